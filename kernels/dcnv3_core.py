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
  "pallas"     a Pallas kernel for NVIDIA GPUs (Triton backend) with a custom VJP, one
               program per block of output pixels of one (n, group) image. The padded image
               stays in HBM: each program gathers the 4 bilinear corner rows of every
               sampling point by pointer ([TM, K, C] per corner), weights and sums them
               (forward); the backward kernel computes the offset and mask gradients per
               point and adds each corner's value gradient atomically into a zeroed float32
               image. K and the channels per group are zero-padded to powers of two, as
               Triton needs; float32 accumulation for any input dtype. GPU only: it is not
               written for TPU, and other backends raise.
  "interpret"  the same kernel in Pallas interpret mode, on any backend (tests on CPU).
  "auto"       "pallas" on a GPU backend, else the reference. On an H200 (jax 0.11.2) the
               kernel's forward + backward took 0.68-0.95x the reference's time at each of
               InternImage-T's four stages, batch 32 (`benchmarks/kernels.py`), with
               differences to the reference of 2-3e-7 relative.
"""
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

IMPLS = ("auto", "reference", "pallas", "interpret")
_TILE_ELEMENTS = 4096  # Default cap on TM·K·C, the [TM, K, C] tile gathered per corner.


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


def _forward_kernel(y_ref, x_ref, mask_ref, image_ref, out_ref, *, h: int, w: int):
  """One pixel block of one (n, group) image: out [TM, C] = Σ_k mask · bilinear(image, y, x)."""
  base = pl.program_id(1) * (h * w)  # First row of this (n, group) image in the flat images.
  y, x, mask = y_ref[...], x_ref[...], mask_ref[...]  # [TM, K]
  samples = jnp.zeros(y.shape + out_ref.shape[-1:], jnp.float32)  # [TM, K, C]
  for index, weight, _, _ in _corners(y, x, h, w):
    rows = image_ref[base + index, :].astype(jnp.float32)  # [TM, K, C], a pointer gather
    samples += (mask * weight)[:, :, None] * rows
  out_ref[...] = jnp.sum(samples, axis=1).astype(out_ref.dtype)  # [TM, C]


def _backward_kernel(y_ref, x_ref, mask_ref, image_ref, grad_ref, zeros_ref, dy_ref, dx_ref,
                     dmask_ref, dimage_ref, *, h: int, w: int, interpret: bool):
  """Gradients of one pixel block; d image gets each corner's contribution added atomically
  (dimage_ref aliases zeros_ref)."""
  del zeros_ref
  base = pl.program_id(1) * (h * w)
  y, x, mask = y_ref[...], x_ref[...], mask_ref[...]  # [TM, K]
  grad = grad_ref[...].astype(jnp.float32)  # [TM, C]
  d_y, d_x, d_mask = (jnp.zeros(y.shape, jnp.float32) for _ in range(3))
  for index, weight, weight_dy, weight_dx in _corners(y, x, h, w):
    rows = image_ref[base + index, :].astype(jnp.float32)  # [TM, K, C]
    dot = jnp.sum(rows * grad[:, None, :], axis=2)  # [TM, K], d out / d (weight · mask)
    d_mask += weight * dot
    d_y += mask * weight_dy * dot
    d_x += mask * weight_dx * dot
    scale = mask * weight  # [TM, K], zero for padded points and corners outside the image
    contrib = scale[:, :, None] * grad[:, None, :]  # [TM, K, C]
    if interpret:  # The interpreter's atomic_add takes no mask and drops repeated rows.
      jax.ref.addupdate(dimage_ref, (base + index, slice(None)), contrib)
    else:  # Masked: dead points would all hit the same clipped rows.
      live = jnp.broadcast_to((scale != 0)[:, :, None], contrib.shape)
      plt.atomic_add(dimage_ref, (base + index, slice(None)), contrib, mask=live)
  dy_ref[...], dx_ref[...], dmask_ref[...] = d_y, d_x, d_mask


def _num_warps(tile_elements: int) -> int:
  """Warps for a [TM, K, C] tile: 16 elements per thread (the backward kernel then needs about
  120 registers on sm_90, without spills), 1..8 warps."""
  return max(1, min(8, tile_elements // (16 * 32)))


def _pallas_call(kernel, inputs, out_shapes, tm: int, interpret: bool, aliases=None):
  """Grid (pixel blocks, N·G): [N·G, M, ·] arrays are tiled by TM pixels; the flat
  [N·G·Hp·Wp, C] images stay in HBM and are read and written by pointer gathers."""
  ng, m, k = inputs[0].shape
  channels = inputs[3].shape[1]

  def spec(shape):
    if len(shape) == 3:
      return pl.BlockSpec((None, tm, shape[2]), lambda b, i: (i, b, 0))
    return pl.BlockSpec(memory_space=pl.ANY)

  params = plt.CompilerParams(num_warps=_num_warps(tm * k * channels), num_stages=1)
  return pl.pallas_call(
      kernel, grid=(m // tm, ng), in_specs=[spec(x.shape) for x in inputs],
      out_specs=[spec(s.shape) for s in out_shapes], out_shape=out_shapes,
      input_output_aliases=aliases or {}, compiler_params=params, interpret=interpret)(*inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _aggregate(y, x, mask, images, hw, tm, interpret, out_dtype):
  """Pallas DCNv3 core on prepared inputs: y, x, mask [N·G, M, K]; images [N·G·Hp·Wp, C]."""
  return _aggregate_fwd(y, x, mask, images, hw, tm, interpret, out_dtype)[0]


def _aggregate_fwd(y, x, mask, images, hw, tm, interpret, out_dtype):
  ng, m, _ = y.shape
  kernel = functools.partial(_forward_kernel, h=hw[0], w=hw[1])
  out = jax.ShapeDtypeStruct((ng, m, images.shape[1]), out_dtype)
  (result,) = _pallas_call(kernel, (y, x, mask, images), [out], tm, interpret)
  return result, (y, x, mask, images)


def _aggregate_bwd(hw, tm, interpret, out_dtype, residuals, grad):
  del out_dtype
  y, x, mask, images = residuals
  point = jax.ShapeDtypeStruct(y.shape, jnp.float32)
  d_image = jax.ShapeDtypeStruct(images.shape, jnp.float32)
  kernel = functools.partial(_backward_kernel, h=hw[0], w=hw[1], interpret=interpret)
  zeros = jnp.zeros(images.shape, jnp.float32)
  d_y, d_x, d_mask, d_images = _pallas_call(
      kernel, (y, x, mask, images, grad, zeros), [point, point, point, d_image], tm, interpret,
      aliases={5: 3})
  return d_y, d_x, d_mask, d_images.astype(images.dtype)


_aggregate.defvjp(_aggregate_fwd, _aggregate_bwd)


def _power_of_two(size: int) -> int:
  return 1 << (size - 1).bit_length()


def pallas_dcnv3(value: jax.Array, offset: jax.Array, mask: jax.Array, *,
                 kernel_size: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
                 dilation: tuple[int, int], group: int, offset_scale: float,
                 block_pixels: int | None = None, interpret: bool = False) -> jax.Array:
  """The Pallas DCNv3 core; same arguments and result as `reference`. Compiles for GPUs
  (Triton) only; `interpret=True` runs it anywhere. `block_pixels` (a power of two) sets the
  output pixels per program; None takes the most with at most 4096 elements per [TM, K, C]
  tile, K and C rounded up to powers of two (16 pixels for 3x3 points, 16 channels)."""
  if block_pixels is not None and (block_pixels < 1 or block_pixels & (block_pixels - 1)):
    raise ValueError(f"dcnv3 block_pixels must be a power of two, got {block_pixels}.")
  n, _, _, channels = value.shape
  _, h_out, w_out, _ = offset.shape
  k = kernel_size[0] * kernel_size[1]
  per_group, m = channels // group, h_out * w_out
  k_padded, c_padded = _power_of_two(k), _power_of_two(per_group)
  padded = jnp.pad(value, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
  hp, wp = padded.shape[1:3]
  images = padded.reshape(n, hp * wp, group, per_group).transpose(0, 2, 1, 3)
  images = jnp.pad(images, ((0, 0), (0, 0), (0, 0), (0, c_padded - per_group)))
  images = images.reshape(n * group * hp * wp, c_padded)  # [N·G·Hp·Wp, C']
  tm = block_pixels or max(1, _TILE_ELEMENTS // (k_padded * c_padded))
  tm = min(tm, _power_of_two(m))
  m_padded = -(-m // tm) * tm

  def points(t):  # [N, H_out, W_out, G, K] -> [N·G, M', K'], zero-filled
    t = t.reshape(n, m, group, k).transpose(0, 2, 1, 3).reshape(n * group, m, k)
    return jnp.pad(t, ((0, 0), (0, m_padded - m), (0, k_padded - k)))

  y, x = sampling_points(offset, kernel_size, stride, dilation, group, offset_scale)
  out = _aggregate(points(y), points(x), points(mask.astype(jnp.float32)), images, (hp, wp),
                   tm, interpret, value.dtype)  # [N·G, M', C']
  out = out[:, :m, :per_group].reshape(n, group, h_out, w_out, per_group)
  return out.transpose(0, 2, 3, 1, 4).reshape(n, h_out, w_out, channels)


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
  if impl == "auto":
    impl = "pallas" if jax.default_backend() == "gpu" else "reference"
  if impl == "reference":
    return reference(value, offset, mask, **args)
  if impl == "pallas" and jax.default_backend() != "gpu":
    raise ValueError(f"dcnv3 impl='pallas' is a Triton kernel for GPUs only; this backend is "
                     f"{jax.default_backend()!r}. Accepted impls: {', '.join(IMPLS)}; use "
                     f"'reference' (or 'auto') here, or 'interpret' to run the kernel slowly.")
  return pallas_dcnv3(value, offset, mask, interpret=impl == "interpret", **args)
