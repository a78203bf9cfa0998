"""Config helpers: typed config-string arguments and validation before any compute.

Configs are Python files with `get_config(arg=None) -> ConfigDict`. The argument string
(`configs/vit.py:variant=S/16,batch_size=64`) is parsed by `parse_arg` against typed
defaults; `validate` checks every name and field type so mistakes fail before compilation.
"""
import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections

from big_vision_lite import evaluators
from big_vision_lite import models
from big_vision_lite import optimizer
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite.input import data as data_lib
from big_vision_lite.input import multiscale as multiscale_lib
from big_vision_lite.input import packing as packing_lib
from big_vision_lite.input import pp as pp_lib


def _convert(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"Config argument {key!r} must be a bool (true/false), got {text!r}.")
  for kind in (int, float):
    if isinstance(default, kind):
      try:
        return kind(text)
      except ValueError:
        raise ValueError(f"Config argument {key!r} must be {kind.__name__}, got {text!r}."
                         ) from None
  return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `"a=1,b=S/16"` into a ConfigDict typed like `defaults` (unknown keys rejected)."""
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"Config argument {item!r} is not of the form key=value.")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; known: {', '.join(sorted(defaults))}.")
    result[key] = _convert(key, value, defaults[key])
  return result


def _check_type(config: Mapping[str, Any], field: str, types: tuple[type, ...],
                required: bool = False, positive: bool = False) -> None:
  value = _lookup(config, field)
  if value is None:
    if required:
      raise ValueError(f"Config field {field!r} is required.")
    return
  if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
    names = " or ".join(t.__name__ for t in types)
    raise ValueError(f"Config field {field!r} must be {names}, got {type(value).__name__} "
                     f"{value!r}.")
  if positive and value <= 0:
    raise ValueError(f"Config field {field!r} must be > 0, got {value!r}.")


def _lookup(config: Mapping[str, Any], field: str) -> Any:
  node: Any = config
  for part in field.split("."):
    if node is None or part not in node:
      return None
    node = node[part]
  return node


def _check_data(data: Any, field: str) -> None:
  if data is None or not hasattr(data, "get") or not isinstance(data.get("name"), str):
    raise ValueError(f"Config field {field!r} must be a dict with a str 'name' (a tfds "
                     "dataset name, e.g. 'shapes' or 'cifar10') and a 'split'.")
  if not isinstance(data.get("split"), str):
    raise ValueError(f"Config field '{field}.split' must be a str such as 'train'.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the field for anything wrong in `config`, before compute."""
  _check_type(config, "model_name", (str,), required=True)
  module = models.get(config.model_name)
  try:
    module.Model(**config.get("model", {}))
  except TypeError as e:
    fields = [f for f in module.Model.__dataclass_fields__ if f not in ("parent", "name")]
    raise ValueError(f"Config field 'model' for model_name {config.model_name!r} is invalid "
                     f"({e}); accepted fields: {', '.join(fields)}.") from None
  packing = (config.get("input") or {}).get("packing")
  if packing:  # Before the task, which may rely on it.
    packing_lib.validate(packing, "input.packing")
  _check_type(config, "task", (str,), required=True)
  tasks.REGISTRY.get(config.task, field="task").validate_config(config)
  for field in ("total_steps", "log_training_steps", "seed"):
    _check_type(config, field, (int,), required=field == "total_steps",
                positive=field != "seed")
  for field in ("ckpt_steps", "keep_ckpt", "grad_accum_steps"):
    _check_type(config, field, (int,), positive=True)
  for field in ("lr", "wd", "grad_clip_norm", "ema_decay"):
    _check_type(config, field, (int, float))
  for field in ("init_from", "compute_dtype"):
    _check_type(config, field, (str,))
  if config.get("init_from") and not os.path.isdir(config.init_from):
    raise ValueError(f"Config field 'init_from': {config.init_from} is not a directory.")
  if config.get("compute_dtype") not in (None, "float32", "bfloat16"):
    raise ValueError(f"Config field 'compute_dtype' must be 'float32' or 'bfloat16', got "
                     f"{config.compute_dtype!r}.")
  _check_type(config, "input.batch_size", (int,), required=True, positive=True)
  _check_type(config, "input.pp", (str,), required=True)
  _check_data(config.input.get("data"), "input.data")
  pp_lib.validate(config.input.pp)
  multiscale = config.input.get("multiscale")
  if not multiscale and config.get("grad_accum_steps") and (
      config.input.batch_size % config.grad_accum_steps):
    raise ValueError(f"Config field 'input.batch_size' ({config.input.batch_size}) must be "
                     f"divisible by 'grad_accum_steps' ({config.grad_accum_steps}).")
  bad_records = config.input.get("bad_records", "fail")
  if bad_records not in data_lib.BAD_RECORDS:
    raise ValueError(f"Config field 'input.bad_records' must be one of "
                     f"{', '.join(map(repr, data_lib.BAD_RECORDS))}, got {bad_records!r}.")
  _validate_debug(config.get("debug"))
  optimizer.validate_config(config)
  _validate_mesh(config.get("mesh"), config.get("sharding_rules"))
  if multiscale:
    if config.input.get("packing"):
      raise ValueError("Config fields 'input.multiscale' and 'input.packing' exclude each "
                       "other: packed rows already mix resolutions.")
    multiscale_lib.validate(multiscale, config.input.batch_size,
                            multiscale_batch_multiple(config), "input.multiscale")
  for name, ev in (config.get("evals") or {}).items():
    field = f"evals.{name}"
    _check_type(ev, "type", (str,), required=True)
    evaluator = evaluators.REGISTRY.get(ev.type, field=f"{field}.type")
    if hasattr(evaluator, "validate_config"):
      evaluator.validate_config(ev, field)
    _check_data(ev.get("data"), f"{field}.data")
    if not isinstance(ev.get("pp"), str):
      raise ValueError(f"Config field '{field}.pp' must be a pp string.")
    pp_lib.validate(ev.pp)
    for key in ("log_steps", "batch_size"):
      if not isinstance(ev.get(key), int) or isinstance(ev.get(key), bool) or ev[key] <= 0:
        raise ValueError(f"Config field '{field}.{key}' must be an int > 0, "
                         f"got {ev.get(key)!r}.")


def multiscale_batch_multiple(config: ml_collections.ConfigDict,
                              mesh: jax.sharding.Mesh | None = None) -> int:
  """What every multi-scale batch size must be a multiple of: the data-parallel devices
  (and processes) of `mesh` (default: the config's) times the gradient accumulation steps."""
  mesh = mesh or sharding.make_mesh(config.get("mesh"))
  return sharding.batch_divisor(mesh) * (config.get("grad_accum_steps") or 1)


def _validate_debug(debug: Mapping[str, Any] | None) -> None:
  unknown = sorted(set(debug or {}) - {"inject_nan_step"})
  if unknown:
    raise ValueError(f"Config field 'debug' has unknown keys {unknown}; accepted: "
                     "inject_nan_step.")
  step = (debug or {}).get("inject_nan_step")
  if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
    raise ValueError(f"Config field 'debug.inject_nan_step' must be an int: the step whose "
                     f"loss becomes NaN, or 0 for none; got {step!r}.")


def _validate_mesh(mesh: Sequence[Any] | None, rules: Sequence[Any] | None) -> None:
  for axis in mesh or ():
    if (len(axis) != 2 or not isinstance(axis[0], str) or not isinstance(axis[1], int)):
      raise ValueError(f"Config field 'mesh' must be a list of (axis_name, size) pairs with "
                       f"size an int (-1 = all remaining devices), got {axis!r}.")
  for rule in rules or ():
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"Config field 'sharding_rules' must be a list of (regex, spec) pairs, "
                       f"got {rule!r}.")
