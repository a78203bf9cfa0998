"""DETR model: the output contract, the sine position encoding against DETR's formula, the
mask's nearest resize, padding + pixel_mask changing nothing, frozen backbone norms with
dropout in training, other backbones and bad fields."""
import functools
import math
import types

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import models
from big_vision_lite.models import detr

TINY = dict(num_classes=3, num_queries=5, hidden=32, num_heads=4, enc_layers=1, dec_layers=2,
            mlp_dim=48, backbone_kwargs=dict(depth=18, width=8, stem_width=8,
                                             stage_sizes=(1, 1, 1, 1), frozen_bn=True))


# XLA:CPU compiles threefry slowly (seconds per dropout site); unsafe_rbg keys compile fast.
DROPOUT_KEY = jax.random.key(1, impl="unsafe_rbg")


def _random_variables(model, images, pixel_mask=None, seed=0):
  """Variables from shapes alone (no compiled init): N(0, 0.3²), BatchNorm variances 1."""
  shapes = jax.eval_shape(functools.partial(model.init, pixel_mask=pixel_mask),
                          jax.random.key(0), images)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape, np.float32) if path[-1].key == "var"
                       else 0.3 * rng.normal(size=s.shape).astype(np.float32)), shapes)


def _images(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_run():
  """The TINY model on two images (one padded), compiled once: variables, eval-mode (out,
  aux), and `train(key)` -> (out, updated batch_stats) in train mode with dropout."""
  model = detr.Model(**TINY)
  images = _images((2, 96, 64, 3))
  pixel_mask = np.zeros((2, 96, 64), bool)
  pixel_mask[0, :64, :64] = pixel_mask[1] = True
  variables = _random_variables(model, images, pixel_mask)

  @jax.jit
  def run(key):
    (train_out, _), updated = model.apply(variables, images, train=True, pixel_mask=pixel_mask,
                                          mutable=["batch_stats"], rngs={"dropout": key})
    return model.apply(variables, images, pixel_mask=pixel_mask), (train_out, updated)

  eval_result, _ = run(DROPOUT_KEY)
  return variables, eval_result, lambda key: run(key)[1]


def test_output_contract(tiny_run):
  variables, (out, aux), _ = tiny_run
  assert out["logits"].shape == (2, 5, 4) and out["boxes"].shape == (2, 5, 4)
  assert aux["decoder_logits"].shape == (2, 2, 5, 4) and aux["decoder_boxes"].shape == (2, 2, 5, 4)
  np.testing.assert_array_equal(aux["decoder_logits"][-1], out["logits"])
  np.testing.assert_array_equal(aux["decoder_boxes"][-1], out["boxes"])
  assert not np.allclose(aux["decoder_logits"][0], aux["decoder_logits"][1])
  assert np.all((out["boxes"] > 0) & (out["boxes"] < 1))
  assert aux["features"].shape == (2, 3, 2, 64)  # resnet's stage4: stride 32.
  np.testing.assert_array_equal(aux["feature_mask"], [[[1, 1], [1, 1], [0, 0]], [[1, 1]] * 3])
  # The backbone is the registry's headless ResNet with frozen norms (none in params).
  params = variables["params"]
  assert "head" not in params["backbone"] and "bn1" not in params["backbone"]
  assert set(variables["batch_stats"]["backbone"]["bn1"]) == {"scale", "bias", "mean", "var"}
  assert params["query_embed"].shape == (5, 32) and params["class_embed"]["kernel"].shape == (32, 4)
  assert set(params["bbox_embed"]) == {"layers_0", "layers_1", "layers_2"}
  assert set(params["decoder_layer1"]) == {"self_attn", "norm1", "multihead_attn", "norm2",
                                           "linear1", "linear2", "norm3"}
  assert set(params["encoder_layer0"]) == {"self_attn", "norm1", "linear1", "linear2", "norm2"}


def _naive_sine_encoding(mask, num_pos_feats, temperature=10000.0, scale=2 * math.pi):
  """DETR's PositionEmbeddingSine(normalize=True), element by element (mask: True = real)."""
  batch, height, width = mask.shape
  out = np.zeros((batch, height, width, 2 * num_pos_feats))
  for b in range(batch):
    for i in range(height):
      for j in range(width):
        y = mask[b, :i + 1, j].sum() / (mask[b, :, j].sum() + 1e-6) * scale
        x = mask[b, i, :j + 1].sum() / (mask[b, i, :].sum() + 1e-6) * scale
        for k in range(num_pos_feats):
          t = temperature ** (2 * (k // 2) / num_pos_feats)
          trig = math.sin if k % 2 == 0 else math.cos
          out[b, i, j, k] = trig(y / t)
          out[b, i, j, num_pos_feats + k] = trig(x / t)
  return out


def test_sine_position_encoding_matches_detr_formula():
  rng = np.random.default_rng(0)
  mask = np.zeros((3, 5, 4), bool)
  mask[0] = True
  mask[1, :3, :2] = True  # Padded bottom/right.
  mask[2] = rng.random((5, 4)) < 0.6  # Any mask.
  got = detr.sine_position_encoding(jnp.asarray(mask), 6)
  np.testing.assert_allclose(got, _naive_sine_encoding(mask, 6), rtol=1e-5, atol=1e-5)
  # The real part of a padded image is encoded as the same image unpadded.
  np.testing.assert_allclose(got[1, :3, :2],
                             detr.sine_position_encoding(jnp.ones((1, 3, 2), bool), 6)[0],
                             rtol=1e-6, atol=1e-6)


def test_mask_resize_is_torch_nearest():
  """F.interpolate(mode="nearest") of a 70x45 map to 3x4 samples rows 0, 23, 46 and columns
  0, 11, 22, 33 (computed with torch 2.14)."""
  grid = np.arange(70)[:, None] * 100 + np.arange(45)[None]
  got = detr.resize_mask_nearest(jnp.asarray(grid[None]), (3, 4))[0]
  np.testing.assert_array_equal(got, [[0, 11, 22, 33], [2300, 2311, 2322, 2333],
                                      [4600, 4611, 4622, 4633]])


class _PatchifyBackbone(nn.Module):
  """A stride-32 patch embedding: each feature sees only its own 32x32 pixels, so the
  features of real pixels are the same with or without padding (padding gets nonzero ones)."""
  num_classes: int = 0

  @nn.compact
  def __call__(self, images, *, train=False):
    del train
    x = nn.Conv(16, (32, 32), strides=32, padding="VALID", name="patchify")(images)
    return x.mean(axis=(1, 2)), {"stage1": x}


def _layer_norm(x, p):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * p[
      "scale"] + p["bias"]


def _attention(p, q, k, v, key_mask):
  """torch.nn.MultiheadAttention (eval) of q [Q, D] over k, v [N, D]; key_mask [N] (True =
  attend), with flax's parameter layout (kernels [D, H, Dh] and [H, Dh, D])."""
  project = lambda x, name: np.einsum("nd,dhk->nhk", x, p[name]["kernel"]) + p[name]["bias"]
  qh, kh, vh = project(q, "query"), project(k, "key"), project(v, "value")
  logits = np.einsum("qhk,nhk->hqn", qh, kh) / np.sqrt(qh.shape[-1])
  logits = np.where(key_mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  heads = np.einsum("hqn,nhk->qhk", weights, vh)
  return np.einsum("qhk,hkd->qd", heads, p["out"]["kernel"]) + p["out"]["bias"]


def _dense(x, p):
  return x @ p["kernel"] + p["bias"]


def _naive_detr_head(params, features, feature_mask, num_layers):
  """DETR's transformer and heads (eval) for one image, written from the paper's code:
  features [h, w, C], feature_mask [h, w] -> (logits [L, Q, C+1], boxes [L, Q, 4])."""
  hidden = params["query_embed"].shape[1]
  pos = _naive_sine_encoding(feature_mask[None], hidden // 2)[0].reshape(-1, hidden)
  key_mask = feature_mask.reshape(-1)
  src = _dense(features.reshape(-1, features.shape[-1]),
               {"kernel": params["input_proj"]["kernel"][0, 0],
                "bias": params["input_proj"]["bias"]})
  ffn = lambda x, p: _dense(np.maximum(_dense(x, p["linear1"]), 0), p["linear2"])
  for i in range(num_layers[0]):
    p = params[f"encoder_layer{i}"]
    src = _layer_norm(src + _attention(p["self_attn"], src + pos, src + pos, src, key_mask),
                      p["norm1"])
    src = _layer_norm(src + ffn(src, p), p["norm2"])
  query_pos = params["query_embed"]
  tgt = np.zeros_like(query_pos)
  everywhere = np.ones(len(query_pos), bool)
  outputs = []
  for i in range(num_layers[1]):
    p = params[f"decoder_layer{i}"]
    tgt = _layer_norm(tgt + _attention(p["self_attn"], tgt + query_pos, tgt + query_pos, tgt,
                                       everywhere), p["norm1"])
    tgt = _layer_norm(tgt + _attention(p["multihead_attn"], tgt + query_pos, src + pos, src,
                                       key_mask), p["norm2"])
    tgt = _layer_norm(tgt + ffn(tgt, p), p["norm3"])
    outputs.append(_layer_norm(tgt, params["decoder_norm"]))
  hs = np.stack(outputs)
  box = params["bbox_embed"]
  box_hidden = np.maximum(_dense(np.maximum(_dense(hs, box["layers_0"]), 0), box["layers_1"]), 0)
  return (_dense(hs, params["class_embed"]),
          1 / (1 + np.exp(-_dense(box_hidden, box["layers_2"]))))


def test_padding_with_pixel_mask_changes_nothing_and_matches_numpy(monkeypatch):
  """Images padded (bottom/right, by multiples of the stride, with random pixels) and their
  pixel_mask give every output of the images alone (the mask reaches the position encoding,
  the encoder's keys and the decoder's cross-attention), and every decoder layer's outputs
  are those of DETR's transformer written naively in numpy."""
  real_get = models.get
  monkeypatch.setattr(models, "get", lambda name: types.SimpleNamespace(
      Model=_PatchifyBackbone) if name == "resnet" else real_get(name))
  model = detr.Model(**{**TINY, "backbone_kwargs": {}, "enc_layers": 2})
  sizes = [(64, 64), (96, 32)]
  padded = _images((2, 128, 96, 3), seed=1)
  pixel_mask = np.zeros((2, 128, 96), bool)
  for b, (h, w) in enumerate(sizes):
    pixel_mask[b, :h, :w] = True
  variables = _random_variables(model, padded, pixel_mask)
  variables["params"]["backbone"]["patchify"]["bias"] += 1.0  # Padding's features nonzero.
  out, aux = jax.jit(model.apply)(variables, padded, pixel_mask=pixel_mask)
  # The second image alone (one compile; the numpy reference covers both in the batch).
  alone, alone_aux = jax.jit(model.apply)(variables, padded[1:, :96, :32])
  for key in ("logits", "boxes"):
    np.testing.assert_allclose(out[key][1], alone[key][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux["decoder_logits"][:, 1], alone_aux["decoder_logits"][:, 0],
                             rtol=1e-5, atol=1e-5)
  for b in range(2):
    logits, boxes = _naive_detr_head(
        jax.tree.map(np.float64, variables["params"]), np.float64(aux["features"][b]),
        pixel_mask[b, ::32, ::32], (2, 2))
    np.testing.assert_allclose(aux["decoder_logits"][:, b], logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(aux["decoder_boxes"][:, b], boxes, rtol=1e-4, atol=1e-5)


def test_training_keeps_backbone_norms_and_uses_dropout(tiny_run):
  """Train mode: the frozen backbone norms come back unchanged and are no parameters (so get
  no gradient or update), and dropout makes train differ from eval, deterministically per
  key."""
  variables, (eval_out, _), train = tiny_run
  params = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  assert [k for k in params if k.startswith("backbone/")] and not [
      k for k in params if k.startswith("backbone/") and "bn" in k]
  out, updated = train(DROPOUT_KEY)
  jax.tree.map(np.testing.assert_array_equal, updated["batch_stats"], variables["batch_stats"])
  assert not np.allclose(out["logits"], eval_out["logits"])
  np.testing.assert_array_equal(out["logits"], train(DROPOUT_KEY)[0]["logits"])
  assert not np.allclose(out["logits"], train(jax.random.key(2, impl="unsafe_rbg"))[0]["logits"])


@pytest.mark.parametrize("backbone, kwargs, stage, grid", [
    ("convnext2", dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 16)), None, (2, 2)),
    ("resnet", TINY["backbone_kwargs"], "stage3", (4, 4)),
    ("internimage", dict(channels=16, depths=(1, 1, 1, 1), group_channels=8), None, (2, 2)),
])
def test_other_backbones_and_stages(backbone, kwargs, stage, grid):
  """Any registered conv backbone; its last "stage<n>" map unless backbone_stage says."""
  model = detr.Model(**{**TINY, "backbone": backbone, "backbone_kwargs": kwargs,
                        "backbone_stage": stage})
  images = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  out, aux = jax.eval_shape(model.apply, variables, images)
  assert aux["features"].shape[1:3] == grid and out["logits"].shape == (1, 5, 4)
  assert "head" not in variables["params"]["backbone"]


def test_default_backbone_is_frozen_resnet50():
  """DETR's default: a headless ResNet-50 (bottlenecks, 3-4-6-3 blocks) with frozen norms."""
  images = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(detr.Model(num_classes=3).init, jax.random.key(0), images)
  backbone = variables["params"]["backbone"]
  assert {k for k in backbone if k.startswith("layer")} == {
      f"layer{s}_block{i}" for s, n in zip(range(1, 5), (3, 4, 6, 3)) for i in range(n)}
  assert backbone["layer4_block2"]["conv3"]["kernel"].shape == (1, 1, 512, 2048)
  assert "head" not in backbone and "bn1" not in backbone
  assert variables["params"]["input_proj"]["kernel"].shape == (1, 1, 2048, 256)


@pytest.mark.parametrize("field, value, match", [
    ("backbone", "nope", "'backbone'"), ("backbone", "detr", "'backbone'"),
    ("hidden", 30, "'hidden'"), ("num_heads", 3, "'hidden'"), ("dropout", 1.0, "'dropout'"),
    ("num_queries", 0, "'num_queries'"), ("dec_layers", 0, "'dec_layers'"),
    ("enc_layers", -1, "'enc_layers'"), ("backbone_kwargs", [1], "'backbone_kwargs'")])
def test_bad_field_is_named(field, value, match):
  with pytest.raises(ValueError, match=match):
    detr.Model(**{**TINY, field: value})


def test_backbone_kwargs_may_be_a_config_dict():
  """A config's `model.backbone_kwargs` arrives as an ml_collections ConfigDict."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  kwargs = ml_collections.ConfigDict(TINY["backbone_kwargs"])
  model = detr.Model(**{**TINY, "backbone_kwargs": kwargs})
  assert model.backbone_model_kwargs() == {**TINY["backbone_kwargs"], "num_classes": 0}


def test_bad_stage_and_mask_are_named():
  images = jnp.zeros((1, 64, 64, 3))
  model = detr.Model(**{**TINY, "backbone_stage": "stage9"})
  with pytest.raises(ValueError, match="'backbone_stage' 'stage9'.*stage4"):
    jax.eval_shape(model.init, jax.random.key(0), images)
  with pytest.raises(ValueError, match="pixel_mask must be"):
    jax.eval_shape(functools.partial(detr.Model(**TINY).init, pixel_mask=jnp.ones((1, 64, 32))),
                   jax.random.key(0), images)
