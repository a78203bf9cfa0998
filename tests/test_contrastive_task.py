"""The contrastive task: its loss over the global batch (the kernel's ring over 8 devices,
inside shard_map) equals the naive single-device loss, with and without empty packed slots;
a LiT run keeps the loaded image tower bit-identical and resumes exactly; config errors."""
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest

from big_vision_lite import checkpointing
from big_vision_lite import config_lib
from big_vision_lite import models
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite import train
from big_vision_lite.input import packing
from big_vision_lite.models import vit
from kernels import contrastive

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import siglip as siglip_config  # pylint: disable=g-import-not-at-top,wrong-import-position

IMAGE = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, pool_type="gap")
TEXT = dict(vocab_size=258, width=16, depth=1, mlp_dim=32, num_heads=2, max_len=8,
            pool_type="last")


def tiny_config(arg: str = "", **overrides) -> ml_collections.ConfigDict:
  """configs/siglip.py with tiny towers, 8-token captions, 16 px images, no evals."""
  config = siglip_config.get_config(
      f"res=16,max_len=8,out_dim=8,batch_size=16,total_steps=4,train_split=train[:64]{arg}")
  config.model.image.update(IMAGE)
  config.model.text.update(TEXT)
  config.mesh = [("data", 1)]
  config.log_training_steps = 1
  config.ckpt_steps = 2
  config.evals = {}
  for key, value in overrides.items():
    config[key] = value
  return config


def compiled(fn, *args, **jit_kwargs):
  """jit(fn) compiled without XLA's optimisations (much cheaper for one call), called."""
  lowered = jax.jit(fn, **jit_kwargs).lower(*args)
  return lowered.compile({"xla_backend_optimization_level": 0})(*args)


def random_params(task, batch):
  """Random normal params of the task's init shapes (compiling init costs more than the
  rest of a test)."""
  shapes = jax.eval_shape(task.init, jax.random.key(0), batch)["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: 0.2 * rng.normal(size=s.shape).astype(np.float32), shapes)


def naive_loss_and_grads(task, params, batch, valid):
  """Loss and gradients of `kernels.contrastive.reference` (the B x B logits on one device)
  over the real pairs only: rows where `valid` is False are dropped before the loss."""
  kind = task.options["loss"]
  keep = np.flatnonzero(valid)

  def loss_fn(params):
    images, image_kwargs = task._inputs(batch)  # pylint: disable=protected-access
    out, _, _ = task.apply(params, {}, images, None, False, text=task._text(batch),  # pylint: disable=protected-access
                           **image_kwargs)
    zimg = out["zimg"].reshape(-1, out["zimg"].shape[-1])[keep]
    ztxt = out["ztxt"][keep]
    return contrastive.reference(zimg, ztxt, kind=kind, temperature=out["temperature"],
                                 bias=out["bias"] if kind == "sigmoid" else None)
  return compiled(jax.value_and_grad(loss_fn), params)


def global_loss_and_grads(task, params, batch, mesh):
  loss_fn = lambda p, b: task.loss(p, {}, b, None)[0]
  return compiled(jax.value_and_grad(loss_fn), params, sharding.global_batch(batch, mesh),
                  in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)))


def assert_close(a, b):
  (loss_a, grads_a), (loss_b, grads_b) = jax.device_get((a, b))
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_b))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6 * scale),
               grads_a, grads_b)


def test_sigmoid_loss_on_eight_devices_equals_the_naive_loss():
  """Plain batch of 16 over 8 devices (2 rows each, chunks of 1): the ring's SigLIP loss
  and gradients (towers, temperature, bias) equal the naive loss on one device."""
  assert jax.device_count() >= 8, "conftest sets 8 host devices"
  config = tiny_config()
  config.contrastive.chunk_size = 1
  mesh = sharding.make_mesh([("data", 8)])
  task = tasks.REGISTRY.get("contrastive")(config, models.from_config(config), mesh)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
           "text": np.where(np.arange(8) < rng.integers(2, 9, (16, 1)),
                            rng.integers(2, 258, (16, 8)), 0).astype(np.int32)}
  params = random_params(task, batch)
  assert_close(global_loss_and_grads(task, params, batch, mesh),
               naive_loss_and_grads(task, params, batch, np.ones(16, bool)))


def test_packed_softmax_loss_leaves_empty_slots_out_exactly():
  """NaViT rows of 3 slots over 8 devices, 10 of the 24 slots real: the CLIP loss and
  gradients equal the naive loss over the real images and their captions only."""
  config = tiny_config(",loss=softmax,image=navit,seq_len=16,max_images=3")
  mesh = sharding.make_mesh([("data", 8)])
  task = tasks.REGISTRY.get("contrastive")(config, models.from_config(config), mesh)
  rng = np.random.default_rng(1)
  sides = [(12, 12), (16, 12), (8, 8), (12, 8)]  # 9, 12, 4, 6 tokens of 4 px patches.
  examples = [{"image": rng.normal(size=(*sides[i % 4], 3)).astype(np.float32),
               "text": rng.integers(2, 258, 8).astype(np.int32)} for i in range(10)]
  rows = list(packing.pack(examples, seq_len=16, patch_size=4, max_images=3, buffer_size=8))
  rows = (rows + [packing.empty_row(rows[0])] * 8)[:8]
  batch = packing.stack(rows)
  valid = batch["label_mask"].reshape(-1)
  assert len(rows) == 8 and 0 < valid.sum() < valid.size
  params = random_params(task, batch)
  assert_close(global_loss_and_grads(task, params, batch, mesh),
               naive_loss_and_grads(task, params, batch, valid))


def write_vit_import(path: str, **fields) -> dict:
  """A 10-class vit of the tiny tower's sizes with random weights, written as an import
  (model.json and params/) at `path`; returns its variables."""
  vit_kwargs = dict(IMAGE, num_classes=10, posemb="learn", **fields)
  shapes = jax.eval_shape(vit.Model(**vit_kwargs).init, jax.random.key(0),
                          np.zeros((1, 16, 16, 3), np.float32))
  rng = np.random.default_rng(2)
  loaded = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  checkpointing.write_import(path, "vit", vit_kwargs, loaded)
  return loaded


def test_lit_keeps_the_image_tower_and_resumes_exactly(tmp_path):
  """An image model's weights (a 10-class vit written as an import, with a class token
  where the config pools "gap"; its head dropped) fill the image tower of a LiT run, which
  takes the import's structure and stays bit-identical while the text tower trains;
  stopping at step 2 and resuming gives the straight run's params."""
  import_dir = str(tmp_path / "vit_import")
  loaded = write_vit_import(import_dir, pool_type="tok")
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  config = tiny_config(f",lit={import_dir}")
  train.train_and_evaluate(config, resumed, stop_after_steps=2)
  at_step_2 = checkpointing.load_variables(resumed)
  train.train_and_evaluate(config, resumed)
  train.train_and_evaluate(config, straight)
  a, b = checkpointing.load_variables(straight), checkpointing.load_variables(resumed)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  moved = jax.tree.map(lambda x, y: np.abs(x - y).max(), a["params"]["txt"],
                       at_step_2["params"]["txt"])
  assert max(jax.tree.leaves(moved)) > 0  # The text tower trains.
  tower = a["params"]["img"]
  jax.tree.map(np.testing.assert_array_equal,
               {k: v for k, v in tower.items() if k != "head"},
               {k: v for k, v in loaded["params"].items() if k != "head"})
  assert "cls" in tower  # The import's class token: its pool_type, not the config's.


def test_lit_import_fields_fill_the_image_tower_or_name_the_conflict(tmp_path):
  """init_from an import of the image model: its structural fields fill model.image where
  the config leaves the model's default (not its head size: the tower projects to
  out_dim); a field set otherwise raises naming model.image.<field>."""
  import_dir = str(tmp_path / "vit_import")
  write_vit_import(import_dir, pool_type="tok", gelu_approximate=False)
  resolved = config_lib.with_init_from_model(tiny_config(f",lit={import_dir}"))
  assert resolved.model.image.pool_type == "tok"
  assert resolved.model.image.gelu_approximate is False
  assert "num_classes" not in resolved.model.image
  config = tiny_config(f",lit={import_dir}")
  config.model.image.pool_type = "map"
  with pytest.raises(ValueError, match=r"'model\.image\.pool_type' is 'map', but init_from "
                     r".*pool_type='tok'"):
    config_lib.with_init_from_model(config)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="'contrastive.loss' must be one of softmax, sigmoid"):
    config_lib.validate(tiny_config(contrastive=dict(loss="hinge")))
  with pytest.raises(ValueError, match="'contrastive' takes .*unknown"):
    config_lib.validate(tiny_config(contrastive=dict(temperature=1.0)))
  with pytest.raises(ValueError, match="'grad_accum_steps' must be 1 for the contrastive"):
    config_lib.validate(tiny_config(grad_accum_steps=2))
  config = tiny_config()
  config.input.packing = dict(seq_len=16, patch_size=4, max_images=3)
  with pytest.raises(ValueError, match="'input.packing' needs model.image_model='navit'"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match="Config argument 'loss' must be"):
    siglip_config.get_config("loss=hinge")
