r"""DINO attention maps: the last layer's [CLS] attention per head over test images.

  python -m big_vision_lite.tools.dino_attention --workdir /tmp/dino --out attention.png \
      [--num_images 4 --split test --res 32 --threshold 0.6 --student]

Loads a DINO run (its teacher, the EMA params, as the paper's figures; `--student` for the
student) or a ViT run or import with a class token (`pool_type="tok"`), takes the first
`--num_images` images of `--split` of the run's dataset (`decode|resize(res)|
value_range(-1, 1)`; `res` defaults to the side the model's learned position embedding was
made for, i.e. a DINO run's global crop size), and draws one row per image: the image,
then each head's attention of the [CLS] query over the patches of the last layer (nearest
upsampled, colours from each map's minimum, dark blue, to its maximum, yellow), then each
head's threshold mask (the smallest set of patches holding `--threshold` of that head's
attention mass, as the official visualize_attention.py) as the image with the other patches
dimmed. Prints per head the fraction of patches kept and the attention the [CLS] token pays
to itself.

`cls_attention` and `threshold_mask` are the computations, for notebooks.
"""
import argparse
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite import checkpointing
from big_vision_lite import models
from big_vision_lite.input import data as data_lib
from big_vision_lite.models import dino as dino_model
from big_vision_lite.models import vit
from big_vision_lite.tools import plot

DIM = 0.25  # Brightness of the patches outside a threshold mask.
VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98],
                    [253, 231, 37]]) / 255  # Colour scale anchors, low to high.


def _vit(model: Any) -> tuple[vit.Model, str]:
  """The ViT of `model` (itself, or a DINO model's ViT backbone) and its fields' prefix in
  the config (for errors); a ValueError for any other model, before any compute."""
  if isinstance(model, dino_model.Model):
    if model.backbone_name != "vit":
      raise ValueError(f"Model field 'backbone_name' must be 'vit' for [CLS] attention maps, "
                       f"got {model.backbone_name!r}.")
    return vit.Model(**dict(model.backbone, num_classes=0)), "backbone."
  if isinstance(model, vit.Model):
    return model, ""
  raise ValueError(f"[CLS] attention maps need a ViT or a DINO model with a ViT backbone "
                   f"(model_name 'vit' or 'dino'), got {type(model).__module__}.Model.")


def check_class_token(model: Any) -> None:
  """A ValueError unless `model` is a ViT (or a DINO model with a ViT backbone) that has a
  class token (`pool_type="tok"`)."""
  backbone, prefix = _vit(model)
  if backbone.pool_type != "tok":
    raise ValueError(f"Model field '{prefix}pool_type' must be 'tok' (a [CLS] token, whose "
                     f"attention is drawn), got {backbone.pool_type!r}.")


def cls_attention(variables: Mapping[str, Any], model: Any, images: jax.Array) -> jax.Array:
  """The last layer's attention of the [CLS] query over the patch tokens, per head.

  model: a `vit.Model` or `dino.Model` (ViT backbone) with pool_type "tok"; images
  [B, H, W, 3] -> [B, heads, h, w] (h, w: the patch grid). Over the patches it sums to 1
  minus the [CLS] token's attention to itself.
  """
  check_class_token(model)
  def last_layer(variables, images):
    _, aux = model.apply(variables, images, return_attention=True)
    last = aux["attention"][-1]  # [B, heads, 1 + N, 1 + N]
    b, h, w, _ = aux["stem"].shape  # The patch grid.
    return last[:, :, 0, 1:].reshape(b, last.shape[1], h, w)  # [B, heads, h, w]
  return jax.jit(last_layer)(variables, images)


def threshold_mask(attention: np.ndarray | jax.Array, threshold: float = 0.6) -> np.ndarray:
  """Per map, the smallest set of patches holding `threshold` of its attention mass.

  attention [..., h, w] (non-negative) -> bool [..., h, w]. The official rule: sort each
  map ascending, normalise its cumulative sum by the total, keep the patches where it
  exceeds 1 - threshold. The kept mass is >= threshold and dropping the smallest kept patch
  takes it below; among equal values the later ones in row-major order are kept first.
  """
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold must be in (0, 1], got {threshold!r}.")
  attention = np.asarray(attention, np.float64)
  *lead, h, w = attention.shape
  flat = attention.reshape(*lead, h * w)
  order = np.argsort(flat, axis=-1, kind="stable")  # Ascending.
  ranked = np.take_along_axis(flat, order, axis=-1)
  cumulative = np.cumsum(ranked, axis=-1) / ranked.sum(-1, keepdims=True)
  keep = np.empty(flat.shape, bool)
  np.put_along_axis(keep, order, cumulative > 1.0 - threshold, axis=-1)
  return keep.reshape(attention.shape)


def _colour(values: np.ndarray) -> np.ndarray:
  """values [...] in [0, 1] -> RGB [..., 3] on the VIRIDIS scale."""
  steps = np.linspace(0.0, 1.0, len(VIRIDIS))
  return np.stack([np.interp(values, steps, VIRIDIS[:, c]) for c in range(3)], axis=-1)


def grid_rows(images: np.ndarray, attention: np.ndarray, masks: np.ndarray
              ) -> list[np.ndarray]:
  """images [B, R, R, 3] in [-1, 1], attention and masks [B, heads, h, w] -> per image the
  columns [1 + 2 heads, R, R, 3] in [0, 1]: image, attention per head, mask per head."""
  side = images.shape[1]
  upsample = lambda x: np.repeat(np.repeat(x, side // x.shape[-2], -2), side // x.shape[-1], -1)
  low = attention.min(axis=(-2, -1), keepdims=True)
  spread = attention.max(axis=(-2, -1), keepdims=True) - low
  maps = _colour(upsample((attention - low) / np.maximum(spread, 1e-12)))  # [B, heads, R, R, 3]
  pictures = (images + 1.0) / 2.0  # [B, R, R, 3]
  brightness = DIM + (1.0 - DIM) * upsample(masks.astype(np.float64))  # [B, heads, R, R]
  masked = pictures[:, None] * brightness[..., None]  # [B, heads, R, R, 3]
  return [np.concatenate([pictures[i][None], maps[i], masked[i]]) for i in range(len(images))]


def load_model(workdir: str, student: bool = False) -> tuple[Any, dict[str, Any], str]:
  """(model, variables, model_name) of a DINO run (its teacher unless `student`) or a ViT
  run or import; ValueErrors for other models or one without a class token, before loading."""
  model_name, kwargs = checkpointing.read_run_model(workdir)
  if model_name is None:
    raise ValueError(f"{workdir} holds no config.json (a run) or model.json (an import).")
  if model_name not in ("dino", "vit"):
    raise ValueError(f"Config field 'model_name' must be 'dino' or 'vit' (a ViT with a [CLS] "
                     f"token) for attention maps, got {model_name!r}.")
  model = models.get(model_name).Model(**kwargs)
  check_class_token(model)
  use_ema = model_name == "dino" and not student
  params = checkpointing.load_variables(workdir, use_ema=use_ema)["params"]
  return model, {"params": params}, model_name


def default_res(model: Any, params: Mapping[str, Any]) -> int:
  """The image side of the model's learned position embedding (patch grid side x patch)."""
  backbone, prefix = _vit(model)
  table = (params["backbone"] if prefix else params).get("pos_embedding")
  if table is None:
    raise ValueError(f"Model field '{prefix}posemb' is {backbone.posemb!r}, no learned table "
                     "gives the training resolution: pass --res.")
  return round(np.sqrt(table.shape[1])) * backbone.hparams()["patch_size"][0]


def _dataset(workdir: str, dataset: str | None, split: str) -> dict[str, Any]:
  """The data fields of the run's training set (config field 'input.data') with `split`."""
  path = os.path.join(workdir, "config.json")
  fields: dict[str, Any] = {}
  if os.path.exists(path):
    with open(path) as f:
      fields = dict(json.load(f).get("input", {}).get("data", {}))
  if dataset:
    fields["name"] = dataset
  if not fields.get("name"):
    raise ValueError(f"{workdir} has no config.json naming its dataset (config field "
                     "'input.data.name'): pass --dataset.")
  return dict(fields, split=split)


def draw(workdir: str, out: str, *, num_images: int = 4, split: str = "test",
         res: int | None = None, threshold: float = 0.6, student: bool = False,
         scale: int | None = None, dataset: str | None = None) -> dict[str, np.ndarray]:
  """Writes the PNG grid (see the module docstring) to `out`; returns per image and head
  "attention" [B, heads, h, w], "mask" [B, heads, h, w], and per head "kept_fraction" and
  "cls_self" (the [CLS] token's attention to itself), averaged over the images."""
  if num_images < 1:
    raise ValueError(f"--num_images must be >= 1, got {num_images}.")
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"--threshold must be in (0, 1], got {threshold!r}.")
  data = _dataset(workdir, dataset, split)
  model, variables, _ = load_model(workdir, student)
  res = res or default_res(model, variables["params"])
  patch = _vit(model)[0].hparams()["patch_size"]
  if res % patch[0] or res % patch[1]:
    raise ValueError(f"--res must be a multiple of the patch size {patch}, got {res}.")
  pp = f'decode|resize({res})|value_range(-1, 1)|keep("image")'
  batch = next(data_lib.make_eval_iterator(data, pp, num_images))
  images = np.asarray(batch["image"])[np.asarray(batch["_mask"])]  # [B, res, res, 3]
  attention = np.asarray(cls_attention(variables, model, jnp.asarray(images)))
  masks = threshold_mask(attention, threshold)
  plot.image_grid(grid_rows(images, attention, masks), out, scale=scale or max(1, 128 // res))
  return {"attention": attention, "mask": masks,
          "kept_fraction": masks.mean(axis=(0, 2, 3)),
          "cls_self": 1.0 - attention.sum(axis=(2, 3)).mean(axis=0)}


def main(argv: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """The command line (see the module docstring); prints the per-head numbers."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="DINO or ViT run dir, or a ViT import.")
  parser.add_argument("--out", default="attention.png", help="Where to write the PNG.")
  parser.add_argument("--num_images", type=int, default=4, help="Rows: test images drawn.")
  parser.add_argument("--split", default="test", help="Split of the run's dataset.")
  parser.add_argument("--dataset", default=None, help="Dataset name (default: the run's).")
  parser.add_argument("--res", type=int, default=None,
                      help="Image side (default: the learned position embedding's).")
  parser.add_argument("--threshold", type=float, default=0.6,
                      help="Attention mass each head's mask keeps (the paper's 0.6).")
  parser.add_argument("--student", action="store_true",
                      help="A DINO run's student instead of its teacher (the EMA params).")
  parser.add_argument("--scale", type=int, default=None,
                      help="Pixels per image pixel (default: tiles of about 128 pixels).")
  args = parser.parse_args(argv)
  result = draw(args.workdir, args.out, num_images=args.num_images, split=args.split,
                res=args.res, threshold=args.threshold, student=args.student,
                scale=args.scale, dataset=args.dataset)
  print(f"{'head':>4}  {'kept':>6}  {'cls->cls':>8}   (kept: fraction of patches in the "
        f"{args.threshold:g} mask; cls->cls: [CLS] attention to itself)")
  for head, (kept, own) in enumerate(zip(result["kept_fraction"], result["cls_self"])):
    print(f"{head:>4}  {kept:6.3f}  {own:8.3f}")
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
