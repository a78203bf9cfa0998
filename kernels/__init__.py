"""Kernels, each beside a pure-jnp reference with the same signature and a dispatcher.

- `contrastive_loss` (contrastive.py): CLIP / SigLIP losses over the global batch, chunked
  with a recomputing custom VJP and, across devices, a `ppermute` ring.
- `segment_attention` (packed_attention.py): NaViT's packed attention, JAX's Pallas
  flash-attention kernels with segment ids on GPU/TPU.
DCNv3 deformable aggregation is tracked in its own issue and lands here.
"""
from kernels.contrastive import contrastive_loss
from kernels.packed_attention import segment_attention

__all__ = ["contrastive_loss", "segment_attention"]
