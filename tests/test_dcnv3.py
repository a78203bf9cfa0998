"""DCNv3: reference vs a loop-by-loop numpy version of the official recipe; Pallas vs reference."""
import importlib.util
import subprocess
import sys

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


def test_pallas_impl_names_the_accepted_impls_off_gpu():
  if jax.default_backend() == "gpu":
    pytest.skip("on a GPU backend impl='pallas' compiles the kernel")
  value, offset, mask = random_inputs(1, 4, 4, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1.0)
  with pytest.raises(ValueError, match="GPUs only.*auto, reference, pallas, interpret"):
    dcnv3_lib.dcnv3(value, offset, mask, group=2, impl="pallas")


def case_args(case):
  kernel, stride, pad, dilation, group, _, scale, _ = CASES[case]
  return dict(kernel_size=kernel, stride=stride, pad=pad, dilation=dilation, group=group,
              offset_scale=scale)


# Shapes lowered for CUDA: (case, n, h, w, channels per group); the last is InternImage-T's
# first stage at 224 px (56 x 56, 64 channels in 4 groups).
LOWERED = [(case, 2, 7, 6, CASES[case][5]) for case in sorted(CASES)] + [("3x3", 2, 56, 56, 16)]


def lower_for_cuda(case, n, h, w, per_group, dtype, grad):
  """The compiled kernel (not interpret mode) lowered for CUDA, forward or value and gradients;
  works without a GPU."""
  args = case_args(case)
  kernel, stride, pad, dilation, group = (args[k] for k in ("kernel_size", "stride", "pad",
                                                              "dilation", "group"))
  value, offset, mask = random_inputs(n, h, w, group, per_group, kernel, stride, pad, dilation,
                                      1.0)
  specs = (jax.ShapeDtypeStruct(value.shape, dtype), jax.ShapeDtypeStruct(offset.shape,
           jnp.float32), jax.ShapeDtypeStruct(mask.shape, jnp.float32))
  forward = lambda v, o, m: dcnv3_lib.pallas_dcnv3(v, o, m, interpret=False, **args)
  loss = lambda *a: (forward(*a).astype(jnp.float32) ** 2).sum()
  fn = jax.grad(loss, argnums=(0, 1, 2)) if grad else forward
  return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", LOWERED, ids=lambda s: f"{s[0]}-{s[2]}x{s[3]}")
def test_pallas_kernel_lowers_for_cuda_forward_and_backward(shape, dtype):
  """The Triton lowering (power-of-two values, pointer gathers, atomics) runs on CPU too, so
  a kernel that no longer lowers for GPU fails here without one."""
  for grad, kernels in ((False, 1), (True, 2)):  # The gradient runs the forward kernel too.
    text = lower_for_cuda(*shape, jnp.dtype(dtype), grad).as_text()
    assert text.count("xla.gpu.triton") == kernels, "expected Triton custom calls"


def triton_modules(lowered):
  """(Triton IR text, num_warps) of each Pallas kernel in a module lowered for CUDA."""
  from jax._src.lib.mlir import ir  # Internal: the kernel IR is MLIR bytecode in the call.
  from jax._src.pallas.triton import lowering as triton_lowering
  modules = []

  def visit(op):
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          child = child.operation
          if child.name == "stablehlo.custom_call" and "mhlo.backend_config" in child.attributes:
            config = ir.DictAttr(child.attributes["mhlo.backend_config"])
            with triton_lowering._new_ir_context():
              text = str(ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes))
            modules.append((text, ir.IntegerAttr(config["num_warps"]).value))
          visit(child)

  visit(lowered.compiler_ir("stablehlo").operation)
  return modules


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pallas_kernel_compiles_to_sm90_with_the_triton_package(dtype, tmp_path):
  """Triton's own compiler (layouts, LLVM, ptxas) on the kernels, without a GPU: catches
  what the JAX lowering lets through. Where there is a GPU the compiled tests cover this."""
  if jax.default_backend() == "gpu":
    pytest.skip("on a GPU the kernel is compiled by the tests below")
  if importlib.util.find_spec("triton") is None:
    pytest.skip("the triton package is not installed (it comes with torch: pip install "
                "torch==2.14.1)")
  lowered = lower_for_cuda("3x3", 2, 56, 56, 16, jnp.dtype(dtype), grad=True)
  modules = triton_modules(lowered)
  assert len(modules) == 2
  for i, (text, num_warps) in enumerate(modules):
    path = tmp_path / f"kernel{i}.ttir"
    path.write_text(text)
    # In a subprocess: triton's native libraries crash in a process that loaded TensorFlow.
    script = ("import sys, triton; from triton.backends.compiler import GPUTarget; "
              "c = triton.compile(sys.argv[1], target=GPUTarget('cuda', 90, 32), "
              "options=dict(num_warps=int(sys.argv[2]), num_stages=1)); "
              "print(len(c.asm['cubin']))")
    result = subprocess.run([sys.executable, "-c", script, str(path), str(num_warps)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) > 0


GPU_ONLY = pytest.mark.skipif(jax.default_backend() != "gpu",
                              reason="the compiled Triton kernel needs a GPU backend")


def compare_compiled_with_reference(inputs, args, dtype, atol, rtol):
  """Compiled impl='pallas' against the reference (float32 matmuls, no TF32): forward and the
  value / offset / mask gradients of a random projection of the output."""
  value, offset, mask = (jnp.asarray(inputs[0], dtype),) + tuple(map(jnp.asarray, inputs[1:]))
  fns = {impl: lambda v, o, m, impl=impl: dcnv3_lib.dcnv3(v, o, m, impl=impl, **args)
         for impl in ("pallas", "reference")}
  probe = jnp.asarray(np.random.default_rng(3).normal(size=offset.shape[:3] + value.shape[3:]),
                      jnp.float32)
  results = {}
  with jax.default_matmul_precision("float32"):
    for impl, fn in fns.items():
      loss = lambda *a, fn=fn: (fn(*a).astype(jnp.float32) * probe).sum()
      grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(value, offset, mask)
      results[impl] = (jax.jit(fn)(value, offset, mask),) + grads
  assert results["pallas"][0].dtype == dtype
  for got, want in zip(results["pallas"], results["reference"]):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, atol=atol * np.abs(want).max(), rtol=rtol)


@GPU_ONLY
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_pallas_kernel_matches_reference_on_gpu(case, dtype):
  """13 x 11 outputs: several pixel blocks, the last one partly filled."""
  kernel, stride, pad, dilation, group, per_group, _, spread = CASES[case]
  inputs = random_inputs(2, 13, 11, group, per_group, kernel, stride, pad, dilation, spread,
                         seed=5)
  tolerance = 1e-4 if dtype == "float32" else 2e-2
  compare_compiled_with_reference(inputs, case_args(case), jnp.dtype(dtype), tolerance,
                                  tolerance)


@GPU_ONLY
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_pallas_kernel_matches_reference_at_internimage_t_stage1(dtype):
  """56 x 56, 64 channels in 4 groups: many programs add into the same image rows."""
  inputs = random_inputs(2, 56, 56, 4, 16, (3, 3), (1, 1), (1, 1), (1, 1), 2.0, seed=6)
  tolerance = 1e-4 if dtype == "float32" else 2e-2
  compare_compiled_with_reference(inputs, case_args("3x3") | dict(group=4), jnp.dtype(dtype),
                                  tolerance, tolerance)
