"""DCNv3: reference vs a loop-by-loop numpy version of the official recipe; Pallas vs reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kernels import dcnv3_core as dcnv3_lib


def naive_dcnv3(value, offset, mask, kernel, stride, pad, dilation, group, offset_scale):
  """Official recipe, literally: normalised sampling locations on the padded input, then
  grid_sample(bilinear, zeros, align_corners=False) as pixel = location · size − 0.5."""
  value = np.pad(value.astype(np.float64), ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
  n, h_in, w_in, channels = value.shape
  _, h_out, w_out, _ = offset.shape
  (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
  per_group, k = channels // group, kh * kw
  out = np.zeros((n, h_out, w_out, channels))
  for b in range(n):
    for i in range(h_out):
      for j in range(w_out):
        ref_y = ((dh * (kh - 1)) // 2 + 0.5 + i * sh) / h_in
        ref_x = ((dw * (kw - 1)) // 2 + 0.5 + j * sw) / w_in
        for g in range(group):
          for ix in range(kw):
            for iy in range(kh):
              p = ix * kh + iy
              grid_x = (-((dw * (kw - 1)) // 2) + ix * dw) / w_in
              grid_y = (-((dh * (kh - 1)) // 2) + iy * dh) / h_in
              off_x, off_y = offset[b, i, j, (g * k + p) * 2: (g * k + p) * 2 + 2]
              loc_x = ref_x + grid_x * offset_scale + off_x * offset_scale / w_in
              loc_y = ref_y + grid_y * offset_scale + off_y * offset_scale / h_in
              px, py = loc_x * w_in - 0.5, loc_y * h_in - 0.5
              x0, y0 = int(np.floor(px)), int(np.floor(py))
              sample = np.zeros(per_group)
              for yy in (y0, y0 + 1):
                for xx in (x0, x0 + 1):
                  if 0 <= yy < h_in and 0 <= xx < w_in:
                    weight = (1 - abs(py - yy)) * (1 - abs(px - xx))
                    sample += weight * value[b, yy, xx, g * per_group:(g + 1) * per_group]
              out[b, i, j, g * per_group:(g + 1) * per_group] += mask[b, i, j, g * k + p] * sample
  return out


def random_inputs(n, h, w, group, per_group, kernel, stride, pad, dilation, spread, seed=0):
  rng = np.random.default_rng(seed)
  h_out = dcnv3_lib.output_size(h, kernel[0], stride[0], pad[0], dilation[0])
  w_out = dcnv3_lib.output_size(w, kernel[1], stride[1], pad[1], dilation[1])
  k = kernel[0] * kernel[1]
  value = rng.normal(size=(n, h, w, group * per_group)).astype(np.float32)
  offset = (rng.normal(size=(n, h_out, w_out, group * k * 2)) * spread).astype(np.float32)
  logits = rng.normal(size=(n, h_out, w_out, group, k))
  mask = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return value, offset, mask.reshape(n, h_out, w_out, group * k).astype(np.float32)


CASES = {  # kernel, stride, pad, dilation, group, channels per group, offset_scale, spread
    "3x3": ((3, 3), (1, 1), (1, 1), (1, 1), 2, 3, 1.0, 1.5),
    "stride2": ((3, 3), (2, 2), (1, 1), (1, 1), 3, 5, 1.0, 2.0),
    "dilation2": ((3, 3), (1, 1), (2, 2), (2, 2), 1, 4, 1.0, 1.0),
    "5x3_scale": ((5, 3), (1, 2), (2, 1), (1, 1), 4, 1, 0.5, 3.0),
    "far_outside": ((3, 3), (1, 1), (0, 0), (1, 1), 2, 2, 2.0, 6.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_the_official_recipe(case):
  kernel, stride, pad, dilation, group, per_group, scale, spread = CASES[case]
  value, offset, mask = random_inputs(2, 7, 6, group, per_group, kernel, stride, pad,
                                      dilation, spread)
  out = dcnv3_lib.dcnv3(jnp.asarray(value), jnp.asarray(offset), jnp.asarray(mask),
                        kernel_size=kernel, stride=stride, pad=pad, dilation=dilation,
                        group=group, offset_scale=scale)
  want = naive_dcnv3(value, offset, mask, kernel, stride, pad, dilation, group, scale)
  assert out.shape == want.shape
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["3x3", "stride2", "dilation2"])
def test_reference_gradients(case):
  kernel, stride, pad, dilation, group, per_group, scale, spread = CASES[case]
  value, offset, mask = random_inputs(1, 5, 5, group, per_group, kernel, stride, pad,
                                      dilation, spread, seed=1)
  # Keep sampling points away from integer coordinates, where bilinear weights have kinks.
  offset = np.round(offset) + 0.3
  fn = lambda v, o, m: dcnv3_lib.dcnv3(v, o, m, kernel_size=kernel, stride=stride, pad=pad,
                                       dilation=dilation, group=group, offset_scale=scale)
  check_grads(fn, tuple(jnp.asarray(x) for x in (value, offset, mask)), order=1,
              modes=("rev",), eps=1e-3, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(group=3), "group"), (dict(impl="cuda"), "impl must be one of"),
    (dict(stride=2), "offset must be"), (dict(kernel_size=(3, 3, 3)), "kernel_size")])
def test_bad_arguments_are_named(kwargs, message):
  value, offset, mask = random_inputs(1, 4, 4, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1.0)
  with pytest.raises(ValueError, match=message):
    dcnv3_lib.dcnv3(value, offset, mask, **{"group": 2, **kwargs})


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("block_pixels", [16, 64])
def test_pallas_kernel_matches_reference_in_interpret_mode(case, block_pixels):
  """Forward and the value / offset / mask gradients; 7 x 6 outputs do not fill the tiles."""
  kernel, stride, pad, dilation, group, per_group, scale, spread = CASES[case]
  inputs = random_inputs(2, 7, 6, group, per_group, kernel, stride, pad, dilation, spread,
                         seed=2)
  args = dict(kernel_size=kernel, stride=stride, pad=pad, dilation=dilation, group=group,
              offset_scale=scale)
  ref = lambda v, o, m: dcnv3_lib.reference(v, o, m, **args)
  kernel_fn = lambda v, o, m: dcnv3_lib.pallas_dcnv3(v, o, m, block_pixels=block_pixels,
                                                     interpret=True, **args)
  want = ref(*inputs)
  np.testing.assert_allclose(kernel_fn(*inputs), want, atol=1e-5, rtol=1e-5)
  probe = jnp.asarray(np.random.default_rng(3).normal(size=want.shape), jnp.float32)
  loss = lambda fn: lambda *a: (fn(*a) * probe).sum()
  grads = jax.grad(loss(kernel_fn), argnums=(0, 1, 2))(*inputs)
  want_grads = jax.grad(loss(ref), argnums=(0, 1, 2))(*inputs)
  for got, expected in zip(grads, want_grads):
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_pallas_kernel_takes_bfloat16_and_accumulates_in_float32():
  kernel, stride, pad, dilation, group, per_group, scale, spread = CASES["3x3"]
  value, offset, mask = random_inputs(1, 6, 6, group, per_group, kernel, stride, pad,
                                      dilation, spread, seed=4)
  args = dict(kernel_size=kernel, stride=stride, pad=pad, dilation=dilation, group=group,
              offset_scale=scale)
  value16 = jnp.asarray(value, jnp.bfloat16)
  out = dcnv3_lib.dcnv3(value16, offset, mask, impl="interpret", **args)
  assert out.dtype == jnp.bfloat16
  want = dcnv3_lib.reference(value16.astype(jnp.float32), offset, mask, **args)
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=2e-2, rtol=2e-2)
