"""MobileViT v1: shapes, paper parameter counts, unfold/fold, resizing, timm parity, training."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from big_vision_lite import models
from big_vision_lite.models import mobilevit
from big_vision_lite.tools import import_timm

sys.path.insert(0, os.path.dirname(__file__))
import make_timm_reference  # pylint: disable=wrong-import-position
from random_init import random, random_variables  # pylint: disable=wrong-import-position

DATA_DIR = make_timm_reference.DATA_DIR
LABELS, SAVED_LABELS = make_timm_reference.labels("mobilevit_")


def count_params(model, res=256):
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, res, res, 3)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_output_and_feature_shapes():
  model = mobilevit.Model(num_classes=5, variant="XS")
  images = jnp.zeros((2, 64, 96, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  (logits, aux) = jax.eval_shape(model.apply, variables, images)
  assert logits.shape == (2, 5)
  assert [aux[f"stage{i}"].shape for i in range(5)] == [
      (2, 32, 48, 32), (2, 16, 24, 48), (2, 8, 12, 64), (2, 4, 6, 80), (2, 2, 3, 96)]
  assert aux["pre_logits"].shape == (2, 384)
  headless = mobilevit.Model(num_classes=0, variant="XS")
  features, _ = jax.eval_shape(headless.apply, jax.eval_shape(headless.init, jax.random.key(0),
                                                              images), images)
  assert features.shape == (2, 384)
  assert set(variables) == {"params", "batch_stats"}
  block = variables["params"]["stage3_mobilevit"]
  assert sorted(block) == ["fusion", "local_conv", "local_proj", "proj", "transformer_0",
                           "transformer_1", "transformer_2", "transformer_3",
                           "transformer_norm"]
  assert block["fusion"]["conv"]["kernel"].shape == (3, 3, 160, 80)


@pytest.mark.parametrize("variant, paper_millions", [("XXS", 1.3), ("XS", 2.3), ("S", 5.6)])
def test_parameter_count_matches_paper(variant, paper_millions):
  count = count_params(mobilevit.Model(num_classes=1000, variant=variant))
  assert abs(count / 1e6 - paper_millions) / paper_millions < 0.03, count


def test_unfold_groups_each_pixel_position_and_fold_inverts_it():
  x = random((2, 12, 8, 5))
  for patch in (1, 2, 4):
    tokens = mobilevit.unfold_patches(x, patch)  # [B, P, N, C]
    grid = (12 // patch, 8 // patch)
    assert tokens.shape == (2, patch * patch, grid[0] * grid[1], 5)
    for i in range(patch):
      for j in range(patch):  # Position (i, j) of every patch, patches in row-major order.
        np.testing.assert_array_equal(tokens[:, i * patch + j],
                                      x[:, i::patch, j::patch].reshape(2, -1, 5))
    np.testing.assert_array_equal(mobilevit.fold_patches(tokens, patch, grid), x)
    np.testing.assert_array_equal(
        mobilevit.unfold_patches(mobilevit.fold_patches(tokens, patch, grid), patch), tokens)


def test_resize_bilinear_is_torch_interpolate():
  x = random((1, 5, 3, 2), seed=1)
  # Upsampling without align_corners is the half-pixel bilinear of jax.image.resize.
  np.testing.assert_allclose(mobilevit.resize_bilinear(x, (6, 4), align_corners=False),
                             jax.image.resize(x, (1, 6, 4, 2), "bilinear"), atol=1e-6)
  # Downsampling does not antialias: 6 -> 3 averages pixel pairs, as torch's interpolate.
  y = random((1, 6, 6, 1), seed=2)
  want = (y[:, ::2] + y[:, 1::2]) / 2
  want = (want[:, :, ::2] + want[:, :, 1::2]) / 2
  np.testing.assert_allclose(mobilevit.resize_bilinear(y, (3, 3), align_corners=False), want,
                             atol=1e-6)
  # align_corners keeps the corners and reproduces a linear ramp exactly.
  ramp = jnp.arange(5.0)[None, :, None, None] * jnp.ones((1, 5, 3, 1))
  up = mobilevit.resize_bilinear(ramp, (7, 4), align_corners=True)
  np.testing.assert_allclose(up[0, :, 0, 0], np.linspace(0, 4, 7), atol=1e-6)


def test_block_resizes_odd_maps_and_train_mode_updates_batch_stats():
  block = mobilevit.MobileViTBlock(transformer_width=16, depth=1, patch_size=2)
  x = random((2, 5, 3, 8), seed=3)  # 5x3 is resized to 6x4 for the 2x2 patches and back.
  variables = random_variables(block, x)
  y, updated = jax.jit(lambda v, x: block.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  assert y.shape == x.shape and np.all(np.isfinite(y))
  assert sorted(updated["batch_stats"]) == ["fusion", "local_conv", "proj"]
  assert not np.allclose(updated["batch_stats"]["fusion"]["bn"]["mean"],
                         variables["batch_stats"]["fusion"]["bn"]["mean"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(variant="XXL"), "variant.*XXS, XS, S"),
    (dict(variant=None, widths=(8, 8, 8, 8, 8)), "variant.*stem_width"),
    (dict(widths=(8, 8, 8)), "widths"),
    (dict(transformer_depths=(2, 4)), "transformer_depths"),
    (dict(num_heads=3), "num_heads"),
    (dict(patch_size=0), "patch_size"),
    (dict(drop_path=1.0), "drop_path"),
])
def test_bad_fields_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mobilevit.Model(**kwargs)


def test_nchw_images_are_rejected():
  model = mobilevit.Model(num_classes=2)
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 64, 64)))


def _apply_timm(label, state, x_nchw):
  model_name, kwargs, variables = import_timm.convert(
      make_timm_reference.REFERENCES[label].timm_name, state)
  assert model_name == "mobilevit"
  json.dumps(kwargs)  # model.json must be able to hold the kwargs.
  model = models.get(model_name).Model(**kwargs)
  out, _ = jax.jit(model.apply)(variables, np.transpose(x_nchw, (0, 2, 3, 1)))
  return np.asarray(out), kwargs


# label -> converted kwargs: timm's widths times width_factor, rounded up to multiples of 8
# (the stem and final conv rounded), and the transformers each reference sets.
SAVED_KWARGS = {
    "mobilevit_s_headless": dict(
        num_classes=0, variant="S", stem_width=2, widths=[8, 8, 16, 16, 24],
        transformer_widths=[16, 16, 24], transformer_depths=[2, 1, 1], final_width=80),
    "mobilevit_xs_rect": dict(
        num_classes=5, variant="XS", stem_width=4, widths=[8, 16, 16, 24, 24],
        transformer_widths=[16, 24, 32], transformer_depths=[1, 2, 1], final_width=96),
    "mobilevit_xxs": dict(
        num_classes=10, variant="XXS", stem_width=4, widths=[8, 8, 16, 16, 24],
        transformer_widths=[16, 24, 32], transformer_depths=[2, 2, 1], final_width=80),
}


def test_saved_timm_references_exist():
  assert SAVED_LABELS == sorted(SAVED_KWARGS)
  assert sorted(set(LABELS) - set(SAVED_LABELS)) == ["mobilevit_s_full_headless"]


@pytest.mark.parametrize("label", SAVED_LABELS)
def test_saved_timm_reference(label):
  state, x, expected = make_timm_reference.load(os.path.join(DATA_DIR, label))
  out, kwargs = _apply_timm(label, state, x)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  assert kwargs == SAVED_KWARGS[label]


@pytest.mark.parametrize("label", LABELS)
def test_live_timm(label, timm_live_dir):
  state, x, expected = make_timm_reference.load(os.path.join(timm_live_dir, label))
  out, kwargs = _apply_timm(label, state, x)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  if label == "mobilevit_s_full_headless":  # Full size: the kwargs are just the variant.
    assert kwargs == dict(num_classes=0, variant="S")


def _xxs_state():
  return dict(load_file(os.path.join(DATA_DIR, "mobilevit_xxs", "state.safetensors")))


@pytest.mark.parametrize("extra", ["stages.2.1.transformer.0.ls1.gamma", "stages.5.0.conv.weight",
                                   "head.norm.weight", "stages.1.0.attn.fc1.weight"])
def test_unsupported_key_is_named(extra):
  state = _xxs_state()
  state[extra] = np.zeros((4,), np.float32)
  with pytest.raises(ValueError, match=rf"{extra.replace('.', r'[.]')}.*supported: mobilevit_"):
    import_timm.convert("mobilevit_xxs", state)


@pytest.mark.parametrize("name", ["mobilevit_xxxs", "semobilevit_s", "mobilevit_m"])
def test_unsupported_name_is_named(name):
  with pytest.raises(ValueError, match=rf"{name}.*mobilevit_\{{xxs"):
    import_timm.convert(name, _xxs_state())


def test_missing_fusion_conv_is_named():
  state = {k: v for k, v in _xxs_state().items() if ".conv_fusion." not in k}
  with pytest.raises(ValueError, match="conv_fusion"):
    import_timm.convert("mobilevit_xxs", state)


@pytest.mark.parametrize("arg", ["variant=XS", "variant=S,res=256,multiscale=true"])
def test_config_variants_validate(arg):
  from big_vision_lite import config_lib  # pylint: disable=g-import-not-at-top
  from configs import mobilevit as mobilevit_config  # pylint: disable=g-import-not-at-top
  config = mobilevit_config.get_config(arg)
  config_lib.validate(config)
  assert config.model.variant == arg.split(",")[0].split("=")[1]
  if "multiscale" in arg:
    assert config.input.multiscale.to_dict() == dict(resolutions=(192, 256, 320),
                                                     base_res=256)
