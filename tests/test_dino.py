"""DINO: loss, schedules, head, packed multi-crop, center across devices, exact resume."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from big_vision_lite import checkpointing
from big_vision_lite import models
from big_vision_lite import optimizer as optimizer_lib
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite import train
from big_vision_lite.losses import dino as dino_losses
from big_vision_lite.models import dino as dino_model
from big_vision_lite.tasks import dino as dino_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import dino as dino_config  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY_BACKBONE = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)


def tiny_config(packed: bool = False, **overrides):
  """DINO with a 1-layer width-32 backbone, 2 global 32 px and 2 local 16 px crops."""
  config = dino_config.get_config(f"packed={packed},batch_size=8,total_steps=6,num_local=2,"
                                  "out_dim=64,hidden_dim=48,bottleneck_dim=16,warmup_steps=1,"
                                  "teacher_temp_warmup_steps=4,freeze_last_layer_steps=2")
  config.model.backbone = dict(TINY_BACKBONE, pool_type="gap" if packed else "tok")
  config.mesh = [("data", 1)]
  config.log_training_steps = 1
  config.ckpt_steps = 3
  config.evals = {}
  for key, value in overrides.items():
    config[key] = value
  return config


def random_batch(batch: int = 4, num_local: int = 2, seed: int = 0) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  return {"global_crops": jnp.asarray(rng.uniform(-1, 1, (batch, 2, 32, 32, 3)), jnp.float32),
          "local_crops": jnp.asarray(rng.uniform(-1, 1, (batch, num_local, 16, 16, 3)),
                                     jnp.float32)}


def naive_dino_loss(student, teacher, center, student_temp, teacher_temp):
  """The official DINOLoss.forward, loop by loop, in float64 numpy; student [V, B, K],
  teacher [T, B, K] (the official chunks: crop-major)."""
  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  student, teacher = np.float64(student), np.float64(teacher)
  targets = softmax((teacher - center) / teacher_temp)
  log_probs = np.log(softmax(student / student_temp))
  total, pairs = 0.0, 0
  for i in range(teacher.shape[0]):
    for v in range(student.shape[0]):
      if v == i:
        continue
      total += np.sum(-targets[i] * log_probs[v], axis=-1).mean()
      pairs += 1
  return total / pairs


@pytest.mark.parametrize("num_local", [0, 3])
def test_loss_matches_naive_official_loop(num_local):
  rng = np.random.default_rng(1)
  student = rng.normal(size=(2 + num_local, 5, 7)) * 3
  teacher = rng.normal(size=(2, 5, 7)) * 3
  center = rng.normal(size=(7,))
  got = dino_losses.dino_loss(jnp.asarray(student, jnp.float32),
                              jnp.asarray(teacher, jnp.float32), jnp.asarray(center, jnp.float32),
                              student_temp=0.1, teacher_temp=0.04)
  np.testing.assert_allclose(got, naive_dino_loss(student, teacher, center, 0.1, 0.04),
                             rtol=1e-5)
  # The same-view pairs are skipped: student crop i = teacher crop i changes nothing when
  # they are the only pairs that moved.
  moved = student.copy()
  moved[:2] += rng.normal(size=(2, 5, 7))
  assert not np.isclose(naive_dino_loss(moved, teacher, center, 0.1, 0.04),
                        naive_dino_loss(student, teacher, center, 0.1, 0.04))


def naive_sinkhorn_knopp(teacher, teacher_temp, iterations):
  """DINOv2's sinkhorn_knopp_teacher on one process, in float64 numpy: teacher [N, K]."""
  q = np.exp(np.float64(teacher) / teacher_temp).T  # [K, N]
  num_prototypes, num_samples = q.shape
  q /= q.sum()
  for _ in range(iterations):
    q /= q.sum(axis=1, keepdims=True)
    q /= num_prototypes
    q /= q.sum(axis=0, keepdims=True)
    q /= num_samples
  return (q * num_samples).T


def naive_koleo(features):
  """DINOv2's KoLeoLoss, row by row in float64 numpy: features [N, D]."""
  x = np.float64(features) / np.linalg.norm(features, axis=-1, keepdims=True)
  total = 0.0
  for i in range(len(x)):
    others = [j for j in range(len(x)) if j != i]
    nearest = others[int(np.argmax([x[i] @ x[j] for j in others]))]
    total -= np.log(np.linalg.norm(x[i] - x[nearest] + 1e-8) + 1e-8)
  return total / len(x)


def test_sinkhorn_knopp_and_koleo_match_naive_dinov2_loops():
  rng = np.random.default_rng(2)
  teacher = rng.normal(size=(12, 7))
  got = dino_losses.sinkhorn_knopp_targets(jnp.asarray(teacher, jnp.float32), 0.5, 3)
  np.testing.assert_allclose(got, naive_sinkhorn_knopp(teacher, 0.5, 3), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, rtol=1e-5)
  # Balanced prototypes: every column carries about N / K of the mass (exactly only in the
  # limit of many iterations), unlike the plain softmax.
  softmax = np.asarray(jax.nn.softmax(teacher / 0.5, axis=-1))
  assert np.abs(np.asarray(got).sum(0) - 12 / 7).max() < 0.1 * np.abs(softmax.sum(0) - 12 / 7).max()
  features = rng.normal(size=(9, 5))
  features[3] = features[1] * 2.0  # Same direction: distance 0, the eps keeps it finite.
  np.testing.assert_allclose(dino_losses.koleo_loss(jnp.asarray(features, jnp.float32)),
                             naive_koleo(features), rtol=1e-5)
  grouped = np.stack([features, features[::-1]])  # [2, N, D]: each group on its own.
  np.testing.assert_allclose(dino_losses.koleo_loss(jnp.asarray(grouped, jnp.float32)),
                             naive_koleo(features), rtol=1e-5)


def test_schedules_follow_their_closed_forms():
  total = 50
  steps = np.arange(total + 1)
  # The official utils.cosine_scheduler: final + (base - final) (1 + cos(pi i / n)) / 2.
  official = lambda base, final: final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / total))
  config = tiny_config(total_steps=total, ema_decay=0.996, ema_decay_end=1.0, wd=0.04,
                       wd_end=0.4)
  momentum = train.ema_decay_schedule(config)
  np.testing.assert_allclose([momentum(s) for s in steps], official(0.996, 1.0), rtol=1e-6)
  weight_decay = optimizer_lib.make_wd_schedule(config)
  np.testing.assert_allclose([weight_decay(s) for s in steps], official(0.04, 0.4), rtol=1e-6)
  temps = [dino_task.teacher_temperature(s, 0.04, 0.07, 20) for s in steps]
  expected = np.where(steps < 20, 0.04 + 0.03 * steps / 20, 0.07)
  np.testing.assert_allclose(temps, expected, rtol=1e-6)
  assert train.ema_decay_schedule(tiny_config(ema_decay=0.9, ema_decay_end=None))(7) == (
      pytest.approx(0.9))


def test_weight_decay_schedule_reaches_the_update():
  """AdamW's decoupled decay with wd_end: a zero gradient moves a param by -lr wd(t) p."""
  config = tiny_config(total_steps=10, lr=0.1, wd=0.04, wd_end=0.4, grad_clip_norm=None)
  config.schedule = dict(decay_type="constant", warmup_steps=0)
  config.frozen_for_steps = ()
  params = {"dense": {"kernel": jnp.ones((2,))}}
  tx, _ = optimizer_lib.make_optimizer(config, params)
  state = tx.init(params)
  wd = optimizer_lib.make_wd_schedule(config)
  for step in range(4):
    updates, state = tx.update({"dense": {"kernel": jnp.zeros((2,))}}, state, params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * wd(step) * params["dense"]["kernel"],
                               rtol=1e-5)
    params = optax.apply_updates(params, updates)


def test_frozen_for_steps_starts_a_fresh_optimizer_on_the_run_schedule():
  """Frozen for n steps: untouched, then moved as a fresh AdamW started at step n with the
  run's learning rate at step n onwards (the official code's grad = None for epoch 0)."""
  config = tiny_config(total_steps=10, lr=0.1, wd=0.0, grad_clip_norm=None)
  config.schedule = dict(decay_type="linear", warmup_steps=0, end_lr_ratio=0.0)
  config.frozen_for_steps = ((r"last/.*", 3),)
  params = {"last": {"w": jnp.ones((3,))}, "other": {"w": jnp.ones((3,))}}
  tx, schedule = optimizer_lib.make_optimizer(config, params)
  fresh = optax.adam(lambda count: schedule(count + 3))
  fresh_state = fresh.init(params["last"])
  state = tx.init(params)
  rng = np.random.default_rng(0)
  for step in range(6):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = tx.update(grads, state, params)
    if step < 3:
      np.testing.assert_array_equal(updates["last"]["w"], 0.0)
      assert np.abs(updates["other"]["w"]).min() > 0
    else:
      expected, fresh_state = fresh.update(grads["last"], fresh_state)
      np.testing.assert_allclose(updates["last"]["w"], expected["w"], rtol=1e-5)
    params = optax.apply_updates(params, updates)


def test_head_normalises_bottleneck_and_last_layer():
  head = dino_model.DINOHead(out_dim=11, hidden_dim=16, bottleneck_dim=5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.float32)
  variables = head.init(jax.random.key(0), x)
  out = head.apply(variables, x)
  # Unit bottleneck times unit columns: every output is a cosine, |out| <= 1.
  assert out.shape == (4, 11) and float(jnp.abs(out).max()) <= 1 + 1e-6
  direction = variables["params"]["last_layer_direction"]
  scaled = {"params": dict(variables["params"], last_layer_direction=direction * 7.0)}
  np.testing.assert_allclose(head.apply(scaled, x), out, rtol=1e-5)  # Norm frozen to 1.
  assert set(variables["params"]) == {"mlp_0", "mlp_1", "mlp_2", "last_layer_direction"}
  free = dino_model.DINOHead(out_dim=11, hidden_dim=16, bottleneck_dim=5, norm_last_layer=False)
  assert "last_layer_scale" in free.init(jax.random.key(0), x)["params"]


def test_packed_multicrop_gives_the_unpacked_loss():
  """One packed NaViT forward over each image's crops = one forward per crop resolution."""
  losses = {}
  for packed in (False, True):
    config = tiny_config(packed=True)
    config.dino.packed = packed
    task = tasks.REGISTRY.get("dino")(config, models.from_config(config))
    batch = random_batch()
    variables = task.init(jax.random.key(0), jax.tree.map(lambda x: x[:1], batch))
    params = variables.pop("params")
    loss_fn = lambda p: task.loss(p, variables, batch, jax.random.key(1), step=jnp.int32(2),
                                  ema_params=jax.tree.map(lambda x: x * 0.9, p))
    (loss, (_, extra)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    losses[packed] = (loss, grads, extra["dino"]["center"])
  np.testing.assert_allclose(losses[True][0], losses[False][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6),
               losses[True][1], losses[False][1])
  np.testing.assert_allclose(losses[True][2], losses[False][2], rtol=1e-6)


def test_vit_resamples_its_learned_posemb_for_local_crops():
  """A ViT initialised on 32 px crops runs 16 px crops with its table resized bicubically
  (as the official DINO code's interpolate_pos_encoding), the same as a model whose table is
  that resize."""
  from big_vision_lite.models import vit  # pylint: disable=g-import-not-at-top
  model = vit.Model(**dict(TINY_BACKBONE, pool_type="tok"))
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  table = params["pos_embedding"].reshape(4, 4, -1)  # The 4 x 4 grid of 32 px / 8.
  resized = jax.image.resize(table, (2, 2, table.shape[-1]), "bicubic").reshape(1, 4, -1)
  expected, _ = model.apply({"params": dict(params, pos_embedding=resized)}, images)
  got, _ = model.apply({"params": params}, images)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  nearest = table[::2, ::2].reshape(1, 4, -1)
  other, _ = model.apply({"params": dict(params, pos_embedding=nearest)}, images)
  assert not np.allclose(got, other, atol=1e-4)


def test_packed_crops_layout():
  batch = random_batch(batch=2, num_local=3)
  inputs = dino_task.packed_crops(batch["global_crops"], batch["local_crops"], 8)
  # 2 globals of 4 x 4 patches and 3 locals of 2 x 2: 44 tokens, no padding.
  assert inputs["patches"].shape == (2, 44, 192)
  np.testing.assert_array_equal(inputs["segment_ids"][0],
                                np.repeat([1, 2, 3, 4, 5], [16, 16, 4, 4, 4]))
  np.testing.assert_array_equal(inputs["image_sizes"][1], [[4, 4]] * 2 + [[2, 2]] * 3)
  # The third local crop's patch (1, 0) of image 1, as pixels.
  patch = np.asarray(batch["local_crops"][1, 2, 8:16, 0:8]).reshape(-1)
  np.testing.assert_array_equal(inputs["patches"][1, 32 + 8 + 2], patch)
  np.testing.assert_array_equal(inputs["positions"][1, 32 + 8 + 2], [1, 0])


def _one_step(config, batch):
  """(initial state, state after one train step, its metrics), on host."""
  mesh = sharding.make_mesh(config.mesh)
  task = tasks.REGISTRY.get("dino")(config, models.from_config(config))
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  training = train.build_training(config, task, mesh, spec)
  state = training.init(jax.random.key(0))
  initial = jax.device_get(state)
  state, metrics = training.step(state, sharding.global_batch(
      jax.tree.map(np.asarray, batch), mesh))
  return initial, jax.device_get(state), jax.device_get(metrics)


def test_center_and_teacher_after_a_step_on_one_and_eight_devices():
  assert jax.device_count() >= 8, "conftest sets 8 host devices"
  batch = random_batch(batch=8)
  initial, one, metrics_one = _one_step(tiny_config(), batch)
  _, eight, metrics_eight = _one_step(tiny_config(mesh=[("data", 8)]), batch)
  np.testing.assert_allclose(eight["extra"]["dino"]["center"], one["extra"]["dino"]["center"],
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics_eight["loss"], metrics_one["loss"], rtol=1e-5)
  # From 0, the center after one step is (1 - 0.9) x the mean of the step-0 teacher (the
  # initial params) over all 16 global crops of the batch.
  config = tiny_config()
  task = tasks.REGISTRY.get("dino")(config, models.from_config(config))
  out = task.predict({"params": initial["params"]},
                     {"image": batch["global_crops"].reshape(16, 32, 32, 3)})
  np.testing.assert_allclose(one["extra"]["dino"]["center"], 0.1 * np.asarray(out).mean(0),
                             rtol=1e-4, atol=1e-7)
  # The teacher moved only by the EMA (no gradient) at the step-0 momentum, ema_decay.
  assert float(metrics_one["ema_decay"]) == pytest.approx(config.ema_decay)
  jax.tree.map(lambda t, p, p0: np.testing.assert_allclose(
      t, config.ema_decay * p0 + (1 - config.ema_decay) * p, rtol=1e-5, atol=1e-7),
               one["ema_params"], one["params"], initial["params"])


def test_sinkhorn_knopp_and_koleo_step_loss_on_one_and_eight_devices():
  """The step's loss with DINOv2's targets and KoLeo equals a numpy recomputation over the
  GLOBAL batch (the balancing and the nearest neighbours span every device's rows)."""
  dino = dict(tiny_config().dino.to_dict(), centering="sinkhorn_knopp", koleo_weight=0.1)
  config = tiny_config(dino=dino)
  batch = random_batch(batch=8)
  initial, _, metrics_one = _one_step(config, batch)
  _, _, metrics_eight = _one_step(tiny_config(dino=dino, mesh=[("data", 8)]), batch)
  task = tasks.REGISTRY.get("dino")(config, models.from_config(config))
  variables = {"params": initial["params"]}  # Student = teacher at step 0; no dropout.
  def outputs(key):
    crops = np.asarray(batch[key])
    out, aux = task.apply_eval(variables, crops.reshape(-1, *crops.shape[2:]))
    shape = crops.shape[:2]
    return (np.asarray(out).reshape(*shape, -1).swapaxes(0, 1),
            np.asarray(aux["pre_logits"]).reshape(*shape, -1).swapaxes(0, 1))
  teacher, features = outputs("global_crops")  # [T, B, K], [T, B, D]
  local, _ = outputs("local_crops")
  temperature = float(metrics_one["teacher_temp"])
  targets = naive_sinkhorn_knopp(teacher.reshape(-1, teacher.shape[-1]), temperature, 3)
  def log_softmax(x):
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(
        -1, keepdims=True))
  student = np.concatenate([teacher, local]) / 0.1  # [V, B, K]
  targets = targets.reshape(teacher.shape)
  pairs = [-(targets[t] * log_softmax(student[v])).sum(-1).mean()
           for t in range(2) for v in range(len(student)) if v != t]
  expected = np.mean(pairs) + 0.1 * sum(naive_koleo(f) for f in features)
  np.testing.assert_allclose(metrics_one["loss"], expected, rtol=1e-4)
  np.testing.assert_allclose(metrics_eight["loss"], expected, rtol=1e-4)


def test_config_errors_name_the_field():
  from big_vision_lite import config_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="'dino.teacher_temp'"):
    config_lib.validate(tiny_config(dino=dict(teacher_temp=0.0)))
  with pytest.raises(ValueError, match="'dino.centering' must be one of ema, sinkhorn_knopp"):
    config_lib.validate(tiny_config(dino=dict(centering="sk")))
  with pytest.raises(ValueError, match="'dino.koleo_weight' must be a number >= 0"):
    config_lib.validate(tiny_config(dino=dict(koleo_weight=-0.1)))
  with pytest.raises(ValueError, match="'dino.sinkhorn_iterations' must be an int >= 1"):
    config_lib.validate(tiny_config(dino=dict(sinkhorn_iterations=0)))
  with pytest.raises(ValueError, match="'ema_decay'"):
    config_lib.validate(tiny_config(ema_decay=None, ema_decay_end=None))
  with pytest.raises(ValueError, match="backbone_name='navit'"):
    config = tiny_config()
    config.dino.packed = True
    config_lib.validate(config)
  with pytest.raises(ValueError, match="'frozen_for_steps'"):
    config_lib.validate(tiny_config(frozen_for_steps=(("head/.*", -1),)))
  with pytest.raises(ValueError, match="backbone.num_classes"):
    dino_model.Model(out_dim=8, backbone=dict(TINY_BACKBONE, num_classes=10))
  with pytest.raises(ValueError, match="'backbone' must be 'vit' or 'convnext2', got 'resnet'"):
    dino_config.get_config("backbone=resnet")
  with pytest.raises(ValueError, match=r"multiples of 32 for backbone=convnext2 .*, got 64 and 16"):
    dino_config.get_config("backbone=convnext2,variant=atto,global_size=64")
  with pytest.raises(ValueError, match="'packed' needs backbone=vit"):
    dino_config.get_config("backbone=convnext2,variant=atto,global_size=64,local_size=32,"
                           "packed=true")


def dropout_config():
  """tiny_config of 6 steps with dropout in the backbone (so the RNG must resume too)."""
  config = tiny_config(total_steps=6)
  config.model.backbone.dropout = 0.1
  return config


def test_resume_is_exact_with_teacher_center_and_schedules(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  config = dropout_config()
  train.train_and_evaluate(config, straight)
  train.train_and_evaluate(config, resumed, stop_after_steps=3)
  train.train_and_evaluate(config, resumed)
  a = checkpointing.load_variables(straight)
  b = checkpointing.load_variables(resumed)
  jax.tree.map(np.testing.assert_array_equal, a, b)  # params and the center
  assert a["dino"]["center"].any()
  a = checkpointing.load_variables(straight, use_ema=True)
  b = checkpointing.load_variables(resumed, use_ema=True)
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])  # the teacher


def test_classifier_fine_tunes_from_the_teacher_backbone(tmp_path):
  dino_dir = str(tmp_path / "dino")
  # The resume test's run, stopped after 2 steps: its compiled programs are in the session's
  # cache.
  train.train_and_evaluate(dropout_config(), dino_dir, stop_after_steps=2)
  import vit as vit_config  # pylint: disable=g-import-not-at-top
  config = vit_config.get_config("res=32,batch_size=8,total_steps=1")
  config.model = dict(TINY_BACKBONE, num_classes=10, pool_type="tok")
  config.mesh, config.evals = [("data", 1)], {}
  config.init_from = dino_dir
  config.init_skip = ("head/.*",)
  config.lr = 0.0  # The step leaves the loaded params as they are.
  train.train_and_evaluate(config, str(tmp_path / "ft"))
  teacher = checkpointing.load_variables(dino_dir, use_ema=True)["params"]["backbone"]
  student = checkpointing.load_variables(dino_dir)["params"]["backbone"]
  tuned = checkpointing.load_params(str(tmp_path / "ft"))
  assert set(tuned) == set(teacher) | {"head"}
  jax.tree.map(np.testing.assert_array_equal, {k: tuned[k] for k in teacher}, teacher)
  assert not np.array_equal(tuned["Transformer"]["encoder_norm"]["scale"],
                            student["Transformer"]["encoder_norm"]["scale"])
