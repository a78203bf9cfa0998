"""FCMAE pre-training (ConvNeXt V2): reconstruct randomly masked 32 x 32 patches.

Config: `model_name = "fcmae"` (`models/fcmae.py`) and `fcmae = dict(mask_ratio=0.6,
norm_pix_loss=True)`. Each step draws, per image, a random set of int(cells · (1 −
mask_ratio)) visible 32 x 32 cells; the loss is the MSE over the masked cells of the
(per-patch normalised, with norm_pix_loss) pixels.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from big_vision_lite.models import fcmae
from big_vision_lite.tasks import REGISTRY
from big_vision_lite.tasks import base
from big_vision_lite.tasks.base import Task

PREDICT_SEED = 0  # Masks of `predict`: fixed, so evaluations and pictures repeat.


def options(config: ml_collections.ConfigDict) -> tuple[float, bool]:
  """(mask_ratio, norm_pix_loss) of the config's `fcmae` field, checked."""
  fields = dict(config.get("fcmae") or {})
  unknown = set(fields) - {"mask_ratio", "norm_pix_loss"}
  if unknown:
    raise ValueError(f"Config field 'fcmae' takes mask_ratio and norm_pix_loss, got "
                     f"{sorted(unknown)}.")
  ratio = fields.get("mask_ratio", 0.6)
  if not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
    raise ValueError(f"Config field 'fcmae.mask_ratio' must be in (0, 1), got {ratio!r}.")
  norm = fields.get("norm_pix_loss", True)
  if not isinstance(norm, bool):
    raise ValueError(f"Config field 'fcmae.norm_pix_loss' must be true or false, got {norm!r}.")
  return float(ratio), norm


def image_grid(images: jax.Array, mask_ratio: float) -> tuple[int, int]:
  """The (h, w) mask grid of a batch, checked to leave >= 1 visible and >= 1 masked cell."""
  grid = fcmae.mask_grid(images.shape)
  keep = int(grid[0] * grid[1] * (1 - mask_ratio))
  if not 0 < keep < grid[0] * grid[1]:
    raise ValueError(f"Config field 'fcmae.mask_ratio' {mask_ratio} on a {grid[0]}x{grid[1]} "
                     f"grid of {fcmae.PATCH}-pixel cells keeps {keep} visible: use larger "
                     "images or another ratio so some cells are kept and some masked.")
  return grid


@REGISTRY.register("fcmae")
class FCMAE(Task):
  """Masked image modelling on a ConvNeXt V2 encoder; batches need only "image"."""

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    base.require_model_name(config, "fcmae")
    options(config)

  def random_mask(self, images: jax.Array, rng: jax.Array) -> jax.Array:
    """Visibility [B, h, w, 1] of a batch of images under the config's mask_ratio."""
    mask_ratio, _ = options(self.config)
    return fcmae.random_mask(rng, images.shape[0], image_grid(images, mask_ratio), mask_ratio)

  def targets(self, images: jax.Array) -> jax.Array:
    """Reconstruction targets [B, h, w, 32·32·C] under the config's norm_pix_loss."""
    return fcmae.patch_targets(images, options(self.config)[1])

  def loss(self, params: Any, extra: dict[str, Any], batch: dict[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, Any]]]:
    if "image" not in batch:
      raise ValueError(f"The fcmae task needs batch key 'image'; the batch has {sorted(batch)} "
                       "(config field 'input.pp' must keep it).")
    mask_rng, dropout_rng = jax.random.split(rng)
    visible = self.random_mask(batch["image"], mask_rng)
    pred, _, new_extra = self.apply(params, extra, batch["image"], dropout_rng, True,
                                    mask=visible)
    loss = fcmae.masked_mse(pred, self.targets(batch["image"]), visible)
    return loss, ({"loss": loss, "visible_fraction": visible.mean()}, new_extra)

  def predict(self, variables: dict[str, Any], batch: dict[str, jax.Array]
              ) -> dict[str, jax.Array]:
    """Reconstructions under fixed masks: pred, target [B, h, w, 32·32·C], visible."""
    visible = self.random_mask(batch["image"], jax.random.key(PREDICT_SEED))
    pred, _ = self.apply_eval(variables, batch["image"], mask=visible)
    return {"pred": pred.astype(jnp.float32), "target": self.targets(batch["image"]),
            "visible": visible}
