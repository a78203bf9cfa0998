"""Optimiser, schedules and loop features against independent references: schedules
against their closed forms in numpy, optimisers against optax used directly and against
updates written out in numpy, EMA against its recursion, `init_skip` against a fresh run."""
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_vision_lite import checkpointing
from big_vision_lite import models
from big_vision_lite import optimizer
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import vit as vit_config  # pylint: disable=g-import-not-at-top,wrong-import-position


# ---------------------------------------------------------------------------------------
# Schedules.


def closed_form_lr(step: np.ndarray, *, lr: float, total: int, warmup: int, decay_type: str,
                   end_lr_ratio: float = 0.0, timescale: float = 10_000) -> np.ndarray:
  """Learning rate at each `step`: 0 -> lr linearly over `warmup` steps, then the decay
  over the remaining steps (held at its end value after `total`)."""
  step = np.asarray(step, np.float64)
  end_lr = lr * end_lr_ratio
  # Progress through the decay, in [0, 1].
  t = np.clip(step - warmup, 0, None)
  progress = np.minimum(t / max(total - warmup, 1), 1.0)
  if decay_type == "cosine":
    decayed = end_lr + (lr - end_lr) * 0.5 * (1 + np.cos(np.pi * progress))
  elif decay_type == "linear":
    decayed = lr + (end_lr - lr) * progress
  elif decay_type == "rsqrt":
    decayed = lr * np.sqrt(timescale / (t + timescale))
  else:
    decayed = np.full_like(step, lr)
  return np.where(step < warmup, lr * step / max(warmup, 1), decayed)


def schedule_config(total: int, lr: float, **schedule) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(total_steps=total, lr=lr, schedule=schedule))


SCHEDULES = [
    # (schedule fields, total steps, warm-up steps the fields mean, {step: known value}).
    (dict(decay_type="cosine", warmup_steps=10, end_lr_ratio=0.1), 50, 10,
     {0: 0.0, 5: 0.25, 10: 0.5, 30: 0.275, 50: 0.05, 60: 0.05}),
    (dict(decay_type="cosine", warmup_percent=0.2, end_lr_ratio=0.0), 50, 10,
     {0: 0.0, 5: 0.25, 10: 0.5, 30: 0.25, 50: 0.0, 60: 0.0}),
    (dict(decay_type="cosine", warmup_percent=0.0), 40, 0, {0: 0.5, 20: 0.25, 40: 0.0}),
    (dict(decay_type="linear", warmup_steps=8, end_lr_ratio=0.2), 48, 8,
     {0: 0.0, 4: 0.25, 8: 0.5, 28: 0.3, 47: 0.5 - 0.4 * 39 / 40, 48: 0.1, 60: 0.1}),
    # 0.29 * 100 is 28.999999999999996 in floating point: still 29 warm-up steps.
    (dict(decay_type="linear", warmup_percent=0.29), 100, 29,
     {0: 0.0, 28: 0.5 * 28 / 29, 29: 0.5, 100: 0.0}),
    (dict(decay_type="rsqrt", warmup_steps=10, timescale=20), 50, 10,
     {0: 0.0, 5: 0.25, 10: 0.5, 30: 0.5 * np.sqrt(0.5), 70: 0.25}),
    (dict(decay_type="constant", warmup_steps=6), 30, 6,
     {0: 0.0, 3: 0.25, 6: 0.5, 18: 0.5, 29: 0.5, 100: 0.5}),
]


@pytest.mark.parametrize("fields,total,warmup,known", SCHEDULES, ids=[
    "cosine_warmup_steps", "cosine_warmup_percent", "cosine_no_warmup", "linear",
    "linear_warmup_percent", "rsqrt", "constant"])
def test_schedule_matches_closed_form(fields, total, warmup, known):
  schedule = optimizer.make_schedule(schedule_config(total, 0.5, **fields))
  # Step 0, mid-warm-up, the join point, mid-decay, the last step and beyond the end.
  steps = np.arange(total + 20)
  expected = closed_form_lr(steps, lr=0.5, total=total, warmup=warmup,
                            decay_type=fields["decay_type"],
                            end_lr_ratio=fields.get("end_lr_ratio", 0.0),
                            timescale=fields.get("timescale", 10_000))
  got = np.array([schedule(s) for s in steps])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  # The closed form itself at values worked out by hand.
  for step, value in known.items():
    np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-5, atol=1e-7,
                               err_msg=f"step {step}")


def test_default_schedule_is_cosine_without_warmup():
  schedule = optimizer.make_schedule(ml_collections.ConfigDict(dict(total_steps=10, lr=0.3)))
  expected = closed_form_lr(np.arange(12), lr=0.3, total=10, warmup=0, decay_type="cosine")
  np.testing.assert_allclose([schedule(s) for s in range(12)], expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Optimisers on a small param tree.

LR, WD, TOTAL, WARMUP = 0.05, 0.1, 6, 2
PARAM_SHAPES = {"dense": {"kernel": (3, 4), "bias": (4,)},
                "head": {"kernel": (4, 2), "bias": (2,)},
                "norm": {"scale": (4,)}}


def random_tree(seed: int, scale: float = 1.0) -> dict:
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda shape: (scale * rng.normal(size=shape)).astype(np.float32),
                      PARAM_SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def names_mask(selected: set[str]) -> dict:
  """The mask tree of PARAM_SHAPES, True for the "<module>/<param>" names in `selected`."""
  return {module: {param: f"{module}/{param}" in selected for param in leaves}
          for module, leaves in PARAM_SHAPES.items()}


DEFAULT_DECAYED = {"dense/kernel", "head/kernel"}  # `.*kernel$`


def opt_config(name: str, **fields) -> ml_collections.ConfigDict:
  """`name` with a warm-up then cosine schedule and weight decay (sgd without momentum
  unless `optax` says otherwise)."""
  config = dict(total_steps=TOTAL, lr=LR, wd=WD, optax_name=name, optax={},
                schedule=dict(decay_type="cosine", warmup_steps=WARMUP, end_lr_ratio=0.1))
  config.update(fields)
  return ml_collections.ConfigDict(config)


def lr_table(config: ml_collections.ConfigDict, steps: int = 20) -> np.ndarray:
  """The schedule's values from the closed form, for references that take a schedule."""
  sched = config.schedule
  return closed_form_lr(np.arange(steps), lr=config.lr, total=config.total_steps,
                        warmup=sched.warmup_steps, decay_type=sched.decay_type,
                        end_lr_ratio=sched.end_lr_ratio).astype(np.float32)


def run_tx(tx: optax.GradientTransformation, params: dict, grads_seq: list[dict]) -> list[dict]:
  """Params after each step of `tx` on the given gradients."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for grads in grads_seq:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(jax.tree.map(np.asarray, params))
  return history


def run_config(config: ml_collections.ConfigDict, params: dict,
               grads_seq: list[dict]) -> list[dict]:
  optimizer.validate_config(config)
  tx, _ = optimizer.make_optimizer(config, params)
  return run_tx(tx, params, grads_seq)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


PARAMS = random_tree(0)
GRADS = [random_tree(seed, scale=0.3) for seed in range(1, 6)]


def test_lion_matches_optax():
  config = opt_config("lion", optax=dict(b1=0.8, b2=0.95))
  table = jnp.asarray(lr_table(config))
  reference = optax.lion(learning_rate=lambda count: table[count], b1=0.8, b2=0.95,
                         weight_decay=WD, mask=names_mask(DEFAULT_DECAYED))
  got = run_config(config, PARAMS, GRADS)
  assert_trees_close(got, run_tx(reference, PARAMS, GRADS))
  assert not np.allclose(got[-1]["dense"]["kernel"], PARAMS["dense"]["kernel"])


def test_adafactor_matches_optax():
  # Factored second moments for the 2-d leaves, momentum, parameter scaling (its default).
  kwargs = dict(min_dim_size_to_factor=2, momentum=0.9, decay_rate=0.8)
  config = opt_config("adafactor", optax=kwargs)
  table = jnp.asarray(lr_table(config))
  # optax's own decoupled decay is not scaled by the learning rate; AdamW's is.
  reference = optax.adafactor(learning_rate=lambda count: table[count],
                              weight_decay_rate=lambda count: WD * table[count],
                              weight_decay_mask=names_mask(DEFAULT_DECAYED), **kwargs)
  got = run_config(config, PARAMS, GRADS)
  assert_trees_close(got, run_tx(reference, PARAMS, GRADS))
  # Decay matters here: without it the kernels end elsewhere.
  no_decay = run_config(opt_config("adafactor", optax=kwargs, wd=0.0), PARAMS, GRADS)
  assert not np.allclose(no_decay[-1]["dense"]["kernel"], got[-1]["dense"]["kernel"],
                         rtol=1e-5, atol=1e-7)


def test_adamw_matches_optax():
  config = opt_config("adamw", optax=dict(b1=0.8, b2=0.99, eps=1e-6))
  table = jnp.asarray(lr_table(config))
  reference = optax.adamw(learning_rate=lambda count: table[count], b1=0.8, b2=0.99, eps=1e-6,
                          weight_decay=WD, mask=names_mask(DEFAULT_DECAYED))
  assert_trees_close(run_config(config, PARAMS, GRADS), run_tx(reference, PARAMS, GRADS))


def numpy_sgd(params, grads_seq, lrs, decayed: set[str], momentum: float = 0.0):
  """SGD with heavy-ball momentum and decoupled weight decay on the `decayed` leaves:
  m = momentum * m + g;  p -= lr * (m + wd * p)."""
  params = {m: {k: v.astype(np.float64) for k, v in leaves.items()}
            for m, leaves in params.items()}
  trace = {m: {k: 0.0 for k in leaves} for m, leaves in params.items()}
  history = []
  for lr, grads in zip(lrs, grads_seq):
    for module, leaves in params.items():
      for name, p in leaves.items():
        trace[module][name] = momentum * trace[module][name] + grads[module][name]
        decay = WD * p if f"{module}/{name}" in decayed else 0.0
        leaves[name] = p - lr * (trace[module][name] + decay)
    history.append({m: dict(leaves) for m, leaves in params.items()})
  return history


def numpy_adamw(params, grads_seq, lrs, decayed: set[str], b1=0.9, b2=0.999, eps=1e-8):
  """AdamW (Loshchilov & Hutter) written out: decay wd * p added to the Adam direction."""
  params = {m: {k: v.astype(np.float64) for k, v in leaves.items()}
            for m, leaves in params.items()}
  mu = {m: {k: 0.0 for k in leaves} for m, leaves in params.items()}
  nu = {m: {k: 0.0 for k in leaves} for m, leaves in params.items()}
  history = []
  for t, (lr, grads) in enumerate(zip(lrs, grads_seq), start=1):
    for module, leaves in params.items():
      for name, p in leaves.items():
        g = grads[module][name].astype(np.float64)
        mu[module][name] = b1 * mu[module][name] + (1 - b1) * g
        nu[module][name] = b2 * nu[module][name] + (1 - b2) * g * g
        direction = ((mu[module][name] / (1 - b1**t))
                     / (np.sqrt(nu[module][name] / (1 - b2**t)) + eps))
        decay = WD * p if f"{module}/{name}" in decayed else 0.0
        leaves[name] = p - lr * (direction + decay)
    history.append({m: dict(leaves) for m, leaves in params.items()})
  return history


WD_MASKS = [(None, DEFAULT_DECAYED),
            (("head/.*",), {"head/kernel", "head/bias"}),
            (("norm/scale", "dense/bias"), {"norm/scale", "dense/bias"})]


@pytest.mark.parametrize("wd_mask,decayed", WD_MASKS, ids=["default", "head", "two_names"])
@pytest.mark.parametrize("name", ["sgd", "sgd_momentum", "adamw"])
def test_weight_decay_reaches_exactly_the_masked_leaves(name, wd_mask, decayed):
  fields = {} if wd_mask is None else dict(wd_mask=wd_mask)
  if name == "sgd_momentum":
    config = opt_config("sgd", optax=dict(momentum=0.9), **fields)
    expected = numpy_sgd(PARAMS, GRADS, lr_table(config), decayed, momentum=0.9)
  elif name == "sgd":
    config = opt_config("sgd", **fields)
    expected = numpy_sgd(PARAMS, GRADS, lr_table(config), decayed)
  else:
    config = opt_config("adamw", optax=dict(b1=0.8, b2=0.99), **fields)
    expected = numpy_adamw(PARAMS, GRADS, lr_table(config), decayed, b1=0.8, b2=0.99)
  got = run_config(config, PARAMS, GRADS)
  assert_trees_close(got, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_frozen_params_stay_and_the_others_train_as_without_freezing(name):
  frozen = ("dense/.*", "norm/scale")
  got = run_config(opt_config(name, frozen_params=frozen), PARAMS, GRADS)[-1]
  free = run_config(opt_config(name), PARAMS, GRADS)[-1]
  for module in ("dense", "norm"):
    for param in PARAMS[module]:
      np.testing.assert_array_equal(got[module][param], PARAMS[module][param])
  for param in PARAMS["head"]:
    np.testing.assert_allclose(got["head"][param], free["head"][param], rtol=1e-6)
    assert not np.allclose(got["head"][param], PARAMS["head"][param])


def test_step_schedule_drops_the_lr_at_its_fractions():
  config = ml_collections.ConfigDict(dict(total_steps=100, lr=0.5, schedule=dict(
      decay_type="step", warmup_steps=10, drop_at=(0.5, 0.8), drop_factor=0.1)))
  optimizer.validate_config(config)
  schedule = optimizer.make_schedule(config)
  got = [float(schedule(s)) for s in (0, 5, 10, 49, 50, 79, 80, 99)]
  np.testing.assert_allclose(got, [0.0, 0.25, 0.5, 0.5, 0.05, 0.05, 0.005, 0.005], rtol=1e-6)
  for drop_at in ((), (1.5,)):
    config.schedule.drop_at = drop_at
    with pytest.raises(ValueError, match="'schedule.drop_at'"):
      optimizer.validate_config(config)


def test_lr_mults_scale_learning_rate_and_weight_decay_of_matching_leaves():
  """AdamW per leaf: the dense leaves follow the lr table x 0.1 (as a torch param group at
  a tenth of the lr, its decoupled decay included), the others the plain table."""
  config = opt_config("adamw", lr_mults=(("dense/.*", 0.1), (".*", 1.0)))
  got = run_config(config, PARAMS, GRADS)[-1]
  table = lr_table(config)
  plain = numpy_adamw(PARAMS, GRADS, table, DEFAULT_DECAYED)[-1]
  tenth = numpy_adamw(PARAMS, GRADS, [0.1 * lr for lr in table], DEFAULT_DECAYED)[-1]
  for module in PARAMS:
    expected = tenth if module == "dense" else plain
    assert_trees_close(got[module], expected[module], rtol=2e-5, atol=1e-6)
  with pytest.raises(ValueError, match="'lr_mults' takes pairs"):
    optimizer.validate_config(opt_config("adamw", lr_mults=(("dense/.*", -1.0),)))


def global_norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(x, dtype=np.float64))
                           for x in jax.tree.leaves(tree))))


@pytest.mark.parametrize("factor", [3.0, 0.5])
def test_grad_clip_norm_rescales_only_gradients_above_the_limit(factor):
  """sgd, constant lr, no decay: one step moves each param by -lr * clipped gradient."""
  grads = GRADS[0]
  limit = global_norm(grads) / factor  # factor > 1: the gradient's norm is above the limit.
  config = opt_config("sgd", wd=0.0, grad_clip_norm=limit,
                      schedule=dict(decay_type="constant", warmup_steps=0))
  got = run_config(config, PARAMS, [grads])[0]
  scale = min(1.0, 1.0 / factor)
  expected = jax.tree.map(lambda p, g: p - LR * scale * g, PARAMS, grads)
  assert_trees_close(got, expected, rtol=1e-5, atol=1e-7)
  # The same update as from the rescaled gradient (of norm `limit`) without clipping.
  rescaled = jax.tree.map(lambda g: g * scale, grads)
  unclipped = opt_config("sgd", wd=0.0, schedule=dict(decay_type="constant", warmup_steps=0))
  assert_trees_close(got, run_config(unclipped, PARAMS, [rescaled])[0], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# The loop: EMA of params, and init_from with init_skip.


EMA_DECAY, LOOP_STEPS = 0.7, 4


def loop_config(**overrides) -> ml_collections.ConfigDict:
  """A 2-layer width-16 ViT on 16x16 shapes images, batch 8, with EMA and a random-init
  head. Every loop test uses this config, so its init and step compile once."""
  config = vit_config.get_config(f"res=16,batch_size=8,total_steps={LOOP_STEPS},lr=0.02")
  config.model = dict(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=(8, 8),
                      num_classes=10, pool_type="gap", head_zeroinit=False)
  config.ema_decay = EMA_DECAY
  config.mesh = [("data", 1)]
  config.evals = {}
  for key, value in overrides.items():
    config[key] = value
  return config


def test_ema_params_follow_the_recursion_over_the_param_sequence():
  config = loop_config()
  mesh = sharding.make_mesh(config.mesh)
  task = tasks.REGISTRY.get(config.task)(config, models.from_config(config))
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
           "labels": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 8)]}
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  training = train.build_training(config, task, mesh, spec)
  state = training.init(jax.random.key(0))
  ema = jax.tree.map(lambda x: np.asarray(x, np.float64), state["params"])
  assert_trees_close(state["ema_params"], ema, rtol=0, atol=0)
  for _ in range(LOOP_STEPS):
    state, _ = training.step(state, sharding.global_batch(batch, mesh))
    params = jax.tree.map(np.asarray, state["params"])  # The step donates `state`.
    ema = jax.tree.map(lambda e, p: EMA_DECAY * e + (1 - EMA_DECAY) * p, ema, params)
  got = jax.tree.map(np.asarray, state["ema_params"])
  assert_trees_close(got, ema, rtol=1e-5, atol=1e-7)
  # The EMA lags the params by far more than the tolerance.
  kernel = lambda tree: tree["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert np.max(np.abs(kernel(got) - kernel(params))) > 1e-3


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  """A trained run (seed 1) to initialise from, and its params."""
  workdir = str(tmp_path_factory.mktemp("init_source"))
  train.train_and_evaluate(loop_config(seed=1), workdir)
  return workdir, checkpointing.load_params(workdir)


def initial_params(workdir: str, **overrides) -> dict:
  """The params a run (seed 0) starts from: it stops, with a checkpoint, before step 1."""
  train.train_and_evaluate(loop_config(**overrides), workdir, stop_after_steps=0)
  assert checkpointing.Checkpointer(workdir).all_steps() == [0]
  return checkpointing.load_params(workdir)


def test_init_skip_keeps_a_fresh_head(source_run, tmp_path):
  source, loaded = source_run
  fresh = initial_params(str(tmp_path / "fresh"))
  skipped = initial_params(str(tmp_path / "skip"), init_from=source, init_skip=("head/.*",))
  whole = initial_params(str(tmp_path / "whole"), init_from=source)
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(skipped["head"][name], fresh["head"][name])
    np.testing.assert_array_equal(whole["head"][name], loaded["head"][name])
    assert not np.allclose(fresh["head"][name], loaded["head"][name])
  body = lambda tree: {k: v for k, v in tree.items() if k != "head"}
  jax.tree.map(np.testing.assert_array_equal, body(skipped), body(loaded))
  jax.tree.map(np.testing.assert_array_equal, body(whole), body(loaded))
  assert not np.allclose(fresh["Transformer"]["encoder_norm"]["scale"],
                         loaded["Transformer"]["encoder_norm"]["scale"])
