"""MobileViT v2 (Mehta & Rastegari 2022): MobileViT with separable self-attention, as timm.

`Model(num_classes=10, variant="050").apply(variables, images, train=False)` -> (logits, aux),
images NHWC float32, BatchNorm statistics in "batch_stats". The layout is MobileViT v1's
(`mobilevit.py`, whose MV2 block, conv-BN, unfold/fold and head this file reuses): a 3x3
stem and five stages of MV2 blocks (expansion 2), the last three ending in a MobileViT v2
block, with every width scaled by `width_multiplier` (0.5-2.0; `variant` "050" ... "200"):

  local:   depth-wise 3x3 conv (BN, SiLU) -> 1x1 conv to D = C / 2
  global:  unfold into [B, P, N, D]; blocks of x + SSA(GN(x)), x + MLP(GN(x)), GroupNorm
           with one group (over P, N and D, as timm's GroupNorm1); fold back
  project: 1x1 conv + BN to C (no skip, no fusion with the block input)

Separable self-attention costs O(N·D) instead of O(N²·D): a D -> 1 projection scores the
N tokens (softmax over N), the context vector is the score-weighted sum of the key
projection, and out = Linear(ReLU(Linear_v(x)) ⊙ context) with the context broadcast over
tokens. A map whose side is not a multiple of the patch is resized up to one (bilinear,
align_corners=True) before the block and stays at that size, as in timm.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.models import layers
from big_vision_lite.models import mobilevit

VARIANTS = {"050": 0.5, "075": 0.75, "100": 1.0, "125": 1.25, "150": 1.5, "175": 1.75,
            "200": 2.0}
MULTIPLIER_RANGE = (0.5, 2.0)
BASE_WIDTHS = (64, 128, 256, 384, 512)
BASE_STEM = 32


def architecture(multiplier: float) -> dict[str, Any]:
  """The architecture fields of `mobilevit.Model`-style models at a width multiplier."""
  scale = lambda c: int(c * multiplier) if multiplier != 1.0 else c
  widths = tuple(layers.make_divisible(scale(c)) for c in BASE_WIDTHS)
  return dict(stem_width=int(BASE_STEM * multiplier), widths=widths,
              mv2_depths=(1, 2, 1, 1, 1), expansion=2.0,
              transformer_widths=tuple(layers.make_divisible(c / 2) for c in widths[2:]),
              transformer_depths=(2, 4, 3), final_width=0)


class SeparableSelfAttention(nn.Module):
  """Separable self-attention over the token axis (-2); linear in the number of tokens."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., N, D] -> [..., N, D]."""
    width = x.shape[-1]
    scores = jax.nn.softmax(nn.Dense(1, name="score")(x), axis=-2)  # [..., N, 1]
    keys = nn.Dense(width, name="key")(x)  # [..., N, D]
    context = jnp.sum(keys * scores, axis=-2, keepdims=True)  # [..., 1, D]
    values = nn.relu(nn.Dense(width, name="value")(x))  # [..., N, D]
    return nn.Dense(width, name="out")(values * context)  # [..., N, D]


class LinearTransformerBlock(nn.Module):
  """x + SSA(GN(x)), then x + MLP(GN(x)); GroupNorm(1) over all but the batch axis."""
  mlp_dim: int
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, P, N, D] -> [B, P, N, D]."""
    norm = lambda name: nn.GroupNorm(num_groups=1, epsilon=layers.TORCH_NORM_EPS,
                                     use_fast_variance=False, name=name)
    y = SeparableSelfAttention(name="attention")(norm("norm1")(x))
    x = mobilevit.residual(self, x, y, self.drop_path, train)
    y = mobilevit.Mlp(self.mlp_dim, name="mlp")(norm("norm2")(x))
    return mobilevit.residual(self, x, y, self.drop_path, train)


class MobileViTv2Block(nn.Module):
  """Depth-wise local conv, separable-attention transformer across patches, 1x1 projection.

  Output channels = input channels; the map is resized up to a multiple of the patch.
  """
  transformer_width: int
  depth: int
  mlp_ratio: float = 2.0
  patch_size: int = 2
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, H, W, C] -> [B, H', W', C] with H', W' the next multiples of the patch."""
    _, h, w, c = x.shape
    p, width = self.patch_size, self.transformer_width
    grid = mobilevit.padded_grid(h, w, p)
    if h % p or w % p:
      x = mobilevit.resize_bilinear(x, (grid[0] * p, grid[1] * p), align_corners=True)
    y = nn.silu(mobilevit.conv_bn(c, 3, groups=c, name="local_conv")(x, train))
    y = layers.Conv(width, impl="shifted", name="local_proj")(y)  # [B, H', W', D]
    tokens = mobilevit.unfold_patches(y, p)  # [B, P, N, D]
    for i in range(self.depth):
      tokens = LinearTransformerBlock(int(width * self.mlp_ratio), self.drop_path,
                                      name=f"transformer_{i}")(tokens, train)
    tokens = nn.GroupNorm(num_groups=1, epsilon=layers.TORCH_NORM_EPS, use_fast_variance=False,
                          name="transformer_norm")(tokens)
    y = mobilevit.fold_patches(tokens, p, grid)  # [B, H', W', D]
    return mobilevit.conv_bn(c, name="proj")(y, train)  # [B, H', W', C]


class Model(nn.Module):
  """MobileViT v2 classifier. `variant` ("050" ... "200") or `width_multiplier` (0.5-2.0,
  default 1.0) gives the architecture fields, any of which may be overridden."""
  num_classes: int | None = None
  variant: str | None = None
  width_multiplier: float | None = None
  stem_width: int | None = None
  widths: Sequence[int] | None = None
  mv2_depths: Sequence[int] | None = None
  expansion: float | None = None
  transformer_widths: Sequence[int] | None = None
  transformer_depths: Sequence[int] | None = None
  mlp_ratio: float = 2.0
  patch_size: int = 2
  dropout: float = 0.0
  drop_path: float = 0.0
  head_zeroinit: bool = True

  def __post_init__(self):
    self.hparams()
    mobilevit.check_common_fields(self.patch_size, self.mlp_ratio, self.dropout,
                                  self.drop_path)
    super().__post_init__()

  def multiplier(self) -> float:
    """The width multiplier from `variant` or `width_multiplier` (1.0 when neither)."""
    if self.variant is not None:
      layers.check_choice("variant", self.variant, list(VARIANTS))
      if self.width_multiplier not in (None, VARIANTS[self.variant]):
        raise ValueError(f"Model fields 'variant' ({self.variant!r}) and 'width_multiplier' "
                         f"({self.width_multiplier!r}) disagree; give one of them.")
      return VARIANTS[self.variant]
    multiplier = 1.0 if self.width_multiplier is None else self.width_multiplier
    low, high = MULTIPLIER_RANGE
    if (isinstance(multiplier, bool) or not isinstance(multiplier, (int, float))
        or not low <= multiplier <= high):
      raise ValueError(f"Model field 'width_multiplier' must be a number in [{low}, {high}], "
                       f"got {multiplier!r}.")
    return float(multiplier)

  def hparams(self) -> dict[str, Any]:
    """The architecture fields after applying the width multiplier and the overrides."""
    overrides = {f: getattr(self, f) for f in mobilevit.ARCHITECTURE_FIELDS
                 if f != "final_width"}
    return mobilevit.resolve_architecture({"": architecture(self.multiplier())}, "",
                                          overrides)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, Any]]:
    """images [B, H, W, 3] -> (logits [B, num_classes] or features [B, C], aux)."""
    layers.check_images(images, "MobileViT v2")
    hp = self.hparams()
    aux: dict[str, Any] = {}
    x = nn.silu(mobilevit.conv_bn(hp["stem_width"], 3, 2, name="stem")(images, train))
    strides = mobilevit.STRIDES
    first_vit = len(strides) - len(hp["transformer_widths"])
    for i, (width, depth, stride) in enumerate(zip(hp["widths"], hp["mv2_depths"], strides)):
      rate = self.drop_path * i / (len(strides) - 1)
      for j in range(depth):
        x = mobilevit.InvertedResidual(width, stride if j == 0 else 1, hp["expansion"], rate,
                                       name=f"stage{i}_mv2_{j}")(x, train)
      if i >= first_vit:
        x = MobileViTv2Block(hp["transformer_widths"][i - first_vit],
                             hp["transformer_depths"][i - first_vit], self.mlp_ratio,
                             self.patch_size, rate, name=f"stage{i}_mobilevit")(x, train)
      aux[f"stage{i}"] = x  # [B, H/s, W/s, width], s = 2, 4, 8, 16, 32 for i = 0..4
    x = mobilevit.classifier_head(x, self.num_classes, self.dropout, self.head_zeroinit, train,
                                  aux)
    return x, aux
