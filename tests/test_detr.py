"""DETR on the train loop: one train step equal on 1 and 8 devices, remat changing nothing,
exact resume with the COCO evaluation and the boxes picture of the run, config errors
naming their fields."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import checkpointing
from big_vision_lite import config_lib
from big_vision_lite import models
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite import train
from big_vision_lite.models import resnet
from big_vision_lite.tools import draw_boxes
from big_vision_lite.tools import import_timm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import detr as detr_config  # pylint: disable=g-import-not-at-top,wrong-import-position

RESNET_IMPORT = os.path.join(REPO, "tests", "data", "timm", "resnet18_shrunk")
# The backbone of the saved timm resnet18 reference, as DETR's frozen-BatchNorm backbone.
TINY_MODEL = dict(num_queries=6, hidden=16, num_heads=2, enc_layers=1, dec_layers=2,
                  mlp_dim=32, backbone_kwargs=dict(depth=18, width=8, stem_width=64,
                                                   frozen_bn=True))


def tiny_config(**overrides):
  """configs/detr.py with a tiny model on 32 training images, one device, no evals."""
  config = detr_config.get_config("batch_size=8,total_steps=4,train_split=train[:32]")
  config.model.update(TINY_MODEL)
  config.mesh = [("data", 1)]
  config.log_training_steps = 1
  config.ckpt_steps = 2
  config.evals = {}
  for key, value in overrides.items():
    config[key] = value
  return config


def random_batch(batch: int = 8, size: int = 64, num_targets: int = 4, seed: int = 0):
  """Padded images with their pixel masks and 0..num_targets real boxes per image."""
  rng = np.random.default_rng(seed)
  heights, widths = rng.integers(size // 2, size + 1, (2, batch))
  pixel_mask = ((np.arange(size)[None, :, None] < heights[:, None, None])
                & (np.arange(size)[None, None, :] < widths[:, None, None]))  # [B, S, S]
  image = rng.normal(size=(batch, size, size, 3)).astype(np.float32) * pixel_mask[..., None]
  counts = rng.integers(0, num_targets + 1, batch)
  box_mask = np.arange(num_targets)[None] < counts[:, None]  # [B, T]
  boxes = np.concatenate([rng.uniform(0.3, 0.7, (batch, num_targets, 2)),
                          rng.uniform(0.1, 0.5, (batch, num_targets, 2))], -1)
  return {"image": image, "pixel_mask": pixel_mask,
          "boxes": (boxes * box_mask[..., None]).astype(np.float32),
          "labels": (rng.integers(0, 10, (batch, num_targets)) * box_mask).astype(np.int32),
          "box_mask": box_mask}


def test_loss_and_gradient_on_one_and_eight_devices_are_the_same():
  """The box count that normalises l1 and giou is the global batch's, so splitting the
  batch over 8 devices (one image each, some without boxes) changes nothing."""
  assert jax.device_count() >= 8, "conftest sets 8 host devices"
  config = tiny_config()
  task = tasks.REGISTRY.get("detr")(config, models.from_config(config))
  batch = random_batch()
  assert 0 in batch["box_mask"].sum(1)  # Some device holds an image without boxes.
  variables = jax.jit(task.init)(jax.random.key(0), batch)
  params, extra = variables.pop("params"), variables
  loss_and_grad = jax.value_and_grad(
      lambda p, b: task.loss(p, extra, b, jax.random.key(1)), has_aux=True)
  results = []
  for devices in (1, 8):
    mesh = sharding.make_mesh([("data", devices)])
    (loss, (metrics, _)), grads = jax.jit(loss_and_grad)(
        params, sharding.global_batch(batch, mesh))
    results.append(jax.device_get((loss, metrics, grads)))
  (loss_one, metrics_one, grads_one), (loss_eight, metrics_eight, grads_eight) = results
  np.testing.assert_allclose(loss_eight, loss_one, rtol=1e-5)
  for key in ("last_ce", "last_l1", "last_giou"):
    np.testing.assert_allclose(metrics_eight[key], metrics_one[key], rtol=1e-5, err_msg=key)
  # Summation order differs across devices: float32 rounding of the largest gradients'
  # sums, ~1e-7 of them, also lands on leaves whose exact gradient is ~0.
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_one))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6 * scale),
               grads_eight, grads_one)


def test_remat_changes_no_outputs_or_gradients():
  """remat_policy "full" recomputes the encoder and decoder layers (remat blocks in the
  traced program) and gives the plain model's outputs and gradients."""
  batch = random_batch(batch=2)
  images, pixel_mask = batch["image"], batch["pixel_mask"]
  plain = models.get("detr").Model(**TINY_MODEL, dropout=0.0)
  variables = jax.jit(plain.init)(jax.random.key(0), images, pixel_mask=pixel_mask)

  def loss(model):
    def fn(params):
      out, _ = model.apply({**variables, "params": params}, images, train=True,
                           pixel_mask=pixel_mask)
      return sum(jnp.sum(jnp.sin(v)) for v in out.values())
    return fn

  want, want_grads = jax.jit(jax.value_and_grad(loss(plain)))(variables["params"])
  remat = models.get("detr").Model(**TINY_MODEL, dropout=0.0, remat_policy="full")
  assert "remat" in str(jax.make_jaxpr(loss(remat))(variables["params"]))
  assert "remat" not in str(jax.make_jaxpr(loss(plain))(variables["params"]))
  got, got_grads = jax.jit(jax.value_and_grad(loss(remat)))(variables["params"])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Recomputed layers round differently; as in the 1 vs 8 devices test, the rounding of the
  # largest gradients (~50, the backbone's) also lands on leaves whose gradient is ~0.
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6 * scale),
               got_grads, want_grads)


def test_resume_is_exact_and_the_run_evaluates_and_draws(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  config = tiny_config()
  train.train_and_evaluate(config, resumed, stop_after_steps=2)
  train.train_and_evaluate(config, resumed)
  config.evals = {"coco": dict(detr_config.get_config().evals.coco, log_steps=4,
                               batch_size=8, data=dict(name="shapes", split="test[:16]"))}
  train.train_and_evaluate(config, straight)
  a, b = checkpointing.load_variables(straight), checkpointing.load_variables(resumed)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert "batch_stats" in a  # The backbone's BatchNorm statistics resume too.
  with open(os.path.join(straight, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  coco = next(r for r in records if "coco/AP50" in r)
  assert coco["step"] == 4
  assert all(-1 <= coco[f"coco/{k}"] <= 1 for k in ("AP", "AP50", "AP75", "AR100"))
  png = tmp_path / "boxes.png"
  drawn = draw_boxes.main(["--workdir", straight, "--out", str(png), "--num_images", "3",
                           "--score_threshold", "0.0"])
  assert png.stat().st_size > 1000
  assert drawn["images"].shape[0] == 3 and drawn["pred_boxes"].shape == (3, 6, 4)


def test_init_from_a_timm_resnet_import_fills_the_frozen_backbone(tmp_path):
  """A DETR run starts from an imported timm ResNet (lr 0 keeps the loaded values): its
  backbone holds the import's weights with the norms frozen into batch_stats, the
  transformer its fresh init."""
  name, kwargs, variables = import_timm.convert("resnet18", import_timm.read_state_dict(
      os.path.join(RESNET_IMPORT, "state.safetensors")))
  import_dir = str(tmp_path / "r18")
  checkpointing.write_import(import_dir, name, kwargs, variables)
  config = tiny_config(init_from=import_dir, lr=0.0, total_steps=1)
  run_dir = str(tmp_path / "detr")
  train.train_and_evaluate(config, run_dir)
  got = checkpointing.load_variables(run_dir)
  expected = resnet.freeze_batch_norm(
      {c: {k: v for k, v in tree.items() if k != "head"} for c, tree in variables.items()})
  jax.tree.map(np.testing.assert_array_equal, got["params"]["backbone"], expected["params"])
  jax.tree.map(np.testing.assert_array_equal, got["batch_stats"]["backbone"],
               expected["batch_stats"])
  assert "input_proj" in got["params"]  # The rest is DETR's own init.


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="'detr.matcher' must be one of optax, scipy"):
    config_lib.validate(tiny_config(detr=dict(matcher="greedy")))
  with pytest.raises(ValueError, match="'detr' takes .*unknown"):
    config_lib.validate(tiny_config(detr=dict(eos_coef=0.1)))
  with pytest.raises(ValueError, match="'detr.no_object_weight'"):
    config_lib.validate(tiny_config(detr=dict(no_object_weight=-1.0)))
  with pytest.raises(ValueError, match="'recipe' must be one of cpu, paper"):
    detr_config.get_config("recipe=coco")
  with pytest.raises(ValueError, match="'lr_mults' takes pairs"):
    config_lib.validate(tiny_config(lr_mults=(("backbone/.*",),)))
  with pytest.raises(ValueError, match="'remat_policy' must be one of none, full"):
    models.get("detr").Model(remat_policy="all")


def test_paper_recipe_fields():
  config = detr_config.get_config("recipe=paper")
  assert config.model.num_queries == 100 and config.model.backbone_kwargs.frozen_bn
  assert (config.lr, config.wd, config.grad_clip_norm) == (1e-4, 1e-4, 0.1)
  assert config.lr_mults == ((r"backbone/.*", 0.1),)
  assert config.schedule.drop_at == (0.8,) and config.total_steps == 500 * 1849
  assert config.detr.no_object_weight == 0.1
