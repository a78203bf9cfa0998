"""Optimiser and learning-rate schedule from the config (optax).

Config fields: `optax_name` ("adamw" | "sgd" | "lion" | "adafactor"), `optax` (kwargs of
that optax function), `lr`, `wd` (decoupled for every optimiser: a step subtracts
lr(step) * wd * param from each leaf matching `wd_mask`, default `.*kernel$`), `schedule`
(`decay_type`, `warmup_steps` or `warmup_percent`, `end_lr_ratio`, `timescale` of rsqrt),
`grad_clip_norm`, `frozen_params` (regexes of parameters that are not updated).
"""
import re
from typing import Any, Callable

import ml_collections
import optax

from big_vision_lite import utils

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "lion": optax.lion,
    "adafactor": optax.adafactor,
}
DECAY_TYPES = ("cosine", "linear", "rsqrt", "constant")
DEFAULT_WD_MASK = (r".*kernel$",)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks optimiser and schedule names; raises ValueError naming the field."""
  name = config.get("optax_name", "adamw")
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optax_name {name!r}; known: {', '.join(OPTIMIZERS)}.")
  sched = config.get("schedule") or {}
  decay = sched.get("decay_type", "cosine")
  if decay not in DECAY_TYPES:
    raise ValueError(f"Config field 'schedule.decay_type' must be one of "
                     f"{', '.join(DECAY_TYPES)}, got {decay!r}.")
  for key in ("warmup_steps", "warmup_percent", "end_lr_ratio", "timescale"):
    value = sched.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or value < 0):
      raise ValueError(f"Config field 'schedule.{key}' must be a number >= 0, got {value!r}.")
  for pattern in list(config.get("frozen_params") or ()) + list(config.get("wd_mask") or ()):
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"Invalid regex {pattern!r} in 'frozen_params'/'wd_mask': {e}") from None


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then cosine/linear/rsqrt decay or constant."""
  total = config.total_steps
  sched = config.get("schedule") or {}
  warmup = sched.get("warmup_steps")
  if warmup is None:
    # Rounded before the floor: 0.29 * 100 is 28.999999999999996 in floating point.
    warmup = int(round(sched.get("warmup_percent", 0.0) * total, 6))
  warmup = min(int(warmup), total)
  lr = config.get("lr", 1e-3)
  end_lr = lr * sched.get("end_lr_ratio", 0.0)
  decay_type = sched.get("decay_type", "cosine")
  decay_steps = max(total - warmup, 1)
  if decay_type == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr / lr if lr else 0.0)
  elif decay_type == "linear":
    decay = optax.linear_schedule(lr, end_lr, decay_steps)
  elif decay_type == "rsqrt":
    timescale = sched.get("timescale", 10_000)
    decay = lambda step: lr * (timescale / (step + timescale)) ** 0.5
  else:
    decay = optax.constant_schedule(lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _path_mask(params: Any, patterns: tuple[str, ...] | list[str]) -> Any:
  regexes = [re.compile(p) for p in patterns]
  return utils.tree_map_with_names(
      lambda name, _: any(r.fullmatch(name) for r in regexes), params)


def make_optimizer(config: ml_collections.ConfigDict,
                   params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, schedule) for `params` (a pytree or its abstract shapes)."""
  schedule = make_schedule(config)
  kwargs = dict(config.get("optax") or {})
  name = config.get("optax_name", "adamw")
  wd = config.get("wd", 0.0)
  wd_mask = _path_mask(params, tuple(config.get("wd_mask") or DEFAULT_WD_MASK))
  if name == "adamw":
    kwargs.update(weight_decay=wd, mask=wd_mask)
  elif name == "lion":
    kwargs.update(weight_decay=wd, mask=wd_mask)
  chain = []
  if config.get("grad_clip_norm"):
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(OPTIMIZERS[name](learning_rate=schedule, **kwargs))
  if wd and name in ("sgd", "adafactor"):
    # Decoupled as in adamw and lion: -lr(step) * wd * param joins the optimiser's update
    # (added to the gradient, it would pass through momentum and Adafactor's scaling).
    chain.append(optax.add_decayed_weights(lambda count: -wd * schedule(count), mask=wd_mask))
  tx = optax.chain(*chain)
  frozen = config.get("frozen_params")
  if frozen:
    labels = utils.tree_map_with_names(
        lambda n, _: "frozen" if any(re.fullmatch(p, n) for p in frozen) else "train", params)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
