r"""Attention collapse: similarity of each layer's attention maps to the next layer's.

  python -m big_vision_lite.tools.attention_collapse --vit_workdir /tmp/vit12 \
      --deepvit_workdir /tmp/deepvit12 --out /tmp/collapse.png

DeepViT's diagnostic: for layer l, the similarity between the attention map rows of
layer l and layer l + 1 (per image, head and query token), averaged. Values near 1 in the
deep layers mean the layers attend alike ("collapse"). The maps are those that multiply V
(softmax for ViT, head-mixed and head-normalised for DeepViT, which are not probabilities),
so the similarity is the correlation of the rows (cosine after removing each row's mean).
Models come from run workdirs (`configs/vit.py --config.model.depth=12`,
`configs/deepvit.py:depth=12`, ...) or, without them, are freshly initialised with
--depth/--width/--heads/--patch (untrained: both curves near 0). Prints one row per
layer and draws both curves into --out (PNG).
"""
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from big_vision_lite import checkpointing
from big_vision_lite import models
from big_vision_lite.input import data as data_lib
from big_vision_lite.tools import plot

flags.DEFINE_string("vit_workdir", None, "Run or import dir of a ViT (else a fresh one).")
flags.DEFINE_string("deepvit_workdir", None, "Run dir of a DeepViT (else a fresh one).")
flags.DEFINE_integer("depth", 12, "Depth of fresh models.")
flags.DEFINE_integer("width", 96, "Width of fresh models.")
flags.DEFINE_integer("heads", 4, "Heads of fresh models.")
flags.DEFINE_integer("patch", 4, "Patch size of fresh models.")
flags.DEFINE_integer("res", 32, "Image side.")
flags.DEFINE_integer("images", 32, "Test images of the 'shapes' dataset to average over.")
flags.DEFINE_string("out", "attention_collapse.png", "Where to write the plot.")


def layer_similarity(maps: Sequence[jax.Array]) -> np.ndarray:
  """maps: per layer [B, H, N, N] -> [layers - 1] mean row correlation of layer l vs l + 1."""
  sims = []
  for a, b in zip(maps, maps[1:]):
    a, b = (m.astype(jnp.float32) - m.astype(jnp.float32).mean(-1, keepdims=True)
            for m in (a, b))
    cos = (a * b).sum(-1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-9)
    sims.append(float(cos.mean()))
  return np.asarray(sims)


def _model(name: str, workdir: str | None, images: jax.Array) -> tuple[Any, dict[str, Any]]:
  if workdir:
    recorded, kwargs = checkpointing.read_run_model(workdir)
    if recorded != name:
      raise ValueError(f"{workdir} holds model_name={recorded!r}, expected {name!r}.")
    model = models.get(name).Model(**kwargs)
    return model, {"params": checkpointing.load_params(workdir)}
  f = flags.FLAGS
  model = models.get(name).Model(num_classes=10, width=f.width, depth=f.depth,
                                 num_heads=f.heads, patch_size=(f.patch, f.patch))
  return model, model.init(jax.random.key(0), images)


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  pp = f'decode|resize({f.res})|value_range(-1, 1)|keep("image")'
  batch = next(data_lib.make_eval_iterator(dict(name="shapes", split="test"), pp, f.images))
  images = jnp.asarray(batch["image"])
  curves = {}
  for name, workdir in (("vit", f.vit_workdir), ("deepvit", f.deepvit_workdir)):
    model, variables = _model(name, workdir, images)
    _, aux = model.apply(variables, images, return_attention=True)
    curves[name] = layer_similarity(aux["attention"])
  print(f"{'layer':>5}  " + "  ".join(f"{name:>8}" for name in curves))
  for layer in range(max(len(c) for c in curves.values())):
    cells = [f"{c[layer]:8.3f}" if layer < len(c) else " " * 8 for c in curves.values()]
    print(f"{layer:>5}  " + "  ".join(cells))
  plot.line_plot(curves, f.out, title="attention similarity of adjacent layers",
                  xlabel="layer l (vs l + 1)")
  print(f"wrote {f.out}")


if __name__ == "__main__":
  app.run(main)
