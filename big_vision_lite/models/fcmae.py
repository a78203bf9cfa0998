"""FCMAE (Woo et al. 2023): ConvNeXt V2's fully convolutional masked autoencoder.

`Model(variant="atto").apply(variables, images, mask=visible)` -> (pred, aux): the
`encoder` is a headless `convnext2.Model` run on the visible pixels only (its dense
masked path: masked positions are zeroed after every spatial op, so visible outputs never
see masked pixels), on images whose sides are multiples of PATCH = 32, the encoder's total
stride, so one mask cell is one position of its last feature map. The decoder projects
those features to `decoder_dim` (`decoder_proj`), fills the masked positions with a
learned `mask_token`, runs `decoder_depth` ConvNeXt V2 blocks (`decoder_block{i}`) and
predicts each cell's PATCH x PATCH x C pixels (`decoder_pred`): pred [B, H/32, W/32,
32·32·C], laid out as `layers.patchify`.

The FCMAE task (`tasks/fcmae.py`) draws the mask (`random_mask`) and takes the MSE on the
masked cells of per-patch normalised pixels (`patch_targets`, `masked_mse`). The encoder's
params are a convnext2 model's under `encoder/`, so `convnext2.load` fine-tunes from an
FCMAE run (`configs/convnext2.py --config.init_from=FCMAE_WORKDIR`).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.models import convnext2
from big_vision_lite.models import layers

PATCH = 32  # Stem 4 x three 2x downsamplings: one mask cell per last-stage position.


def random_mask(rng: jax.Array, batch: int, grid: tuple[int, int], mask_ratio: float
                ) -> jax.Array:
  """Visibility [B, h, w, 1] (1 = visible): per image, int(h·w·(1 − ratio)) cells kept."""
  cells = grid[0] * grid[1]
  keep = int(cells * (1 - mask_ratio))
  noise = jax.random.uniform(rng, (batch, cells))
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)  # [B, h·w], a permutation each
  return (ranks < keep).astype(jnp.float32).reshape(batch, *grid, 1)


def patch_stats(patches: jax.Array, eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """Each patch's pixel mean and sqrt(variance + eps): patches [..., P] -> 2 x [..., 1]."""
  return patches.mean(-1, keepdims=True), jnp.sqrt(patches.var(-1, keepdims=True) + eps)


def patch_targets(images: jax.Array, normalise: bool = True) -> jax.Array:
  """Reconstruction targets [B, h, w, p·p·C]; with `normalise`, each patch's pixels
  standardised by its `patch_stats`."""
  target = layers.patchify(images.astype(jnp.float32), PATCH)
  if not normalise:
    return target
  mean, std = patch_stats(target)
  return (target - mean) / std


def pixel_mask(visible: jax.Array, channels: int, patch: int = PATCH) -> jax.Array:
  """Cell visibility [B, h, w, 1] -> pixel visibility [B, h·p, w·p, C]."""
  cells = jnp.broadcast_to(visible, visible.shape[:3] + (patch * patch * channels,))
  return layers.unpatchify(cells, channels, patch)


def mask_grid(shape: tuple[int, ...]) -> tuple[int, int]:
  """The (h, w) grid of mask cells of an image batch shape [B, H, W, C], checked."""
  if len(shape) != 4 or shape[1] % PATCH or shape[2] % PATCH:
    raise ValueError(f"FCMAE needs images [B, H, W, C] with H and W multiples of {PATCH} "
                     f"(pp resize), got {tuple(shape)}.")
  return shape[1] // PATCH, shape[2] // PATCH


def masked_mse(pred: jax.Array, target: jax.Array, visible: jax.Array) -> jax.Array:
  """Mean over masked cells of each cell's mean squared error; pred/target [B, h, w, P],
  visible [B, h, w, 1]."""
  per_cell = ((pred.astype(jnp.float32) - target) ** 2).mean(-1)  # [B, h, w]
  masked = 1.0 - visible[..., 0]
  return (per_cell * masked).sum() / jnp.maximum(masked.sum(), 1.0)


class Model(nn.Module):
  """ConvNeXt V2 encoder (fields as `convnext2.Model`) + the FCMAE decoder."""
  variant: str = "atto"
  depths: Sequence[int] | None = None
  dims: Sequence[int] | None = None
  drop_path: float = 0.0
  grn: bool = True
  dwconv_impl: str = "auto"
  decoder_dim: int = 512
  decoder_depth: int = 1

  def __post_init__(self):
    for field in ("decoder_dim", "decoder_depth"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Model field {field!r} must be an int >= 1, got {value!r}.")
    super().__post_init__()

  def encoder_kwargs(self) -> dict[str, Any]:
    """The `convnext2.Model` fields of the encoder."""
    return dict(variant=self.variant, depths=self.depths, dims=self.dims,
                drop_path=self.drop_path, grn=self.grn, dwconv_impl=self.dwconv_impl,
                num_classes=0)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """images [B, H, W, C] (H, W multiples of 32), mask [B, H/32, W/32, 1] (1 = visible;
    None: all visible) -> (pred [B, H/32, W/32, 32·32·C], aux with "features")."""
    grid = mask_grid(images.shape)
    if mask is not None and mask.shape != (images.shape[0], *grid, 1):
      raise ValueError(f"FCMAE mask must be [B, H/{PATCH}, W/{PATCH}, 1] = "
                       f"{(images.shape[0], *grid, 1)}, got {mask.shape}.")
    encoder = convnext2.Model(**self.encoder_kwargs(), name="encoder")
    _, encoder_aux = encoder(images, train=train, mask=mask)
    x = encoder_aux["stage3"]  # [B, h, w, D], zero at masked cells
    x = nn.Dense(self.decoder_dim, kernel_init=convnext2.KERNEL_INIT, name="decoder_proj")(x)
    token = self.param("mask_token", nn.initializers.normal(0.02), (self.decoder_dim,))
    if mask is not None:
      visible = mask.astype(x.dtype)
      x = x * visible + token.astype(x.dtype) * (1 - visible)  # [B, h, w, decoder_dim]
    for i in range(self.decoder_depth):
      x = convnext2.Block(0.0, True, self.dwconv_impl, name=f"decoder_block{i}")(x, None, train)
    pred = nn.Dense(PATCH * PATCH * images.shape[-1], kernel_init=convnext2.KERNEL_INIT,
                    name="decoder_pred")(x)  # [B, h, w, 32·32·C]
    return pred, {"features": encoder_aux["stage3"]}
