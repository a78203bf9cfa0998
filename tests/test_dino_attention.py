"""tools/dino_attention.py: the threshold mask, the [CLS] attention maps, the command line."""
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from big_vision_lite import checkpointing
from big_vision_lite import train
from big_vision_lite.input import data as data_lib
from big_vision_lite.models import dino as dino_model
from big_vision_lite.models import vit
from big_vision_lite.tools import dino_attention
from test_dino import TINY_BACKBONE, tiny_config


def brute_force_masks(values: np.ndarray, threshold: float) -> list[frozenset[int]]:
  """Every smallest set of patches holding `threshold` of the mass and, among those, the
  largest mass (ties give several), by enumerating all subsets."""
  mass = values / values.sum()
  for size in range(1, len(values) + 1):
    sets = [(mass[list(s)].sum(), frozenset(s)) for s in
            itertools.combinations(range(len(values)), size)]
    best = max(m for m, _ in sets)
    if best >= threshold - 1e-9:
      return [s for m, s in sets if m >= best - 1e-12]
  raise AssertionError("unreachable: all patches hold the whole mass")


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9, 1.0])
def test_threshold_mask_is_the_smallest_set_holding_the_mass(threshold):
  rng = np.random.default_rng(0)
  maps = rng.dirichlet(np.full(6, 0.5), size=(3, 2)).reshape(3, 2, 2, 3) * 0.8  # Sum 0.8.
  ties = np.array([[0.05, 0.15, 0.15], [0.15, 0.5, 0.0]])  # 0.6: 0.5 and one 0.15.
  flat_maps = np.concatenate([maps.reshape(-1, 2, 3), [ties, np.full((2, 3), 1 / 6)]])
  masks = dino_attention.threshold_mask(flat_maps, threshold)
  assert masks.shape == flat_maps.shape and masks.dtype == bool
  for values, mask in zip(flat_maps.reshape(-1, 6), masks.reshape(-1, 6)):
    kept = frozenset(np.flatnonzero(mask))
    assert kept in brute_force_masks(values, threshold), (values, kept)
    mass = values / values.sum()
    assert mass[mask].sum() >= threshold - 1e-9
    assert mass[mask].sum() - mass[mask].min() < threshold
  # The ties: exactly one of the three equal 0.15 patches, and 4 of 6 equal patches for 0.6.
  if threshold == 0.6:
    np.testing.assert_array_equal(masks[-2].sum(), 2)
    assert masks[-2][1, 1]
    np.testing.assert_array_equal(masks[-1].sum(), 4)
  # The same mask for the map without its scale: only the shares of the mass count.
  np.testing.assert_array_equal(dino_attention.threshold_mask(flat_maps * 7.0, threshold), masks)


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_threshold_mask_rejects_thresholds_outside_0_1(threshold):
  with pytest.raises(ValueError, match="threshold"):
    dino_attention.threshold_mask(np.ones((2, 2)), threshold)


def _layer_norm(x, params):
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  return x * params["scale"] + params["bias"]


def naive_cls_attention(images: np.ndarray, params, tokens: np.ndarray | None, patch: int
                        ) -> np.ndarray:
  """The last block's softmax attention of token 0 over the patches, in float64 numpy, from
  its input `tokens` [B, 1 + N, D] (None: the patch embedding, computed here) -> [B, H, h, w]."""
  params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
  b, side_h, side_w, _ = images.shape
  h, w = side_h // patch, side_w // patch
  if tokens is None:
    patches = images.reshape(b, h, patch, w, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    embedded = np.einsum("bijpqc,pqcd->bijd", patches, params["embedding"]["kernel"])
    embedded = embedded.reshape(b, h * w, -1) + params["embedding"]["bias"]
    embedded = embedded + params["pos_embedding"][0]
    tokens = np.concatenate([np.repeat(params["cls"], b, 0), embedded], axis=1)
  depth = sum(name.startswith("encoderblock_") for name in params["Transformer"])
  block = params["Transformer"][f"encoderblock_{depth - 1}"]
  x = _layer_norm(np.asarray(tokens, np.float64), block["LayerNorm_0"])
  attention_params = block["MultiHeadDotProductAttention_0"]
  project = lambda name: (np.einsum("bnd,dhe->bhne", x, attention_params[name]["kernel"])
                          + attention_params[name]["bias"][:, None])  # [B, H, 1 + N, Dh]
  query, key = project("query")[:, :, :1], project("key")  # [B, H, 1, Dh], [B, H, 1 + N, Dh]
  logits = np.einsum("bhqe,bhke->bhqk", query, key)[:, :, 0] / np.sqrt(query.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)  # [B, H, 1 + N]
  return weights[:, :, 1:].reshape(b, -1, h, w)


@pytest.mark.parametrize("depth", [1, 2])
def test_cls_attention_equals_naive_last_layer(depth):
  # A 16 x 24 image: a 2 x 3 patch grid, so rows and columns cannot be swapped unnoticed.
  backbone = dict(TINY_BACKBONE, depth=depth, pool_type="tok")
  model = dino_model.Model(out_dim=8, hidden_dim=16, bottleneck_dim=4, backbone=backbone)
  images = jax.random.uniform(jax.random.key(1), (2, 16, 24, 3), minval=-1, maxval=1)
  variables = jax.jit(model.init)(jax.random.key(0), images)
  # Random (not zero-initialised) class token and biases.
  leaves, tree = jax.tree.flatten(variables)
  noise = np.random.default_rng(2)
  variables = jax.tree.unflatten(tree, [
      leaf + 0.3 * noise.normal(size=leaf.shape).astype(np.float32) for leaf in leaves])

  got = np.asarray(dino_attention.cls_attention(variables, model, images))
  assert got.shape == (2, 2, 2, 3)
  tokens = None
  if depth > 1:  # The last block's input, the previous block's output.
    _, aux = jax.jit(model.apply)(variables, images)
    tokens = aux[f"block{depth - 2:02d}"]
  backbone_params = variables["params"]["backbone"]
  want = naive_cls_attention(np.asarray(images), backbone_params, tokens, patch=8)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # Over the patches: 1 minus the [CLS] token's attention to itself, so below 1.
  assert np.all(got.sum((2, 3)) < 1.0)
  # The backbone ViT alone, on the DINO model's backbone params, gives the same maps.
  alone = vit.Model(num_classes=0, **backbone)
  np.testing.assert_allclose(
      dino_attention.cls_attention({"params": backbone_params}, alone, images), got,
      rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("model,field", [
    (dino_model.Model(out_dim=8, backbone=dict(TINY_BACKBONE, pool_type="gap")),
     "'backbone.pool_type' must be 'tok'"),
    (dino_model.Model(out_dim=8, backbone_name="navit", backbone=dict(TINY_BACKBONE)),
     "'backbone_name' must be 'vit'"),
    (vit.Model(num_classes=0, **TINY_BACKBONE), "'pool_type' must be 'tok'"),
])
def test_cls_attention_errors_name_the_field(model, field):
  with pytest.raises(ValueError, match=field):  # Before any compute: no variables needed.
    dino_attention.cls_attention(None, model, jnp.zeros((1, 16, 16, 3)))


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory):
  """A tiny DINO run on 'shapes' (2 global crops of 32 px, patch 8), trained 2 steps."""
  workdir = str(tmp_path_factory.mktemp("dino_attention") / "run")
  train.train_and_evaluate(tiny_config(total_steps=2), workdir)
  return workdir


def test_cli_draws_the_teacher_maps(dino_run, tmp_path, capsys):
  out = str(tmp_path / "attention.png")
  result = dino_attention.main(["--workdir", dino_run, "--out", out, "--num_images", "3"])
  heads, res, scale, gap = TINY_BACKBONE["num_heads"], 32, 4, 2  # Default res: global crops.
  with Image.open(out) as image:
    assert image.size == ((1 + 2 * heads) * (res * scale + gap) + gap,
                          3 * (res * scale + gap) + gap)
    pixels = np.asarray(image.convert("RGB"))
  assert pixels.std() > 0.05 * 255  # Not blank.
  assert result["attention"].shape == result["mask"].shape == (3, heads, 4, 4)
  # The teacher (EMA params) by default, as the paper draws; --student for the student.
  model, _, _ = dino_attention.load_model(dino_run)
  images = _first_test_images(3)
  teacher = {"params": checkpointing.load_variables(dino_run, use_ema=True)["params"]}
  np.testing.assert_allclose(result["attention"],
                             dino_attention.cls_attention(teacher, model, images), rtol=1e-5)
  student = dino_attention.main(["--workdir", dino_run, "--out", out, "--num_images", "3",
                                 "--student"])
  assert np.abs(student["attention"] - result["attention"]).max() > 1e-6
  np.testing.assert_array_equal(result["mask"],
                                dino_attention.threshold_mask(result["attention"], 0.6))
  np.testing.assert_allclose(result["kept_fraction"], result["mask"].mean((0, 2, 3)))
  printed = capsys.readouterr().out
  assert f"wrote {out}" in printed and len(printed.splitlines()) >= 2 + heads


def _first_test_images(count: int) -> jax.Array:
  """The first `count` test images of 'shapes' at 32 px in [-1, 1]."""
  batch = next(data_lib.make_eval_iterator(
      dict(name="shapes", split="test"), 'decode|resize(32)|value_range(-1, 1)|keep("image")',
      count))
  return jnp.asarray(batch["image"])


def test_cli_rejects_a_run_without_class_token(dino_run, tmp_path):
  config_path = tmp_path / "config.json"
  with open(f"{dino_run}/config.json") as f:
    config = json.load(f)
  config["model"]["backbone"]["pool_type"] = "gap"
  config_path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match="'backbone.pool_type' must be 'tok'"):
    dino_attention.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "a.png")])
