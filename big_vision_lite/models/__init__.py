"""Model registry: `get(name)` returns the module `big_vision_lite/models/<name>.py`.

Every model module exposes `Model(flax.linen.Module)`, called as
`Model(**config.model).apply(variables, images, train=False)` -> `(out, aux)`, and
optionally `load(init_params, loaded_params, model_kwargs)` that adapts a checkpoint of
the same architecture (e.g. resampling position embeddings) when it is loaded.
`from_config(config)` builds a config's model as the train loop does.
"""
import dataclasses
import importlib
import pkgutil
from types import ModuleType
from typing import Any, Mapping

SHARED = ("layers",)  # Pieces several models use (`layers.py`), not a model.
KNOWN = sorted(m.name for m in pkgutil.iter_modules(__path__)
               if not m.name.startswith("_") and m.name not in SHARED)


def get(name: str) -> ModuleType:
  """Returns the model module `name`; a ValueError lists the known names otherwise."""
  if name not in KNOWN:
    raise ValueError(f"Unknown model_name {name!r}; known: {', '.join(KNOWN)}.")
  return importlib.import_module(f"{__name__}.{name}")


def from_config(config: Mapping[str, Any]) -> Any:
  """`get(config.model_name).Model(**config.model)`; a model with a `dtype_mm` field (the
  ViT family's matmul dtype) that the config leaves unset gets the config's
  `compute_dtype`, so bfloat16 runs multiply in bfloat16."""
  model_class = get(config["model_name"]).Model
  kwargs = dict(config.get("model") or {})
  compute_dtype = config.get("compute_dtype")
  fields = {f.name for f in dataclasses.fields(model_class)}
  if compute_dtype and "dtype_mm" in fields and "dtype_mm" not in kwargs:
    kwargs["dtype_mm"] = compute_dtype
  return model_class(**kwargs)
