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
        a, b, kind=kind, temperature=t, bias=bias, chunk_size=4, axis_name="batch")
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
    (dict(chunk_size=5), "must divide"), (dict(kind="sigmoid"), "needs a bias")])
def test_bad_arguments_are_named(kwargs, message):
  zimg, ztxt = embeddings(8)
  with pytest.raises(ValueError, match=message):
    kernels.contrastive_loss(zimg, ztxt, temperature=1.0, **{"kind": "softmax", **kwargs})
