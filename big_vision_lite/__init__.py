"""big_vision_lite: a small JAX/Flax research codebase for vision models."""
