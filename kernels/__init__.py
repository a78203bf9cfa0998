"""Kernels, each beside a pure-jnp reference with the same signature and a dispatcher.

- `dcnv3` (dcnv3_core.py): InternImage's deformable aggregation, with the official layout and
  semantics; a jnp reference and a Pallas (Triton, GPU-only) kernel with a custom VJP, tested
  in interpret mode and lowered for CUDA on CPU, compiled and timed on an H200; "auto" is
  the kernel on GPU and the reference elsewhere.
- `contrastive_loss` (contrastive.py): CLIP / SigLIP losses over the global batch, chunked
  with a recomputing custom VJP and, across devices, a `ppermute` ring; the per-block work
  in jnp or in Pallas kernels (Triton on GPU, Mosaic on TPU; "auto" picks them there);
  `valid` leaves empty packed slots out exactly.
- `segment_attention` (packed_attention.py): NaViT's packed attention, JAX's Pallas
  flash-attention kernels with segment ids on GPU/TPU.
"""
from kernels.contrastive import contrastive_loss
from kernels.dcnv3_core import dcnv3
from kernels.packed_attention import segment_attention

__all__ = ["contrastive_loss", "dcnv3", "segment_attention"]
