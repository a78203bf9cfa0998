r"""Feature collapse (ConvNeXt V2, Fig. 3): mean pairwise cosine distance between channels.

  python -m big_vision_lite.tools.feature_collapse \
      --workdirs /tmp/fcmae,/tmp/fcmae_nogrn --labels grn,no_grn --out collapse.png

For each ConvNeXt block, the expanded MLP features X [H, W, C] (the input of `pwconv2`,
sown as "mlp_hidden") of an image give C channel vectors over the H·W positions; the
block's value is (1 / C²) Σ_i Σ_j (1 − cos(X_i, X_j)) / 2, averaged over images. Values
near 0 mean the channels are alike ("collapsed"; the paper finds this in FCMAE
pre-trained ConvNeXt V1, i.e. without GRN), larger means diverse channels.
Models come from run or import dirs of `convnext2` or `fcmae` (its encoder) models, or,
without --workdirs, freshly initialised --variant models with and without GRN. Prints one
row per block and draws one curve per model into --out (PNG).
"""
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from big_vision_lite import checkpointing
from big_vision_lite import models
from big_vision_lite import utils
from big_vision_lite.input import data as data_lib
from big_vision_lite.tools import plot

BLOCK = re.compile(r"(?:.*/)?stage(\d+)_block(\d+)/mlp_hidden")


def channel_distance(features: jax.Array) -> jax.Array:
  """features [B, H, W, C] -> [B]: (1/C²) Σ_ij (1 − cos(channel i, channel j)) / 2."""
  b, h, w, c = features.shape
  x = features.astype(jnp.float32).reshape(b, h * w, c)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # unit channels
  cos = jnp.einsum("bpi,bpj->bij", x, x)  # [B, C, C]
  return ((1.0 - cos) / 2.0).mean(axis=(1, 2))


def block_features(model: Any, variables: dict[str, Any], images: jax.Array
                   ) -> dict[str, jax.Array]:
  """The encoder blocks' "mlp_hidden" features in stage/block order: name -> [B, H, W, 4C]."""
  _, state = model.apply(variables, images, mutable=["intermediates"])
  found = {}
  for name, value in utils.flatten_names(state["intermediates"]).items():
    match = BLOCK.fullmatch(name.removesuffix("/0"))
    if match:
      found[(int(match[1]), int(match[2]))] = (name.removesuffix("/mlp_hidden/0"), value)
  return {name: value for _, (name, value) in sorted(found.items())}


def per_block_distance(model: Any, variables: dict[str, Any], images: jax.Array
                       ) -> dict[str, float]:
  """Mean channel cosine distance of each encoder block."""
  return {name: float(channel_distance(x).mean())
          for name, x in block_features(model, variables, images).items()}


def _model(workdir: str) -> tuple[Any, dict[str, Any]]:
  name, kwargs = checkpointing.read_run_model(workdir)
  if name not in ("convnext2", "fcmae"):
    raise ValueError(f"--workdirs: {workdir} holds model_name={name!r}; feature_collapse "
                     "takes convnext2 or fcmae runs.")
  return models.get(name).Model(**kwargs), checkpointing.load_variables(workdir)


def compare(runs: dict[str, tuple[Any, dict[str, Any]]], images: jax.Array, out: str
            ) -> dict[str, dict[str, float]]:
  """Per-block distances of each (model, variables); prints the table and draws `out`."""
  curves = {label: per_block_distance(model, variables, images)
            for label, (model, variables) in runs.items()}
  blocks = max(curves.values(), key=len)
  print(f"{'block':>16}  " + "  ".join(f"{label:>14}" for label in curves))
  for block in blocks:
    cells = [f"{c[block]:14.4f}" if block in c else " " * 14 for c in curves.values()]
    print(f"{block:>16}  " + "  ".join(cells))
  print(f"{'mean':>16}  " + "  ".join(f"{np.mean(list(c.values())):14.4f}"
                                      for c in curves.values()))
  plot.line_plot({label: list(c.values()) for label, c in curves.items()}, out,
                 title="mean pairwise cosine distance between channels",
                 xlabel="block (stage by stage)", y_range=(0.0, 0.5))
  print(f"wrote {out}")
  return curves


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  if f.labels and len(f.labels) != len(f.workdirs):
    raise ValueError(f"--labels needs one label per --workdirs entry ({len(f.workdirs)}), "
                     f"got {len(f.labels)}.")
  pp = f'decode|resize({f.res})|value_range(-1, 1)|keep("image")'
  batch = next(data_lib.make_eval_iterator(dict(name=f.dataset, split=f.split), pp, f.images))
  images = jnp.asarray(batch["image"])
  if f.workdirs:
    labels = f.labels or [w.rstrip("/").split("/")[-1] for w in f.workdirs]
    runs = {label: _model(w) for label, w in zip(labels, f.workdirs)}
  else:
    runs = {}
    for label, grn in (("grn (fresh)", True), ("no grn (fresh)", False)):
      model = models.get("convnext2").Model(num_classes=10, variant=f.variant, grn=grn)
      runs[label] = (model, model.init(jax.random.key(0), images))
  compare(runs, images, f.out)


if __name__ == "__main__":
  flags.DEFINE_list("workdirs", [], "Run or import dirs of convnext2 / fcmae models.")
  flags.DEFINE_list("labels", [], "A label per workdir (default: the dir names).")
  flags.DEFINE_string("variant", "atto", "Variant of the fresh models (without --workdirs).")
  flags.DEFINE_integer("res", 64, "Image side.")
  flags.DEFINE_integer("images", 32, "Test images of --dataset to average over.")
  flags.DEFINE_string("dataset", "shapes", "tfds name of the images.")
  flags.DEFINE_string("split", "test", "Split of the images.")
  flags.DEFINE_string("out", "feature_collapse.png", "Where to write the plot.")
  app.run(main)
