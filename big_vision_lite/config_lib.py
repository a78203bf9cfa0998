"""Config helpers: typed config-string arguments and validation before any compute.

Configs are Python files with `get_config(arg=None) -> ConfigDict`. The argument string
(`configs/vit.py:variant=S/16,batch_size=64`) is parsed by `parse_arg` against typed
defaults; `validate` checks every name and field type so mistakes fail before compilation:
batch sizes against the mesh, the mesh against the devices, `init_from` and the datasets'
splits against what is on disk (metadata only).

`with_init_from_model` gives a config whose `init_from` is an import (tools/import_*.py)
that import's structural model fields; the train loop applies it before `validate`.
"""
import dataclasses
import os
import re
from typing import Any, Mapping, Sequence

import jax
import ml_collections
from absl import logging

from big_vision_lite import checkpointing
from big_vision_lite import evaluators
from big_vision_lite import models
from big_vision_lite import optimizer
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite.input import data as data_lib
from big_vision_lite.input import multiscale as multiscale_lib
from big_vision_lite.input import packing as packing_lib
from big_vision_lite.input import pp as pp_lib


# Fields of an import's model.json that leave the model's structure to the config: a
# fine-tuning run sizes its own head (and re-initialises it with `init_skip`).
_NOT_STRUCTURAL = ("num_classes",)


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


LOSS_INPUTS = ("step", "ema_params")  # Train-state entries a task's loss may read.


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
  task_class = tasks.REGISTRY.get(config.task, field="task")
  task_class.validate_config(config)
  for field in ("total_steps", "log_training_steps", "seed"):
    _check_type(config, field, (int,), required=field == "total_steps",
                positive=field != "seed")
  for field in ("ckpt_steps", "keep_ckpt", "grad_accum_steps"):
    _check_type(config, field, (int,), positive=True)
  for field in ("lr", "wd", "grad_clip_norm", "ema_decay", "ema_decay_end"):
    _check_type(config, field, (int, float))
  for field in ("ema_decay", "ema_decay_end"):
    if config.get(field) is not None and not 0.0 <= config.get(field) <= 1.0:
      raise ValueError(f"Config field {field!r} must be in [0, 1], got {config.get(field)!r}.")
  if config.get("ema_decay_end") is not None and not config.get("ema_decay"):
    raise ValueError("Config field 'ema_decay_end' needs 'ema_decay' (the decay at step 0).")
  unknown_inputs = set(task_class.loss_inputs) - set(LOSS_INPUTS)
  if unknown_inputs:
    raise ValueError(f"Task {config.task!r} asks for loss inputs {sorted(unknown_inputs)}; the "
                     f"train loop provides {', '.join(LOSS_INPUTS)}.")
  if "ema_params" in task_class.loss_inputs and not config.get("ema_decay"):
    raise ValueError(f"Task {config.task!r} reads the EMA of the params: set config field "
                     "'ema_decay' (e.g. 0.996, and 'ema_decay_end' for a cosine schedule).")
  for field in ("init_from", "compute_dtype"):
    _check_type(config, field, (str,))
  if config.get("init_from"):
    _validate_init_from(config)
  if config.get("compute_dtype") not in (None, "float32", "bfloat16"):
    raise ValueError(f"Config field 'compute_dtype' must be 'float32' or 'bfloat16', got "
                     f"{config.compute_dtype!r}.")
  _check_type(config, "input.batch_size", (int,), required=True, positive=True)
  _check_type(config, "input.pp", (str,), required=True)
  _check_data(config.input.get("data"), "input.data")
  pp_lib.validate(config.input.pp)
  multiscale = config.input.get("multiscale")
  bad_records = config.input.get("bad_records", "fail")
  if bad_records not in data_lib.BAD_RECORDS:
    raise ValueError(f"Config field 'input.bad_records' must be one of "
                     f"{', '.join(map(repr, data_lib.BAD_RECORDS))}, got {bad_records!r}.")
  _validate_debug(config.get("debug"))
  optimizer.validate_config(config)
  mesh = _validate_mesh(config.get("mesh"), config.get("sharding_rules"))
  sharding.check_activation_rules(config.get("activation_rules"), mesh)
  divisor = sharding.batch_divisor(mesh)
  if not multiscale:
    accum = config.get("grad_accum_steps") or 1
    check_batch_size("input.batch_size", config.input.batch_size, divisor, accum)
  if multiscale:
    if config.input.get("packing"):
      raise ValueError("Config fields 'input.multiscale' and 'input.packing' exclude each "
                       "other: packed rows already mix resolutions.")
    multiscale_lib.validate(multiscale, config.input.batch_size,
                            multiscale_batch_multiple(config, mesh), "input.multiscale")
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
    check_batch_size(f"{field}.batch_size", ev.batch_size, divisor)
  # Last: the datasets' metadata (builds the embedded "shapes" dataset on first use).
  data_lib.check_split(config.input.data, "input.data")
  for name, ev in (config.get("evals") or {}).items():
    data_lib.check_split(ev.data, f"evals.{name}.data")


def check_batch_size(field: str, batch_size: int, divisor: int, accum: int = 1) -> None:
  """Raises a ValueError naming `field` and the nearest valid sizes unless `batch_size`
  splits into `accum` micro-batches that each split evenly over `divisor` (the
  data-parallel devices and the processes, `sharding.batch_divisor`)."""
  multiple = divisor * accum
  if batch_size % multiple == 0:
    return
  below = batch_size // multiple * multiple
  nearest = f"{below} or {below + multiple}" if below else f"{multiple}"
  processes = jax.process_count()
  split = (f"the {divisor} data-parallel devices" if processes == 1 else
           f"the data-parallel devices and the {processes} processes (least common multiple "
           f"{divisor})")
  if accum > 1:
    split = f"'grad_accum_steps' ({accum}) micro-batches, each over {split}"
  raise ValueError(f"Config field {field!r} is {batch_size}, which does not split into "
                   f"{split}: it must be a multiple of {multiple}, e.g. {nearest}.")


def backbone_source(name: str | None, model_kwargs: Mapping[str, Any] | None) -> str | None:
  """The backbone's model name when model `name` wraps one (its module's `backbone`, e.g. a
  DINO run's ViT), else None: a run of it initialises a model of that name."""
  if name not in models.KNOWN or not hasattr(models.get(name), "backbone"):
    return None
  return models.get(name).backbone(model_kwargs or {})


def _validate_init_from(config: ml_collections.ConfigDict) -> None:
  """`init_from` holds a checkpoint of a model this run loads, agreeing with `config.model`."""
  checkpointing.check_init_from(config.init_from)
  name, source_model = checkpointing.read_run_model(config.init_from)
  accepted = (config.model_name,) + tuple(getattr(models.get(config.model_name), "LOADS_FROM",
                                                  ()))
  if name is not None and name not in accepted and (
      backbone_source(name, source_model) != config.model_name):
    raise ValueError(f"Config field 'init_from': {config.init_from} holds model_name={name!r}; "
                     f"a {config.model_name!r} run loads {', '.join(map(repr, accepted))}.")
  with_init_from_model(config)  # Raises on a conflicting model field.


def _plain(value: Any) -> Any:
  """Tuples and lists (also nested) as lists, for comparing config values with JSON ones."""
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  return value


def with_init_from_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the model fields of an imported `init_from` (see below), else `config`.

  When `init_from` is an import (model.json and params/, from tools/import_*.py) of
  `config.model_name`, the import decides the model's structure: each field of its
  model.json except `num_classes` (pooling and class token, heads, sizes, norms, GELU, ...)
  is taken where `config.model` leaves it out or at the Model's default (configs/vit.py's
  `pool_type="gap"` is the default, so a timm import's class token wins); a field set to
  another value raises a ValueError naming it and both values. A `variant` (which the
  import leaves None) must give the import's sizes. When the config's model wraps the
  import's model as its backbone (the field named by the module's `BACKBONE_FIELD`, e.g.
  two_towers' `model.image`), the same rule fills that field, and the wrapper keeps sizing
  the backbone's head. Returns a copy; config.json records the effective
  fields.
  """
  path = config.get("init_from")
  if not (isinstance(path, str) and path and checkpointing.is_import(path)):
    return config
  name, recorded = checkpointing.read_run_model(path)
  own = dict(config.get("model") or {})
  if not isinstance(recorded, Mapping):
    return config
  if name == config.get("model_name"):
    effective = _import_fields(name, own, recorded, path, "model", keep_head=True)
  elif backbone_source(config.get("model_name"), own) == name and hasattr(
      models.get(config.model_name), "BACKBONE_FIELD"):
    field = models.get(config.model_name).BACKBONE_FIELD
    effective = dict(own, **{field: _import_fields(
        name, dict(own.get(field) or {}), recorded, path, f"model.{field}", keep_head=False)})
  else:
    return config
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    resolved.model = effective
  return resolved


def _import_fields(name: str, own: dict[str, Any], recorded: Mapping[str, Any], path: str,
                   prefix: str, keep_head: bool) -> dict[str, Any]:
  """The kwargs of model `name`: `own` (config field `prefix`) with the structural fields
  of the import at `path` (its model.json `recorded`); `keep_head` also takes the import's
  head size where `own` has none."""
  model_class = models.get(name).Model
  defaults = {f.name: f.default for f in dataclasses.fields(model_class)}
  effective = dict(own)
  taken = []
  for field, value in recorded.items():
    if field in _NOT_STRUCTURAL or (value is None and field in own):
      if keep_head or field not in _NOT_STRUCTURAL:
        effective.setdefault(field, value)  # A head size, or a field the import leaves open.
      continue
    if field not in own or _plain(own[field]) == _plain(defaults.get(field)):
      if field not in own or _plain(own[field]) != _plain(value):
        taken.append(f"{field}={value!r}")
      effective[field] = value
    elif _plain(own[field]) != _plain(value):
      raise ValueError(
          f"Config field '{prefix}.{field}' is {own[field]!r}, but init_from {path} is an "
          f"import whose model.json has {field}={value!r}; an import's structural fields "
          f"decide the model. Set --config.{prefix}.{field}={value!r} (a field left at the "
          f"model's default, {defaults.get(field)!r}, takes the import's value), or init_from "
          "an import of the model this config describes.")
  _check_same_hparams(model_class, effective, dict(recorded), own, path, prefix)
  if taken:
    logging.info("init_from %s: %s fields from its model.json: %s.", path, prefix,
                 ", ".join(taken))
  return effective


def _check_same_hparams(model_class: Any, effective: dict[str, Any], recorded: dict[str, Any],
                        own: dict[str, Any], path: str, prefix: str) -> None:
  """A `variant` (or other size preset) in the config must resolve to the import's sizes.

  The fields the config gives (with the import's values where it left them at the default)
  are resolved without the import's other fields, which would otherwise win over the
  config's `variant`."""
  if not hasattr(model_class, "hparams") or "variant" not in own:
    return
  try:
    mine = model_class(**{field: effective[field] for field in own}).hparams()
    theirs = model_class(**recorded).hparams()
  except (TypeError, ValueError):
    return  # validate() names the bad field.
  if _plain(mine) == _plain(theirs):
    return
  if isinstance(mine, Mapping):
    keys = [k for k in mine if _plain(mine[k]) != _plain(theirs.get(k))]
    mine = ", ".join(f"{k}={mine[k]!r}" for k in keys)
    theirs = ", ".join(f"{k}={theirs.get(k)!r}" for k in keys)
  field = f"'{prefix}.variant' ({own['variant']!r})" if "variant" in own else f"'{prefix}'"
  raise ValueError(
      f"Config field {field} gives {mine}, but init_from {path} is "
      f"an import of {theirs} (its model.json). Use the variant the import was made from "
      "(e.g. configs/vit.py:variant=S/16 for vit_small_patch16_224), or init_from an import "
      "of the configured size.")


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


def _validate_mesh(mesh: Sequence[Any] | None,
                   rules: Sequence[Any] | None) -> jax.sharding.Mesh:
  """Checks the mesh against the devices and each rule's regex and spec; returns the mesh."""
  for axis in mesh or ():
    if (len(axis) != 2 or not isinstance(axis[0], str) or not isinstance(axis[1], int)):
      raise ValueError(f"Config field 'mesh' must be a list of (axis_name, size) pairs with "
                       f"size an int (-1 = all remaining devices), got {axis!r}.")
  built = sharding.make_mesh(mesh)
  for rule in rules or ():
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"Config field 'sharding_rules' must be a list of (regex, spec) pairs, "
                       f"got {rule!r}.")
    try:
      re.compile(rule[0])
    except re.error as e:
      raise ValueError(f"Config field 'sharding_rules': {rule[0]!r} is not a regex ({e}).") \
          from None
    sharding.check_rule_spec(rule[1], built)
  return built
