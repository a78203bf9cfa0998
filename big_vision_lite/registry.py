"""String-named registries: models, tasks, pp ops and evaluators are looked up by name.

Each registry is an explicit object owned by the module that fills it; nothing is global
beyond those objects, and a lookup of an unknown name fails with the known names listed.
"""
from typing import Any, Callable, Iterable


class Registry:
  """Maps names to objects; `get` of an unknown name raises a ValueError listing the known."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Any] = {}

  def register(self, name: str) -> Callable[[Any], Any]:
    """Decorator: `@REGISTRY.register("name")` adds the decorated object under `name`."""
    def add(obj: Any) -> Any:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice.")
      self._entries[name] = obj
      return obj
    return add

  def get(self, name: str, field: str | None = None) -> Any:
    """Returns the entry `name`; `field` names the config field in the error message."""
    if name not in self._entries:
      where = f" (config field {field!r})" if field else ""
      raise ValueError(f"Unknown {self.kind} {name!r}{where}; known: "
                       f"{', '.join(sorted(self._entries))}.")
    return self._entries[name]

  def names(self) -> Iterable[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries
