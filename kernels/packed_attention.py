"""Segment-masked (packed) self-attention: a token attends only to tokens of its segment.

`segment_attention(q, k, v, segment_ids, impl="auto")` with q, k, v [B, L, H, Dh] and
segment_ids [B, L] int (0 = padding, which attends only to padding):

  "reference"  `dot_product_attention` (plain einsums) with a boolean [B, 1, L, L] mask built
               from the ids and broadcast over heads (XLA fuses it on GPU; on CPU it is
               materialised).
  "pallas"     the flash-attention kernels that ship with JAX, which take segment ids and
               never build an L x L mask: `pallas.ops.gpu.attention.mha` on GPU (Triton) and
               `pallas.ops.tpu.flash_attention` on TPU. Dh must be a multiple of 16, and L a
               multiple of 128 (the kernels' block), or on GPU also 16, 32 or 64 (one block:
               Triton's blocks are powers of two; the TPU kernel's key blocks hold 128).
  "interpret"  the GPU Pallas kernel in interpret mode (tests on CPU).
  "auto"       "pallas" on GPU/TPU where the shapes allow it, the reference elsewhere.

`gpu_kernel` and `tpu_kernel` are the two Pallas paths themselves (tests run the TPU one
under `pallas.tpu.force_tpu_interpret_mode` and lower the GPU one for CUDA on CPU).
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_attention

IMPLS = ("auto", "reference", "pallas", "interpret")
_BLOCK = 128


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """segment_ids [B, L] -> boolean [B, 1, L, L], True where query and key share a segment."""
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """q [B, Nq, H, Dh], k and v [B, Nk, H, Dh], boolean mask broadcastable to [B, H, Nq, Nk]
  -> (out [B, Nq, H, Dh], softmax weights [B, H, Nq, Nk] in float32).

  Plain einsums, as flax's attention, with the scale on q rather than on the logits: XLA
  compiles them with fewer transposes and copies than `jax.nn.dot_product_attention`'s
  (grouped-query) XLA path, which slowed a ViT-S/16 train step on CPU by 5-10%; the op
  alone, fwd+bwd, took 1.24-1.30x as long masked and 1.25x unmasked (benchmarks/attention.py).
  """
  q = q * (1 / np.sqrt(q.shape[-1])).astype(q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                      preferred_element_type=jnp.float32)  # [B, H, Nq, Nk]
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)  # [B, H, Nq, Nk]
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v), probs


def reference(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Pure-JAX segment-masked attention; q, k, v [B, L, H, Dh] -> [B, L, H, Dh]."""
  return dot_product_attention(q, k, v, segment_mask(segment_ids))[0]


def pallas_shapes_ok(q: jax.Array, backend: str) -> bool:
  """Whether the Pallas kernel of `backend` ("gpu" or "tpu") takes q [B, L, H, Dh]."""
  length, head_dim = q.shape[1], q.shape[3]
  one_gpu_block = backend == "gpu" and length in (16, 32, 64)
  return head_dim % 16 == 0 and (length % _BLOCK == 0 or one_gpu_block)


def gpu_kernel(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
               interpret: bool = False) -> jax.Array:
  """JAX's Triton flash attention with segment ids; q, k, v [B, L, H, Dh] -> [B, L, H, Dh]."""
  scale = 1.0 / np.sqrt(q.shape[-1])
  return gpu_attention.mha(q, k, v, segment_ids.astype(jnp.int32), sm_scale=scale,
                           interpret=interpret)


def tpu_kernel(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """JAX's TPU flash attention with segment ids; q, k, v [B, L, H, Dh] -> [B, L, H, Dh]."""
  ids = segment_ids.astype(jnp.int32)
  to_bhld = lambda x: x.transpose(0, 2, 1, 3)
  out = tpu_attention.flash_attention(
      to_bhld(q), to_bhld(k), to_bhld(v), segment_ids=tpu_attention.SegmentIds(q=ids, kv=ids),
      sm_scale=1.0 / np.sqrt(q.shape[-1]))
  return to_bhld(out)


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                      impl: str = "auto") -> jax.Array:
  """Attention of q over k, v [B, L, H, Dh] within segments of `segment_ids` [B, L]."""
  if impl not in IMPLS:
    raise ValueError(f"segment_attention impl must be one of {', '.join(IMPLS)}; got {impl!r}.")
  if q.shape != k.shape or q.shape != v.shape or segment_ids.shape != q.shape[:2]:
    raise ValueError(f"segment_attention needs q, k, v of one shape [B, L, H, Dh] and "
                     f"segment_ids [B, L]; got {q.shape}, {k.shape}, {v.shape}, "
                     f"{segment_ids.shape}.")
  backend = jax.default_backend()
  if impl == "auto":
    impl = ("pallas" if backend in ("gpu", "tpu") and pallas_shapes_ok(q, backend)
            else "reference")
  if impl == "reference":
    return reference(q, k, v, segment_ids)
  if impl == "pallas" and backend not in ("gpu", "tpu"):
    raise ValueError(f"impl='pallas' needs a GPU or TPU backend; this one is {backend!r} "
                     "(use 'reference', 'auto' or, for tests, 'interpret').")
  kernel_backend = "gpu" if impl == "interpret" else backend
  if not pallas_shapes_ok(q, kernel_backend):
    raise ValueError(f"The {kernel_backend.upper()} Pallas attention needs head dim a multiple "
                     f"of 16 and L a multiple of {_BLOCK}"
                     + (" or one of 16, 32, 64" if kernel_backend == "gpu" else "")
                     + f"; got L={q.shape[1]}, head dim {q.shape[3]} (impl='auto' falls back "
                     "to the reference for such shapes).")
  if impl == "interpret":
    return gpu_kernel(q, k, v, segment_ids, interpret=True)
  if backend == "tpu":
    return tpu_kernel(q, k, v, segment_ids)
  return gpu_kernel(q, k, v, segment_ids)
