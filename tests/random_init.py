"""Random variables for a module from shapes alone (no compiled init), for parity tests."""
import jax
import numpy as np


def random(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def random_variables(module, *inputs, seed=0):
  """Variables of `module` filled with N(0, 0.3²), BatchNorm variances with ones."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape, np.float32) if path[-1].key == "var"
                       else random(s.shape, rng.integers(1 << 30)) * 0.3), shapes)
