"""ConvNeXt V2: GRN against numpy, shapes, paper parameter counts, the masked (FCMAE) path,
drop path, timm parity (saved and live), conversion errors and a short training run."""
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from big_vision_lite import models
from big_vision_lite import utils
from big_vision_lite.models import convnext2
from big_vision_lite.tools import import_timm

sys.path.insert(0, os.path.dirname(__file__))
import make_timm_reference  # pylint: disable=wrong-import-position

DATA_DIR = make_timm_reference.DATA_DIR
LABELS = sorted(label for label in make_timm_reference.REFERENCES
                if label.startswith("convnextv2_"))
# Woo et al. 2023 (model sizes, ImageNet-1k heads), in millions.
PAPER_PARAMS = {"atto": 3.7, "femto": 5.2, "pico": 9.1, "nano": 15.6, "tiny": 28.6,
                "base": 89.0, "large": 198.0, "huge": 660.0}
SMALL = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))


def normal(shape, seed=0, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def random_variables(model, images, seed=0, scale=0.3):
  """Variables of `model` for `images` filled with noise (GRN gamma/beta and head included),
  from shapes alone (no init compiled); 1-D leaves (norms, biases, GRN) around 1."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(
      scale * rng.normal(size=x.shape) + (1.0 if len(x.shape) == 1 else 0.0), x.dtype), shapes)


def test_grn_matches_naive_formula():
  x = np.asarray(normal((2, 5, 6, 8)), np.float64)
  gamma, beta = np.asarray(normal((8,), 1)), np.asarray(normal((8,), 2))
  want = np.empty_like(x)
  for b in range(2):
    norms = np.array([np.sqrt((x[b, :, :, c] ** 2).sum()) for c in range(8)])
    relative = norms / (norms.mean() + 1e-6)
    for c in range(8):
      want[b, :, :, c] = x[b, :, :, c] + gamma[c] * x[b, :, :, c] * relative[c] + beta[c]
  got = convnext2.grn(jnp.asarray(x, jnp.float32), jnp.asarray(gamma), jnp.asarray(beta))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  module = convnext2.GRN()
  variables = module.init(jax.random.key(0), x.astype(np.float32))
  assert not any(np.any(v) for v in jax.tree.leaves(variables))  # Zero init: identity.
  np.testing.assert_array_equal(module.apply(variables, x.astype(np.float32)),
                                x.astype(np.float32))


def test_grn_gradient_is_finite_for_an_all_zero_channel():
  """A channel zero at every position (norm 0) gets torch.norm's gradient convention (0
  through the norm, so the upstream gradient passes as is); elsewhere the gradient is the
  central finite difference of the naive float64 formula."""
  x = np.asarray(normal((1, 2, 2, 4)), np.float64)
  x[..., 1] = 0.0
  gamma, beta = np.asarray(normal((4,), 1)), np.asarray(normal((4,), 2))
  weights = np.asarray(normal((1, 2, 2, 4), 3), np.float64)

  def naive(x):
    norms = np.sqrt((x ** 2).sum(axis=(1, 2), keepdims=True))
    return (weights * (x + gamma * x * norms / (norms.mean(-1, keepdims=True) + 1e-6)
                       + beta)).sum()

  grads = jax.grad(lambda x: jnp.sum(weights * convnext2.grn(x, gamma, beta)))(
      jnp.asarray(x, jnp.float32))
  grads = np.asarray(grads)
  assert np.isfinite(grads).all()
  np.testing.assert_allclose(grads[..., 1], weights[..., 1], rtol=1e-6)
  for index in np.ndindex(x.shape):
    if index[-1] == 1:
      continue
    step = np.zeros_like(x)
    step[index] = 1e-6
    numeric = (naive(x + step) - naive(x - step)) / 2e-6
    np.testing.assert_allclose(grads[index], numeric, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("hw", [(5, 9), (2, 3), (1, 1)])
def test_shifted_depthwise_conv_equals_lax_conv_with_gradients(hw):
  x, kernel = normal((2, *hw, 6)), normal((7, 7, 1, 6), 1)
  loss = lambda impl: lambda x, k: jnp.sum(jnp.sin(convnext2.depthwise_conv(x, k, impl)))
  want = jax.jit(jax.value_and_grad(loss("conv"), argnums=(0, 1)))(x, kernel)
  got = jax.jit(jax.value_and_grad(loss("shifted"), argnums=(0, 1)))(x, kernel)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_output_shapes_features_and_intermediates():
  model = convnext2.Model(num_classes=7, variant="atto")
  images = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  assert set(variables) == {"params"}
  (logits, aux), state = jax.eval_shape(
      functools.partial(model.apply, mutable=["intermediates"]), variables, images)
  assert logits.shape == (2, 7)
  assert aux["stem"].shape == (2, 16, 24, 40)
  assert [aux[f"stage{i}"].shape for i in range(4)] == [
      (2, 16, 24, 40), (2, 8, 12, 80), (2, 4, 6, 160), (2, 2, 3, 320)]
  assert aux["pre_logits"].shape == (2, 320)
  hidden = state["intermediates"]["stage2_block5"]["mlp_hidden"][0]
  assert hidden.shape == (2, 4, 6, 640)
  params = variables["params"]
  assert params["stage1_block0"]["grn"]["gamma"].shape == (320,)
  assert params["downsample3_conv"]["kernel"].shape == (2, 2, 160, 320)
  assert params["stage0_block1"]["dwconv"]["kernel"].shape == (7, 7, 1, 40)
  headless = convnext2.Model(num_classes=0, **SMALL)
  features, _ = jax.eval_shape(headless.apply, jax.eval_shape(
      headless.init, jax.random.key(0), images), images)
  assert features.shape == (2, 32)


@pytest.mark.parametrize("variant", list(PAPER_PARAMS))
def test_parameter_count_matches_paper(variant):
  model = convnext2.Model(num_classes=1000, variant=variant)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  millions = utils.count_params(shapes["params"]) / 1e6
  assert abs(millions - PAPER_PARAMS[variant]) < 0.02 * PAPER_PARAMS[variant], millions


def test_without_grn_has_no_grn_params():
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(convnext2.Model(grn=False, **SMALL).init, jax.random.key(0),
                          images)["params"]
  names = utils.flatten_names(params)
  assert names and not any("grn" in name for name in names)
  with_grn = jax.eval_shape(convnext2.Model(**SMALL).init, jax.random.key(0), images)["params"]
  assert utils.count_params(with_grn) - utils.count_params(params) == 2 * 4 * (8 + 16 + 24 + 32)


@pytest.mark.parametrize("field, value", [("variant", "giant"), ("depths", (1, 2, 3)),
                                          ("dims", (8, 16, 0, 32)), ("drop_path", 1.0),
                                          ("grn", "yes"), ("dwconv_impl", "cudnn")])
def test_bad_field_is_named(field, value):
  with pytest.raises(ValueError, match=field):
    convnext2.Model(**{field: value})


def test_bad_images_and_mask_are_rejected():
  model = convnext2.Model(**SMALL)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  apply = lambda x, **kw: jax.eval_shape(functools.partial(model.apply, **kw), variables, x)
  with pytest.raises(ValueError, match="NHWC"):
    apply(jax.ShapeDtypeStruct((64, 64, 3), jnp.float32))
  with pytest.raises(ValueError, match="NHWC"):
    apply(jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8))
  with pytest.raises(ValueError, match="mask"):
    apply(images, mask=jnp.ones((1, 1, 1)))
  with pytest.raises(ValueError, match="mask"):
    apply(images, mask=jnp.ones((1, 3, 3, 1)))


def test_resize_mask_repeats_or_min_pools():
  mask = np.random.default_rng(0).random((2, 4, 6, 1)) > 0.5
  up = np.asarray(convnext2.resize_mask(jnp.asarray(mask), (8, 18)))
  np.testing.assert_array_equal(up, mask.repeat(2, axis=1).repeat(3, axis=2))
  down = np.asarray(convnext2.resize_mask(jnp.asarray(mask), (2, 3)))
  np.testing.assert_array_equal(down, mask.reshape(2, 2, 2, 3, 2, 1).min(axis=(2, 4)))


@pytest.mark.parametrize("mask_grid", [3, 96])  # FCMAE's 32x32-patch grid; pixel level.
def test_masked_pixels_never_reach_visible_outputs(mask_grid):
  model = convnext2.Model(num_classes=5, **SMALL)
  images = normal((2, 96, 96, 3), 1)
  variables = random_variables(model, images, 2)
  patch_mask = np.random.default_rng(3).random((2, 3, 3, 1)) > 0.6  # 1 = visible.
  patch_mask[:, 0, 0] = True
  pixel_mask = patch_mask.repeat(32, axis=1).repeat(32, axis=2)  # [B, 96, 96, 1]
  mask = jnp.asarray(pixel_mask if mask_grid == 96 else patch_mask)
  under_mask = jnp.where(pixel_mask, images, normal(images.shape, 4, scale=5.0))
  apply = jax.jit(lambda x, m: model.apply(variables, x, mask=m))
  (logits, aux), (logits2, aux2) = apply(images, mask), apply(under_mask, mask)
  np.testing.assert_allclose(logits, logits2, rtol=1e-6, atol=1e-6)
  for name in ("stem", "stage0", "stage1", "stage2", "stage3"):
    visible = convnext2.resize_mask(jnp.asarray(patch_mask), aux[name].shape[1:3])
    np.testing.assert_allclose(aux[name], aux2[name], rtol=1e-6, atol=1e-6, err_msg=name)
    assert not np.any(np.where(visible, 0.0, aux[name])), name  # Masked positions are zero.
  # With every position visible (the unmasked model) the same change does reach the
  # outputs, so the test has teeth.
  all_visible = jnp.ones_like(mask)
  changed = apply(images, all_visible)[0] - apply(under_mask, all_visible)[0]
  assert np.abs(changed).max() > 1e-3


def test_drop_path_is_identity_in_eval_and_active_in_training():
  images = normal((4, 32, 32, 3))
  dropped = convnext2.Model(num_classes=3, drop_path=0.5, **SMALL)
  variables = random_variables(dropped, images)
  plain = jax.jit(convnext2.Model(num_classes=3, **SMALL).apply)(variables, images)[0]
  apply = jax.jit(lambda rng, train: dropped.apply(variables, images, train=train,
                                                   rngs={"dropout": rng})[0],
                  static_argnums=1)
  for seed in (1, 2):
    np.testing.assert_allclose(apply(jax.random.key(seed), False), plain, rtol=1e-5, atol=1e-6)
  trained = [apply(jax.random.key(seed), True) for seed in (1, 2)]
  assert np.abs(trained[0] - trained[1]).max() > 1e-3


@functools.lru_cache
def _jitted_apply(model_name, kwargs_json):
  """One compiled apply per converted architecture (the saved and live tests share it)."""
  return jax.jit(models.get(model_name).Model(**json.loads(kwargs_json)).apply)


def _apply_converted(timm_name, state, x_nchw):
  model_name, kwargs, variables = import_timm.convert(timm_name, state)
  assert model_name == "convnext2"
  apply = _jitted_apply(model_name, json.dumps(kwargs))  # model.json must hold the kwargs.
  out, _ = apply(variables, np.transpose(x_nchw, (0, 2, 3, 1)))
  return np.asarray(out), kwargs


@pytest.mark.parametrize("label", LABELS)
def test_saved_timm_reference(label):
  ref = make_timm_reference.REFERENCES[label]
  state, x, expected = make_timm_reference.load(os.path.join(DATA_DIR, label))
  out, kwargs = _apply_converted(ref.timm_name, state, x)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  # The converted tree is the model's own (what `init_from` checks name by name).
  _, _, variables = import_timm.convert(ref.timm_name, state)
  model = convnext2.Model(**kwargs)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x.transpose(0, 2, 3, 1))
  assert ({k: v.shape for k, v in utils.flatten_names(variables).items()}
          == {k: v.shape for k, v in utils.flatten_names(shapes).items()})
  assert kwargs["grn"] is True
  assert kwargs["depths"] == list(ref.kwargs["depths"])
  assert kwargs["dims"] == list(ref.kwargs["dims"])
  assert kwargs["num_classes"] == ref.kwargs["num_classes"]


@pytest.mark.parametrize("label", LABELS)
def test_live_timm(label, timm_live_dir):
  state, x, expected = make_timm_reference.load(os.path.join(timm_live_dir, label))
  saved = load_file(os.path.join(DATA_DIR, label, "state.safetensors"))
  assert not np.allclose(state["stem.0.weight"], saved["stem.0.weight"])
  out, _ = _apply_converted(make_timm_reference.REFERENCES[label].timm_name, state, x)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def _atto_state():
  return dict(load_file(os.path.join(DATA_DIR, LABELS[0], "state.safetensors")))


@pytest.mark.parametrize("extra", ["stages.0.blocks.0.gamma", "norm_pre.weight",
                                   "head.pre_logits.fc.weight"])
def test_unsupported_timm_key_is_named(extra):
  state = _atto_state()
  state[extra] = np.zeros((4,), np.float32)
  with pytest.raises(ValueError, match=rf"{extra.replace('.', r'[.]')}.*supported: convnextv2_"):
    import_timm.convert("convnextv2_atto", state)


@pytest.mark.parametrize("name", ["convnextv2_giant", "convnext_atto"])
def test_unsupported_timm_name_is_named(name):
  with pytest.raises(ValueError, match=rf"{name}.*convnextv2_"):
    import_timm.convert(name, _atto_state())


def test_overlapping_stem_is_rejected():
  state = _atto_state()
  state["stem.0.weight"] = state["stem.0.weight"][:, :, :3, :3]
  with pytest.raises(ValueError, match=r"stem[.]0[.]weight"):
    import_timm.convert("convnextv2_atto", state)


def test_fcmae_style_weights_without_head_convert():
  state = {k: v for k, v in _atto_state().items() if not k.startswith("head.")}
  _, kwargs, variables = import_timm.convert("timm/convnextv2_atto.fcmae", state)
  assert kwargs["num_classes"] == 0
  np.testing.assert_array_equal(variables["params"]["head_norm"]["scale"], 1.0)
