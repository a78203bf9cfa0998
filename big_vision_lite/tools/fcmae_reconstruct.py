r"""FCMAE reconstructions: original / masked / reconstructed images of a pre-training run.

  python -m big_vision_lite.tools.fcmae_reconstruct --run_dir /tmp/fcmae --out recon.png

Draws --images test images with a random mask (--seed, the run's mask_ratio) into one PNG
of three rows: the originals, the visible cells (masked cells black) and the model's
prediction in the masked cells pasted beside the visible pixels. With norm_pix_loss the
model predicts per-patch normalised pixels; they are brought back with each original
patch's mean and standard deviation (the usual MAE visualisation).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from big_vision_lite import checkpointing
from big_vision_lite.input import data as data_lib
from big_vision_lite.models import fcmae
from big_vision_lite.models import layers
from big_vision_lite.tools import plot


def run_config(workdir: str) -> dict:
  """The run's config.json as a dict."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"--run_dir: {workdir} has no config.json (not a train run dir).")
  with open(path) as f:
    return json.load(f)


def reconstruct(model: fcmae.Model, variables: dict, images: jax.Array, visible: jax.Array,
                norm_pix_loss: bool) -> jax.Array:
  """images [B, H, W, C] in [-1, 1] -> the visible pixels plus the predicted masked cells."""
  pred, _ = model.apply(variables, images, mask=visible)  # [B, h, w, 32·32·C]
  patches = layers.patchify(images, fcmae.PATCH)
  if norm_pix_loss:
    mean, std = fcmae.patch_stats(patches)
    pred = pred * std + mean
  merged = jnp.where(visible > 0, patches, pred)
  return layers.unpatchify(merged, images.shape[-1], fcmae.PATCH)


def write_picture(run_dir: str, out: str, num_images: int = 8, res: int = 64, seed: int = 0,
                  scale: int = 2, split: str = "test") -> float:
  """Writes the PNG of `num_images` reconstructions; returns their mean squared error."""
  name, kwargs = checkpointing.read_run_model(run_dir)
  if name != "fcmae":
    raise ValueError(f"--run_dir: {run_dir} holds model_name={name!r}, not an fcmae run.")
  if res % fcmae.PATCH:
    raise ValueError(f"--res must be a multiple of {fcmae.PATCH}, got {res}.")
  config = run_config(run_dir)
  options = config.get("fcmae") or {}
  model = fcmae.Model(**kwargs)
  variables = checkpointing.load_variables(run_dir)
  data = dict(config["input"]["data"], split=split)
  pp = f'decode|resize({res})|value_range(-1, 1)|keep("image")'
  images = jnp.asarray(next(data_lib.make_eval_iterator(data, pp, num_images))["image"])
  grid = (res // fcmae.PATCH, res // fcmae.PATCH)
  visible = fcmae.random_mask(jax.random.key(seed), num_images, grid,
                              options.get("mask_ratio", 0.6))
  recon = reconstruct(model, variables, images, visible, options.get("norm_pix_loss", True))
  masked = jnp.where(fcmae.pixel_mask(visible, images.shape[-1]) > 0, images, -1.0)
  to_unit = lambda x: np.asarray((x + 1.0) / 2.0)
  plot.image_grid([to_unit(images), to_unit(masked), to_unit(recon)], out, scale=scale)
  error = float(((recon - images) ** 2).mean())
  print(f"wrote {out}: {num_images} images at {res}px, {int(np.asarray(visible).sum())} of "
        f"{visible.size} cells visible; mean squared error of the reconstruction {error:.4f}")
  return error


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  write_picture(f.run_dir, f.out, f.images, f.res, f.seed, f.scale, f.split)


if __name__ == "__main__":
  flags.DEFINE_string("run_dir", None, "FCMAE run dir: the --workdir of configs/fcmae.py.")
  flags.DEFINE_integer("images", 8, "Test images to draw.")
  flags.DEFINE_integer("res", 64, "Image side, a multiple of 32 (the model is convolutional).")
  flags.DEFINE_integer("seed", 0, "Seed of the masks.")
  flags.DEFINE_integer("scale", 2, "Pixels per image pixel in the PNG.")
  flags.DEFINE_string("split", "test", "Split of the run's dataset to draw from.")
  flags.DEFINE_string("out", "fcmae_reconstruction.png", "Where to write the PNG.")
  flags.mark_flag_as_required("run_dir")
  app.run(main)
