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

`impl`:
  "reference"  this file's jnp version, differentiated by JAX.
  "pallas"     a Pallas kernel with a custom VJP (forward: gather, weight and sum; backward:
               gradients for offset and mask per sampling point, and value by accumulating
               into the (n, group) image block), tiled over `block_pixels` output pixels
               per program and one group; float32 accumulation for any input dtype.
  "interpret"  the Pallas kernel in interpret mode (tests on CPU).
  "auto"       the reference. The kernel has been run only in interpret mode so far; it
               becomes the default on GPU once it has been compiled and timed there.
"""
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

IMPLS = ("auto", "reference", "pallas", "interpret")


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
  rows = image.reshape(h * w, -1)
  return sum(weight[:, None] * rows[index] for index, weight, _, _ in _corners(y, x, h, w))


def _corners(y: jax.Array, x: jax.Array, h: int, w: int):
  """The 4 bilinear corners of points y, x [...]: (flat index, weight, dweight/dy, dweight/dx),
  weights zeroed outside the h x w image."""
  y0, x0 = jnp.floor(y), jnp.floor(x)
  for dy in (0, 1):
    for dx in (0, 1):
      yy, xx = y0 + dy, x0 + dx
      wy, wx = 1 - jnp.abs(y - yy), 1 - jnp.abs(x - xx)
      inside = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)).astype(jnp.float32)
      index = (jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)).astype(jnp.int32)
      sign_y, sign_x = (1.0 if dy else -1.0), (1.0 if dx else -1.0)  # d(1-|t-c|)/dt
      yield index, wy * wx * inside, sign_y * wx * inside, sign_x * wy * inside


def _forward_kernel(y_ref, x_ref, mask_ref, value_ref, out_ref, *, h: int, w: int):
  """One (n, group, pixel block): out [TM, C] = Σ_k mask · bilinear(value, y, x)."""
  y, x, mask = y_ref[...], x_ref[...], mask_ref[...]  # [TM, K]
  value = value_ref[...].astype(jnp.float32)  # [Hp·Wp, C]
  tm, k = y.shape
  out = jnp.zeros((tm, value.shape[1]), jnp.float32)
  for index, weight, _, _ in _corners(y, x, h, w):
    rows = value[index.reshape(-1)].reshape(tm, k, -1)  # [TM, K, C]
    out += jnp.einsum("mk,mkc->mc", mask * weight, rows)
  out_ref[...] = out.astype(out_ref.dtype)


def _backward_kernel(y_ref, x_ref, mask_ref, value_ref, grad_ref, dy_ref, dx_ref, dmask_ref,
                     dvalue_ref, *, h: int, w: int):
  """Gradients of one pixel block; d value accumulates over the pixel blocks of (n, g)."""
  @pl.when(pl.program_id(2) == 0)
  def _():
    dvalue_ref[...] = jnp.zeros_like(dvalue_ref)

  y, x, mask = y_ref[...], x_ref[...], mask_ref[...]  # [TM, K]
  value = value_ref[...].astype(jnp.float32)  # [Hp·Wp, C]
  grad = grad_ref[...].astype(jnp.float32)  # [TM, C]
  tm, k = y.shape
  d_y, d_x, d_mask = (jnp.zeros((tm, k), jnp.float32) for _ in range(3))
  d_value = jnp.zeros_like(value)
  for index, weight, weight_dy, weight_dx in _corners(y, x, h, w):
    flat = index.reshape(-1)
    rows = value[flat].reshape(tm, k, -1)  # [TM, K, C]
    dot = jnp.einsum("mkc,mc->mk", rows, grad)  # d out / d (weight · mask) per point
    d_mask += weight * dot
    d_y += mask * weight_dy * dot
    d_x += mask * weight_dx * dot
    contrib = (mask * weight)[..., None] * grad[:, None, :]  # [TM, K, C]
    d_value = d_value.at[flat].add(contrib.reshape(tm * k, -1))
  dy_ref[...], dx_ref[...], dmask_ref[...] = d_y, d_x, d_mask
  dvalue_ref[...] += d_value


def _pallas_call(kernel, inputs, out_shapes, tm: int, interpret: bool):
  """Grid (N, G, pixel blocks): [N, G, M, K] point arrays and [N, G, Hp·Wp, C] images."""
  n, g, m, _ = inputs[0].shape

  def spec(shape):
    if shape[2] == m:  # Per output pixel: tiled.
      return pl.BlockSpec((None, None, tm, shape[3]), lambda i, j, b: (i, j, b, 0))
    return pl.BlockSpec((None, None) + tuple(shape[2:]), lambda i, j, b: (i, j, 0, 0))

  return pl.pallas_call(
      kernel, grid=(n, g, m // tm), in_specs=[spec(x.shape) for x in inputs],
      out_specs=[spec(s.shape) for s in out_shapes], out_shape=out_shapes,
      interpret=interpret)(*inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _aggregate(y, x, mask, images, hw, tm, interpret, out_dtype):
  """Pallas DCNv3 core on prepared inputs: y, x, mask [N, G, M, K]; images [N, G, Hp·Wp, C]."""
  return _aggregate_fwd(y, x, mask, images, hw, tm, interpret, out_dtype)[0]


def _aggregate_fwd(y, x, mask, images, hw, tm, interpret, out_dtype):
  n, g, m, _ = y.shape
  kernel = functools.partial(_forward_kernel, h=hw[0], w=hw[1])
  out = jax.ShapeDtypeStruct((n, g, m, images.shape[3]), out_dtype)
  (result,) = _pallas_call(kernel, (y, x, mask, images), [out], tm, interpret)
  return result, (y, x, mask, images)


def _aggregate_bwd(hw, tm, interpret, out_dtype, residuals, grad):
  del out_dtype
  y, x, mask, images = residuals
  point = jax.ShapeDtypeStruct(y.shape, jnp.float32)
  kernel = functools.partial(_backward_kernel, h=hw[0], w=hw[1])
  d_y, d_x, d_mask, d_images = _pallas_call(
      kernel, (y, x, mask, images, grad),
      [point, point, point, jax.ShapeDtypeStruct(images.shape, jnp.float32)], tm, interpret)
  return d_y, d_x, d_mask.astype(mask.dtype), d_images.astype(images.dtype)


_aggregate.defvjp(_aggregate_fwd, _aggregate_bwd)


def pallas_dcnv3(value: jax.Array, offset: jax.Array, mask: jax.Array, *,
                 kernel_size: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
                 dilation: tuple[int, int], group: int, offset_scale: float,
                 block_pixels: int = 64, interpret: bool = False) -> jax.Array:
  """The Pallas DCNv3 core; same arguments and result as `reference`."""
  n, _, _, channels = value.shape
  _, h_out, w_out, _ = offset.shape
  k = kernel_size[0] * kernel_size[1]
  per_group, m = channels // group, h_out * w_out
  padded = jnp.pad(value, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
  hp, wp = padded.shape[1:3]
  images = padded.reshape(n, hp * wp, group, per_group).transpose(0, 2, 1, 3)
  y, x = sampling_points(offset, kernel_size, stride, dilation, group, offset_scale)
  points = lambda t: t.reshape(n, m, group, k).transpose(0, 2, 1, 3)  # [N, G, M, K]
  weights = points(mask.astype(jnp.float32))
  tm = min(block_pixels, -(-m // 8) * 8)
  m_padded = -(-m // tm) * tm
  fill = lambda t: jnp.pad(t, ((0, 0), (0, 0), (0, m_padded - m), (0, 0)))
  out = _aggregate(fill(points(y)), fill(points(x)), fill(weights), images, (hp, wp), tm,
                   interpret, value.dtype)  # [N, G, M', C]
  return out[:, :, :m].transpose(0, 2, 1, 3).reshape(n, h_out, w_out, channels)


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
  args = dict(kernel_size=kernel_size, stride=stride, pad=pad, dilation=dilation, group=group,
              offset_scale=offset_scale)
  if impl in ("auto", "reference"):
    return reference(value, offset, mask, **args)
  if impl == "pallas" and jax.default_backend() not in ("gpu", "tpu"):
    raise ValueError(f"dcnv3 impl='pallas' compiles for GPU or TPU; this backend is "
                     f"{jax.default_backend()!r} (use 'reference', 'auto' or 'interpret').")
  return pallas_dcnv3(value, offset, mask, interpret=impl == "interpret", **args)
