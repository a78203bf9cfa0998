"""ViT with learnable memory: bit-exact original outputs, masking against a naive
full-sequence ViT block, recipes' frozen sets, model concatenation, loading and training."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from big_vision_lite import checkpointing
from big_vision_lite import models
from big_vision_lite import optimizer as optimizer_lib
from big_vision_lite import tasks
from big_vision_lite import train
from big_vision_lite import utils
from big_vision_lite.models import memory_vit
from big_vision_lite.models import vit
from big_vision_lite.tools import concat_memory
from big_vision_lite.tools import import_timm
from configs import memory_vit as memory_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=(8, 8), pool_type="tok",
            num_classes=7)


def images(seed=0, shape=(3, 32, 32, 3)):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def init(model, seed=0, x=None):
  """Random params of `model` drawn with numpy (shapes from `jax.eval_shape`): cheaper than
  compiling flax's initialisers, and non-zero everywhere (heads and class tokens too)."""
  x = images(shape=(1, 32, 32, 3)) if x is None else x
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)

  def draw(name, leaf):
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    return 1.0 + 0.1 * noise if name.endswith("scale") else 0.1 * noise

  return utils.tree_map_with_names(draw, shapes)


def vit_params(seed=0, **overrides):
  model = vit.Model(**dict(TINY, **overrides))
  return model, init(model, seed)


def with_tasks(base_params, seed=1, **kwargs):
  """A memory_vit on `base_params` with fresh (random, non-zero head) task params."""
  model = memory_vit.Model(**dict(TINY, **kwargs))
  fresh = init(model, seed)
  return model, memory_vit.load(fresh, base_params, {})


def flat(tree):
  return {k: np.asarray(v) for k, v in utils.flatten_names(tree).items()}


@pytest.mark.parametrize("overrides", [{}, dict(pool_type="map", final_norm="post_pool")])
def test_original_task_is_bit_exact(overrides):
  plain, base = vit_params(**overrides)
  x = images(1)
  want, _ = jax.jit(plain.apply)({"params": base}, x)
  outputs = []
  for task_classes, num_memory in [((5,), 3), ((5, 4), (3, 0))]:
    model, params = with_tasks(base, task_classes=task_classes, num_memory=num_memory,
                               **overrides)
    _, aux = jax.jit(model.apply)({"params": params}, x)
    assert len(aux["task_logits"]) == len(task_classes) + 1
    np.testing.assert_array_equal(aux["task_logits"][0], want)
    outputs.append(aux["task_logits"])
  # Task 1 does not see task 2 (only the masked key axis is longer).
  np.testing.assert_allclose(outputs[0][1], outputs[1][1], rtol=1e-6, atol=1e-6)


def test_memory_changes_only_its_own_task():
  _, base = vit_params()
  model, params = with_tasks(base, task_classes=(5, 4, 3), num_memory=(2, 3, 1))
  x = images(2)
  apply = jax.jit(model.apply)
  out, aux = apply({"params": params}, x)
  assert out.shape == (3, 3) and [l.shape[1] for l in aux["task_logits"]] == [7, 5, 4, 3]
  changed = dict(params, task_2=dict(params["task_2"]))
  noise = np.random.default_rng(3).normal(size=params["task_2"]["memory"].shape)
  changed["task_2"]["memory"] = params["task_2"]["memory"] + noise.astype(np.float32)
  _, aux2 = apply({"params": changed}, x)
  for t in (0, 1, 3):
    np.testing.assert_array_equal(aux2["task_logits"][t], aux["task_logits"][t])
  assert np.abs(aux2["task_logits"][2] - aux["task_logits"][2]).max() > 0.05


def test_attention_mask_layout():
  # N=2 original tokens, task 1 with 2 memory tokens, task 2 with none.
  want = np.array([[1, 1, 1, 1, 1, 0],
                   [1, 1, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(memory_vit.attention_mask(2, (2, 0)), want)


def test_new_tasks_match_a_masked_full_sequence_vit():
  """Each layer as plain vit.Encoder1DBlock on [original | memory | class tokens] with a
  boolean mask, memory re-inserted per layer and not passed on."""
  _, base = vit_params(pool_type="gap")
  counts = (2, 3)
  model, params = with_tasks(base, task_classes=(5, 4), num_memory=counts, pool_type="gap")
  x = images(3)
  _, aux = jax.jit(model.apply)({"params": params}, x)
  tokens = jax.lax.conv_general_dilated(
      x, params["embedding"]["kernel"], (8, 8), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["embedding"]["bias"]
  tokens = tokens.reshape(3, 16, 32) + params["pos_embedding"]  # [B, N, D]
  n, m_total = tokens.shape[1], sum(counts)
  cls = jnp.concatenate([params[f"task_{t}"]["cls"] for t in (1, 2)], 1)
  cls = jnp.tile(cls, (3, 1, 1))  # [B, 2, D]
  owner = [0] * n + [1] * counts[0] + [2] * counts[1] + [1, 2]  # 0: original token.
  size = len(owner)
  mask = np.zeros((size, size), bool)
  for q in range(size):
    for k in range(size):
      if owner[q] == 0:
        mask[q, k] = owner[k] == 0
      else:
        mask[q, k] = owner[k] == 0 or owner[k] == owner[q]
  block = jax.jit(vit.Encoder1DBlock(mlp_dim=64, num_heads=2).apply)
  for i in range(2):
    memory = jnp.concatenate([params[f"task_{t}"]["memory"][i] for t in (1, 2)], 0)
    sequence = jnp.concatenate([tokens, jnp.tile(memory[None], (3, 1, 1)), cls], 1)
    out, _ = block({"params": params["Transformer"][f"encoderblock_{i}"]}, sequence,
                   mask=jnp.asarray(mask)[None, None])
    tokens, cls = out[:, :n], out[:, n + m_total:]
  norm = params["Transformer"]["encoder_norm"]
  mean, var = cls.mean(-1, keepdims=True), cls.var(-1, keepdims=True)
  cls = (cls - mean) / jnp.sqrt(var + 1e-6) * norm["scale"] + norm["bias"]
  for t in (1, 2):
    head = params[f"task_{t}"]["head"]
    want = cls[:, t - 1] @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(aux["task_logits"][t], want, rtol=1e-5, atol=1e-5)


def test_timm_base_keeps_timm_logits():
  label = os.path.join(REPO, "tests", "data", "timm", "vit_tiny_patch16_224")
  state = import_timm.read_state_dict(os.path.join(label, "state.safetensors"))
  x = np.load(os.path.join(label, "input.npy")).transpose(0, 2, 3, 1)  # NCHW -> NHWC
  name, kwargs, variables = import_timm.convert("vit_tiny_patch16_224", state)
  assert name == "vit"
  model = memory_vit.Model(**kwargs, task_classes=(3,), num_memory=4)
  fresh = init(model, 0, x)
  params = checkpointing.merge_init_params(
      fresh, memory_vit.load(fresh, variables["params"], kwargs), (), "timm")
  _, aux = jax.jit(model.apply)({"params": params}, x)
  want, _ = jax.jit(vit.Model(**kwargs).apply)(variables, x)
  np.testing.assert_array_equal(aux["task_logits"][0], want)
  np.testing.assert_allclose(aux["task_logits"][0], np.load(os.path.join(label, "logits.npy")),
                             rtol=1e-4, atol=1e-5)
  assert aux["task_logits"][1].shape == (x.shape[0], 3)


def test_load_keeps_new_tasks_fresh_and_resamples_posemb():
  _, base = vit_params(seed=3)  # 32x32 images: a 4x4 grid.
  model = memory_vit.Model(**TINY, task_classes=(5,), num_memory=2)
  fresh = init(model, 4, images(shape=(1, 48, 48, 3)))  # A 6x6 grid.
  merged = checkpointing.merge_init_params(fresh, memory_vit.load(fresh, base, {}), (), "base")
  assert merged["pos_embedding"].shape == (1, 36, 32)
  np.testing.assert_array_equal(merged["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"],
                                base["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"])
  for key, value in flat(fresh["task_1"]).items():
    np.testing.assert_array_equal(flat(merged["task_1"])[key], value)


def test_new_task_initialisation():
  """Memory ~ N(0, 0.02) as in the paper; class token and head start at zero."""
  task = memory_vit.NewTask(num_classes=5, num_memory=40, depth=3, width=64)
  params = task.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
  assert params["memory"].shape == (3, 40, 64)
  assert float(jnp.std(params["memory"])) == pytest.approx(0.02, rel=0.05)
  assert not np.any(params["cls"]) and not np.any(params["head"]["kernel"])


@pytest.mark.parametrize("variant,timm_count", [("B/32", 88_224_232), ("Ti/16", 5_717_416),
                                                ("S/16", 22_050_664)])
def test_parameter_counts(variant, timm_count):
  """The base is timm's ViT (1000 classes, 224px) less the class token's position
  embedding (D, folded into `cls`); each task adds the paper's m·L·D memory, a class
  token D and a head (D+1)·C (Sandler et al. 2022: ViT-B/32 with 5 cells per layer)."""
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  count = lambda model: utils.count_params(jax.eval_shape(model.init, jax.random.key(0), x))
  kwargs = dict(variant=variant, num_classes=1000, pool_type="tok")
  width, depth = vit.parse_variant(variant)["width"], vit.parse_variant(variant)["depth"]
  vit_count = timm_count - width
  assert count(vit.Model(**kwargs)) == vit_count
  assert count(memory_vit.Model(**kwargs)) == vit_count
  model = memory_vit.Model(**kwargs, task_classes=(100, 397), num_memory=(5, 20))
  added = sum(m * depth * width + width + (width + 1) * c for m, c in ((5, 100), (20, 397)))
  assert count(model) == vit_count + added
  if variant == "B/32":
    assert 5 * depth * width == 46_080  # The paper's 5 cells per layer on ViT-B/32.


def tiny_config(arg):
  config = memory_config.get_config(arg)
  config.model.update(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=(8, 8))
  config.schedule.warmup_percent = 0.0
  config.mesh = [("data", 1)]
  return config


@pytest.mark.parametrize("recipe,trained", [
    ("head", {"task_1/head/kernel", "task_1/head/bias"}),
    ("head_cls", {"task_1/head/kernel", "task_1/head/bias", "task_1/cls"}),
    ("memory", {"task_1/head/kernel", "task_1/head/bias", "task_1/cls", "task_1/memory"}),
    ("full", None)])
def test_recipe_freezes_the_rest(recipe, trained):
  """Three optimiser steps of the recipe's config on random gradients for every param (the
  train loop's real gradients: test_vit_checkpoint_to_memory_run_to_concatenation)."""
  config = tiny_config(f"recipe={recipe},memory=3,lr=1e-2")
  params = init(models.get(config.model_name).Model(**config.model))
  tx, _ = optimizer_lib.make_optimizer(config, params)
  rng = np.random.default_rng(0)

  @jax.jit
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  state, opt_state = params, tx.init(params)
  for _ in range(3):
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    state, opt_state = step(state, opt_state, grads)
  start, end = flat(params), flat(state)
  moved = {k for k in start if not np.array_equal(start[k], end[k])}
  assert moved == (trained or set(start))
  assert ("task_1/memory" in start) == (recipe in ("memory", "full"))


def test_concat_answers_every_task_as_its_own_model():
  _, base = vit_params(seed=5)
  x = images(6)
  first = with_tasks(base, seed=7, task_classes=(5,), num_memory=3)
  second = with_tasks(base, seed=8, task_classes=(4, 6), num_memory=(0, 2))
  inputs = [
      ("vit", TINY, base),
      ("memory_vit", dict(TINY, task_classes=[5], num_memory=3), first[1]),
      ("memory_vit", dict(TINY, task_classes=[4, 6], num_memory=[0, 2]), second[1])]
  kwargs, params = concat_memory.concat(inputs)
  assert kwargs["task_classes"] == [5, 4, 6] and kwargs["num_memory"] == [3, 0, 2]
  merged = memory_vit.Model(**json.loads(json.dumps(kwargs)))
  _, aux = jax.jit(merged.apply)({"params": params}, x)
  want = [jax.jit(model.apply)({"params": p}, x)[1]["task_logits"]
          for model, p in (first, second)]
  np.testing.assert_array_equal(aux["task_logits"][0], want[0][0])
  np.testing.assert_allclose(aux["task_logits"][1], want[0][1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(aux["task_logits"][2], want[1][1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(aux["task_logits"][3], want[1][2], rtol=1e-6, atol=1e-6)


def test_concat_rejects_a_changed_base():
  _, base = vit_params(seed=5)
  model, params = with_tasks(base, task_classes=(5,), num_memory=1)
  block = dict(params["Transformer"]["encoderblock_1"])
  block["MlpBlock_0"] = {"Dense_0": dict(block["MlpBlock_0"]["Dense_0"]),
                         "Dense_1": block["MlpBlock_0"]["Dense_1"]}
  block["MlpBlock_0"]["Dense_0"]["kernel"] = block["MlpBlock_0"]["Dense_0"]["kernel"] * 1.01
  changed = dict(params, Transformer=dict(params["Transformer"], encoderblock_1=block))
  kwargs = dict(TINY, task_classes=[5], num_memory=1)
  with pytest.raises(ValueError, match="Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"):
    concat_memory.concat([("memory_vit", kwargs, params), ("memory_vit", kwargs, changed)],
                         names=["run_a", "run_b"])
  with pytest.raises(ValueError, match="width"):
    concat_memory.concat([("memory_vit", kwargs, params),
                          ("vit", dict(TINY, width=64), base)])


@pytest.mark.parametrize("fields,match", [
    (dict(task_classes=(5, 0)), "task_classes"),
    (dict(task_classes=(5,), num_memory=-1), "num_memory"),
    (dict(task_classes=(5, 3), num_memory=(1,)), "num_memory"),
    (dict(task_classes=(5,), train_task=2), "train_task"),
    (dict(pool_type="none"), "pool_type")])
def test_bad_model_fields(fields, match):
  with pytest.raises(ValueError, match=match):
    memory_vit.Model(**fields)


@pytest.mark.parametrize("arg,match", [("recipe=memory_only", "recipe.*head, head_cls"),
                                       ("memory=-2", "memory"),
                                       ("base_classes=-1", "base_classes"),
                                       ("layers=3", "layers")])
def test_bad_config_arguments(arg, match):
  with pytest.raises(ValueError, match=match):
    memory_config.get_config(arg)


def test_headless_base_and_foreign_checkpoints_are_checked(tmp_path):
  """A base without an original head (base_classes=0) trains its new task's head; init_from
  names the model names it accepts."""
  config = memory_config.get_config("base_classes=0")
  assert config.model.num_classes == 0 and config.model.task_classes == [10]
  tasks.REGISTRY.get(config.task).validate_config(config)
  checkpointing.write_import(str(tmp_path), "deepvit", dict(TINY), {"params": {}})
  with pytest.raises(ValueError, match="memory_vit or vit checkpoint"):
    memory_config.get_config(f"init_from={tmp_path}")


def test_checkpoint_dirs_config_and_concatenation(tmp_path):
  """vit import dir -> memory_vit base dir -> config reading it -> the train loop's
  init_from steps (load + merge) -> concatenation of dirs."""
  _, base = vit_params(seed=9, num_classes=10)
  vit_dir, base_dir, task_dir = (str(tmp_path / n) for n in ("vit", "base", "task"))
  checkpointing.write_import(vit_dir, "vit", dict(TINY, num_classes=10), {"params": base})
  assert concat_memory.concat_to_dir([vit_dir], base_dir)["task_classes"] == []
  config = memory_config.get_config(f"init_from={base_dir},memory=2,num_classes=4")
  from_vit = memory_config.get_config(f"init_from={vit_dir},memory=2,num_classes=4")
  arch = lambda c: memory_vit.Model(**c.model).hparams()
  assert arch(from_vit) == arch(config)
  assert from_vit.model.task_classes == [4] and from_vit.model.num_memory == [2]
  assert config.model_name == "memory_vit" and config.init_from == base_dir
  assert config.model.task_classes == [4] and config.model.num_memory == [2]
  model = memory_vit.Model(**config.model)
  fresh = init(model, seed=4)
  loaded = checkpointing.load_params(base_dir)
  params = checkpointing.merge_init_params(fresh, memory_vit.load(fresh, loaded, {}), (), "")
  merged = flat(params)
  for key, value in flat(base).items():
    np.testing.assert_array_equal(merged[key], value, err_msg=key)
  for key, value in flat(fresh["task_1"]).items():
    np.testing.assert_array_equal(merged[f"task_1/{key}"], value, err_msg=key)
  checkpointing.write_import(task_dir, "memory_vit", config.model.to_dict(),
                               {"params": params})
  kwargs, variables = concat_memory.concat_dirs([task_dir, base_dir, task_dir])
  assert kwargs["task_classes"] == [4, 4] and kwargs["num_memory"] == [2, 2]
  assert kwargs["num_classes"] == 10 and kwargs["pool_type"] == "tok"
  for key, value in flat(params["task_1"]).items():
    np.testing.assert_array_equal(flat(variables["params"]["task_2"])[key], value)


@pytest.mark.slow
def test_vit_checkpoint_to_memory_run_to_concatenation(tmp_path):
  """vit import dir -> recipe "memory" run via init_from (the plain vit checkpoint) -> the
  run concatenated with itself and the converted base; the base stays bit-identical
  through real train steps."""
  plain, base = vit_params(seed=9, num_classes=10)
  vit_dir, base_dir, run_dir = (str(tmp_path / n) for n in ("vit", "base", "run"))
  checkpointing.write_import(vit_dir, "vit", dict(TINY, num_classes=10), {"params": base})
  concat_memory.concat_to_dir([vit_dir], base_dir)
  config = memory_config.get_config(f"init_from={vit_dir},memory=2,total_steps=2,"
                                    "batch_size=8")
  assert config.model.task_classes == [10] and config.model.width == 32
  config.mesh = [("data", 1)]
  config.evals = {}
  train.train_and_evaluate(config, run_dir)
  trained = flat(checkpointing.load_params(run_dir))
  for key, value in flat(base).items():
    np.testing.assert_array_equal(trained[key], value, err_msg=key)
  for key in ("cls", "head/kernel", "head/bias"):  # Zero at initialisation.
    assert np.any(trained[f"task_1/{key}"]), key
  assert trained["task_1/memory"].shape == (2, 2, 32)
  kwargs, variables = concat_memory.concat_dirs([run_dir, base_dir, run_dir])
  assert kwargs["task_classes"] == [10, 10] and kwargs["num_memory"] == [2, 2]
  x = images(10)
  _, aux = jax.jit(memory_vit.Model(**kwargs).apply)(variables, x)
  np.testing.assert_array_equal(aux["task_logits"][0],
                                jax.jit(plain.apply)({"params": base}, x)[0])
  np.testing.assert_allclose(aux["task_logits"][1], aux["task_logits"][2], atol=1e-6)


@pytest.mark.slow
def test_cli_writes_the_concatenation(tmp_path):
  _, base = vit_params(seed=2)
  checkpointing.write_import(str(tmp_path / "vit"), "vit", TINY, {"params": base})
  subprocess.run([sys.executable, "-m", "big_vision_lite.tools.concat_memory",
                  f"--inputs={tmp_path / 'vit'},{tmp_path / 'vit'}", f"--out={tmp_path / 'out'}"],
                 check=True, cwd=REPO, capture_output=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
  name, kwargs = checkpointing.read_run_model(str(tmp_path / "out"))
  assert name == "memory_vit" and kwargs["task_classes"] == [] and kwargs["width"] == 32
  written = flat(checkpointing.load_params(str(tmp_path / "out")))
  assert sorted(written) == sorted(flat(base))
  for key, value in flat(base).items():
    np.testing.assert_array_equal(written[key], value, err_msg=key)
