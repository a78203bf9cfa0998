"""ResNet: shapes and features, torchvision's parameter counts, frozen BatchNorm, timm parity
(saved and live) and conversion errors."""
import functools
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import models
from big_vision_lite.models import resnet
from big_vision_lite.tools import import_timm

sys.path.insert(0, os.path.dirname(__file__))
import make_timm_reference  # pylint: disable=wrong-import-position
from random_init import random_variables  # pylint: disable=wrong-import-position

DATA_DIR = make_timm_reference.DATA_DIR
LABELS = sorted(label for label in make_timm_reference.REFERENCES if label.startswith("resnet"))
TINY = dict(depth=18, width=8, stage_sizes=(1, 1, 1, 1))


def _images(batch=2, size=(32, 32), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, *size, 3))


def test_output_shapes_and_features():
  model = resnet.Model(num_classes=5, **TINY)
  x = _images(size=(64, 32))
  variables = random_variables(model, x)
  logits, aux = jax.jit(model.apply)(variables, x)
  assert logits.shape == (2, 5) and aux["pre_logits"].shape == (2, 64)
  assert aux["stem"].shape == (2, 16, 8, 8)
  for stage, stride in zip(range(1, 5), (4, 8, 16, 32)):
    assert aux[f"stage{stage}"].shape == (2, 64 // stride, 32 // stride, 8 * 2**(stage - 1))
  np.testing.assert_allclose(aux["pre_logits"], aux["stage4"].mean(axis=(1, 2)), rtol=1e-6)
  headless = resnet.Model(num_classes=0, **TINY)
  headless_vars = jax.eval_shape(headless.init, jax.random.key(0), x)
  assert "head" not in headless_vars["params"]
  out, aux = jax.eval_shape(headless.apply, headless_vars, x)
  assert out.shape == aux["pre_logits"].shape == (2, 64)
  assert models.get("resnet") is resnet


@pytest.mark.parametrize("depth, expected", [(18, 11_689_512), (34, 21_797_672),
                                             (50, 25_557_032)])
def test_parameter_count_matches_torchvision(depth, expected):
  """torchvision's resnet{18,34,50}(num_classes=1000) parameter counts (BN affine included,
  running statistics not)."""
  model = resnet.Model(num_classes=1000, depth=depth)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  assert sum(np.prod(p.shape) for p in jax.tree.leaves(shapes["params"])) == expected


@pytest.mark.parametrize("field, value", [("depth", 26), ("width", 0), ("stem_width", 1.5),
                                          ("stage_sizes", (1, 1, 1)), ("frozen_bn", "yes")])
def test_bad_field_is_named(field, value):
  with pytest.raises(ValueError, match=f"'{field}'"):
    resnet.Model(**{**TINY, field: value})


def _train_apply(model):
  """Jitted train-mode apply returning ((out, aux), updated batch_stats)."""
  return jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))


def _bn_paths(tree):
  return {path for path in flax.traverse_util.flatten_dict(tree, sep="/")
          if "bn" in path.split("/")[-2]}


def test_frozen_batch_norm_never_changes_and_gets_no_gradient():
  """Frozen: the norms hold all four tensors in batch_stats, a train-mode apply uses and
  returns them unchanged and equals eval mode, and no parameter of a norm exists to get a
  gradient. Trainable (the control): train mode uses batch statistics and updates them."""
  x = _images(batch=4, seed=1)
  frozen = resnet.Model(num_classes=3, frozen_bn=True, head_zeroinit=False, **TINY)
  variables = random_variables(frozen, x)  # Statistics away from the identity.
  stats = variables["batch_stats"]
  assert not _bn_paths(variables["params"])
  assert set(stats["bn1"]) == {"scale", "bias", "mean", "var"}

  @jax.jit
  def frozen_run(params):
    def loss(params):
      (logits, _), updated = frozen.apply({**variables, "params": params}, x, train=True,
                                          mutable=["batch_stats"])
      return jnp.sum(logits**2), (logits, updated)
    return jax.grad(loss, has_aux=True)(params), frozen.apply(variables, x)[0]

  (grads, (train_logits, updated)), eval_logits = frozen_run(variables["params"])
  jax.tree.map(np.testing.assert_array_equal, updated["batch_stats"], stats)
  assert not _bn_paths(grads) and jax.tree.structure(grads) == jax.tree.structure(
      variables["params"])
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(train_logits, eval_logits, rtol=1e-5, atol=1e-6)

  trainable = resnet.Model(num_classes=3, head_zeroinit=False, **TINY)
  variables = random_variables(trainable, x)
  assert _bn_paths(variables["params"]) and set(variables["batch_stats"]["bn1"]) == {"mean", "var"}

  @jax.jit
  def trainable_run():
    return _train_apply(trainable)(variables, x), trainable.apply(variables, x)[0]

  ((logits, _), updated), eval_logits = trainable_run()
  assert not np.allclose(updated["batch_stats"]["bn1"]["mean"],
                         variables["batch_stats"]["bn1"]["mean"])
  assert not np.allclose(logits, eval_logits)


def test_freeze_batch_norm_keeps_the_function():
  """A converted (trainable-norm) model and its frozen copy compute the same in eval mode,
  and the frozen one the same again in train mode."""
  state, x, expected = make_timm_reference.load(os.path.join(DATA_DIR, "resnet50_shrunk"))
  _, kwargs, variables = import_timm.convert("resnet50", state)
  frozen_vars = resnet.freeze_batch_norm(variables)
  assert not _bn_paths(frozen_vars["params"])
  x = np.transpose(x, (0, 2, 3, 1))
  model = resnet.Model(**kwargs, frozen_bn=True)
  out, _ = _train_apply(model)(frozen_vars, x)[0]
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def _apply_converted(timm_name, state, x_nchw):
  model_name, kwargs, variables = import_timm.convert(timm_name, state)
  assert model_name == "resnet"
  model = models.get(model_name).Model(**kwargs)
  out, _ = jax.jit(model.apply)(variables, np.transpose(x_nchw, (0, 2, 3, 1)))
  return np.asarray(out), kwargs


def _assert_close(out, expected):
  """1e-4 relative to the output's scale (timm logits here are O(1..10))."""
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("label", LABELS)
def test_saved_timm_reference(label):
  ref = make_timm_reference.REFERENCES[label]
  state, x, expected = make_timm_reference.load(os.path.join(DATA_DIR, label))
  out, kwargs = _apply_converted(ref.timm_name, state, x)
  _assert_close(out, expected)
  assert kwargs["depth"] == int(ref.timm_name.removeprefix("resnet"))
  assert kwargs["num_classes"] == ref.kwargs["num_classes"]
  assert kwargs.get("stage_sizes", list(resnet.DEPTHS[kwargs["depth"]][1])) == list(
      ref.kwargs.get("layers", resnet.DEPTHS[kwargs["depth"]][1]))


@pytest.mark.parametrize("label", LABELS)
def test_live_timm(label, timm_live_dir):
  state, x, expected = make_timm_reference.load(os.path.join(timm_live_dir, label))
  out, _ = _apply_converted(make_timm_reference.REFERENCES[label].timm_name, state, x)
  _assert_close(out, expected)


def _state(label="resnet18_shrunk"):
  return dict(make_timm_reference.load(os.path.join(DATA_DIR, label))[0])


@pytest.mark.parametrize("name", ["resnet26", "resnet50d", "resnetv2_50"])
def test_unsupported_timm_name_is_named(name):
  with pytest.raises(ValueError, match=rf"Unsupported timm ResNet name '{name}'.*resnet\{{18"):
    import_timm.convert(name, _state())


def test_block_type_must_match_the_name():
  with pytest.raises(ValueError, match="'resnet50' has basic blocks.*bottleneck"):
    import_timm.convert("resnet50", _state())
  with pytest.raises(ValueError, match="'resnet18' has bottleneck blocks.*basic"):
    import_timm.convert("resnet18", _state("resnet50_shrunk"))


def test_unsupported_timm_key_is_named():
  state = _state()
  state["layer1.0.se.fc1.weight"] = np.zeros((2, 8, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"'layer1.0.se.fc1.weight'.*supported: resnet\{18"):
    import_timm.convert("resnet18", state)
