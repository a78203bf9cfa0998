"""ViT: shapes, position embeddings, attention paths and masks, loading, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import models

vit = models.get("vit")
TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=(8, 8))


def _init(model, images):
  return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, images,
                    train=False)


def _images(b=2, h=32, w=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, h, w, 3))


@pytest.mark.parametrize("pool_type,tokens", [("tok", 17), ("gap", 16), ("map", 16)])
def test_pooled_shapes(pool_type, tokens):
  model = vit.Model(num_classes=5, pool_type=pool_type, **TINY)
  images = _images()
  logits, aux = model.apply(_init(model, images), images, return_attention=True)
  assert logits.shape == (2, 5)
  assert aux["stem"].shape == (2, 4, 4, 32)
  assert aux["encoded"].shape == (2, tokens, 32)
  assert aux["pre_logits"].shape == (2, 32)
  assert aux["logits"].shape == (2, 5)
  assert len(aux["attention"]) == 2
  assert aux["attention"][0].shape == (2, 4, tokens, tokens)


def test_pool_none_is_per_token_and_no_head():
  model = vit.Model(num_classes=3, pool_type="none", **TINY)
  images = _images(h=16, w=24)
  out, aux = model.apply(_init(model, images), images)
  assert out.shape == (2, 6, 3)
  headless = vit.Model(num_classes=None, **TINY)
  out, aux = headless.apply(_init(headless, images), images)
  assert out.shape == (2, 32) and "head" not in _init(headless, images)["params"]


@pytest.mark.parametrize("variant,width,depth,heads,patch", [
    ("Ti/16", 192, 12, 3, 16), ("S/8", 384, 12, 6, 8), ("B/32", 768, 12, 12, 32),
    ("L/14", 1024, 24, 16, 14)])
def test_variants(variant, width, depth, heads, patch):
  model = vit.Model(num_classes=4, variant=variant, width=8, depth=1)
  hp = model.hparams()
  assert (hp["width"], hp["depth"], hp["num_heads"], hp["patch_size"], hp["mlp_dim"]) == (
      width, depth, heads, (patch, patch), 4 * width)
  if variant == "Ti/16":
    images = jnp.zeros((1, 32, 32, 3))
    params = jax.eval_shape(lambda: _init(model, images))["params"]
    assert params["embedding"]["kernel"].shape == (16, 16, 3, 192)
    assert len([k for k in params["Transformer"] if k.startswith("encoderblock_")]) == 12


def test_sincos_posemb_matches_naive_formula():
  h, w, d = 3, 5, 16
  got = np.asarray(vit.get_posemb_sincos2d(h, w, d))
  assert got.shape == (1, h * w, d)
  q = d // 4
  omega = 1.0 / 10_000.0 ** (np.arange(q) / (q - 1))
  expected = np.zeros((h * w, d))
  for i in range(h):
    for j in range(w):
      row = i * w + j
      expected[row] = np.concatenate([np.sin(j * omega), np.cos(j * omega),
                                      np.sin(i * omega), np.cos(i * omega)])
  np.testing.assert_allclose(got[0], expected, atol=1e-5)
  model = vit.Model(num_classes=2, posemb="sincos2d", **TINY)
  assert "pos_embedding" not in _init(model, _images())["params"]


def test_attention_maps_and_fused_path_agree():
  model = vit.Model(num_classes=5, pool_type="tok", head_zeroinit=False, **TINY)
  images = _images()
  variables = _init(model, images)
  fused, _ = model.apply(variables, images)
  explicit, aux = model.apply(variables, images, return_attention=True)
  np.testing.assert_allclose(fused, explicit, rtol=1e-5, atol=1e-5)
  for weights in aux["attention"]:
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("return_attention", [False, True])
def test_block_diagonal_mask_isolates_blocks(return_attention):
  block = vit.Encoder1DBlock(mlp_dim=32, num_heads=2)
  x = jax.random.normal(jax.random.key(0), (1, 6, 16))  # [B, N, D]
  segments = jnp.array([1, 1, 1, 2, 2, 2])
  mask = (segments[:, None] == segments[None, :])[None, None]  # [1, 1, N, N]
  variables = block.init(jax.random.key(1), x, mask)
  out, weights = block.apply(variables, x, mask, return_attention=return_attention)
  alone, _ = block.apply(variables, x[:, :3], return_attention=return_attention)
  np.testing.assert_allclose(out[:, :3], alone, rtol=1e-5, atol=1e-5)
  changed = x.at[:, 3:].set(jax.random.normal(jax.random.key(2), (1, 3, 16)))
  out2, _ = block.apply(variables, changed, mask, return_attention=return_attention)
  np.testing.assert_allclose(out2[:, :3], out[:, :3], rtol=1e-6, atol=1e-6)
  if return_attention:
    np.testing.assert_array_equal(np.asarray(weights)[0, :, :3, 3:], 0.0)


def test_resample_posemb():
  posemb = jax.random.normal(jax.random.key(0), (1, 16, 8))
  np.testing.assert_allclose(vit.resample_posemb(posemb, (4, 4)), posemb, atol=1e-6)
  for method in ("bilinear", "bicubic"):
    got = vit.resample_posemb(posemb, (6, 3), method=method)
    expected = jax.image.resize(posemb[0].reshape(4, 4, 8), (6, 3, 8), method=method)
    assert got.shape == (1, 18, 8)
    np.testing.assert_allclose(got[0], expected.reshape(18, 8), atol=1e-6)


def test_load_resamples_pos_embedding():
  model = vit.Model(num_classes=3, pool_type="tok", **TINY)
  small = jax.tree.map(np.asarray, _init(model, _images(h=16, w=16))["params"])
  large = jax.tree.map(np.asarray, _init(model, _images(h=32, w=32))["params"])
  loaded = vit.load(large, small, dict(TINY))
  assert loaded is not small
  assert loaded["pos_embedding"].shape == (1, 16, 32)
  np.testing.assert_allclose(loaded["pos_embedding"],
                             vit.resample_posemb(small["pos_embedding"], (4, 4)), atol=1e-6)
  np.testing.assert_array_equal(loaded["cls"], small["cls"])
  model.apply({"params": loaded}, _images())
  same = vit.load(small, small, dict(TINY))
  np.testing.assert_array_equal(same["pos_embedding"], small["pos_embedding"])


def test_zero_init_head_gives_zero_logits():
  model = vit.Model(num_classes=7, **TINY)
  images = _images()
  logits, _ = model.apply(_init(model, images), images)
  np.testing.assert_array_equal(logits, 0.0)


def test_dropout_only_in_train():
  model = vit.Model(num_classes=5, head_zeroinit=False, dropout=0.3, drop_path=0.3, **TINY)
  images = _images()
  variables = _init(model, images)
  eval1, _ = model.apply(variables, images)
  eval2, _ = model.apply(variables, images, train=False)
  np.testing.assert_array_equal(eval1, eval2)
  train1, _ = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(3)})
  train2, _ = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(4)})
  assert not np.allclose(train1, eval1)
  assert not np.allclose(train1, train2)


@pytest.mark.parametrize("kwargs,field", [
    (dict(variant="X/16"), "variant"), (dict(variant="S/15"), "variant"),
    (dict(pool_type="max"), "pool_type"), (dict(posemb="rope"), "posemb"),
    (dict(final_norm="none"), "final_norm")])
def test_bad_config_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    vit.Model(num_classes=2, **kwargs)
