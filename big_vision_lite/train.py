r"""The one train loop: every config, every task, 1 CPU to a multi-host TPU pod.

  python -m big_vision_lite.train --config configs/vit.py:variant=Ti/16 --workdir /tmp/vit

What a step computes comes from the config's `task`; the loop owns sharding, the
optimiser, checkpoints, metrics and evaluators. A run resumes by itself from the newest
checkpoint in its workdir; SIGTERM saves a checkpoint and exits 0. `init_from` an import
(tools/import_*.py) takes the model's structural fields from its model.json where the config
leaves them out or at the model's defaults (a conflicting value is an error naming both);
config.json records the fields the run used.
"""
import dataclasses
import logging as std_logging
import os
import signal
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from clu import parameter_overview
from jax.experimental import multihost_utils
from ml_collections import config_flags

from big_vision_lite import checkpointing
from big_vision_lite import config_lib
from big_vision_lite import evaluators
from big_vision_lite import metrics as metrics_lib
from big_vision_lite import models
from big_vision_lite import optimizer as optimizer_lib
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite import utils
from big_vision_lite.input import data as data_lib

config_flags.DEFINE_config_file("config", None, "Config file (with optional :args).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator "
                    "(overrides JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Number of processes (overrides JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (overrides JAX_PROCESS_ID).")


class NonFiniteError(RuntimeError):
  """A training metric became NaN or infinite."""


class _StopSignal:
  """SIGTERM (a preemption notice) ends the loop at a step boundary, with a checkpoint.

  One process: a Python handler records the signal. Several: JAX's preemption service
  (its runtime catches SIGTERM on any process) names one step at which every process
  stops, so all of them reach the collective save on the same step.
  """

  def __init__(self):
    self.stopped = False
    self._received = False
    self._previous = None
    self._multi_process = jax.process_count() > 1

  def __enter__(self) -> "_StopSignal":
    if not self._multi_process:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self._received = True

  def should_stop(self, step: int) -> bool:
    """Whether to stop after `step`; with several processes, call it at every step."""
    if self._multi_process:
      self.stopped = multihost_utils.reached_preemption_sync_point(step)
    else:
      self.stopped = self._received
    return self.stopped

  def __exit__(self, *exc: Any) -> None:
    if not self._multi_process:
      signal.signal(signal.SIGTERM, self._previous)


_CLUSTER_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def distributed_settings(coordinator_address: str | None = None,
                         num_processes: int | None = None, process_id: int | None = None,
                         env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """Arguments for `jax.distributed.initialize`, or None for a single-process run.

  Each value comes from its argument (a flag), else from JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES or JAX_PROCESS_ID; values still unset are left to jax's cluster
  auto-detection (Cloud TPU, SLURM, Open MPI) when the environment is such a cluster.
  """
  env = os.environ if env is None else env
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  settings = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  if any(k in env for k in _CLUSTER_ENV_VARS) and num_processes != 1:
    return settings
  if num_processes is None or num_processes == 1:
    return None
  missing = [name for name, value in (("--coordinator_address", coordinator_address),
                                      ("--process_id", process_id)) if value is None]
  if missing:
    raise app.UsageError(f"{num_processes} processes need {' and '.join(missing)} (or the "
                         "JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID environment variables).")
  return settings


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Calls `jax.distributed.initialize` when flags, environment or cluster ask for several
  processes (see `distributed_settings`); CPU processes talk through gloo collectives."""
  if jax.distributed.is_initialized():
    return
  settings = distributed_settings(coordinator_address, num_processes, process_id)
  if settings is None:
    return
  # Without a CPU collectives implementation, cross-process computations fail on CPU.
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**settings)


def _check_workdir(workdir: str) -> None:
  """Creates `workdir` and writes a file there, so an unusable one fails before compute."""
  probe = os.path.join(workdir, f".write-test-{jax.process_index()}-{os.getpid()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise OSError(e.errno, f"--workdir {workdir} is not a writable directory ({e.strerror}: "
                  f"{e.filename}); choose another --workdir or fix its permissions.") from None


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(path + ".tmp", path)


def _check_same_architecture(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir holding another model's run is an error, not a silent mix.

  Variants of the same model are told apart when the checkpoint's params are restored.
  """
  name, _ = checkpointing.read_run_model(workdir)
  if name is not None and name != config.model_name:
    raise ValueError(f"Workdir {workdir} holds a run of model_name={name!r}; the config asks "
                     f"for model_name={config.model_name!r}. Use another --workdir.")


def ema_decay_schedule(config: ml_collections.ConfigDict) -> optax.Schedule | None:
  """The EMA decay per step: `ema_decay`, or a cosine from it to `ema_decay_end` over
  `total_steps` (`optimizer.cosine_between`, DINO's teacher momentum); None without EMA."""
  decay = config.get("ema_decay")
  if not decay:
    return None
  if config.get("ema_decay_end") is None:
    return lambda step: jnp.asarray(decay, jnp.float32)
  return optimizer_lib.cosine_between(decay, config.ema_decay_end, config.total_steps)


def make_train_step(task: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    config: ml_collections.ConfigDict) -> Callable[..., Any]:
  """Returns step(state, batch) -> (state, metrics), with gradient accumulation and EMA.

  The task's loss also gets the state entries named by `task.loss_inputs` ("step": the
  count before this update; "ema_params") as keyword arguments.
  """
  accum = config.get("grad_accum_steps") or 1
  ema_decay = ema_decay_schedule(config)
  nan_step = (config.get("debug") or {}).get("inject_nan_step")

  def grads_and_metrics(params, extra, batch, rng, loss_inputs):
    grad_fn = jax.grad(lambda *args: task.loss(*args, **loss_inputs), has_aux=True)
    if accum == 1:
      grads, (metrics, extra) = grad_fn(params, extra, batch, rng)
      return grads, metrics, extra
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def body(carry, inputs):
      grads_sum, metrics_sum, extra = carry
      index, micro_batch = inputs
      grads, (metrics, extra) = grad_fn(params, extra, micro_batch, jax.random.fold_in(rng, index))
      add = lambda a, b: jax.tree.map(jnp.add, a, b)
      return (add(grads_sum, grads), add(metrics_sum, metrics), extra), None

    zeros_like = lambda t: jax.tree.map(jnp.zeros_like, t)
    metric_shapes = jax.eval_shape(lambda: grad_fn(params, extra, jax.tree.map(
        lambda x: x[0], micro), rng)[1][0])
    init = (zeros_like(params), zeros_like(metric_shapes), extra)
    (grads, metrics, extra), _ = jax.lax.scan(body, init, (jnp.arange(accum), micro))
    scale = lambda t: jax.tree.map(lambda x: x / accum, t)
    return scale(grads), scale(metrics), extra

  def step(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    loss_inputs = {name: state[name] for name in task.loss_inputs}
    grads, metrics, extra = grads_and_metrics(state["params"], state["extra"], batch, rng,
                                              loss_inputs)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if nan_step:  # Debug: step `nan_step` ends with a NaN loss and NaN params.
      poisoned = state["step"] + 1 == nan_step
      params = jax.tree.map(lambda p: jnp.where(poisoned, jnp.nan, p), params)
      metrics = dict(metrics, loss=jnp.where(poisoned, jnp.nan, metrics["loss"]))
    new_state = dict(state, params=params, opt_state=opt_state, extra=extra,
                     step=state["step"] + 1)
    if ema_decay:
      decay = ema_decay(state["step"])
      new_state["ema_params"] = optax.incremental_update(params, state["ema_params"],
                                                         1.0 - decay)
      metrics = dict(metrics, ema_decay=decay)
    weight_decay = optimizer_lib.make_wd_schedule(config)
    if callable(weight_decay):
      metrics = dict(metrics, weight_decay=weight_decay(state["step"]))
    metrics = dict(metrics, learning_rate=schedule(state["step"]),
                   grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params))
    return new_state, metrics

  return step


def _init_state_fn(task: Any, tx: optax.GradientTransformation,
                   config: ml_collections.ConfigDict, batch: dict[str, Any]):
  def init(rng):
    init_rng, train_rng = jax.random.split(rng)
    # Parameter shapes do not depend on the batch size: initialise on one example.
    example = {k: jnp.zeros((1,) + v.shape[1:], v.dtype) for k, v in batch.items()}
    variables = task.init(init_rng, example)
    params = variables.pop("params")
    state = {"params": params, "extra": variables, "opt_state": tx.init(params),
             "step": jnp.zeros((), jnp.int32), "rng": train_rng}
    if config.get("ema_decay"):
      state["ema_params"] = params
    return state
  return init


def peek_batch_spec(train_iter: Any, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes of one batch, read without moving the iterator."""
  position = train_iter.get_state()
  example = next(train_iter)
  train_iter.set_state(position)
  return {k: jax.ShapeDtypeStruct((global_batch_size,) + v.shape[1:], v.dtype)
          for k, v in example.items()}


@dataclasses.dataclass
class Training:
  """What a run needs to step: the jitted init and step and the state's layout."""
  abstract_state: Any  # ShapeDtypeStructs carrying their shardings.
  state_shardings: Any
  init: Callable[[jax.Array], Any]  # rng -> sharded state.
  step: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]  # (state, batch), donates state.


def build_training(config: ml_collections.ConfigDict, task: Any, mesh: jax.sharding.Mesh,
                   batch_spec: dict[str, jax.ShapeDtypeStruct]) -> Training:
  """Optimiser, state layout from `jax.eval_shape` and the sharding rules, jitted step
  (activations sharded by config field 'activation_rules' where models name their axes)."""
  abstract_variables = jax.eval_shape(task.init, jax.random.key(0), batch_spec)
  tx, schedule = optimizer_lib.make_optimizer(config, abstract_variables["params"])
  init_fn = _init_state_fn(task, tx, config, batch_spec)
  abstract_state = jax.eval_shape(init_fn, jax.random.key(0))
  state_shardings = sharding.infer_shardings(abstract_state, mesh, config.get("sharding_rules"))
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_shardings)
  train_step = make_train_step(task, tx, schedule, config)

  def step(state, batch):  # The name jax.log_compiles reports: "jit(step)".
    with sharding.activation_sharding(config.get("activation_rules"), mesh):
      return train_step(state, batch)

  jitted_step = jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                        out_shardings=(state_shardings, sharding.replicated(mesh)),
                        donate_argnums=(0,))
  return Training(abstract_state, state_shardings,
                  jax.jit(init_fn, out_shardings=state_shardings), jitted_step)


def _check_finite(step: int, metrics: dict[str, Any]) -> None:
  for name, value in jax.device_get(metrics).items():
    if not np.all(np.isfinite(value)):
      raise NonFiniteError(f"Training metric {name!r} is {value} at step {step}; stopping. "
                           "The last checkpoint before this step is intact.")


def _eval_variables(state: dict[str, Any], use_ema: bool) -> dict[str, Any]:
  params = state["ema_params"] if use_ema and "ema_params" in state else state["params"]
  return {"params": params, **state["extra"]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_steps: int | None = None) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns last metrics.

  `stop_after_steps` ends this run early, with a checkpoint, after that many steps (as a
  preemption would); the next call resumes. An `init_from` import sets the model's
  structural fields (`config_lib.with_init_from_model`); config.json records the result.
  """
  config = config_lib.with_init_from_model(config)
  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  _check_workdir(workdir)
  _check_same_architecture(config, workdir)
  _write_config(config, workdir)

  mesh = sharding.make_mesh(config.get("mesh"))
  logging.info("Mesh %s over %d devices (%d processes).", dict(mesh.shape),
               mesh.devices.size, jax.process_count())
  model = models.from_config(config)
  task = tasks.REGISTRY.get(config.task)(config, model, mesh)
  writer = metrics_lib.create_writer(workdir)
  seed = config.get("seed", 0)
  batch_size = config.input.batch_size
  bad_records = config.input.get("bad_records", "fail")

  train_iter = data_lib.make_train_iterator(
      config.input.data, config.input.pp, batch_size, seed=seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.input.get("num_threads", 2),
      prefetch=config.input.get("prefetch", 2), packing=config.input.get("packing"),
      multiscale=config.input.get("multiscale"),
      batch_multiple=config_lib.multiscale_batch_multiple(config, mesh), bad_records=bad_records)
  batch_spec = peek_batch_spec(train_iter, batch_size)

  training = build_training(config, task, mesh, batch_spec)
  abstract_state, state_shardings = training.abstract_state, training.state_shardings

  checkpointer = checkpointing.Checkpointer(workdir, keep=config.get("keep_ckpt"))
  checkpointer.check_space(abstract_state)
  restored = checkpointer.restore_latest(abstract_state)
  skipped_before = 0  # Bad records skipped before the restored step.
  if restored is not None:
    state, data_state, step = restored
    train_iter.set_state(data_lib.select_iterator_state(data_state))
    skipped_before = data_state.get("skipped_records", 0)
    logging.info("Resumed from %s at step %d.", checkpointer.directory, step)
  else:
    state = training.init(jax.random.key(seed))
    if config.get("init_from"):
      state = _init_from(config, state, state_shardings)
  start_step = int(jax.device_get(state["step"]))
  if start_step == 0:
    # Every process joins in: params sharded over processes need a collective for the stats.
    parameter_overview.log_parameter_overview(state["params"], include_stats="global",
                                              jax_logging_process=0)
  if jax.process_index() == 0 and start_step == 0:
    writer.write_scalars(0, {"num_params": utils.count_params(state["params"])})

  train_step = training.step
  eval_runners = {
      name: evaluators.REGISTRY.get(ev.type)(task, mesh, ev, seed)
      for name, ev in (config.get("evals") or {}).items()}

  total_steps = config.total_steps
  log_every = config.get("log_training_steps", 50)
  ckpt_every = config.get("ckpt_steps")
  throughput = metrics_lib.Throughput(total_steps, start_step)
  last_metrics: dict[str, float] = {}
  end_step = total_steps if stop_after_steps is None else min(
      total_steps, start_step + stop_after_steps)

  def save(step: int) -> None:
    if pending is not None:  # Never save a state whose loss is not finite.
      _check_finite(*pending)
    # orbax's JSON writer stores process 0's copy: it holds every process's position.
    data_state = data_lib.gather_iterator_states(train_iter.get_state())
    if bad_records == "skip":
      data_state["skipped_records"] = skipped_before + data_lib.count_skipped(train_iter)
    checkpointer.save(step, state, data_state)

  def run_evals(step: int, final: bool) -> None:
    for name, runner in eval_runners.items():
      ev = config.evals[name]
      if final or step % ev.log_steps == 0:
        results = runner.run(_eval_variables(state, ev.get("use_ema", False)))
        writer.write_scalars(step, {f"{name}/{k}": v for k, v in results.items()})
        last_metrics.update({f"{name}/{k}": v for k, v in results.items()})

  pending: tuple[int, Any] | None = None
  with _StopSignal() as stop, checkpointer:
    step = start_step
    while step < end_step:
      step += 1
      batch = sharding.global_batch(next(train_iter), mesh)
      throughput.count(len(jax.tree.leaves(batch)[0]))
      with jax.transfer_guard("disallow"):
        state, step_metrics = train_step(state, batch)
      if pending is not None:  # Check the previous step while this one runs.
        _check_finite(*pending)
      pending = (step, {"loss": step_metrics["loss"]})
      if step % log_every == 0 or step == end_step:
        values = {f"train/{k}": float(v) for k, v in jax.device_get(step_metrics).items()}
        _check_finite(step, values)
        values.update(throughput.measure(step))
        if bad_records == "skip":
          values["input/skipped_records"] = skipped_before + data_lib.count_skipped(train_iter)
        writer.write_scalars(step, values)
        last_metrics.update(values)
        logging.info("step %d/%d  loss %.4f  %.2f steps/s  %.1f examples/s  ETA %s", step,
                     total_steps, values["train/loss"], values["steps_per_sec"],
                     values["examples_per_sec"], metrics_lib.format_duration(values["eta_seconds"]))
      run_evals(step, final=step == total_steps)
      if stop.should_stop(step):
        break
      if ckpt_every and step % ckpt_every == 0 and step != end_step:
        save(step)
    if pending is not None:
      _check_finite(*pending)
    if step > start_step or restored is None:
      save(step)
  writer.flush()
  if stop.stopped:
    logging.warning("Stopped by SIGTERM at step %d; checkpoint saved, exiting cleanly.", step)
  logging.info("Step %d: checkpoints in %s, metrics in %s (and TensorBoard in %s).", step,
               checkpointer.directory, os.path.join(workdir, "metrics.jsonl"),
               os.path.join(workdir, "tensorboard"))
  return last_metrics


def _to_host(tree: Any) -> Any:
  """Numpy copies of global arrays, gathered from the processes that hold their shards."""
  return jax.tree.map(lambda x: np.asarray(x) if x.is_fully_addressable
                      else multihost_utils.process_allgather(x, tiled=True), tree)


def _init_from(config: ml_collections.ConfigDict, state: dict[str, Any],
               state_shardings: dict[str, Any]) -> dict[str, Any]:
  """Replaces the fresh params (and BatchNorm statistics etc.) by those of another run or
  an imported checkpoint; `init_skip` regexes keep matching entries fresh. A run of a
  model wrapping this one (`config_lib.backbone_source`, e.g. DINO) gives its backbone; a
  run or import of this model's backbone alone fills it (the module's `load_backbone`,
  e.g. DETR)."""
  path = config.init_from
  module = models.get(config.model_name)
  name, source_model = checkpointing.read_run_model(path)  # validate() checked it loads here.
  if name != config.model_name and config_lib.backbone_source(name, source_model):
    # A wrapper's run (e.g. DINO): its backbone's variables, of its EMA params if it says so.
    source = models.get(name)
    loaded = checkpointing.load_variables(path, use_ema=source.BACKBONE_FROM_EMA)
    loaded = {collection: values[source.BACKBONE_KEY] for collection, values in loaded.items()
              if source.BACKBONE_KEY in values}
  else:
    loaded = checkpointing.load_variables(path)
  if name != config.model_name and hasattr(module, "load_backbone"):
    # A run or import of the backbone alone (e.g. an ImageNet ResNet for DETR).
    loaded = module.load_backbone({"params": _to_host(state["params"]),
                                   **_to_host(state["extra"])}, loaded, config.model.to_dict())
  skip = config.get("init_skip") or ()
  init_params = _to_host(state["params"])
  loaded_params = loaded.pop("params")
  if hasattr(module, "load"):
    loaded_params = module.load(init_params, loaded_params, config.model.to_dict())
  params = checkpointing.merge_init_params(init_params, loaded_params, skip, path)
  extra = dict(_to_host(state["extra"]))
  for collection, values in extra.items():
    if collection in loaded:
      extra[collection] = checkpointing.merge_init_params(values, loaded[collection], skip,
                                                          f"{path} ({collection})")
    else:
      logging.warning("init_from %s has no %r collection; it keeps its initial values.", path,
                      collection)
  logging.info("Initialised params from %s (%s).", path, name or "unknown model")
  params = jax.device_put(params, state_shardings["params"])
  state = dict(state, params=params,
               extra=jax.device_put(extra, state_shardings["extra"]))
  if "ema_params" in state:
    state["ema_params"] = params
  return state


class _OnlyOrbaxWarnings(std_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the console; its warnings still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
  del argv
  logging.get_absl_handler().addFilter(_OnlyOrbaxWarnings())
  maybe_initialize_distributed(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                               flags.FLAGS.process_id)
  config = flags.FLAGS.config
  if config is None or flags.FLAGS.workdir is None:
    raise app.UsageError("--config and --workdir are required.")
  train_and_evaluate(config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
