"""Model registry: `get(name)` returns the module `big_vision_lite/models/<name>.py`.

Every model module exposes `Model(flax.linen.Module)`, called as
`Model(**config.model).apply(variables, images, train=False)` -> `(out, aux)`, and
optionally `load(init_params, loaded_params, model_kwargs)` that adapts a checkpoint of
the same architecture (e.g. resampling position embeddings) when it is loaded.
"""
import importlib
import pkgutil
from types import ModuleType

KNOWN = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str) -> ModuleType:
  """Returns the model module `name`; a ValueError lists the known names otherwise."""
  if name not in KNOWN:
    raise ValueError(f"Unknown model_name {name!r}; known: {', '.join(KNOWN)}.")
  return importlib.import_module(f"{__name__}.{name}")
