"""Small pytree helpers shared by the optimiser, sharding and checkpoint code."""
from typing import Any, Callable

import jax
import numpy as np

# Layer stacks a model may hold either as `{name}_{i}` subtrees or scanned, as one `{name}`
# subtree with a leading [depth] axis (models/vit.py `Encoder(scan_layers=...)`).
STACKABLE_LAYERS = ("encoderblock",)


def path_name(path: tuple[Any, ...]) -> str:
  """`(DictKey('a'), DictKey('b'))` -> "a/b", the name regex rules match against."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def tree_map_with_names(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """Maps `fn(name, leaf)` over `tree`, with names like "Transformer/encoder_norm/scale"."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_name(p), x), tree)


def flatten_names(tree: Any) -> dict[str, Any]:
  """Returns {name: leaf} for every leaf of `tree`."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_name(p): x for p, x in leaves}


def count_params(tree: Any) -> int:
  """Number of scalars in all leaves of `tree` (arrays or ShapeDtypeStructs)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
