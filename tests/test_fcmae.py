"""FCMAE: masking, targets and loss against numpy; no leak from masked pixels; the task and
config train; fine-tuning takes the encoder; the reconstruction and collapse tools."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import checkpointing
from big_vision_lite import config_lib
from big_vision_lite import train
from big_vision_lite import utils
from big_vision_lite.input import data as data_lib
from big_vision_lite.models import convnext2
from big_vision_lite.models import fcmae
from big_vision_lite.models import layers
from big_vision_lite.tasks import fcmae as fcmae_task
from big_vision_lite.tools import fcmae_reconstruct
from big_vision_lite.tools import feature_collapse
from configs import convnext2 as convnext2_config
from configs import fcmae as fcmae_config

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), decoder_dim=16)


def images(n: int, side: int = 64, seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, side, side, 3)),
                     jnp.float32)


def compile_once(fn, *args, **kwargs):
  """`fn` compiled for `args` without XLA's optimisations, which would cost more than the
  tests' few calls save (eager calls would compile every op on its own)."""
  return jax.jit(fn).lower(*args, **kwargs).compile({"xla_backend_optimization_level": 0})


def test_random_mask_keeps_the_paper_count_per_image():
  visible = np.asarray(fcmae.random_mask(jax.random.key(0), 64, (7, 7), 0.6))
  assert visible.shape == (64, 7, 7, 1)
  np.testing.assert_array_equal(visible.sum(axis=(1, 2, 3)), int(49 * 0.4))  # 19 of 49
  patterns = {visible[i].tobytes() for i in range(64)}
  assert len(patterns) > 60  # independent per image
  # Every cell is masked about 60% of the time.
  np.testing.assert_allclose(visible.mean(0), 19 / 49, atol=0.2)
  again = fcmae.random_mask(jax.random.key(0), 64, (7, 7), 0.6)
  np.testing.assert_array_equal(visible, again)


def test_patchify_layout_and_inverse():
  x = np.asarray(images(2, 64))
  patches = np.asarray(layers.patchify(jnp.asarray(x), fcmae.PATCH))
  assert patches.shape == (2, 2, 2, 32 * 32 * 3)
  for i in range(2):
    for j in range(2):
      want = x[1, i * 32:(i + 1) * 32, j * 32:(j + 1) * 32].reshape(-1)
      np.testing.assert_array_equal(patches[1, i, j], want)
  np.testing.assert_array_equal(layers.unpatchify(jnp.asarray(patches), 3, fcmae.PATCH), x)
  visible = np.array([[1, 0], [0, 1]], np.float32).reshape(1, 2, 2, 1)
  want = np.repeat(np.repeat(visible, 32, axis=1), 32, axis=2).repeat(3, axis=3)
  np.testing.assert_array_equal(fcmae.pixel_mask(jnp.asarray(visible), 3), want)


def test_targets_and_masked_mse_on_known_inputs():
  x = np.asarray(images(3, 64, seed=1))
  target = np.asarray(fcmae.patch_targets(jnp.asarray(x)))
  raw = np.asarray(layers.patchify(jnp.asarray(x), fcmae.PATCH))
  want = (raw - raw.mean(-1, keepdims=True)) / np.sqrt(raw.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(target, want, atol=1e-5)
  np.testing.assert_array_equal(fcmae.patch_targets(jnp.asarray(x), normalise=False), raw)
  # pred = target + c per cell: the cell's error is c²; only masked cells count.
  visible = np.zeros((3, 2, 2, 1), np.float32)
  visible[0, 0, 0] = visible[2, 1, 1] = 1
  shift = np.arange(12, dtype=np.float32).reshape(3, 2, 2, 1)
  loss = fcmae.masked_mse(jnp.asarray(target + shift), jnp.asarray(target),
                          jnp.asarray(visible))
  masked = (1 - visible[..., 0]).astype(bool)
  np.testing.assert_allclose(loss, (shift[..., 0][masked] ** 2).mean(), rtol=1e-5)


def test_masked_pixels_never_reach_the_prediction():
  """Changing the pixels under the mask changes nothing the model outputs: the encoder
  never reads them and the decoder sees the mask token there."""
  model = fcmae.Model(**TINY)
  x = images(2, 64)
  visible = fcmae.random_mask(jax.random.key(3), 2, (2, 2), 0.5)
  variables = compile_once(model.init, jax.random.key(0), x, mask=visible)(
      jax.random.key(0), x, mask=visible)
  pixel_visible = fcmae.pixel_mask(visible, 3)
  noise = images(2, 64, seed=7) * 50
  changed = jnp.where(pixel_visible > 0, x, noise)
  apply = compile_once(model.apply, variables, x, mask=visible)
  pred, aux = apply(variables, x, mask=visible)
  pred_changed, aux_changed = apply(variables, changed, mask=visible)
  np.testing.assert_allclose(pred_changed, pred, atol=1e-5)
  np.testing.assert_allclose(aux_changed["features"], aux["features"], atol=1e-5)
  # ... while visible pixels do matter.
  moved, _ = apply(variables, jnp.where(pixel_visible > 0, noise, x), mask=visible)
  assert np.abs(np.asarray(moved - pred)).max() > 1e-3


def test_task_loss_is_the_masked_mse_of_its_own_mask():
  config = fcmae_config.get_config()
  model = fcmae.Model(**TINY)
  task = fcmae_task.FCMAE(config, model)
  x = images(4, 64)
  rng, batch = jax.random.key(5), {"image": x}
  params = compile_once(task.init, rng, batch)(jax.random.key(0), batch)["params"]
  loss, (metrics, _) = compile_once(task.loss, params, {}, batch, rng)(params, {}, batch, rng)
  mask_rng, _ = jax.random.split(rng)
  visible = fcmae.random_mask(mask_rng, 4, (2, 2), 0.6)
  variables = {"params": params}
  pred, _ = compile_once(model.apply, variables, x, mask=visible)(variables, x, mask=visible)
  want = fcmae.masked_mse(pred, fcmae.patch_targets(x), visible)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert float(metrics["visible_fraction"]) == 0.25  # int(4 · 0.4) = 1 of 4 cells


@pytest.mark.parametrize("fields,match", [
    (dict(fcmae=dict(mask_ratio=1.0)), "mask_ratio.*0, 1"),
    (dict(fcmae=dict(ratio=0.5)), "mask_ratio and norm_pix_loss")])
def test_bad_config_fields_are_named(fields, match):
  config = fcmae_config.get_config()
  config.unlock()
  config.update(fields)
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)


def test_bad_sizes_are_named():
  with pytest.raises(ValueError, match="res.*multiple of 32"):
    fcmae_config.get_config("res=48")
  with pytest.raises(ValueError, match="keeps 0 visible"):
    fcmae_task.image_grid(images(1, 32), 0.6)
  with pytest.raises(ValueError, match="decoder_dim"):
    fcmae.Model(decoder_dim=0)
  with pytest.raises(ValueError, match="norm_pix_loss"):
    fcmae_task.options({"fcmae": {"norm_pix_loss": "yes"}})
  with pytest.raises(ValueError, match="model_name.*fcmae"):
    fcmae_task.FCMAE.validate_config(convnext2_config.get_config())


def test_channel_distance_against_numpy_and_closed_forms():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  got = np.asarray(feature_collapse.channel_distance(jnp.asarray(x)))
  for b in range(2):
    channels = x[b].reshape(12, 5).T
    total = 0.0
    for i in range(5):
      for j in range(5):
        cos = channels[i] @ channels[j] / np.linalg.norm(channels[i]) / np.linalg.norm(
            channels[j])
        total += (1 - cos) / 2
    np.testing.assert_allclose(got[b], total / 25, rtol=1e-5)
  same = np.repeat(rng.uniform(0.1, 1, size=(1, 4, 4, 1)), 6, axis=-1) * np.arange(1, 7)
  np.testing.assert_allclose(feature_collapse.channel_distance(jnp.asarray(same)), 0, atol=1e-6)
  orthogonal = np.eye(16, 4).reshape(1, 4, 4, 4)  # 4 one-hot channels: cos 0 off-diagonal
  np.testing.assert_allclose(feature_collapse.channel_distance(jnp.asarray(orthogonal)),
                             0.5 * 12 / 16, atol=1e-6)


def test_block_features_are_in_stage_order_for_both_models():
  # 4 images as in test_pretraining_lowers_the_loss_and_draws, which then reuses the ops
  # that eager flax compiled here.
  x = images(4, 64)
  classifier = convnext2.Model(num_classes=3, depths=(1, 2, 1, 1), dims=(8, 16, 24, 32))
  pre_training = fcmae.Model(**dict(TINY, depths=(1, 2, 1, 1)))
  for model in (classifier, pre_training):
    variables = compile_once(model.init, jax.random.key(0), x)(jax.random.key(0), x)
    features = feature_collapse.block_features(model, variables, x)
    assert [n.split("/")[-1] for n in features] == [
        "stage0_block0", "stage1_block0", "stage1_block1", "stage2_block0", "stage3_block0"]
    assert features[list(features)[1]].shape == (4, 8, 8, 64)
    assert all(0 < v < 1 for v in feature_collapse.per_block_distance(
        model, variables, x).values())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A short configs/fcmae.py run (tiny encoder) on one device: (run dir, its config, train
  losses). One device compiles and steps in about half the time of the 8 virtual ones; that
  a run on many devices trains like one on one device is test_train's."""
  pre_dir = str(tmp_path_factory.mktemp("fcmae"))
  config = fcmae_config.get_config("total_steps=40,batch_size=16,lr=3e-3,decoder_dim=32")
  config.model.update(depths=TINY["depths"], dims=TINY["dims"])
  config.mesh = [("data", 1)]
  config.log_training_steps = 5
  config.input.data.split = "train[:256]"
  train.train_and_evaluate(config, pre_dir)
  with open(f"{pre_dir}/metrics.jsonl") as f:
    losses = [json.loads(line).get("train/loss") for line in f]
  return pre_dir, config, [l for l in losses if l is not None]


def test_pretraining_lowers_the_loss_and_draws(pretrained, tmp_path):
  pre_dir, config, losses = pretrained
  assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses
  png = tmp_path / "recon.png"
  error = fcmae_reconstruct.write_picture(pre_dir, str(png), num_images=3)
  assert png.stat().st_size > 1000 and 0 < error < 1.0
  collapse_png = tmp_path / "collapse.png"
  model = fcmae.Model(**config.model)
  curves = feature_collapse.compare(
      {"fcmae": (model, checkpointing.load_variables(pre_dir))}, images(4), str(collapse_png))
  assert len(curves["fcmae"]) == 4 and collapse_png.stat().st_size > 1000


def test_pretraining_beats_the_untrained_model_and_the_visible_mean_fill(pretrained):
  """On 16 test images under the task's fixed eval masks (1 of 4 cells visible), in the
  loss's normalised target space: the trained model's error over the masked cells (numpy)
  is below the untrained model's and below filling every masked cell with the mean of the
  image's visible target values (both ~1: targets are per-patch normalised). 40 steps
  give ~0.95."""
  pre_dir, config, _ = pretrained
  task = fcmae_task.FCMAE(config, fcmae.Model(**config.model))
  data = dict(config.input.data, split="test")
  pp = 'decode|resize(64)|value_range(-1, 1)|keep("image")'
  batch = {"image": jnp.asarray(next(data_lib.make_eval_iterator(data, pp, 16))["image"])}
  rng, variables = jax.random.key(0), checkpointing.load_variables(pre_dir)
  predict = compile_once(task.predict, variables, batch)
  trained = predict(variables, batch)
  untrained = predict(compile_once(task.init, rng, batch)(rng, batch), batch)
  np.testing.assert_array_equal(untrained["visible"], trained["visible"])
  target = np.asarray(trained["target"])  # [B, h, w, P]
  visible = np.asarray(trained["visible"])[..., 0] > 0  # [B, h, w]
  error = lambda pred: float(((np.asarray(pred) - target) ** 2).mean(-1)[~visible].mean())
  visible_mean = np.array([target[b][visible[b]].mean() for b in range(len(target))])
  fill = np.broadcast_to(visible_mean[:, None, None, None], target.shape)
  errors = {"trained": error(trained["pred"]), "untrained": error(untrained["pred"]),
            "visible_mean_fill": error(fill)}
  assert errors["trained"] < 0.98 * min(errors["untrained"], errors["visible_mean_fill"]), errors


def test_finetuning_params_are_the_encoder_and_a_fresh_head(pretrained):
  """What init_from = an FCMAE run gives a configs/convnext2.py model: the encoder's params
  exactly, and the fresh init's head and head_norm."""
  pre_dir, _, _ = pretrained
  model = convnext2.Model(num_classes=10, depths=TINY["depths"], dims=TINY["dims"])
  x = images(1)
  fresh = compile_once(model.init, jax.random.key(1), x)(jax.random.key(1), x)["params"]
  pre = utils.flatten_names(checkpointing.load_params(pre_dir)["encoder"])
  merged = checkpointing.merge_init_params(
      fresh, convnext2.load(fresh, checkpointing.load_params(pre_dir), {}), (), "fcmae")
  for name, value in utils.flatten_names(merged).items():
    want = pre[name] if not name.startswith("head") else utils.flatten_names(fresh)[name]
    np.testing.assert_array_equal(value, want, err_msg=name)


@pytest.mark.slow
def test_finetuning_through_the_train_loop(pretrained, tmp_path):
  """configs/convnext2.py with init_from = the FCMAE run: the train loop accepts it
  (convnext2.LOADS_FROM) and starts one small step away from the encoder."""
  pre_dir, _, _ = pretrained
  ft = convnext2_config.get_config("res=64,total_steps=1,batch_size=8")
  ft.model.update(depths=TINY["depths"], dims=TINY["dims"])
  ft.init_from = pre_dir
  ft.evals = {}
  train.train_and_evaluate(ft, str(tmp_path))
  pre = utils.flatten_names(checkpointing.load_params(pre_dir)["encoder"])
  tuned = utils.flatten_names(checkpointing.load_params(str(tmp_path)))
  assert set(tuned) == set(pre) | {"head/kernel", "head/bias"}
  for name, value in pre.items():  # One small AdamW step away from the encoder's values.
    np.testing.assert_allclose(tuned[name], value, atol=ft.lr * 1.5, err_msg=name)
