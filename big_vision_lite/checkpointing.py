"""Checkpoints with orbax: the one place where runs are saved, resumed and initialised.

A run's checkpoints live in `<workdir>/checkpoints/<step>/{state,data}`: `state` is the
train state pytree (params, optimiser state, extra model collections, EMA, step, RNG) and
`data` the JSON position of the data iterator (one for all processes, or one per process
for packed data). orbax writes each step into a temporary directory and renames it when
complete, so a half-written step is never listed; if the newest listed step still fails to
restore, or its arrays differ from their fingerprint saved beside them in `data` (a file
overwritten or bit-flipped after the save), the previous one is used with a warning.
A save that fails (full disk, lost permissions) raises `CheckpointSaveError` naming the
step and the directory; orbax writes in the background, so the error of step s surfaces at
the next save or at the end of the run.
"""
import json
import os
import re
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from big_vision_lite import utils

_FINGERPRINT_KEY = "state_fingerprint"


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed; the steps saved before it are intact."""


class Checkpointer:
  """Periodic/final saves with keep-last-N and restore of the newest good step.

  As a context manager it waits for the save in flight on exit, also when the run stops
  with an error, so the last good checkpoint is complete.
  """

  def __init__(self, workdir: str, keep: int | None = None, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._saving: int | None = None  # The step whose background write may be in flight.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
    """Starts saving `state` and the data iterator position at `step` (asynchronously)."""
    self.wait()
    data_state = dict(data_state, **{_FINGERPRINT_KEY: fingerprint(state)})
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    self._saving = step

  def wait(self) -> None:
    """Blocks until the save in flight is written; raises `CheckpointSaveError` if it failed."""
    step, self._saving = self._saving, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e

  def _save_error(self, step: int | None, error: Exception) -> CheckpointSaveError:
    self.manager.reload()
    steps = self.all_steps()
    resume = (f"a rerun resumes from step {steps[-1]}" if steps
              else "no checkpoint of this run is complete")
    return CheckpointSaveError(
        f"Saving the checkpoint of step {step} into {self.directory} failed "
        f"({type(error).__name__}: {str(error).splitlines()[0][:300]}). Is the disk full or "
        f"the directory no longer writable? Complete checkpoints: {steps}; {resume} once "
        "there is space (or with another --workdir and init_from).")

  def check_space(self, abstract_state: Any) -> None:
    """Raises an OSError if the disk cannot hold one more checkpoint of `abstract_state`."""
    needed = sum(int(np.prod(x.shape)) * getattr(x.dtype, "itemsize", 8)
                 for x in jax.tree.leaves(abstract_state) if hasattr(x, "dtype"))
    free = shutil.disk_usage(self.directory).free
    if free < needed:
      raise OSError(f"The disk of {self.directory} has {free / 2**20:.1f} MiB free, less "
                    f"than one checkpoint of this run ({needed / 2**20:.1f} MiB). Free some "
                    "space or choose another --workdir.")

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any], int] | None:
    """Restores the newest step that reads back whole, or returns None if there is none.

    `abstract_state` holds ShapeDtypeStructs with shardings; restored arrays get them, so
    a checkpoint written on N devices resumes on M. A checkpoint whose tree does not match
    (another architecture) raises a ValueError naming the differing parameters.
    """
    for step in reversed(self.all_steps()):
      try:
        saved_params = self._saved_state_tree(step)["params"]
      except Exception as e:  # pylint: disable=broad-except
        self._warn_unreadable(step, e)
        continue
      _check_tree_matches(saved_params, abstract_state["params"], f"{self.directory}/{step}")
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        self._warn_unreadable(step, e)
        continue
      saved = restored.data.get(_FINGERPRINT_KEY)
      changed = sorted(k for k, v in fingerprint(restored.state).items()
                       if saved is not None and saved.get(k) != v)
      if changed:
        self._warn_unreadable(step, ValueError(
            f"{len(changed)} arrays differ from their fingerprint at save time, e.g. "
            f"{', '.join(changed[:3])}"))
        continue
      return restored.state, restored.data, step
    return None

  def _warn_unreadable(self, step: int, error: Exception) -> None:
    """Moves an unreadable step aside (kept for inspection) so training can save it anew."""
    aside = os.path.join(self.directory, f"{step}.unreadable-{int(time.time())}")
    logging.warning("Checkpoint %s/%d does not restore (%s: %s); moved to %s, trying the "
                    "previous one.", self.directory, step, type(error).__name__,
                    str(error)[:300], aside)
    if jax.process_index() == 0:
      os.rename(os.path.join(self.directory, str(step)), aside)
    self.manager.reload()

  def _saved_state_tree(self, step: int) -> Any:
    meta = self.manager.item_metadata(step)["state"]
    return getattr(meta, "tree", meta)

  def close(self) -> None:
    """Waits for the save in flight (raising `CheckpointSaveError` if it failed), then closes."""
    try:
      self.wait()
    finally:
      self.manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # Already failing: finish the save in flight, but keep the first error.
      self.close()
    except CheckpointSaveError as e:
      logging.error("%s", e)


def fingerprint(state: Any) -> dict[str, int]:
  """{leaf name: a uint32 checksum of its bits}; any single flipped bit changes it."""
  return {k: int(v) for k, v in utils.flatten_names(
      jax.device_get(_fingerprint_leaves(state))).items()}


@jax.jit
def _fingerprint_leaves(state: Any) -> Any:
  def checksum(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
      bits = x.astype(jnp.uint32)
    else:
      unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
      bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    # Odd weights 2·position + 1 (mod 2^32), built without reshaping sharded arrays.
    position, stride = jnp.zeros(bits.shape, jnp.uint32), 1
    for axis in reversed(range(bits.ndim)):
      iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
      position = position + iota * jnp.uint32(stride % 2**32)
      stride *= bits.shape[axis]
    return jnp.sum(bits * (2 * position + 1), dtype=jnp.uint32)
  return jax.tree.map(checksum, state)


def _check_tree_matches(saved: Any, expected: Any, where: str) -> None:
  saved_shapes = {k: tuple(v.shape) for k, v in utils.flatten_names(saved).items()}
  expected_shapes = {k: tuple(v.shape) for k, v in utils.flatten_names(expected).items()}
  _raise_on_mismatch(saved_shapes, expected_shapes, where)


def _raise_on_mismatch(saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                       where: str) -> None:
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  reshaped = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
  if not (missing or unexpected or reshaped):
    return
  lines = [f"Checkpoint {where} does not match the configured model (is it from another "
           "architecture or variant?)."]
  if missing:
    lines.append(f"  missing in checkpoint: {', '.join(missing[:8])}"
                 + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
  if unexpected:
    lines.append(f"  not in the model: {', '.join(unexpected[:8])}"
                 + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
  for k in reshaped[:8]:
    lines.append(f"  {k}: checkpoint {saved[k]} vs model {expected[k]}")
  raise ValueError("\n".join(lines))


def read_run_model(path: str) -> tuple[str | None, dict[str, Any] | None]:
  """(model_name, model kwargs) recorded in a run dir (config.json) or an import (model.json)."""
  for filename in ("model.json", "config.json"):
    full = os.path.join(path, filename)
    if os.path.exists(full):
      with open(full) as f:
        record = json.load(f)
      return record.get("model_name"), record.get("model")
  return None, None


def write_import(workdir: str, model_name: str, model_kwargs: dict[str, Any],
                 variables: dict[str, Any]) -> None:
  """Writes an imported checkpoint: `workdir/params` (orbax, every collection of
  `variables`), then `model.json` ({"model_name", "model": kwargs}), which `is_import`,
  `read_run_model` and `load_variables` read; without model.json it is not an import."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(workdir + "/params", dict(variables), force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  with open(os.path.join(workdir, "model.json"), "w") as f:
    json.dump({"model_name": model_name, "model": model_kwargs}, f, indent=2)


def is_import(path: str) -> bool:
  """Whether `path` is an imported checkpoint (`model.json` and `params/`, as written by
  `write_import`) rather than a run's workdir."""
  return (os.path.isfile(os.path.join(path, "model.json"))
          and os.path.isdir(os.path.join(path, "params")))


def check_init_from(path: str) -> None:
  """Raises a ValueError naming config field 'init_from' unless `path` holds an import or a
  run with at least one complete checkpoint step (read from directory names only)."""
  if not os.path.isdir(path):
    raise ValueError(f"Config field 'init_from': {path} is not a directory; give an import "
                     "(model.json and params/, from tools/import_*.py) or a run's workdir.")
  if is_import(path):
    return
  directory = os.path.join(path, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
      directory) else []
  if not steps:
    held = sorted(os.listdir(path))
    raise ValueError(
        f"Config field 'init_from': {path} holds no checkpoint to start from (it contains "
        f"{', '.join(held[:6]) + (' ...' if len(held) > 6 else '') if held else 'nothing'}); "
        "accepted: an import (model.json and params/, written by tools/import_*.py) or a "
        "run's workdir with a complete step under checkpoints/<step>/.")


def load_variables(path: str, use_ema: bool = False) -> dict[str, Any]:
  """Reads the model variables of `path` as numpy: `{"params": ..., <collection>: ...}`.

  `path` is an import dir (`params/`, holding every collection, e.g. `batch_stats`) or a
  run dir, whose newest step gives `params` and the `extra` collections of its train state.
  `use_ema` takes the run's EMA params ("ema_params", kept when config field 'ema_decay' is
  set; e.g. DINO's teacher) as "params"; a ValueError says when `path` has none.
  """
  path = os.path.abspath(path)
  as_numpy = lambda tree: jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  if os.path.isdir(os.path.join(path, "params")):
    if use_ema:
      raise ValueError(f"{path} is an import, which holds one set of params and no EMA "
                       "params ('ema_params'); evaluate it with use_ema=False.")
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(os.path.join(path, "params"))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return dict(checkpointer.restore(os.path.join(path, "params"), args=ocp.args.PyTreeRestore(
        item=tree, restore_args=as_numpy(tree))))
  directory = os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"Config field 'init_from': {path} holds neither an imported checkpoint "
                     "(params/) nor a run's checkpoints (checkpoints/).")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"Config field 'init_from': {directory} has no complete checkpoint.")
  meta = manager.item_metadata(step)["state"]
  saved = getattr(meta, "tree", meta)
  key = "ema_params" if use_ema else "params"
  if key not in saved:
    raise ValueError(f"The run in {path} has no EMA params ('ema_params' is not in its train "
                     f"state at step {step}: its config sets no 'ema_decay'); evaluate its "
                     "params with use_ema=False.")
  sub = {key: saved[key], "extra": saved.get("extra") or {}}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=sub, restore_args=as_numpy(sub), partial_restore=True)))
  return {"params": restored.state[key], **(restored.state.get("extra") or {})}


def load_params(path: str) -> dict[str, Any]:
  """The `params` collection of `load_variables(path)`."""
  return load_variables(path)["params"]


def match_layer_stacking(init_params: Any, loaded: Any) -> Any:
  """`loaded` with its layer stacks (`utils.STACKABLE_LAYERS`) scanned or unscanned as in
  `init_params`: `{name}_0` .. `{name}_{n-1}` are stacked into `{name}` [n, ...], or the
  reverse, wherever in the tree the two layouts differ. Other entries pass unchanged."""
  if not (isinstance(init_params, dict) and isinstance(loaded, dict)):
    return loaded
  out = dict(loaded)
  for name in utils.STACKABLE_LAYERS:
    indices = sorted(int(m.group(1)) for k in out if (m := re.fullmatch(rf"{name}_(\d+)", k)))
    if name in init_params and name not in out and indices:
      if indices != list(range(len(indices))):
        raise ValueError(f"Layers {name}_i to stack must be numbered 0..n-1, got {indices}.")
      layers = [out.pop(f"{name}_{i}") for i in indices]
      out[name] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
    elif name in out and name not in init_params and f"{name}_0" in init_params:
      stacked = out.pop(name)
      depth = len(jax.tree.leaves(stacked)[0])
      for i in range(depth):
        out[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked)
  return {k: match_layer_stacking(init_params[k], v) if k in init_params else v
          for k, v in out.items()}


def merge_init_params(init_params: Any, loaded: Any, skip: list[str] | tuple[str, ...],
                      where: str) -> Any:
  """Takes `loaded` values for every param not matching a `skip` regex; shapes must agree.
  Scanned and unscanned layer stacks convert (`match_layer_stacking`)."""
  loaded = match_layer_stacking(init_params, loaded)
  init_flat = utils.flatten_names(init_params)
  loaded_flat = utils.flatten_names(loaded)
  skipped = lambda name: any(re.fullmatch(p, name) for p in skip)
  keep_fresh = {k for k in init_flat if skipped(k)}
  _raise_on_mismatch(
      {k: tuple(np.shape(v)) for k, v in loaded_flat.items() if not skipped(k)},
      {k: tuple(np.shape(v)) for k, v in init_flat.items() if k not in keep_fresh}, where)
  return utils.tree_map_with_names(
      lambda k, v: v if k in keep_fresh else np.asarray(loaded_flat[k], dtype=v.dtype),
      init_params)
