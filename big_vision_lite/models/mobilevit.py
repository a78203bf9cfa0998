"""MobileViT v1 (Mehta & Rastegari 2022): MobileNetV2 blocks and MobileViT blocks, as timm.

`Model(num_classes=10, variant="XXS").apply(variables, images, train=False)` -> (logits, aux),
images NHWC float32, BatchNorm statistics in the "batch_stats" collection. The network is a
stride-2 3x3 stem and five stages (strides 1, 2, 2, 2, 2) of MobileNetV2 inverted-residual
(MV2) blocks; stages 3-5 end with a MobileViT block:

  local:   n x n conv (BN, SiLU) -> 1x1 conv to the transformer width D
  global:  unfold into p x p patches, [B, H, W, D] -> [B, P = p*p, N = H*W / P, D]; a
           transformer across the N patches at each of the P pixel positions; fold back
  fusion:  1x1 conv (BN, SiLU) to C, concat with the block input, n x n conv (BN, SiLU)

then a 1x1 conv, global average pooling and the classifier. A feature map whose side is not
a multiple of p is resized (bilinear) up to one for the transformer and back, as in timm.

The pieces shared with MobileViT v2 (`mobilevit2.py`) live here: `conv_bn`,
`InvertedResidual`, `unfold_patches` / `fold_patches`, `resize_bilinear`,
`resolve_architecture` and `classifier_head`; `layers` holds the conv, BatchNorm and
`make_divisible` both share with other models.
"""
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models import layers

# The paper's Table 4 / timm's byobnet configs. Stage widths are each stage's output
# channels; MobileViT blocks sit in stages 3-5 with the given transformer widths and depths.
VARIANTS: dict[str, dict[str, Any]] = {
    "XXS": dict(stem_width=16, widths=(16, 24, 48, 64, 80), mv2_depths=(1, 3, 1, 1, 1),
                expansion=2.0, transformer_widths=(64, 80, 96), transformer_depths=(2, 4, 3),
                final_width=320),
    "XS": dict(stem_width=16, widths=(32, 48, 64, 80, 96), mv2_depths=(1, 3, 1, 1, 1),
               expansion=4.0, transformer_widths=(96, 120, 144), transformer_depths=(2, 4, 3),
               final_width=384),
    "S": dict(stem_width=16, widths=(32, 64, 96, 128, 160), mv2_depths=(1, 3, 1, 1, 1),
              expansion=4.0, transformer_widths=(144, 192, 240), transformer_depths=(2, 4, 3),
              final_width=640),
}
STRIDES = (1, 2, 2, 2, 2)  # Per stage; MobileViT blocks in the last len(transformer_widths).
ARCHITECTURE_FIELDS = ("stem_width", "widths", "mv2_depths", "expansion",
                       "transformer_widths", "transformer_depths", "final_width")


def resolve_architecture(variants: Mapping[str, Mapping[str, Any]], variant: str | None,
                         overrides: Mapping[str, Any]) -> dict[str, Any]:
  """The variant's architecture fields with every non-None override applied; checked."""
  if variant is not None:
    layers.check_choice("variant", variant, list(variants))
  hp = dict(variants[variant]) if variant is not None else {}
  hp.update({k: v for k, v in overrides.items() if v is not None})
  missing = [f for f in ARCHITECTURE_FIELDS if f not in hp]
  if missing:
    raise ValueError(f"Model field 'variant' is None, so {', '.join(missing)} must be given "
                     f"(or pick a variant: {', '.join(variants)}).")
  for field, length in (("widths", len(STRIDES)), ("mv2_depths", len(STRIDES)),
                        ("transformer_widths", None), ("transformer_depths", None)):
    value = hp[field]
    if (not isinstance(value, (tuple, list)) or not value
        or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value)):
      raise ValueError(f"Model field {field!r} must be a tuple of positive ints, got {value!r}.")
    hp[field] = tuple(value)
  for field in ("widths", "mv2_depths"):
    if len(hp[field]) != len(STRIDES):
      raise ValueError(f"Model field {field!r} needs one entry per stage ({len(STRIDES)}), "
                       f"got {hp[field]!r}.")
  if not 1 <= len(hp["transformer_widths"]) <= len(STRIDES):
    raise ValueError(f"Model field 'transformer_widths' needs 1 to {len(STRIDES)} entries, "
                     f"got {hp['transformer_widths']!r}.")
  if len(hp["transformer_depths"]) != len(hp["transformer_widths"]):
    raise ValueError("Model fields 'transformer_depths' and 'transformer_widths' must have "
                     f"one entry per MobileViT block, got {hp['transformer_depths']!r} and "
                     f"{hp['transformer_widths']!r}.")
  for field in ("stem_width", "final_width"):
    if isinstance(hp[field], bool) or not isinstance(hp[field], int) or hp[field] < 0:
      raise ValueError(f"Model field {field!r} must be an int >= 0, got {hp[field]!r}.")
  if not hp["expansion"] > 0:
    raise ValueError(f"Model field 'expansion' must be > 0, got {hp['expansion']!r}.")
  return hp


def check_common_fields(patch_size: int, mlp_ratio: float, dropout: float,
                        drop_path: float) -> None:
  """Checks the fields MobileViT v1 and v2 share."""
  if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
    raise ValueError(f"Model field 'patch_size' must be an int >= 1, got {patch_size!r}.")
  if not mlp_ratio > 0:
    raise ValueError(f"Model field 'mlp_ratio' must be > 0, got {mlp_ratio!r}.")
  for field, rate in (("dropout", dropout), ("drop_path", drop_path)):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"Model field {field!r} must be in [0, 1), got {rate!r}.")


def _interpolation_matrix(size_in: int, size_out: int, align_corners: bool) -> np.ndarray:
  """[size_out, size_in] weights of PyTorch's bilinear `interpolate` along one axis."""
  dst = np.arange(size_out, dtype=np.float64)
  if align_corners:
    src = dst * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
  else:
    src = np.maximum((dst + 0.5) * size_in / size_out - 0.5, 0.0)
  low = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
  high = np.minimum(low + 1, size_in - 1)
  frac = src - low
  matrix = np.zeros((size_out, size_in), np.float64)
  np.add.at(matrix, (np.arange(size_out), low), 1.0 - frac)
  np.add.at(matrix, (np.arange(size_out), high), frac)
  return matrix.astype(np.float32)


def resize_bilinear(x: jax.Array, size: tuple[int, int], align_corners: bool) -> jax.Array:
  """[B, H, W, C] -> [B, h, w, C], bilinear without antialiasing as torch's `interpolate`."""
  rows = _interpolation_matrix(x.shape[1], size[0], align_corners)  # [h, H]
  cols = _interpolation_matrix(x.shape[2], size[1], align_corners)  # [w, W]
  x = jnp.einsum("oh,bhwc->bowc", rows.astype(x.dtype), x, precision="highest")
  return jnp.einsum("pw,bowc->bopc", cols.astype(x.dtype), x, precision="highest")


def unfold_patches(x: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, P, N, C]: P = patch² pixel positions, N = (H/patch)·(W/patch)
  non-overlapping patches in row-major order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // patch, patch, w // patch, patch, c)  # [B, nh, p, nw, p, C]
  x = x.transpose(0, 2, 4, 1, 3, 5)  # [B, p, p, nh, nw, C]
  return x.reshape(b, patch * patch, (h // patch) * (w // patch), c)


def fold_patches(x: jax.Array, patch: int, grid: tuple[int, int]) -> jax.Array:
  """Inverse of `unfold_patches`: [B, P, N, C] with N = grid[0]·grid[1] -> [B, H, W, C]."""
  b, _, _, c = x.shape
  x = x.reshape(b, patch, patch, grid[0], grid[1], c)  # [B, p, p, nh, nw, C]
  x = x.transpose(0, 3, 1, 4, 2, 5)  # [B, nh, p, nw, p, C]
  return x.reshape(b, grid[0] * patch, grid[1] * patch, c)


def padded_grid(height: int, width: int, patch: int) -> tuple[int, int]:
  """Patches per side once the map is resized up to a multiple of `patch` (as timm)."""
  return math.ceil(height / patch), math.ceil(width / patch)


def conv_bn(features: int, kernel_size: int = 1, strides: int = 1, groups: int = 1, *,
            name: str) -> layers.ConvBN:
  """`layers.ConvBN` on the CPU-fast "shifted" convs (call from a compact method)."""
  return layers.ConvBN(features, kernel_size, strides, groups, conv_impl="shifted", name=name)


class InvertedResidual(nn.Module):
  """MobileNetV2 block: 1x1 expand (SiLU), depth-wise 3x3 (SiLU), linear 1x1 project, and a
  residual when the shape is unchanged."""
  features: int
  strides: int = 1
  expansion: float = 4.0
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, H, W, Cin] -> [B, H / strides, W / strides, features]."""
    hidden = layers.make_divisible(x.shape[-1] * self.expansion)
    y = nn.silu(conv_bn(hidden, name="expand")(x, train))  # [B, H, W, hidden]
    y = nn.silu(conv_bn(hidden, 3, self.strides, groups=hidden, name="depthwise")(y, train))
    y = conv_bn(self.features, name="project")(y, train)  # [B, H', W', features]
    if self.strides != 1 or x.shape[-1] != self.features:
      return y
    if train and self.drop_path > 0:
      y = layers.stochastic_depth(y, self.drop_path, self.make_rng("dropout"))
    return x + y


class Mlp(nn.Module):
  """Dense(hidden) -> SiLU -> Dense(D), on the last axis."""
  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.xavier_uniform()
    y = nn.silu(nn.Dense(self.hidden, kernel_init=init)(x))  # [..., hidden]
    return nn.Dense(x.shape[-1], kernel_init=init)(y)  # [..., D]


def residual(module: nn.Module, x: jax.Array, y: jax.Array, drop_path: float,
             train: bool) -> jax.Array:
  """x + y, with drop-path on y in training."""
  if train and drop_path > 0:
    y = layers.stochastic_depth(y, drop_path, module.make_rng("dropout"))
  return x + y


class TransformerBlock(nn.Module):
  """Pre-LN block: x + MHSA(LN(x)), then x + MLP(LN(x)) with a SiLU MLP (as timm)."""
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, N, D] -> [B, N, D]."""
    y = nn.LayerNorm(epsilon=layers.TORCH_NORM_EPS, use_fast_variance=False, name="norm1")(x)
    y, _ = layers.MultiHeadAttention(self.num_heads, name="attention")(y)
    x = residual(self, x, y, self.drop_path, train)
    y = nn.LayerNorm(epsilon=layers.TORCH_NORM_EPS, use_fast_variance=False, name="norm2")(x)
    return residual(self, x, Mlp(self.mlp_dim, name="mlp")(y), self.drop_path, train)


class MobileViTBlock(nn.Module):
  """Local convs, a transformer across patches per pixel position, fold, fusion with the
  input. Output channels = input channels."""
  transformer_width: int
  depth: int
  num_heads: int = 4
  mlp_ratio: float = 2.0
  patch_size: int = 2
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, H, W, C] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    p, width = self.patch_size, self.transformer_width
    y = nn.silu(conv_bn(c, 3, name="local_conv")(x, train))
    y = layers.Conv(width, impl="shifted", name="local_proj")(y)  # [B, H, W, D]
    grid = padded_grid(h, w, p)
    resized = bool(h % p or w % p)
    if resized:
      y = resize_bilinear(y, (grid[0] * p, grid[1] * p), align_corners=False)
    tokens = unfold_patches(y, p)  # [B, P, N, D]
    tokens = tokens.reshape(b * p * p, grid[0] * grid[1], width)  # [B·P, N, D]
    for i in range(self.depth):
      tokens = TransformerBlock(self.num_heads, int(width * self.mlp_ratio), self.drop_path,
                                name=f"transformer_{i}")(tokens, train)
    tokens = nn.LayerNorm(epsilon=layers.TORCH_NORM_EPS, use_fast_variance=False,
                          name="transformer_norm")(tokens)
    y = fold_patches(tokens.reshape(b, p * p, -1, width), p, grid)  # [B, H', W', D]
    if resized:
      y = resize_bilinear(y, (h, w), align_corners=False)  # [B, H, W, D]
    y = nn.silu(conv_bn(c, name="proj")(y, train))  # [B, H, W, C]
    return nn.silu(conv_bn(c, 3, name="fusion")(jnp.concatenate([x, y], axis=-1), train))


def classifier_head(x: jax.Array, num_classes: int | None, dropout: float, zeroinit: bool,
                    train: bool, aux: dict[str, Any]) -> jax.Array:
  """Global average pooling, dropout and a Dense `head` (call from a compact method).

  x [B, H, W, C] -> logits [B, num_classes], or the pooled [B, C] for num_classes 0/None.
  """
  x = x.mean(axis=(1, 2))  # [B, C]
  aux["pre_logits"] = x
  if num_classes:
    x = nn.Dropout(dropout)(x, deterministic=not train)
    init = nn.initializers.zeros if zeroinit else nn.initializers.lecun_normal()
    x = nn.Dense(num_classes, kernel_init=init, name="head")(x)  # [B, num_classes]
  aux["logits"] = x
  return x


class Model(nn.Module):
  """MobileViT v1 classifier; `variant` ("XXS", "XS", "S") gives the architecture fields,
  any of which may be overridden (all are needed with variant=None)."""
  num_classes: int | None = None
  variant: str | None = "XXS"
  stem_width: int | None = None
  widths: Sequence[int] | None = None
  mv2_depths: Sequence[int] | None = None
  expansion: float | None = None
  transformer_widths: Sequence[int] | None = None
  transformer_depths: Sequence[int] | None = None
  final_width: int | None = None  # 0: no final 1x1 conv.
  num_heads: int = 4
  mlp_ratio: float = 2.0
  patch_size: int = 2
  dropout: float = 0.0
  drop_path: float = 0.0
  head_zeroinit: bool = True

  def __post_init__(self):
    hp = self.hparams()
    check_common_fields(self.patch_size, self.mlp_ratio, self.dropout, self.drop_path)
    for width in hp["transformer_widths"]:
      if width % self.num_heads:
        raise ValueError(f"Model field 'transformer_widths' ({hp['transformer_widths']}) must "
                         f"be divisible by 'num_heads' ({self.num_heads}).")
    super().__post_init__()

  def hparams(self) -> dict[str, Any]:
    """The architecture fields after applying `variant`."""
    return resolve_architecture(VARIANTS, self.variant, {
        f: getattr(self, f) for f in ARCHITECTURE_FIELDS})

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, Any]]:
    """images [B, H, W, 3] -> (logits [B, num_classes] or features [B, C], aux)."""
    layers.check_images(images, "MobileViT")
    hp = self.hparams()
    aux: dict[str, Any] = {}
    x = nn.silu(conv_bn(hp["stem_width"], 3, 2, name="stem")(images, train))  # [B, H/2, W/2, C]
    first_vit = len(STRIDES) - len(hp["transformer_widths"])
    for i, (width, depth, stride) in enumerate(zip(hp["widths"], hp["mv2_depths"], STRIDES)):
      rate = self.drop_path * i / (len(STRIDES) - 1)
      for j in range(depth):
        x = InvertedResidual(width, stride if j == 0 else 1, hp["expansion"], rate,
                             name=f"stage{i}_mv2_{j}")(x, train)
      if i >= first_vit:
        x = MobileViTBlock(hp["transformer_widths"][i - first_vit],
                           hp["transformer_depths"][i - first_vit], self.num_heads,
                           self.mlp_ratio, self.patch_size, rate,
                           name=f"stage{i}_mobilevit")(x, train)
      aux[f"stage{i}"] = x  # [B, H/s, W/s, width], s = 2, 4, 8, 16, 32 for i = 0..4
    if hp["final_width"]:
      x = nn.silu(conv_bn(hp["final_width"], name="final_conv")(x, train))  # [B, h, w, C_final]
    x = classifier_head(x, self.num_classes, self.dropout, self.head_zeroinit, train, aux)
    return x, aux
