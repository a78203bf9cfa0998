"""Pallas kernels, each beside a pure-jnp reference with the same signature.

A dispatcher per kernel picks `impl="pallas"` where it compiles and the reference
elsewhere (SPEC "Kernels"): DCNv3 deformable aggregation and the chunked contrastive loss
are tracked in their own issue and land here.
"""
