"""MobileViT v2: separable self-attention (naive formula, linear cost), widths, paper parameter
counts, timm parity and a short training run."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from big_vision_lite import models
from big_vision_lite.models import mobilevit2
from big_vision_lite.models import layers
from big_vision_lite.tools import import_timm

sys.path.insert(0, os.path.dirname(__file__))
import make_timm_reference  # pylint: disable=wrong-import-position
from random_init import random, random_variables  # pylint: disable=wrong-import-position

DATA_DIR = make_timm_reference.DATA_DIR
LABELS, SAVED_LABELS = make_timm_reference.labels("mobilevitv2_")


def test_separable_attention_is_the_naive_formula():
  x = random((2, 3, 7, 8))  # [B, P, N, D]
  module = mobilevit2.SeparableSelfAttention()
  params = random_variables(module, x)["params"]
  got = jax.jit(module.apply)({"params": params}, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = np.zeros(x.shape)
  for b in range(2):
    for pixel in range(3):
      tokens = x[b, pixel].astype(np.float64)  # [N, D]
      logits = tokens @ p["score"]["kernel"][:, 0] + p["score"]["bias"][0]  # [N]
      scores = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
      context = sum(scores[n] * (tokens[n] @ p["key"]["kernel"] + p["key"]["bias"])
                    for n in range(7))  # [D]
      for n in range(7):
        value = np.maximum(tokens[n] @ p["value"]["kernel"] + p["value"]["bias"], 0)
        want[b, pixel, n] = (value * context) @ p["out"]["kernel"] + p["out"]["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _flops(module, tokens):
  x = jnp.zeros((1, tokens, 8))
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  cost = jax.jit(lambda v, x: module.apply(v, x)).lower(variables, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"]


def test_separable_attention_cost_is_linear_in_tokens():
  separable = mobilevit2.SeparableSelfAttention()
  ratio = _flops(separable, 1024) / _flops(separable, 256)
  assert 3.6 < ratio < 4.4, ratio
  standard = layers.MultiHeadAttention(num_heads=1)
  quadratic_ratio = _flops(standard, 1024) / _flops(standard, 256)
  assert quadratic_ratio > 13, quadratic_ratio  # 16 for the N² attention, 4 for projections.


@pytest.mark.parametrize("variant, paper_millions", [
    ("050", 1.4), ("075", 2.9), ("100", 4.9), ("125", 7.5), ("150", 10.6), ("175", 14.3),
    ("200", 18.4)])
def test_parameter_count_matches_paper(variant, paper_millions):
  model = mobilevit2.Model(num_classes=1000, variant=variant)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  assert abs(count / 1e6 - paper_millions) / paper_millions < 0.03, count


def test_widths_follow_the_multiplier():
  assert mobilevit2.Model(variant="075").hparams() == mobilevit2.Model(
      width_multiplier=0.75).hparams()
  hp = mobilevit2.Model(width_multiplier=1.75).hparams()
  assert hp["stem_width"] == 56 and hp["widths"] == (112, 224, 448, 672, 896)
  assert hp["transformer_widths"] == (224, 336, 448)
  assert mobilevit2.Model().hparams()["widths"] == (64, 128, 256, 384, 512)
  odd = mobilevit2.Model(width_multiplier=0.6).hparams()  # int(64 · 0.6) = 38 -> 40.
  assert odd["widths"] == (40, 80, 152, 232, 304) and odd["transformer_widths"] == (80, 120, 152)


def test_output_shapes_and_resized_maps():
  model = mobilevit2.Model(num_classes=4, variant="050")
  images = jnp.zeros((2, 80, 48, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  logits, aux = jax.eval_shape(model.apply, variables, images)
  assert logits.shape == (2, 4) and aux["pre_logits"].shape == (2, 256)
  # 5x3 and 3x2 maps are resized up to multiples of the 2x2 patch before the v2 block.
  assert [aux[f"stage{i}"].shape[1:3] for i in range(5)] == [
      (40, 24), (20, 12), (10, 6), (6, 4), (4, 2)]
  block = variables["params"]["stage2_mobilevit"]
  assert sorted(block) == ["local_conv", "local_proj", "proj", "transformer_0",
                           "transformer_1", "transformer_norm"]  # No fusion conv.
  assert block["local_conv"]["conv"]["kernel"].shape == (3, 3, 1, 128)  # Depth-wise.
  assert block["transformer_0"]["attention"]["score"]["kernel"].shape == (64, 1)


def test_block_output_is_finite_and_train_mode_updates_batch_stats():
  block = mobilevit2.MobileViTv2Block(transformer_width=8, depth=1)
  x = random((2, 5, 3, 16), seed=1)
  variables = random_variables(block, x)
  y, updated = jax.jit(lambda v, x: block.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  assert y.shape == (2, 6, 4, 16) and np.all(np.isfinite(y))
  assert not np.allclose(updated["batch_stats"]["proj"]["bn"]["mean"], 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(variant="300"), "variant.*050, 075"),
    (dict(width_multiplier=2.5), "width_multiplier.*0.5, 2.0"),
    (dict(variant="050", width_multiplier=1.0), "variant.*width_multiplier.*disagree"),
    (dict(transformer_widths=(8, 8)), "transformer_depths"),
    (dict(mv2_depths=(1, 2, 0, 1, 1)), "mv2_depths"),
    (dict(mlp_ratio=0.0), "mlp_ratio"),
])
def test_bad_fields_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mobilevit2.Model(**kwargs)


def _apply_timm(label, state, x_nchw):
  model_name, kwargs, variables = import_timm.convert(
      make_timm_reference.REFERENCES[label].timm_name, state)
  assert model_name == "mobilevit2"
  json.dumps(kwargs)  # model.json must be able to hold the kwargs.
  model = models.get(model_name).Model(**kwargs)
  out, _ = jax.jit(model.apply)(variables, np.transpose(x_nchw, (0, 2, 3, 1)))
  return np.asarray(out), kwargs


# label -> (stem width, widths): timm's int(multiplier · (32; 64, 128, 256, 384, 512)) times
# width_factor, rounded (stem) or rounded up to multiples of 8, not the variant's own.
SAVED_WIDTHS = {
    "mobilevitv2_050": (4, [8, 16, 32, 48, 64]),
    "mobilevitv2_075_headless": (3, [8, 16, 24, 40, 48]),
    "mobilevitv2_100_rect": (4, [8, 16, 32, 48, 64]),
    "mobilevitv2_175": (4, [8, 16, 32, 40, 56]),
}


def test_saved_timm_references_exist():
  assert SAVED_LABELS == sorted(SAVED_WIDTHS)
  assert sorted(set(LABELS) - set(SAVED_LABELS)) == ["mobilevitv2_075_full_headless"]


@pytest.mark.parametrize("label", SAVED_LABELS)
def test_saved_timm_reference(label):
  state, x, expected = make_timm_reference.load(os.path.join(DATA_DIR, label))
  out, kwargs = _apply_timm(label, state, x)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  assert kwargs["variant"] == label[len("mobilevitv2_"):][:3]
  assert kwargs["num_classes"] == make_timm_reference.REFERENCES[label].kwargs["num_classes"]
  assert (kwargs["stem_width"], kwargs["widths"]) == SAVED_WIDTHS[label]


@pytest.mark.parametrize("label", LABELS)
def test_live_timm(label, timm_live_dir):
  state, x, expected = make_timm_reference.load(os.path.join(timm_live_dir, label))
  out, kwargs = _apply_timm(label, state, x)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  if label == "mobilevitv2_075_full_headless":  # Full size: the kwargs are just the variant.
    assert kwargs == dict(num_classes=0, variant="075")


def _small_state():
  return dict(load_file(os.path.join(DATA_DIR, "mobilevitv2_050", "state.safetensors")))


@pytest.mark.parametrize("extra", ["stages.2.1.conv_fusion.conv.weight", "final_conv.conv.weight",
                                   "stages.3.1.transformer.0.attn.q_norm.weight"])
def test_unsupported_key_is_named(extra):
  state = _small_state()
  state[extra] = np.zeros((4,), np.float32)
  with pytest.raises(ValueError, match=rf"{extra.replace('.', r'[.]')}.*supported: mobilevit_"):
    import_timm.convert("mobilevitv2_050", state)


@pytest.mark.parametrize("name", ["mobilevitv2_060", "mobilevitv2_050x"])
def test_unsupported_name_is_named(name):
  with pytest.raises(ValueError, match=rf"{name}.*mobilevitv2_\{{050"):
    import_timm.convert(name, _small_state())


def test_config_variant_is_a_name_or_a_multiplier():
  from big_vision_lite import config_lib  # pylint: disable=g-import-not-at-top
  from configs import mobilevit2 as mobilevit2_config  # pylint: disable=g-import-not-at-top
  named = mobilevit2_config.get_config("variant=175")
  config_lib.validate(named)
  assert named.model_name == "mobilevit2" and named.model.variant == "175"
  assert named.wd == 0.05
  number = mobilevit2_config.get_config("variant=0.6,wd=0.1")
  config_lib.validate(number)
  assert number.model.width_multiplier == 0.6 and number.wd == 0.1
  with pytest.raises(ValueError, match="variant.*050"):
    mobilevit2_config.get_config("variant=large")
