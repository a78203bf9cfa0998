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
  if images.ndim != 4 or images.shape[1] % fcmae.PATCH or images.shape[2] % fcmae.PATCH:
    raise ValueError(f"FCMAE needs images [B, H, W, C] with H and W multiples of "
                     f"{fcmae.PATCH} (pp resize), got {images.shape}.")
  grid = (images.shape[1] // fcmae.PATCH, images.shape[2] // fcmae.PATCH)
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
    if config.get("model_name") != "fcmae":
      raise ValueError(f"Config field 'model_name' must be 'fcmae' for the fcmae task, got "
                       f"{config.get('model_name')!r}.")
    options(config)

  def reconstruct(self, params: Any, extra: dict[str, Any], images: jax.Array,
                  mask_rng: jax.Array, rng: jax.Array | None, train: bool
                  ) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, Any]]:
    """(pred, normalised targets [B, h, w, 32·32·C], visible [B, h, w, 1], new extra)."""
    mask_ratio, norm_pix = options(self.config)
    visible = fcmae.random_mask(mask_rng, images.shape[0], image_grid(images, mask_ratio),
                                mask_ratio)
    pred, _, new_extra = self.apply(params, extra, images, rng, train, mask=visible)
    return pred.astype(jnp.float32), fcmae.patch_targets(images, norm_pix), visible, new_extra

  def loss(self, params: Any, extra: dict[str, Any], batch: dict[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, Any]]]:
    if "image" not in batch:
      raise ValueError(f"The fcmae task needs batch key 'image'; the batch has {sorted(batch)} "
                       "(config field 'input.pp' must keep it).")
    mask_rng, dropout_rng = jax.random.split(rng)
    pred, target, visible, new_extra = self.reconstruct(params, extra, batch["image"],
                                                        mask_rng, dropout_rng, True)
    loss = fcmae.masked_mse(pred, target, visible)
    return loss, ({"loss": loss, "visible_fraction": visible.mean()}, new_extra)

  def predict(self, variables: dict[str, Any], batch: dict[str, jax.Array]
              ) -> dict[str, jax.Array]:
    """Reconstructions under fixed masks: pred, target [B, h, w, 32·32·C], visible."""
    params = variables["params"]
    extra = {k: v for k, v in variables.items() if k != "params"}
    pred, target, visible, _ = self.reconstruct(
        params, extra, batch["image"], jax.random.key(PREDICT_SEED), None, False)
    return {"pred": pred, "target": target, "visible": visible}
