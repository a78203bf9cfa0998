"""Chunked / ring contrastive losses: equal to the naive B x B loss, memory linear in B."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import kernels
from kernels import contrastive


@pytest.fixture(autouse=True)
def float32_matmuls():
  """Exact float32 logits on GPU too, where XLA's default precision would use TF32."""
  with jax.default_matmul_precision("float32"):
    yield


def eight_devices():
  """8 devices of one platform: the default backend's, or else the 8 host CPU devices that
  conftest forces (a 1-GPU machine runs the ring on those)."""
  for devices in (jax.devices(), jax.devices("cpu")):
    if len(devices) >= 8:
      return devices[:8]
  pytest.skip(f"needs 8 devices; have {jax.device_count()} {jax.default_backend()} and "
              f"{len(jax.devices('cpu'))} cpu (conftest sets 8 host devices before jax loads)")


def embeddings(b, d=16, seed=0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(2, b, d)).astype(np.float32)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  return jnp.asarray(z[0]), jnp.asarray(z[1])


def numpy_loss(zimg, ztxt, kind, t, bias):
  """The papers' formulas in float64 numpy."""
  logits = t * np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T
  n = len(logits)
  if kind == "softmax":
    lse = lambda x, axis: np.log(np.exp(x).sum(axis))
    return 0.5 * np.mean(lse(logits, 1) - np.diag(logits)) + 0.5 * np.mean(
        lse(logits, 0) - np.diag(logits))
  labels = 2 * np.eye(n) - 1
  return np.sum(np.log1p(np.exp(-labels * (logits + bias)))) / n


def loss_and_grads(fn, zimg, ztxt, t, bias):
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(zimg, ztxt, t, bias)


def assert_close(got, want):
  (value, grads), (want_value, want_grads) = got, want
  np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-6)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("chunk", [8, 24, 48])
def test_chunked_equals_naive_on_one_device(kind, chunk):
  zimg, ztxt = embeddings(48)
  t, bias = jnp.float32(5.0), jnp.float32(-3.0)
  naive = lambda a, b, t, bias: kernels.contrastive_loss(
      a, b, kind=kind, temperature=t, bias=bias, impl="reference")
  chunked = lambda a, b, t, bias: kernels.contrastive_loss(
      a, b, kind=kind, temperature=t, bias=bias, chunk_size=chunk)
  want = loss_and_grads(naive, zimg, ztxt, t, bias)
  np.testing.assert_allclose(want[0], numpy_loss(zimg, ztxt, kind, 5.0, -3.0), rtol=1e-5)
  assert abs(float(want[1][2])) > 1e-3  # The temperature gradient is exercised.
  assert_close(loss_and_grads(chunked, zimg, ztxt, t, bias), want)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ring_on_eight_devices_equals_naive(kind):
  devices = eight_devices()
  mesh = Mesh(np.array(devices), ("batch",))

  def ring(a, b, t, bias):
    local = lambda a, b, t, bias: kernels.contrastive_loss(
        a, b, kind=kind, temperature=t, bias=bias, chunk_size=4, axis_name="batch",
        impl="chunked")
    return jax.shard_map(local, mesh=mesh, in_specs=(P("batch"), P("batch"), P(), P()),
                         out_specs=P())(a, b, t, bias)

  naive = lambda a, b, t, bias: contrastive.reference(a, b, kind=kind, temperature=t,
                                                      bias=bias)
  with jax.default_device(devices[0]):  # The CPU devices, where a single GPU is the default.
    zimg, ztxt = embeddings(64, seed=1)
    t, bias = jnp.float32(4.0), jnp.float32(-2.0)
    assert_close(loss_and_grads(ring, zimg, ztxt, t, bias),
                 loss_and_grads(naive, zimg, ztxt, t, bias))


def temp_bytes(fn, b, d=32):
  zimg, ztxt = embeddings(b, d)
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(zimg, ztxt).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_memory_grows_linearly_in_batch_at_fixed_chunk():
  chunked = lambda a, b: kernels.contrastive_loss(a, b, kind="sigmoid", temperature=10.0,
                                                  bias=-10.0, chunk_size=64)
  naive = lambda a, b: contrastive.reference(a, b, kind="sigmoid", temperature=10.0,
                                             bias=-10.0)
  sizes = (1024, 2048, 4096)
  chunked_bytes = [temp_bytes(chunked, b) for b in sizes]
  naive_bytes = [temp_bytes(naive, b) for b in sizes]
  for small, large in zip(chunked_bytes, chunked_bytes[1:]):
    assert large / small < 2.5, chunked_bytes  # Linear: x2 per doubling.
  for small, large in zip(naive_bytes, naive_bytes[1:]):
    assert large / small > 3.5, naive_bytes  # Quadratic: x4 per doubling.
  assert chunked_bytes[-1] * 8 < naive_bytes[-1]


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="triplet"), "kind must be one of"), (dict(impl="cuda"), "impl must be one of"),
    (dict(chunk_size=5, impl="chunked"), "must divide"),
    (dict(valid=np.ones(7, bool)), "valid must have shape"),
    (dict(kind="sigmoid"), "needs a bias")])
def test_bad_arguments_are_named(kwargs, message):
  zimg, ztxt = embeddings(8)
  with pytest.raises(ValueError, match=message):
    kernels.contrastive_loss(zimg, ztxt, temperature=1.0, **{"kind": "softmax", **kwargs})


def masked_inputs(b, seed, empty=(1, 5, 6)):
  """Embeddings and a valid mask with the slots `empty` (and the last) unused."""
  zimg, ztxt = embeddings(b, seed=seed)
  valid = np.ones(b, bool)
  valid[list(empty) + [b - 1]] = False
  return zimg, ztxt, valid


def loss_fn(impl, kind, valid, chunk, **kwargs):
  return lambda a, b, t, bias: kernels.contrastive_loss(
      a, b, kind=kind, temperature=t, bias=bias if kind == "sigmoid" else None,
      chunk_size=chunk, impl=impl, valid=valid, **kwargs)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_pallas_kernel_equals_reference_in_interpret_mode(kind):
  """B = 40 in blocks of 16: padded to 48, so the last block is partly padding (with empty
  slots: test_masked_loss_is_the_naive_loss_on_the_real_pairs)."""
  zimg, ztxt = embeddings(40, seed=2)
  t, bias = jnp.float32(5.0), jnp.float32(-3.0)
  want = loss_and_grads(loss_fn("reference", kind, None, None), zimg, ztxt, t, bias)
  assert abs(float(want[1][2])) > 1e-3  # The temperature gradient is exercised.
  assert_close(loss_and_grads(loss_fn("pallas", kind, None, 16), zimg, ztxt, t, bias), want)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl,chunk", [("reference", None), ("chunked", 8), ("pallas", 16)])
def test_masked_loss_is_the_naive_loss_on_the_real_pairs(kind, impl, chunk):
  """Against the naive loss of only the real rows (dropped, then the numpy formula and the
  unmasked naive jax loss for gradients); empty slots get exactly zero gradient."""
  zimg, ztxt, valid = masked_inputs(24, seed=3)
  t, bias = jnp.float32(4.0), jnp.float32(-2.0)
  value, grads = loss_and_grads(loss_fn(impl, kind, valid, chunk), zimg, ztxt, t, bias)
  real = lambda x: x[valid]
  np.testing.assert_allclose(value, numpy_loss(real(zimg), real(ztxt), kind, 4.0, -2.0),
                             rtol=1e-5)
  _, want = loss_and_grads(loss_fn("reference", kind, None, None), real(zimg), real(ztxt), t,
                           bias)
  for got, expected in zip(grads[:2], want[:2]):
    np.testing.assert_allclose(got[valid], expected, rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(got)[~valid])  # Exactly zero, not just small.
  for got, expected in zip(grads[2:], want[2:]):  # Temperature, bias (zero for softmax).
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "chunked", "pallas"])
def test_no_valid_pair_gives_zero_loss_and_gradients(impl):
  zimg, ztxt = embeddings(16)
  for kind in ("softmax", "sigmoid"):
    value, grads = loss_and_grads(loss_fn(impl, kind, np.zeros(16, bool), 8), zimg, ztxt,
                                  jnp.float32(5.0), jnp.float32(-3.0))
    assert float(value) == 0.0
    for grad in grads:
      assert not np.any(np.asarray(grad)), (kind, grad)  # Zero, and no NaN.


SLOW = pytest.mark.slow  # Pallas' interpreter inside shard_map: ~6-10 s on 2 devices, ~30 on 8.


@pytest.mark.parametrize("kind,impl,chunk,n_devices", [
    ("softmax", "chunked", 4, 8), ("sigmoid", "chunked", 4, 8), ("softmax", "pallas", 16, 2),
    pytest.param("sigmoid", "pallas", 16, 2, marks=SLOW),
    pytest.param("softmax", "pallas", 16, 8, marks=SLOW),
    pytest.param("sigmoid", "pallas", 16, 8, marks=SLOW)])
def test_masked_ring_equals_naive_on_real_pairs(kind, impl, chunk, n_devices):
  """64 rows over the ring, some devices' slots empty (with 8 devices, one has no real row):
  the ring with `valid` (a psum of the valid count) equals the single-device naive loss on
  the real rows, and empty slots get zero gradient."""
  devices = eight_devices()[:n_devices]
  if impl == "pallas" and devices[0].platform != jax.default_backend():
    pytest.skip("the pallas impl builds kernels for the default backend, not these devices")
  mesh = Mesh(np.array(devices), ("batch",))

  def ring(a, b, t, bias, valid):
    local = lambda a, b, t, bias, valid: loss_fn(impl, kind, valid, chunk,
                                                 axis_name="batch")(a, b, t, bias)
    return jax.shard_map(local, mesh=mesh, in_specs=(P("batch"),) * 2 + (P(), P(), P("batch")),
                         out_specs=P())(a, b, t, bias, valid)

  with jax.default_device(devices[0]):
    zimg, ztxt, valid = masked_inputs(64, seed=4, empty=(0, 9, 10, 11, 30, *range(40, 48)))
    t, bias = jnp.float32(4.0), jnp.float32(-2.0)
    got = jax.jit(jax.value_and_grad(ring, argnums=(0, 1, 2, 3)))(zimg, ztxt, t, bias, valid)
    real = lambda x: x[valid]
    want = loss_and_grads(loss_fn("reference", kind, None, None), real(zimg), real(ztxt), t,
                          bias)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
  for i in (0, 1):
    np.testing.assert_allclose(got[1][i][valid], want[1][i], rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(got[1][i])[~valid])
  for i in (2, 3):
    np.testing.assert_allclose(got[1][i], want[1][i], rtol=1e-5, atol=1e-6)


def test_auto_is_the_pallas_kernel_only_on_gpu_and_tpu():
  zimg, ztxt = embeddings(16)
  jaxpr = lambda impl: str(jax.make_jaxpr(lambda a, b: kernels.contrastive_loss(
      a, b, temperature=5.0, impl=impl))(zimg, ztxt))
  assert "pallas_call" in jaxpr("pallas")
  assert ("pallas_call" in jaxpr("auto")) == (jax.default_backend() in ("gpu", "tpu"))


@pytest.mark.parametrize("backend", ["gpu", "tpu", "cpu"])
def test_pallas_layout_fits_the_hardware(backend):
  """Blocks: powers of two in 16..128 (Triton's power-of-two shapes), on TPU 128 or one block
  holding the batch (lane-dimension slices); the batch padded to whole blocks, the width to a
  power of two (GPU) or multiple of 128 (TPU), never below the data."""
  for b in (5, 24, 100, 300, 4096):
    for width in (16, 65, 256, 769):
      for chunk in (None, 16, 48, 512):
        block, n, padded = contrastive._pallas_layout(b, width, chunk, backend)
        assert block & (block - 1) == 0 and 16 <= block <= 128 and n % block == 0
        assert b <= n < b + block and width <= padded
        if backend == "gpu":
          assert padded & (padded - 1) == 0 and (chunk or block * padded <= 1 << 14)
        if backend == "tpu":
          assert padded % 128 == 0 and (block == 128 or n == block)
        if chunk and backend != "tpu":
          assert block == min(max(16, 1 << (min(chunk, 128).bit_length() - 1)), n)


@pytest.mark.parametrize("platform,backend,marker", [
    ("cuda", "gpu", "xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
def test_pallas_kernels_lower_for_gpu_and_tpu(platform, backend, marker):
  """The compiled (not interpret) kernels lowered for Triton and Mosaic without the hardware:
  one statistics kernel forward and one gradient kernel per side backward, per kind. B = 300
  is padded to 3 blocks of 128, the width 64 (+1 bias column) to the backend's multiple."""
  specs = (jax.ShapeDtypeStruct((300, 64), jnp.float32),) * 2 + (
      jax.ShapeDtypeStruct((), jnp.float32),) * 2 + (jax.ShapeDtypeStruct((300,), bool),)
  for kind in ("softmax", "sigmoid"):
    loss = lambda a, b, t, bias, valid: contrastive.pallas_loss(
        a, b, kind=kind, temperature=t, bias=bias if kind == "sigmoid" else None, valid=valid,
        chunk_size=128, axis_name=None, backend=backend)
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).trace(*specs).lower(
        lowering_platforms=(platform,))
    assert lowered.as_text().count(marker) == 3, kind
