"""InternImage (Wang et al. CVPR 2023): a ConvNet on the deformable operator DCNv3.

`Model(num_classes=10, variant="T").apply(variables, images)` -> (logits, aux), images
NHWC float32, BatchNorm statistics (head only) in the "batch_stats" collection. Layout and
parameter names follow the official classification model (OpenGVLab/InternImage,
`models/intern_image.py`, `levels.i.blocks.j.*` -> `level{i}_block{j}/*`):

  stem      3x3 conv s2 (C1/2) -> LN -> GELU -> 3x3 conv s2 (C1) -> LN      [B, H/4, W/4, C1]
  level i   L_i blocks, then LN (pre-norm models only), then (i < 3) 3x3 conv s2 without
            bias to 2·C_i -> LN
  block     pre-norm:  x + γ1·DCNv3(LN(x)), then x + γ2·MLP(LN(x))
            post-norm: x + γ1·LN(DCNv3(x)), then x + γ2·LN(MLP(x))
            (γ: layer scale where the variant has one, else 1; drop path on each branch)
  head      1x1 conv without bias to cls_scale·C4 -> BatchNorm -> GELU -> mean over space
            (the pre-logits) -> Dense

DCNv3 (`DCNv3`): x -> input_proj -> value; x -> 3x3 depth-wise conv -> LN -> GELU -> the
features from which Linear `offset` (G·K·2, an (x, y) pair per group and point) and `mask`
(G·K, softmax over the K = 9 points of each group) are predicted, both zero-initialised;
`kernels.dcnv3` samples the value bilinearly at the offset points and sums them weighted by
the mask; -> output_proj.

Stacking rules (`stage_hparams`): 4 stages, C_i = 2^(i-1)·C1, G_i = C_i / C', depths
L1 = L2 = L4 <= L3 ("AABA"), so a variant is (C1, C', L1, L3, MLP ratio, layer scale,
post-norm, offset scale); T/S/B/L/XL as the official configs (S and larger: layer scale
1e-5 and post-norm; L and XL: offset scale 2). H and G are not built: they change the
operator and the head (5x5 depth-wise conv, center feature scale, residual post-norms,
an attention-pooling CLIP projector, C' = 32), none of which T..XL use; dropout (0 in every
official config) is left out too. `variant="mini"` (C1 = 32, L1 = 1, L3 = 3) is a CPU-sized
model under the same rules, not from the paper. Parameter counts at 1000 classes: T 29.9M,
S 50.1M, B 97.5M, L 223.3M, XL 334.8M (paper: 30M, 50M, 97M, 223M, 335M).
"""
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import kernels
from big_vision_lite.models import convnext2
from big_vision_lite.models import layers
from kernels import dcnv3_core


class Variant(NamedTuple):
  """The free hyper-parameters of a model under the stacking rules."""
  channels: int  # C1, the width of the first stage.
  depth: int  # L1 = L2 = L4.
  depth3: int  # L3 >= L1.
  group_channels: int = 16  # C' = C_i / G_i.
  mlp_ratio: float = 4.0
  layer_scale: float = 0.0  # Initial layer-scale γ; 0: no layer scale.
  post_norm: bool = False
  offset_scale: float = 1.0


VARIANTS: dict[str, Variant] = {
    "mini": Variant(32, 1, 3),  # CPU-sized (configs/internimage.py), not from the paper.
    "T": Variant(64, 4, 18),
    "S": Variant(80, 4, 21, layer_scale=1e-5, post_norm=True),
    "B": Variant(112, 4, 21, layer_scale=1e-5, post_norm=True),
    "L": Variant(160, 5, 22, layer_scale=1e-5, post_norm=True, offset_scale=2.0),
    "XL": Variant(192, 5, 24, layer_scale=1e-5, post_norm=True, offset_scale=2.0),
}
KERNEL_INIT = nn.initializers.truncated_normal(0.02)  # Official init of the Linear layers.


def stage_hparams(channels: int, depth: int, depth3: int, group_channels: int
                  ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """Stacking rules: (C1, L1, L3, C') -> (widths C_i, depths L_i, groups G_i), 4 stages."""
  widths = tuple(channels * 2 ** i for i in range(4))
  return widths, (depth, depth, depth3, depth), tuple(w // group_channels for w in widths)


# jit-wrapped so that blocks of one shape share one trace (eval_shape and compiles of deep
# models trace the aggregation once per stage, not once per block).
_dcnv3 = jax.jit(kernels.dcnv3, static_argnames=("group", "offset_scale", "impl"))


def gelu(x: jax.Array) -> jax.Array:
  return nn.gelu(x, approximate=False)  # torch.nn.GELU().


def layer_norm(name: str) -> nn.LayerNorm:
  # Two-pass variance: the post-norm stacks amplify the rounding of E[x²] - E[x]².
  return nn.LayerNorm(epsilon=layers.FLAX_NORM_EPS,  # The official build_norm_layer's.
                      use_fast_variance=False, name=name)


def conv3x3(features: int, name: str, use_bias: bool = True) -> nn.Conv:
  """torch Conv2d(kernel_size=3, stride=2, padding=1): [B, H, W, C] -> [B, ⌈H/2⌉, ⌈W/2⌉, F]."""
  return nn.Conv(features, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=use_bias,
                 name=name)


class DCNv3(nn.Module):
  """The DCNv3 operator (3x3 points, stride 1, pad 1) with `group` groups."""
  group: int
  offset_scale: float = 1.0
  impl: str = "auto"  # kernels.dcnv3's `impl`.

  @nn.compact
  def __call__(self, x: jax.Array, return_sampling: bool = False
               ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """x [B, H, W, C] -> [B, H, W, C]; with `return_sampling` also {"offset" [B, H, W, G·K·2],
    "mask" [B, H, W, G·K] (softmaxed)}, K = 9."""
    b, h, w, channels = x.shape
    points = 9
    xavier = nn.initializers.xavier_uniform()
    value = nn.Dense(channels, kernel_init=xavier, name="input_proj")(x)  # [B, H, W, C]
    features = convnext2.DepthwiseConv(kernel_size=3, name="dw_conv")(x)  # [B, H, W, C]
    features = gelu(layer_norm("dw_norm")(features))
    zeros = nn.initializers.zeros
    offset = nn.Dense(self.group * points * 2, kernel_init=zeros, name="offset")(features)
    logits = nn.Dense(self.group * points, kernel_init=zeros, name="mask")(features)
    mask = jax.nn.softmax(logits.reshape(b, h, w, self.group, points), axis=-1)
    mask = mask.reshape(b, h, w, self.group * points)  # [B, H, W, G·K]
    out = _dcnv3(value, offset, mask, group=self.group, offset_scale=self.offset_scale,
                 impl=self.impl)  # [B, H, W, C]
    out = nn.Dense(channels, kernel_init=xavier, name="output_proj")(out)
    if return_sampling:
      return out, {"offset": offset, "mask": mask}
    return out


class Mlp(nn.Module):
  """Dense(hidden) -> GELU -> Dense(C)."""
  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., C] -> [..., C]."""
    y = gelu(nn.Dense(self.hidden, kernel_init=KERNEL_INIT, name="fc1")(x))  # [..., hidden]
    return nn.Dense(x.shape[-1], kernel_init=KERNEL_INIT, name="fc2")(y)


class Block(nn.Module):
  """DCNv3 and MLP residual branches, pre- or post-norm, with optional layer scale."""
  group: int
  mlp_ratio: float
  layer_scale: float  # 0: none.
  post_norm: bool
  offset_scale: float
  drop_path: float = 0.0
  dcnv3_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, H, W, C] -> [B, H, W, C]."""
    channels = x.shape[-1]
    branches = (
        ("1", DCNv3(self.group, self.offset_scale, self.dcnv3_impl, name="dcn")),
        ("2", Mlp(int(channels * self.mlp_ratio), name="mlp")))
    for index, branch in branches:
      norm = layer_norm(f"norm{index}")
      y = norm(branch(x)) if self.post_norm else branch(norm(x))  # [B, H, W, C]
      if self.layer_scale:
        gamma = self.param(f"gamma{index}", nn.initializers.constant(self.layer_scale),
                           (channels,), jnp.float32)
        y = y * gamma.astype(y.dtype)
      if train and self.drop_path > 0:
        y = layers.stochastic_depth(y, self.drop_path, self.make_rng("dropout"))
      x = x + y
    return x


class Model(nn.Module):
  """InternImage classifier; the fields after `variant` override the variant's values."""
  num_classes: int = 1000
  variant: str = "T"
  channels: int | None = None  # C1.
  depths: Sequence[int] | None = None  # (L1, L1, L3, L1).
  group_channels: int | None = None  # C'.
  mlp_ratio: float | None = None
  layer_scale: float | None = None  # 0: no layer scale.
  post_norm: bool | None = None
  offset_scale: float | None = None
  cls_scale: float = 1.5  # Width of the head conv over C4.
  drop_path: float = 0.0  # Rising linearly over all blocks from 0.
  dcnv3_impl: str = "auto"  # kernels.dcnv3's `impl`.

  def __post_init__(self):
    layers.check_choice("variant", self.variant, tuple(VARIANTS))
    layers.check_choice("dcnv3_impl", self.dcnv3_impl, dcnv3_core.IMPLS)
    self.hparams()
    if not isinstance(self.num_classes, int) or self.num_classes < 0:
      raise ValueError(f"Model field 'num_classes' must be an int >= 0, got "
                       f"{self.num_classes!r}.")
    if not 0.0 <= self.drop_path < 1.0:
      raise ValueError(f"Model field 'drop_path' must be in [0, 1), got "
                       f"{self.drop_path!r}.")
    if not self.cls_scale > 0:
      raise ValueError(f"Model field 'cls_scale' must be > 0, got {self.cls_scale!r}.")
    super().__post_init__()

  def hparams(self) -> dict[str, Any]:
    """widths, depths, groups (4 stages each), mlp_ratio, layer_scale, post_norm and
    offset_scale after the overrides; a ValueError names a field that breaks the rules."""
    base = VARIANTS[self.variant]

    def pick(field):
      value = getattr(self, field)
      return getattr(base, field) if value is None else value

    channels, group_channels = pick("channels"), pick("group_channels")
    depths = tuple(self.depths) if self.depths is not None else (
        base.depth, base.depth, base.depth3, base.depth)
    for field, value in (("channels", channels), ("group_channels", group_channels)):
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Model field {field!r} must be a positive int, got {value!r}.")
    if channels % group_channels:
      raise ValueError(f"Model field 'channels' ({channels}) must be a multiple of "
                       f"'group_channels' ({group_channels}): G_i = C_i / C'.")
    positive = all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in depths)
    if len(depths) != 4 or not positive or not depths[0] == depths[1] == depths[3] <= depths[2]:
      raise ValueError(f"Model field 'depths' must be 4 positive ints with L1 = L2 = L4 <= L3 "
                       f"(the stacking rules), got {self.depths!r}.")
    widths, _, groups = stage_hparams(channels, depths[0], depths[2], group_channels)
    hp = dict(widths=widths, depths=depths, groups=groups)
    for field in ("mlp_ratio", "layer_scale", "offset_scale"):
      hp[field] = pick(field)
      if not isinstance(hp[field], (int, float)) or hp[field] < 0 or (
          field != "layer_scale" and hp[field] == 0):
        raise ValueError(f"Model field {field!r} must be a number > 0 (layer_scale: >= 0), "
                         f"got {hp[field]!r}.")
    hp["post_norm"] = pick("post_norm")
    if not isinstance(hp["post_norm"], bool):
      raise ValueError(f"Model field 'post_norm' must be True or False, got "
                       f"{hp['post_norm']!r}.")
    return hp

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, Any]]:
    """images [B, H, W, 3] -> (logits [B, classes], aux).

    aux: "stem" and "stage0".."stage3" feature maps (before downsampling), "pre_logits"
    [B, cls_scale·C4] and "logits"; with num_classes 0 the output is the pre-logits.
    """
    layers.check_images(images, "InternImage")
    hp = self.hparams()
    widths, depths = hp["widths"], hp["depths"]
    aux: dict[str, Any] = {}
    x = conv3x3(widths[0] // 2, "stem_conv1")(images)  # [B, H/2, W/2, C1/2]
    x = gelu(layer_norm("stem_norm1")(x))
    x = conv3x3(widths[0], "stem_conv2")(x)  # [B, H/4, W/4, C1]
    x = aux["stem"] = layer_norm("stem_norm2")(x)
    rates = layers.drop_path_rates(self.drop_path, sum(depths))
    for level, (depth, group) in enumerate(zip(depths, hp["groups"])):
      for i in range(depth):
        x = Block(group, hp["mlp_ratio"], hp["layer_scale"], hp["post_norm"],
                  hp["offset_scale"], rates.pop(0), self.dcnv3_impl,
                  name=f"level{level}_block{i}")(x, train)
      if not hp["post_norm"]:
        x = layer_norm(f"level{level}_norm")(x)
      aux[f"stage{level}"] = x
      if level < 3:
        x = conv3x3(widths[level + 1], f"level{level}_downsample_conv", use_bias=False)(x)
        x = layer_norm(f"level{level}_downsample_norm")(x)  # [B, H', W', C_{i+1}]
    head_width = int(widths[-1] * self.cls_scale)
    x = nn.Dense(head_width, use_bias=False, name="conv_head")(x)  # 1x1 conv [B, h, w, D]
    x = layers.batch_norm(train, name="conv_head_bn")(x)
    x = aux["pre_logits"] = gelu(x).mean(axis=(1, 2))  # [B, D]
    if self.num_classes:
      x = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT, name="head")(x)  # [B, classes]
    aux["logits"] = x
    return x, aux
