"""DCNv3 deformable aggregation (InternImage), with the layout of `dcnv3_core_pytorch`.

  out = dcnv3(value, offset, mask, kernel_size=(3, 3), stride=(1, 1), pad=(1, 1),
              dilation=(1, 1), group=G, offset_scale=1.0)

value (N, H, W, G·C) channels-last; offset (N, H_out, W_out, G·K·2) holding an (x, y) pair
per group and point; mask (N, H_out, W_out, G·K), already normalised (InternImage applies
a softmax over the K points of a group); out (N, H_out, W_out, G·C). K = kh·kw points
are ordered x-major (point p = ix·kh + iy), as the official dilation grid is.

Semantics (official: sampling locations normalised by the padded input size, then
`grid_sample(bilinear, zeros, align_corners=False)`; here the same in pixel units of the
zero-padded input, where the normalisation cancels): output pixel (i, j), point (ix, iy)
of group g samples value_g at
  x = (dil_w·(kw−1))//2 + j·stride_w + (−(dil_w·(kw−1))//2 + ix·dil_w + offset_x)·offset_scale
and likewise for y, bilinearly with zeros outside; H_out = (H + 2·pad_h −
(dil_h·(kh−1) + 1)) // stride_h + 1. The result is Σ_p mask_p · sample_p per group.

`impl`: "reference" (this file's jnp version, differentiated by JAX) or "auto".
"""
from typing import Sequence

import jax
import jax.numpy as jnp

IMPLS = ("auto", "reference")


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
    raise ValueError(f"dcnv3 {name} must be an int or a pair of ints, got {value!r}.")
  return pair


def output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
  """Output length of one spatial axis."""
  return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def sampling_points(offset: jax.Array, kernel_size: tuple[int, int],
                    stride: tuple[int, int], dilation: tuple[int, int], group: int,
                    offset_scale: float) -> tuple[jax.Array, jax.Array]:
  """(y, x) pixel coordinates in the padded input, each [N, H_out, W_out, G, K]."""
  n, h_out, w_out, _ = offset.shape
  (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
  half_h, half_w = (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2
  ix, iy = jnp.meshgrid(jnp.arange(kw), jnp.arange(kh), indexing="ij")  # [kw, kh]
  grid_x = (-half_w + ix.reshape(-1) * dw).astype(jnp.float32)  # [K], x-major points
  grid_y = (-half_h + iy.reshape(-1) * dh).astype(jnp.float32)
  ref_y = half_h + jnp.arange(h_out, dtype=jnp.float32) * sh  # [H_out], minus the 0.5
  ref_x = half_w + jnp.arange(w_out, dtype=jnp.float32) * sw
  offset = offset.astype(jnp.float32).reshape(n, h_out, w_out, group, kh * kw, 2)
  x = ref_x[None, None, :, None, None] + (grid_x + offset[..., 0]) * offset_scale
  y = ref_y[None, :, None, None, None] + (grid_y + offset[..., 1]) * offset_scale
  return y, x


def _bilinear(image: jax.Array, y: jax.Array, x: jax.Array) -> jax.Array:
  """image [H, W, C], y / x [M] pixel coordinates -> [M, C], zeros outside the image."""
  h, w, _ = image.shape
  y0, x0 = jnp.floor(y), jnp.floor(x)
  out = 0.0
  for dy in (0, 1):
    for dx in (0, 1):
      yy, xx = y0 + dy, x0 + dx
      weight = (1 - jnp.abs(y - yy)) * (1 - jnp.abs(x - xx))  # [M]
      inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
      index = (jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)).astype(jnp.int32)
      values = image.reshape(h * w, -1)[index]  # [M, C]
      out = out + jnp.where(inside, weight, 0.0)[:, None] * values
  return out


def reference(value: jax.Array, offset: jax.Array, mask: jax.Array, *,
              kernel_size: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
              dilation: tuple[int, int], group: int, offset_scale: float) -> jax.Array:
  """Pure-jnp DCNv3 core; see the module docstring for shapes and semantics."""
  n, _, _, channels = value.shape
  _, h_out, w_out, _ = offset.shape
  k = kernel_size[0] * kernel_size[1]
  per_group = channels // group
  padded = jnp.pad(value.astype(jnp.float32),
                   ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
  y, x = sampling_points(offset, kernel_size, stride, dilation, group, offset_scale)
  hp, wp = padded.shape[1:3]
  images = padded.reshape(n, hp, wp, group, per_group).transpose(0, 3, 1, 2, 4)  # [N,G,Hp,Wp,C]
  flat = lambda t: t.transpose(0, 3, 1, 2, 4).reshape(n, group, -1)  # [N, G, H_out·W_out·K]
  sample = jax.vmap(jax.vmap(_bilinear))(images, flat(y), flat(x))  # [N, G, M, C]
  sample = sample.reshape(n, group, h_out, w_out, k, per_group)
  weights = mask.astype(jnp.float32).reshape(n, h_out, w_out, group, k)
  out = jnp.einsum("nghwkc,nhwgk->nhwgc", sample, weights)
  return out.reshape(n, h_out, w_out, channels).astype(value.dtype)


def dcnv3(value: jax.Array, offset: jax.Array, mask: jax.Array, *,
          kernel_size: int | Sequence[int] = (3, 3), stride: int | Sequence[int] = (1, 1),
          pad: int | Sequence[int] = (1, 1), dilation: int | Sequence[int] = (1, 1),
          group: int, offset_scale: float = 1.0, impl: str = "auto") -> jax.Array:
  """DCNv3 core: (N, H, W, G·C) -> (N, H_out, W_out, G·C); see the module docstring."""
  if impl not in IMPLS:
    raise ValueError(f"dcnv3 impl must be one of {', '.join(IMPLS)}; got {impl!r}.")
  kernel_size, stride = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
  pad, dilation = _pair(pad, "pad"), _pair(dilation, "dilation")
  if value.ndim != 4 or offset.ndim != 4 or mask.ndim != 4:
    raise ValueError(f"dcnv3 needs value, offset and mask of rank 4 (channels-last); got "
                     f"{value.shape}, {offset.shape}, {mask.shape}.")
  n, h, w, channels = value.shape
  if not isinstance(group, int) or group < 1 or channels % group:
    raise ValueError(f"dcnv3 group ({group!r}) must be an int >= 1 dividing the channels "
                     f"({channels}).")
  k = kernel_size[0] * kernel_size[1]
  h_out = output_size(h, kernel_size[0], stride[0], pad[0], dilation[0])
  w_out = output_size(w, kernel_size[1], stride[1], pad[1], dilation[1])
  if offset.shape != (n, h_out, w_out, group * k * 2):
    raise ValueError(f"dcnv3 offset must be {(n, h_out, w_out, group * k * 2)} (N, H_out, "
                     f"W_out, G·K·2), got {offset.shape}.")
  if mask.shape != (n, h_out, w_out, group * k):
    raise ValueError(f"dcnv3 mask must be {(n, h_out, w_out, group * k)} (N, H_out, W_out, "
                     f"G·K), got {mask.shape}.")
  return reference(value, offset, mask, kernel_size=kernel_size, stride=stride, pad=pad,
                   dilation=dilation, group=group, offset_scale=offset_scale)
