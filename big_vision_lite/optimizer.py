"""Optimiser and learning-rate schedule from the config (optax).

Config fields: `optax_name` ("adamw" | "sgd" | "lion" | "adafactor"), `optax` (kwargs of
that optax function), `lr`, `wd` (decoupled for every optimiser: a step subtracts
lr(step) * wd * param from each leaf matching `wd_mask`, default `.*kernel$`), `schedule`
(`decay_type`, `warmup_steps` or `warmup_percent`, `end_lr_ratio`, `timescale` of rsqrt,
`drop_at` and `drop_factor` of step: the lr times drop_factor at each fraction of
`total_steps` in drop_at, e.g. DETR's (0.8,) and 0.1),
`grad_clip_norm`, `frozen_params` (regexes of parameters that are not updated),
`frozen_for_steps` (pairs (regex, n): matching parameters stay untouched for the first n
steps, then start their own optimiser state as if new, on the run's schedules; DINO's
last layer), `lr_mults` (pairs (regex, m): the first matching pair scales a parameter's
update, so its learning rate and decoupled weight decay, by m; DETR's backbone at 0.1)
and `wd_end` (the weight decay follows a cosine from `wd` at step 0 to `wd_end` at
`total_steps`, `cosine_between`).
"""
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from big_vision_lite import utils

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "lion": optax.lion,
    "adafactor": optax.adafactor,
}
DECAY_TYPES = ("cosine", "linear", "rsqrt", "constant", "step")
DEFAULT_WD_MASK = (r".*kernel$",)
DROP_FACTOR = 0.1  # The "step" schedule's default lr factor at each drop.


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
  drop_at = sched.get("drop_at") or ()
  if decay == "step" and (not isinstance(drop_at, (tuple, list)) or not drop_at or any(
      isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1 for f in drop_at)):
    raise ValueError(f"Config field 'schedule.drop_at' must list fractions of total_steps in "
                     f"(0, 1) for decay_type 'step', got {drop_at!r}.")
  factor = sched.get("drop_factor", DROP_FACTOR)
  if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
    raise ValueError(f"Config field 'schedule.drop_factor' must be a number >= 0, got "
                     f"{factor!r}.")
  for entry in config.get("frozen_for_steps") or ():
    if (not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str)
        or isinstance(entry[1], bool) or not isinstance(entry[1], int) or entry[1] < 0):
      raise ValueError(f"Config field 'frozen_for_steps' takes pairs (regex, steps >= 0), got "
                       f"{entry!r}.")
  for entry in config.get("lr_mults") or ():
    if (not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str)
        or isinstance(entry[1], bool) or not isinstance(entry[1], (int, float))
        or entry[1] < 0):
      raise ValueError(f"Config field 'lr_mults' takes pairs (regex, multiplier >= 0), got "
                       f"{entry!r}.")
  wd_end = config.get("wd_end")
  if wd_end is not None and (isinstance(wd_end, bool) or not isinstance(wd_end, (int, float))
                             or wd_end < 0):
    raise ValueError(f"Config field 'wd_end' must be a number >= 0 (or unset), got {wd_end!r}.")
  patterns = [e[0] for e in list(config.get("frozen_for_steps") or ())
              + list(config.get("lr_mults") or ())]
  for pattern in (list(config.get("frozen_params") or ()) + list(config.get("wd_mask") or ())
                  + patterns):
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"Invalid regex {pattern!r} in 'frozen_params'/'wd_mask'/"
                       f"'frozen_for_steps'/'lr_mults': {e}") from None


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then cosine/linear/rsqrt decay, step drops or constant."""
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
  elif decay_type == "step":
    boundaries = {int(round(f * total)) - warmup: sched.get("drop_factor", DROP_FACTOR)
                  for f in sched["drop_at"]}
    decay = optax.piecewise_constant_schedule(lr, boundaries)
  else:
    decay = optax.constant_schedule(lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _path_mask(params: Any, patterns: tuple[str, ...] | list[str]) -> Any:
  regexes = [re.compile(p) for p in patterns]
  return utils.tree_map_with_names(
      lambda name, _: any(r.fullmatch(name) for r in regexes), params)


def cosine_between(start: float, end: float, steps: int) -> optax.Schedule:
  """end + (start - end) * (1 + cos(pi * step / steps)) / 2 for step < steps, then end."""
  def schedule(step):
    progress = jnp.minimum(step, steps) / max(steps, 1)
    return end + (start - end) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
  return schedule


def make_wd_schedule(config: ml_collections.ConfigDict) -> float | optax.Schedule:
  """`wd`, or with `wd_end` the cosine from `wd` to `wd_end` over `total_steps`."""
  wd = config.get("wd", 0.0)
  if config.get("wd_end") is None:
    return wd
  return cosine_between(wd, config.wd_end, config.total_steps)


def _shifted(schedule: float | optax.Schedule, offset: int) -> float | optax.Schedule:
  """The schedule seen by an optimiser whose step count starts `offset` steps into the run."""
  if not callable(schedule) or not offset:
    return schedule
  return lambda count: schedule(count + offset)


def _base_optimizer(config: ml_collections.ConfigDict, params: Any, schedule: optax.Schedule,
                    offset: int = 0) -> optax.GradientTransformation:
  """The config's optimiser with decoupled weight decay, its counts starting at `offset`."""
  lr, wd = _shifted(schedule, offset), _shifted(make_wd_schedule(config), offset)
  kwargs = dict(config.get("optax") or {})
  name = config.get("optax_name", "adamw")
  wd_mask = _path_mask(params, tuple(config.get("wd_mask") or DEFAULT_WD_MASK))
  if name in ("adamw", "lion"):
    kwargs.update(weight_decay=wd, mask=wd_mask)
  tx = OPTIMIZERS[name](learning_rate=lr, **kwargs)
  if name in ("sgd", "adafactor") and (callable(wd) or wd):
    # Decoupled as in adamw and lion: -lr(step) * wd * param joins the optimiser's update
    # (added to the gradient, it would pass through momentum and Adafactor's scaling).
    wd_fn = wd if callable(wd) else (lambda count: wd)
    lr_fn = lr if callable(lr) else (lambda count: lr)
    tx = optax.chain(tx, optax.add_decayed_weights(
        lambda count: -wd_fn(count) * lr_fn(count), mask=wd_mask))
  return tx


def make_optimizer(config: ml_collections.ConfigDict,
                   params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, schedule) for `params` (a pytree or its abstract shapes)."""
  schedule = make_schedule(config)
  frozen_for = [(p, int(n)) for p, n in config.get("frozen_for_steps") or ()]
  if frozen_for:
    def group(name: str, _: Any) -> str:
      return next((f"after_{n}" for p, n in frozen_for if re.fullmatch(p, name)), "train")
    groups = {f"after_{n}": optax.transforms.conditionally_mask(
        _base_optimizer(config, params, schedule, offset=n),
        lambda count, n=n: count >= n) for _, n in frozen_for}
    groups["train"] = _base_optimizer(config, params, schedule)
    tx = optax.multi_transform(groups, utils.tree_map_with_names(group, params))
  else:
    tx = _base_optimizer(config, params, schedule)
  if config.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  lr_mults = [(p, float(m)) for p, m in config.get("lr_mults") or ()]
  if lr_mults:
    multipliers = utils.tree_map_with_names(
        lambda n, _: next((m for p, m in lr_mults if re.fullmatch(p, n)), 1.0), params)
    tx = optax.chain(tx, optax.stateless(
        lambda updates, _: jax.tree.map(lambda u, m: u * m, updates, multipliers)))
  frozen = config.get("frozen_params")
  if frozen:
    labels = utils.tree_map_with_names(
        lambda n, _: "frozen" if any(re.fullmatch(p, n) for p in frozen) else "train", params)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
