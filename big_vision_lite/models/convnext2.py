"""ConvNeXt V2 (Woo et al. 2023): ConvNeXt blocks with Global Response Normalization.

`Model(num_classes=10, variant="atto").apply(variables, images)` -> (logits, aux), images
NHWC float32. Stem: 4x4 conv with stride 4 + LayerNorm; four stages, stages 1-3 opened by
a downsampling layer (LayerNorm + 2x2 conv with stride 2); blocks

  x + drop_path(pwconv2(GRN(GELU(pwconv1(LN(dwconv7x7(x)))))))

with no LayerScale; head: global average pool -> LayerNorm -> Dense. `grn=False` drops
GRN (the feature-collapse baseline). GRN (`grn`, `GRN`):

  GRN(X) = X + γ·(X·N(X)) + β,   N(X)_c = ‖X_c‖₂ / (mean_c' ‖X_c'‖₂ + ε)

with the L2 norm over the spatial positions of each channel, γ and β zero-initialised.

Masked (FCMAE-style) encoding: `mask` [B, h, w, 1] (1 = visible, 0 = masked, at any grid
that divides or is divided by each feature map, see `resize_mask`) zeroes masked
positions after the stem, after every downsampling and depth-wise conv, before the GRN
statistics and at every block output, and the pooling averages visible positions only.
This is the dense equivalent of a sparse (submanifold) convolution: what the model
returns at visible positions does not depend on the pixels under the mask.
The expanded MLP features (the input of `pwconv2`) are sown as "mlp_hidden" in the
"intermediates" collection (`apply(..., mutable=["intermediates"])`) for the
feature-collapse analysis.
"""
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.models import layers

# variant: (depths, dims) as in the paper; "small" (not in the V2 paper) as timm's.
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}
DWCONV_IMPLS = ("auto", "conv", "shifted")
GRN_EPS = 1e-6
KERNEL_INIT = nn.initializers.truncated_normal(0.02)
HEAD_PARAMS = ("head_norm", "head")
LOADS_FROM = ("fcmae",)  # init_from also takes an FCMAE pre-training run (see `load`).


def grn(x: jax.Array, gamma: jax.Array, beta: jax.Array, eps: float = GRN_EPS) -> jax.Array:
  """Global Response Normalization of x [B, H, W, C] with gamma, beta [C].

  A channel that is zero everywhere (e.g. a tanh-GELU saturated on a 2 x 2 map) has norm
  0; the norm's gradient there is 0, as torch.norm's, not sqrt's NaN (0 / 0).
  """
  squares = jnp.sum(jnp.square(x), axis=(1, 2), keepdims=True)  # [B, 1, 1, C]
  nonzero = squares > 0
  norms = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squares, 1)), 0)  # [B, 1, 1, C]
  relative = norms / (jnp.mean(norms, axis=-1, keepdims=True) + eps)  # [B, 1, 1, C]
  return x + gamma * (x * relative) + beta


class GRN(nn.Module):
  """`grn` with learned `gamma` and `beta` [C], both zero-initialised (identity at init)."""
  eps: float = GRN_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C] -> [B, H, W, C]."""
    gamma = self.param("gamma", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    beta = self.param("beta", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    return grn(x, gamma.astype(x.dtype), beta.astype(x.dtype), self.eps)


def depthwise_conv(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
  """"SAME" depth-wise correlation of x [B, H, W, C] with kernel [kh, kw, 1, C] (odd sizes).

  "conv": lax's grouped convolution. "shifted": the sum of kh·kw shifted copies of x times
  their kernel tap, skipping taps that only see padding; the same numbers, and ~10x faster
  on XLA:CPU, whose grouped convolutions (and their gradients) are slow. "auto": "shifted"
  on CPU, "conv" elsewhere.
  """
  kh, kw, _, channels = kernel.shape
  kernel = kernel.astype(x.dtype)
  if impl == "auto":
    impl = "shifted" if jax.default_backend() == "cpu" else "conv"
  if impl == "conv":
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)
  h, w = x.shape[1:3]
  pad_h, pad_w = min(kh // 2, h - 1), min(kw // 2, w - 1)  # Farther taps see only zeros.
  padded = jnp.pad(x, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)))
  out = jnp.zeros_like(x)
  for i in range(2 * pad_h + 1):
    for j in range(2 * pad_w + 1):
      tap = kernel[kh // 2 - pad_h + i, kw // 2 - pad_w + j, 0]  # [C]
      out = out + padded[:, i:i + h, j:j + w] * tap
  return out


class DepthwiseConv(nn.Module):
  """7x7 depth-wise conv with bias; parameters `kernel` [7, 7, 1, C] and `bias` [C] as
  `nn.Conv(C, (7, 7), feature_group_count=C)`."""
  kernel_size: int = 7
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C] -> [B, H, W, C]."""
    channels = x.shape[-1]
    kernel = self.param("kernel", KERNEL_INIT, (self.kernel_size, self.kernel_size, 1, channels),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    return depthwise_conv(x, kernel, self.impl) + bias.astype(x.dtype)


def resize_mask(mask: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """Brings a visibility mask [B, h, w, 1] to the grid hw = (H, W) -> [B, H, W, 1].

  A coarser mask is repeated (nearest upsampling); from a finer one, a position stays
  visible only if every mask cell it covers is visible (min pooling), so a visible
  feature never sees a masked pixel. Each side must divide, or be divided by, the other.
  """
  for axis, target in ((1, hw[0]), (2, hw[1])):
    side = mask.shape[axis]
    if side == target:
      continue
    if target % side == 0:
      mask = jnp.repeat(mask, target // side, axis=axis)
    elif side % target == 0:
      shape = mask.shape[:axis] + (target, side // target) + mask.shape[axis + 1:]
      mask = mask.reshape(shape).min(axis=axis + 1)
    else:
      raise ValueError(f"A mask of {mask.shape[1:3]} cannot be brought to a feature map of "
                       f"{tuple(hw)}: each side must divide or be a multiple of the other.")
  return mask


def apply_mask(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """x [B, H, W, C] with masked positions (mask [B, H, W, 1] == 0) zeroed; x if no mask."""
  return x if mask is None else x * mask.astype(x.dtype)


class Block(nn.Module):
  """ConvNeXt V2 block; with a mask, masked positions of x must be zero (and stay so)."""
  drop_path: float = 0.0
  grn: bool = True
  dwconv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """x [B, H, W, C], mask [B, H, W, 1] or None -> [B, H, W, C]."""
    width = x.shape[-1]
    y = DepthwiseConv(impl=self.dwconv_impl, name="dwconv")(x)  # [B, H, W, C]
    y = apply_mask(y, mask)
    y = nn.LayerNorm(epsilon=layers.FLAX_NORM_EPS, name="norm")(y)
    y = nn.Dense(4 * width, kernel_init=KERNEL_INIT, name="pwconv1")(y)  # [B, H, W, 4C]
    y = nn.gelu(y, approximate=False)
    if self.grn:
      y = GRN(name="grn")(apply_mask(y, mask))
    self.sow("intermediates", "mlp_hidden", y)
    y = nn.Dense(width, kernel_init=KERNEL_INIT, name="pwconv2")(y)  # [B, H, W, C]
    if train and self.drop_path > 0:
      y = layers.stochastic_depth(y, self.drop_path, self.make_rng("dropout"))
    return apply_mask(x + y, mask)


class Model(nn.Module):
  """ConvNeXt V2 classifier; `depths`/`dims` (4 stages each) override the variant's."""
  num_classes: int | None = None
  variant: str = "atto"
  depths: Sequence[int] | None = None
  dims: Sequence[int] | None = None
  drop_path: float = 0.0  # Rising linearly over all blocks from 0.
  grn: bool = True
  head_zeroinit: bool = True
  dwconv_impl: str = "auto"  # See `depthwise_conv`.

  def __post_init__(self):
    layers.check_choice("variant", self.variant, tuple(VARIANTS))
    layers.check_choice("dwconv_impl", self.dwconv_impl, DWCONV_IMPLS)
    for field in ("depths", "dims"):
      value = getattr(self, field)
      if value is not None and (len(value) != 4 or not all(
          isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"Model field {field!r} must be 4 positive ints (one per stage), "
                         f"got {value!r}.")
    if not 0.0 <= self.drop_path < 1.0:
      raise ValueError(f"Model field 'drop_path' must be in [0, 1), got "
                       f"{self.drop_path!r}.")
    if not isinstance(self.grn, bool):
      raise ValueError(f"Model field 'grn' must be True or False, got {self.grn!r}.")
    super().__post_init__()

  def hparams(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(depths, dims) after the overrides."""
    depths, dims = VARIANTS[self.variant]
    return tuple(self.depths or depths), tuple(self.dims or dims)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """images [B, H, W, C], mask [B, h, w, 1] (1 = visible) -> (logits [B, classes], aux).

    aux: "stem" and "stage0".."stage3" feature maps (masked positions zero), "pre_logits"
    [B, dims[-1]] and "logits"; with num_classes 0/None the output is the pre-logits.
    """
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"ConvNeXt V2 expects float NHWC images [B, H, W, C], got "
                       f"{images.dtype} {images.shape}.")
    if images.shape[1] < 32 or images.shape[2] < 32:
      raise ValueError(f"ConvNeXt V2 downsamples by 32; images {images.shape[1:3]} are "
                       "smaller than 32x32.")
    if mask is not None and (mask.ndim != 4 or mask.shape[-1] != 1
                             or mask.shape[0] != images.shape[0]):
      raise ValueError(f"mask must be [B, h, w, 1] with the images' batch "
                       f"{images.shape[0]}, got {mask.shape}.")
    depths, dims = self.hparams()
    masks_at = lambda x: None if mask is None else resize_mask(mask, x.shape[1:3])
    aux: dict[str, Any] = {}
    x = nn.Conv(dims[0], (4, 4), strides=4, padding="VALID", kernel_init=KERNEL_INIT,
                name="stem_conv")(images)  # [B, H/4, W/4, D0]
    x = nn.LayerNorm(epsilon=layers.FLAX_NORM_EPS, name="stem_norm")(x)
    x_mask = masks_at(x)
    x = aux["stem"] = apply_mask(x, x_mask)
    rates = layers.drop_path_rates(self.drop_path, sum(depths))
    for stage, (depth, width) in enumerate(zip(depths, dims)):
      if stage > 0:
        x = nn.LayerNorm(epsilon=layers.FLAX_NORM_EPS, name=f"downsample{stage}_norm")(x)
        x = nn.Conv(width, (2, 2), strides=2, padding="VALID", kernel_init=KERNEL_INIT,
                    name=f"downsample{stage}_conv")(x)  # [B, H', W', width]
        x_mask = masks_at(x)
        x = apply_mask(x, x_mask)
      for i in range(depth):
        x = Block(rates.pop(0), self.grn, self.dwconv_impl, name=f"stage{stage}_block{i}")(
            x, x_mask, train)
      aux[f"stage{stage}"] = x
    if x_mask is None:
      x = x.mean(axis=(1, 2))  # [B, D]
    else:
      visible = x_mask.astype(x.dtype).sum(axis=(1, 2))  # [B, 1]
      x = x.sum(axis=(1, 2)) / jnp.maximum(visible, 1.0)  # [B, D]
    x = nn.LayerNorm(epsilon=layers.FLAX_NORM_EPS, name="head_norm")(x)
    aux["pre_logits"] = x
    if self.num_classes:
      init = nn.initializers.zeros if self.head_zeroinit else KERNEL_INIT
      x = nn.Dense(self.num_classes, kernel_init=init, name="head")(x)  # [B, classes]
    aux["logits"] = x
    return x, aux


def load(init_params: Mapping[str, Any], loaded_params: Mapping[str, Any],
         model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """Adapts an FCMAE checkpoint to this classifier: its `encoder/` params, with `head_norm`
  and `head` from `init_params` (pre-training never trains them); others pass through."""
  del model_kwargs
  if "encoder" not in loaded_params:
    return dict(loaded_params)
  params = {k: v for k, v in loaded_params["encoder"].items() if k not in HEAD_PARAMS}
  params.update({k: v for k, v in init_params.items() if k in HEAD_PARAMS})
  return params
