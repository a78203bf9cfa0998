"""ResNet (He et al. 2016) as torchvision and timm build it (v1.5: stride in the 3x3 conv).

`Model(num_classes=1000, depth=50).apply(variables, images, train=False)` -> (logits, aux),
images NHWC float32. Stem: 7x7 conv with stride 2, BatchNorm, ReLU, 3x3 max pool with
stride 2; four stages of basic blocks (depth 18, 34) or bottleneck blocks (50, 101, 152)
with `width * 2**i` channels (x4 at a bottleneck's output), stages 2-4 opened with stride
2 (a 1x1 conv + BatchNorm shortcut wherever the shape changes); head: global average pool
-> Dense. `width` (64 in the paper), `stem_width` (the stem conv's channels, `width` if
None) and `stage_sizes` shrink it, e.g. a CPU-sized `Model(depth=18, width=16)`.
Convolutions have no bias; BatchNorm epsilon is 1e-5.

BatchNorm: by default flax's, with `scale`/`bias` in "params" and running `mean`/`var` in
"batch_stats" (updated in train mode with momentum 0.9, i.e. torch's 0.1; call with
`mutable=["batch_stats"]`). `frozen_bn=True` is DETR's FrozenBatchNorm2d: every norm uses its
stored statistics in train and eval mode alike, and all four of its tensors (`scale`, `bias`,
`mean`, `var`) live in the "batch_stats" collection, never in "params": nothing of the norms
gets a gradient or an optimiser update, and a train-mode apply returns them unchanged.
(Move a trained model's norm `scale`/`bias` from "params" to "batch_stats" with
`freeze_batch_norm` to use it frozen.) The last norm of each residual branch starts at zero
scale (timm's `zero_init_last`) unless the norms are frozen, where it would stay zero.
"""
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.models import layers

# depth -> (bottleneck blocks?, blocks per stage), as torchvision.
DEPTHS: dict[int, tuple[bool, tuple[int, int, int, int]]] = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}
BOTTLENECK_EXPANSION = 4
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # timm's kaiming.


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine, all in "batch_stats" (DETR's
  FrozenBatchNorm2d): y = (x - mean) * scale / sqrt(var + eps) + bias."""
  eps: float = layers.TORCH_NORM_EPS  # As DETR's FrozenBatchNorm2d.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., C] -> [..., C]."""
    shape = (x.shape[-1],)
    scale = self.variable("batch_stats", "scale", jnp.ones, shape, jnp.float32).value
    bias = self.variable("batch_stats", "bias", jnp.zeros, shape, jnp.float32).value
    mean = self.variable("batch_stats", "mean", jnp.zeros, shape, jnp.float32).value
    var = self.variable("batch_stats", "var", jnp.ones, shape, jnp.float32).value
    multiplier = scale * jax.lax.rsqrt(var + self.eps)
    return x * multiplier.astype(x.dtype) + (bias - mean * multiplier).astype(x.dtype)


def batch_norm(name: str, train: bool, frozen: bool, zero_init: bool = False) -> nn.Module:
  """A frozen or trainable BatchNorm called `name` (scale zero-initialised if `zero_init`)."""
  if frozen:
    return FrozenBatchNorm(name=name)
  return layers.batch_norm(train, zero_init, name)


def conv(features: int, kernel_size: int, strides: int, name: str) -> nn.Conv:
  """Bias-free conv with torch's symmetric padding kernel_size // 2."""
  pad = kernel_size // 2
  return nn.Conv(features, (kernel_size, kernel_size), strides=strides,
                 padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=CONV_INIT,
                 name=name)


class Block(nn.Module):
  """Basic (two 3x3 convs) or bottleneck (1x1, 3x3 with the stride, 1x1 x4) residual block."""
  width: int
  strides: int = 1
  bottleneck: bool = False
  frozen_bn: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, H, W, C] -> [B, H / strides, W / strides, width (x4 for a bottleneck)]."""
    norm = lambda name, zero_init=False: batch_norm(
        name, train, self.frozen_bn, zero_init and not self.frozen_bn)
    if self.bottleneck:
      out_width = self.width * BOTTLENECK_EXPANSION
      y = nn.relu(norm("bn1")(conv(self.width, 1, 1, "conv1")(x)))
      y = nn.relu(norm("bn2")(conv(self.width, 3, self.strides, "conv2")(y)))
      y = norm("bn3", True)(conv(out_width, 1, 1, "conv3")(y))
    else:
      out_width = self.width
      y = nn.relu(norm("bn1")(conv(self.width, 3, self.strides, "conv1")(x)))
      y = norm("bn2", True)(conv(self.width, 3, 1, "conv2")(y))
    if self.strides != 1 or x.shape[-1] != out_width:
      x = norm("downsample_bn")(conv(out_width, 1, self.strides, "downsample_conv")(x))
    return nn.relu(x + y)


class Model(nn.Module):
  """ResNet classifier; `stage_sizes` (4 block counts) overrides the depth's."""
  num_classes: int | None = 1000
  depth: int = 50
  width: int = 64
  stem_width: int | None = None
  stage_sizes: Sequence[int] | None = None
  frozen_bn: bool = False
  head_zeroinit: bool = True

  def __post_init__(self):
    layers.check_choice("depth", self.depth, tuple(DEPTHS))
    for field in ("width", "stem_width"):
      value = getattr(self, field)
      if (value is not None or field == "width") and (
          not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"Model field {field!r} must be a positive int, got {value!r}.")
    if self.stage_sizes is not None and (len(self.stage_sizes) != 4 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.stage_sizes)):
      raise ValueError(f"Model field 'stage_sizes' must be 4 positive ints (blocks per "
                       f"stage), got {self.stage_sizes!r}.")
    if not isinstance(self.frozen_bn, bool):
      raise ValueError(f"Model field 'frozen_bn' must be True or False, got {self.frozen_bn!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, Any]]:
    """images [B, H, W, C] -> (logits [B, classes], aux).

    aux: "stem" (after the max pool, stride 4) and "stage1".."stage4" feature maps (strides
    4, 8, 16, 32), "pre_logits" [B, D] and "logits"; with num_classes 0/None the output is
    the pre-logits.
    """
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"ResNet expects float NHWC images [B, H, W, C], got {images.dtype} "
                       f"{images.shape}.")
    bottleneck, stage_sizes = DEPTHS[self.depth]
    stage_sizes = tuple(self.stage_sizes or stage_sizes)
    aux: dict[str, Any] = {}
    x = conv(self.stem_width or self.width, 7, 2, "conv1")(images)  # [B, H/2, W/2, stem]
    x = nn.relu(batch_norm("bn1", train, self.frozen_bn)(x))
    x = aux["stem"] = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(stage_sizes):
      for i in range(blocks):
        x = Block(self.width * 2**stage, 2 if i == 0 and stage > 0 else 1, bottleneck,
                  self.frozen_bn, name=f"layer{stage + 1}_block{i}")(x, train)
      aux[f"stage{stage + 1}"] = x
    x = aux["pre_logits"] = x.mean(axis=(1, 2))  # [B, D]
    if self.num_classes:
      init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
      x = nn.Dense(self.num_classes, kernel_init=init, name="head")(x)  # [B, classes]
    aux["logits"] = x
    return x, aux


def freeze_batch_norm(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Variables of a `frozen_bn=False` model -> those of the same model with `frozen_bn=True`:
  every norm's `scale` and `bias` move from "params" to "batch_stats" beside its statistics.
  Works on any tree holding ResNets (e.g. a DETR's "backbone")."""
  params, stats = dict(variables["params"]), dict(variables.get("batch_stats") or {})

  def move(params_node: Mapping[str, Any], stats_node: Mapping[str, Any]
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    params_out, stats_out = {}, dict(stats_node)
    for key, value in params_node.items():
      child_stats = stats_node.get(key)
      if isinstance(value, Mapping) and isinstance(child_stats, Mapping) and set(
          child_stats) == {"mean", "var"} and set(value) == {"scale", "bias"}:
        stats_out[key] = {**child_stats, **value}
      elif isinstance(value, Mapping):
        params_out[key], child = move(value, child_stats or {})
        if child:
          stats_out[key] = child
      else:
        params_out[key] = value
    return params_out, stats_out

  params, stats = move(params, stats)
  return {**variables, "params": params, "batch_stats": stats}
