"""Layers and helpers shared by several models, one meaning each.

Field checks (`check_choice`, `check_images`), stochastic depth, rematerialisation, the
transformer pieces the ViT family and others reuse (`MultiHeadAttention`, `MlpBlock`,
`MAPHead`, `pool_tokens`), the conv + BatchNorm unit of the timm-style CNNs (`Conv`,
`ConvBN`), timm's channel rounding (`make_divisible`), patchify of image batches and the
normalisation epsilons. Parameter names are the ones checkpoints and weight converters use.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kernels import packed_attention

TORCH_NORM_EPS = 1e-5  # torch's (so timm's) BatchNorm, LayerNorm and GroupNorm default.
FLAX_NORM_EPS = 1e-6  # flax's LayerNorm default: big_vision's ViT, ConvNeXt, InternImage.
DTYPES_MM = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
CONV_IMPLS = ("xla", "shifted")
# Logical axes of activations, sharded by config field 'activation_rules' (see sharding.py).
RESIDUAL_AXES = ("batch", "length", "embed")  # [B, N, D]
HEADS_AXES = ("batch", "length", "heads", None)  # [B, N, H, Dh]
MLP_AXES = ("batch", "length", "mlp")  # [B, N, mlp_dim]


def check_choice(field: str, value: Any, accepted: Sequence[Any]) -> None:
  """Raises a ValueError naming model field `field` and the accepted values."""
  if value not in accepted:
    raise ValueError(f"Model field {field!r} must be one of {', '.join(map(str, accepted))}; "
                     f"got {value!r}.")


def check_images(images: jax.Array, what: str, patch: tuple[int, int] | None = None
                 ) -> None:
  """Raises a ValueError unless `images` are float NHWC [B, H, W, 3] (at least one patch)."""
  if (images.ndim != 4 or images.shape[-1] != 3
      or not jnp.issubdtype(images.dtype, jnp.floating)):
    raise ValueError(f"{what} expects float NHWC images [B, H, W, 3], got {images.dtype} "
                     f"{images.shape} (NCHW input must be transposed).")
  if patch and (images.shape[1] < patch[0] or images.shape[2] < patch[1]):
    raise ValueError(f"Images {images.shape[1:3]} are smaller than one patch {patch}.")


def stochastic_depth(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Stochastic depth: zeroes whole examples with probability `rate`, rescales the rest."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def remat(block: type[nn.Module], remat_policy: str, static_argnums: tuple[int, ...]
          ) -> type[nn.Module]:
  """`block` (a Module class) recomputing its activations in the backward pass: "none"
  stores them all (the class itself), "full" only the block's inputs, "dots" and
  "dots_with_no_batch_dims" also the matmul outputs (`jax.checkpoint_policies`'
  dots_saveable, dots_with_no_batch_dims_saveable). Parameter names do not change.
  `static_argnums` (self = 0) are the block's Python-valued (e.g. bool) arguments."""
  check_choice("remat_policy", remat_policy, REMAT_POLICIES)
  if remat_policy == "none":
    return block
  policy = {"full": None, "dots": jax.checkpoint_policies.dots_saveable,
            "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            }[remat_policy]
  return nn.remat(block, policy=policy, static_argnums=static_argnums)


def drop_path_rates(drop_path: float, count: int) -> list[float]:
  """Per-block stochastic-depth rates rising linearly from 0 to `drop_path` over `count`
  blocks (the first never drops), as timm and big_vision."""
  return [drop_path * i / max(count - 1, 1) for i in range(count)]


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
  """timm's channel rounding: the nearest multiple of `divisor` (at least `divisor`), one
  `divisor` more when that loses more than 1 - `round_limit` of `value`. round_limit=0.9
  is timm's default (MobileViT widths); round_limit=0 is plain rounding (timm's
  squeeze-excite widths, as EfficientViT's)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < round_limit * value else rounded


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """images [B, H, W, C] -> [B, H//p, W//p, p·p·C]: each patch's pixels row-major, channels
  last (the layout of `input.packing.patchify`); pixels past whole patches are dropped."""
  b, height, width, c = images.shape
  h, w = height // patch, width // patch
  x = images[:, :h * patch, :w * patch].reshape(b, h, patch, w, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, patch * patch * c)


def unpatchify(patches: jax.Array, channels: int, patch: int) -> jax.Array:
  """The inverse of `patchify`: [B, h, w, p·p·C] -> [B, h·p, w·p, C]."""
  b, h, w, _ = patches.shape
  x = patches.reshape(b, h, w, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * patch, w * patch, channels)


# Plain-einsum attention (kernels.packed_attention's, shared with its segment-masked
# reference): q [B, Nq, H, Dh], k, v [B, Nk, H, Dh], mask -> (out, softmax weights).
dot_product_attention = packed_attention.dot_product_attention


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention, with flax's parameter names (query/key/value/out).

  With `segment_ids`, the fused kernel of `kernels.packed_attention` unless the softmax maps
  are requested.
  """
  num_heads: int
  dtype_mm: str = "float32"
  attention_impl: str = "auto"  # For segment_ids: see kernels.packed_attention.

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array | None = None, mask: jax.Array | None = None,
               return_attention: bool = False, segment_ids: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
    """x [B, Nq, D], kv [B, Nk, D] (default x) -> ([B, Nq, D], [B, heads, Nq, Nk] or None).

    `segment_ids` [B, N] (self-attention only, not with `mask`): a token attends only to
    tokens with the same id.
    """
    if segment_ids is not None and (kv is not None or mask is not None):
      raise ValueError("segment_ids is for self-attention without another mask.")
    kv = x if kv is None else kv
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}.")
    dense = lambda name: nn.DenseGeneral(
        (self.num_heads, width // self.num_heads), dtype=self.dtype_mm, name=name,
        kernel_init=nn.initializers.xavier_uniform())
    q = nn.with_logical_constraint(dense("query")(x), HEADS_AXES)  # [B, Nq, H, Dh]
    k = nn.with_logical_constraint(dense("key")(kv), HEADS_AXES)  # [B, Nk, H, Dh]
    v = nn.with_logical_constraint(dense("value")(kv), HEADS_AXES)  # [B, Nk, H, Dh]
    if segment_ids is not None and return_attention:
      mask = packed_attention.segment_mask(segment_ids)
    weights = None
    if segment_ids is not None and not return_attention:
      out = packed_attention.segment_attention(q, k, v, segment_ids, impl=self.attention_impl)
    else:
      out, probs = dot_product_attention(q, k, v, mask)
      weights = probs if return_attention else None
    out = nn.with_logical_constraint(out, HEADS_AXES)
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype_mm, name="out",
                          kernel_init=nn.initializers.xavier_uniform())(out)  # [B, Nq, D]
    return out, weights


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> dropout -> Dense(D)."""
  mlp_dim: int
  dropout: float = 0.0
  gelu_approximate: bool = True
  dtype_mm: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    init = dict(kernel_init=nn.initializers.xavier_uniform(),
                bias_init=nn.initializers.normal(stddev=1e-6), dtype=self.dtype_mm)
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, **init)(x)  # [..., mlp_dim]
    if x.ndim == 3:
      x = nn.with_logical_constraint(x, MLP_AXES)
    x = nn.gelu(x, approximate=self.gelu_approximate)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return nn.Dense(width, **init)(x)  # [..., D]


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens, then an MLP."""
  mlp_dim: int
  num_heads: int
  gelu_approximate: bool = True
  layernorm_eps: float = FLAX_NORM_EPS
  dtype_mm: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               num_queries: int | None = None) -> jax.Array:
    """x [B, N, D], mask broadcastable to [B, heads, Q, N] -> [B, D].

    With `num_queries` = Q, the probe is repeated Q times (each copy with its row of
    `mask`, e.g. one per packed image) and the result is [B, Q, D].
    """
    b, _, width = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width), jnp.float32)
    probe = jnp.tile(probe, (b, num_queries or 1, 1)).astype(x.dtype)  # [B, Q, D]
    y, _ = MultiHeadAttention(self.num_heads, self.dtype_mm,
                              name="MultiHeadDotProductAttention_0")(probe, x, mask=mask)
    z = nn.LayerNorm(epsilon=self.layernorm_eps)(y)
    y = y + MlpBlock(self.mlp_dim, gelu_approximate=self.gelu_approximate,
                     dtype_mm=self.dtype_mm)(z)  # [B, Q, D]
    return y if num_queries else y[:, 0]


def pool_tokens(x: jax.Array, pool_type: str, mlp_dim: int, num_heads: int,
                gelu_approximate: bool, layernorm_eps: float, dtype_mm: str) -> jax.Array:
  """Tokens [B, N, D] -> [B, D]: the first ("tok"), the mean ("gap"), a MAPHead_0 of the
  calling module ("map"); "none" keeps [B, N, D]."""
  if pool_type == "tok":
    return x[:, 0]
  if pool_type == "gap":
    return x.mean(axis=1)
  if pool_type == "map":
    return MAPHead(mlp_dim, num_heads, gelu_approximate, layernorm_eps, dtype_mm,
                   name="MAPHead_0")(x)
  return x


class Conv(nn.Module):
  """Bias-free 2-D conv with PyTorch-style symmetric padding (k - 1) // 2 and nn.Conv's
  kernel [k, k, Cin / groups, features]. `impl` "xla" is one XLA convolution (nn.Conv's
  numerics); "shifted" runs 1x1 convs as a matmul and depth-wise ones as k² shifted
  products, which XLA computes and differentiates far faster on CPU."""
  features: int
  kernel_size: int = 1
  strides: int = 1
  groups: int = 1
  impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, Cin] -> [B, H / strides, W / strides, features]."""
    check_choice("conv_impl", self.impl, CONV_IMPLS)
    k, stride, channels = self.kernel_size, self.strides, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, channels // self.groups, self.features), jnp.float32)
    kernel = kernel.astype(x.dtype)
    pad = (k - 1) // 2
    if self.impl == "shifted" and k == 1 and self.groups == 1:
      return x[:, ::stride, ::stride] @ kernel[0, 0]  # [B, H', W', features]
    if self.impl == "shifted" and self.groups == channels == self.features:  # Depth-wise.
      padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
      out_h = (x.shape[1] + 2 * pad - k) // stride + 1
      out_w = (x.shape[2] + 2 * pad - k) // stride + 1
      return sum(padded[:, i:i + stride * (out_h - 1) + 1:stride,
                        j:j + stride * (out_w - 1) + 1:stride] * kernel[i, j, 0]
                 for i in range(k) for j in range(k))  # [B, H', W', C]
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)


def batch_norm(train: bool, zero_scale: bool = False, name: str | None = None) -> nn.BatchNorm:
  """The timm-style CNNs' BatchNorm: torch's epsilon, momentum 0.9, batch statistics in
  training; `zero_scale` starts a residual branch at zero (timm's bn_weight_init=0)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=TORCH_NORM_EPS,
                      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                      name=name)


class ConvBN(nn.Module):
  """`Conv` (`conv`) -> `batch_norm` (`bn`; `zero_scale` starts a residual branch at zero).
  No activation: the caller applies its own."""
  features: int
  kernel_size: int = 1
  strides: int = 1
  groups: int = 1
  zero_scale: bool = False
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, H, W, Cin] -> [B, H / strides, W / strides, features]."""
    x = Conv(self.features, self.kernel_size, self.strides, self.groups, self.conv_impl,
             name="conv")(x)
    return batch_norm(train, self.zero_scale, name="bn")(x)
