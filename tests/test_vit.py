"""ViT: shapes, position embeddings, attention paths and masks, loading, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import models
from big_vision_lite.models import layers
from big_vision_lite.tasks import base

vit = models.get("vit")
TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=(8, 8))


def _init(module, *args, **kwargs):
  """Random variables of the right shapes; skips flax's initialisers, slow to run eagerly."""
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


@functools.cache
def _jit_apply(module):
  return jax.jit(module.apply, static_argnames=("train", "return_attention"))


def _apply(module, variables, *args, **kwargs):
  """`module.apply`, jitted once per module config: cheaper than eager op-by-op compiles."""
  return _jit_apply(module)(variables, *args, **kwargs)


def _normal(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _images(b=2, h=32, w=32, seed=0):
  return _normal((b, h, w, 3), seed)


@pytest.mark.parametrize("pool_type,tokens", [("tok", 17), ("gap", 16), ("map", 16)])
def test_pooled_shapes(pool_type, tokens):
  model = vit.Model(num_classes=5, pool_type=pool_type, **TINY)
  images = _images()
  variables = _init(model, images)
  logits, aux = _apply(model, variables, images, return_attention=True)
  assert logits.shape == (2, 5)
  assert aux["stem"].shape == (2, 4, 4, 32)
  assert aux["encoded"].shape == (2, tokens, 32)
  assert aux["pre_logits"].shape == (2, 32)
  assert aux["logits"].shape == (2, 5)
  assert [a.shape for a in aux["attention"]] == [(2, 4, tokens, tokens)] * 2
  params = variables["params"]
  assert ("cls" in params) == (pool_type == "tok")
  assert ("MAPHead_0" in params) == (pool_type == "map")
  assert params["pos_embedding"].shape == (1, 16, 32)
  block = params["Transformer"]["encoderblock_1"]
  assert sorted(block) == ["LayerNorm_0", "LayerNorm_1", "MlpBlock_0",
                           "MultiHeadDotProductAttention_0"]
  attn = block["MultiHeadDotProductAttention_0"]
  assert attn["query"]["kernel"].shape == (32, 4, 8)
  assert attn["out"]["kernel"].shape == (4, 8, 32)
  assert "encoder_norm" in params["Transformer"]


def test_pool_none_post_pool_and_headless():
  model = vit.Model(num_classes=3, pool_type="none", **TINY)
  images = _images(h=16, w=24)
  out, aux = _apply(model, _init(model, images), images)
  assert out.shape == (2, 6, 3) and aux["pre_logits"].shape == (2, 6, 32)
  headless = vit.Model(num_classes=None, final_norm="post_pool", **TINY)
  variables = _init(headless, images)
  out, _ = _apply(headless, variables, images)
  assert out.shape == (2, 32)
  assert "head" not in variables["params"] and "fc_norm" in variables["params"]
  assert "encoder_norm" not in variables["params"]["Transformer"]


@pytest.mark.parametrize("variant,width,depth,heads,patch", [
    ("Ti/16", 192, 12, 3, 16), ("S/8", 384, 12, 6, 8), ("B/32", 768, 12, 12, 32),
    ("L/14", 1024, 24, 16, 14), ("H/14", 1280, 32, 16, 14)])
def test_variants(variant, width, depth, heads, patch):
  model = vit.Model(num_classes=4, variant=variant)
  hp = model.hparams()
  assert (hp["width"], hp["depth"], hp["num_heads"], hp["patch_size"], hp["mlp_dim"]) == (
      width, depth, heads, (patch, patch), 4 * width)
  images = np.zeros((1, 2 * patch, 3 * patch, 3), np.float32)
  (logits, aux), variables = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), images))
  assert logits.shape == (1, 4) and aux["encoded"].shape == (1, 6, width)
  params = variables["params"]
  assert params["embedding"]["kernel"].shape == (patch, patch, 3, width)
  assert len([k for k in params["Transformer"] if k.startswith("encoderblock_")]) == depth


def test_given_fields_win_over_variant():
  """As big_vision's {**variant, **kwargs}: S/16 with depth=2 builds 2 blocks of S/16."""
  model = vit.Model(num_classes=4, variant="S/16", depth=2, patch_size=32)
  assert model.hparams() == dict(width=384, depth=2, mlp_dim=1536, num_heads=6,
                                 patch_size=(32, 32))
  params = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 64, 64, 3)))["params"]
  assert len([k for k in params["Transformer"] if k.startswith("encoderblock_")]) == 2
  assert params["embedding"]["kernel"].shape == (32, 32, 3, 384)
  # Sizes neither given nor in a variant are B/16's; a given width without mlp_dim has 4x.
  assert vit.Model(width=64, num_heads=2).hparams() == dict(
      width=64, depth=12, mlp_dim=256, num_heads=2, patch_size=(16, 16))
  assert vit.Model(variant="S/16", mlp_dim=100).hparams()["mlp_dim"] == 100
  # With a variant, a given width keeps the variant's mlp_dim ({**variant, **kwargs}).
  assert vit.Model(variant="S/16", width=192).hparams()["mlp_dim"] == 1536


def test_sincos_posemb_matches_naive_formula():
  h, w, d = 3, 5, 16
  got = np.asarray(vit.get_posemb_sincos2d(h, w, d))
  assert got.shape == (1, h * w, d)
  q = d // 4
  omega = [1.0 / 10_000.0 ** (k / (q - 1)) for k in range(q)]
  expected = np.zeros((h * w, d))
  for i in range(h):
    for j in range(w):
      for k in range(q):
        expected[i * w + j, [k, q + k, 2 * q + k, 3 * q + k]] = [
            np.sin(j * omega[k]), np.cos(j * omega[k]),
            np.sin(i * omega[k]), np.cos(i * omega[k])]
  np.testing.assert_allclose(got[0], expected, atol=1e-5)
  model = vit.Model(num_classes=2, posemb="sincos2d", **TINY)
  assert "pos_embedding" not in _init(model, _images())["params"]


def test_returning_attention_maps_keeps_the_logits():
  model = vit.Model(num_classes=5, pool_type="tok", **TINY)
  images = _images()
  variables = _init(model, images)
  plain, plain_aux = _apply(model, variables, images)
  explicit, aux = _apply(model, variables, images, return_attention=True)
  assert "attention" not in plain_aux
  np.testing.assert_allclose(plain, explicit, rtol=1e-5, atol=1e-5)
  assert len(aux["attention"]) == 2
  for weights in aux["attention"]:
    assert weights.shape == (2, 4, 17, 17)
    assert np.all(np.asarray(weights) >= 0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


def test_block_diagonal_mask_isolates_blocks():
  block = vit.Encoder1DBlock(mlp_dim=32, num_heads=2)
  x = _normal((1, 6, 16))  # [B, N, D]
  segments = np.array([1, 1, 1, 2, 2, 2])
  mask = (segments[:, None] == segments[None, :])[None, None]  # [1, 1, N, N]
  variables = _init(block, x, mask)
  changed = np.concatenate([x[:, :3], _normal((1, 3, 16), seed=2)], axis=1)
  alone, _ = _apply(block, variables, x[:, :3])
  outs = {}
  for return_attention in (False, True):
    out, weights = _apply(block, variables, x, mask, return_attention=return_attention)
    out2, _ = _apply(block, variables, changed, mask, return_attention=return_attention)
    np.testing.assert_allclose(out2[:, :3], out[:, :3], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[:, :3], alone, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out2[:, 3:], out[:, 3:])
    outs[return_attention] = out
  np.testing.assert_allclose(outs[False], outs[True], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(weights)[0, :, :3, 3:], 0.0)
  np.testing.assert_array_equal(np.asarray(weights)[0, :, 3:, :3], 0.0)


def test_map_head_mask_ignores_masked_tokens():
  head = layers.MAPHead(mlp_dim=32, num_heads=2)
  x = _normal((2, 5, 16))  # [B, N, D]
  valid = np.array([True, True, True, False, False])
  variables = _init(head, x)
  masked = _apply(head, variables, x, mask=valid[None, None, None, :])
  np.testing.assert_allclose(masked, _apply(head, variables, x[:, :3]), rtol=1e-5, atol=1e-5)


def _plane(ys, xs, coefficients):
  """Position embeddings [1, len(ys)·len(xs), D] of the planes a·y + b·x + c (coefficients
  [3, D]) at grid rows `ys` and columns `xs` (in old-grid cell indices)."""
  y, x = np.meshgrid(np.asarray(ys, np.float64), np.asarray(xs, np.float64), indexing="ij")
  a, b, c = np.asarray(coefficients, np.float64)
  values = y[..., None] * a + x[..., None] * b + c  # [h, w, D]
  return values.reshape(1, -1, values.shape[-1]).astype(np.float32)


# Resampling n cells to m: new cell u's centre (u + 1/2)·n/m in old-grid units is old cell
# index (u + 1/2)·n/m − 1/2; bilinear interpolation of a plane gives the plane there,
# held at the edge value beyond the outer old centres (index clamped to [0, n − 1]).
CENTRES_4_TO_8 = [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3]  # −0.25 and 3.25 clamped
CENTRES_4_TO_6 = [0, 0.5, 7 / 6, 11 / 6, 2.5, 3]  # −1/6 and 19/6 clamped
CENTRES_2_TO_4 = [0, 0.25, 0.75, 1]
PLANES = [[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [1.0, 0.5, 0.0]]  # [3, D=3]: y, x, y + x/2


def test_resample_posemb_gives_a_planes_values_at_the_new_centres():
  posemb = _plane(range(4), range(4), PLANES)
  np.testing.assert_array_equal(vit.resample_posemb(posemb, (4, 4)), posemb)
  got = vit.resample_posemb(posemb, (8, 6))
  assert got.shape == (1, 48, 3)
  np.testing.assert_allclose(got, _plane(CENTRES_4_TO_8, CENTRES_4_TO_6, PLANES), atol=1e-5)
  rect = vit.resample_posemb(_plane(range(2), range(4), PLANES), (4, 8), old_hw=(2, 4))
  np.testing.assert_allclose(rect, _plane(CENTRES_2_TO_4, CENTRES_4_TO_8, PLANES), atol=1e-5)
  # Bicubic reproduces a plane where all 4 taps lie inside the grid: new rows/cols 3 and 4.
  cubic = np.asarray(vit.resample_posemb(posemb, (8, 8), method="bicubic")).reshape(8, 8, 3)
  np.testing.assert_allclose(cubic[3:5, 3:5].reshape(1, 4, 3),
                             _plane([1.25, 1.75], [1.25, 1.75], PLANES), atol=1e-5)
  # Down 8 -> 4: new centres at old 0.5, 2.5, 4.5, 6.5; the antialiasing filter (4 taps,
  # symmetric) reproduces the plane at the inner two.
  down = np.asarray(vit.resample_posemb(_plane(range(8), range(8), PLANES), (4, 4)))
  np.testing.assert_allclose(down.reshape(4, 4, 3)[1:3, 1:3].reshape(1, 4, 3),
                             _plane([2.5, 4.5], [2.5, 4.5], PLANES), atol=1e-5)
  with pytest.raises(ValueError, match="old_hw"):
    vit.resample_posemb(posemb[:, :12], (4, 4))
  with pytest.raises(ValueError, match="method"):
    vit.resample_posemb(posemb, (4, 4), method="cubic_spline")


def test_load_resamples_pos_embedding():
  """A 32 px checkpoint (4x4 grid) loaded into the 64 px model (8x8): its planar
  pos_embedding takes the plane's values at the new centres; the class token and every
  other param stay exactly as saved."""
  model = vit.Model(num_classes=3, pool_type="tok", **TINY)
  small = jax.tree.map(np.asarray, _init(model, _images(h=32, w=32))["params"])
  large = jax.tree.map(np.asarray, _init(model, _images(h=64, w=64))["params"])
  planes = _normal((3, TINY["width"]), seed=1)
  small["pos_embedding"] = _plane(range(4), range(4), planes)
  loaded = vit.load(large, small, dict(TINY))
  assert loaded["pos_embedding"].shape == large["pos_embedding"].shape == (1, 64, 32)
  np.testing.assert_allclose(loaded["pos_embedding"],
                             _plane(CENTRES_4_TO_8, CENTRES_4_TO_8, planes), atol=1e-5)
  assert np.abs(small["cls"]).min() > 0  # A class token that zeros would not fake.
  for name, value in small.items():
    if name != "pos_embedding":
      jax.tree.map(np.testing.assert_array_equal, loaded[name], value)
  logits, _ = _apply(model, {"params": loaded}, _images(h=64, w=64))
  assert logits.shape == (2, 3)
  same = vit.load(small, small, dict(TINY))
  np.testing.assert_array_equal(same["pos_embedding"], small["pos_embedding"])
  rect = dict(small, pos_embedding=np.zeros((1, 6, 32), np.float32))
  with pytest.raises(ValueError, match="not a square grid"):
    vit.load(large, rect, dict(TINY))


def test_zero_init_head_gives_zero_logits():
  model = vit.Model(num_classes=7, **dict(TINY, depth=1))
  images = _images()
  variables = jax.jit(model.init)(jax.random.key(0), images)
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"], 0.0)
  np.testing.assert_array_equal(variables["params"]["head"]["bias"], 0.0)
  logits, _ = _apply(model, variables, images)
  np.testing.assert_array_equal(logits, 0.0)


@pytest.mark.parametrize("dropout,drop_path", [(0.3, 0.0), (0.0, 0.5)])
def test_dropout_and_drop_path_only_in_train(dropout, drop_path):
  model = vit.Model(num_classes=5, dropout=dropout, drop_path=drop_path, **TINY)
  images = _images()
  variables = _init(model, images)
  plain = vit.Model(num_classes=5, **TINY)
  eval_out, eval_aux = _apply(model, variables, images)
  np.testing.assert_array_equal(eval_out, _apply(plain, variables, images)[0])
  train1, aux = _apply(model, variables, images, train=True, rngs={"dropout": jax.random.key(3)})
  train2, _ = _apply(model, variables, images, train=True, rngs={"dropout": jax.random.key(4)})
  assert not np.allclose(train1, eval_out)
  assert not np.allclose(train1, train2)
  if not dropout:  # Drop-path rises linearly from 0: the first block never drops.
    np.testing.assert_allclose(aux["block00"], eval_aux["block00"], rtol=1e-5, atol=1e-5)


def test_bfloat16_matmuls():
  model = vit.Model(num_classes=5, dtype_mm="bfloat16", **TINY)
  images = _images()
  variables = _init(model, images)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  out, aux = _apply(model, variables, images)
  assert aux["stem"].dtype == jnp.bfloat16
  reference, _ = _apply(vit.Model(num_classes=5, **TINY), variables, images)
  np.testing.assert_allclose(out.astype(np.float32), reference, rtol=0.1, atol=0.1)


def test_config_compute_dtype_reaches_the_matmuls():
  """compute_dtype=bfloat16 in a config: the built ViT, run as a task runs it (params and
  images cast), multiplies in bfloat16 (every dot_general and the patch conv), unless
  model.dtype_mm says else."""
  config = {"model_name": "vit", "compute_dtype": "bfloat16",
            "model": dict(num_classes=5, **TINY)}
  images = _images()

  def operand_dtypes(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        yield from (str(v.aval.dtype) for v in eqn.invars)
      for param in eqn.params.values():
        for sub in param if isinstance(param, tuple) else (param,):
          if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
            yield from operand_dtypes(getattr(sub, "jaxpr", sub))

  def matmul_dtypes(config):
    model = models.from_config(config)
    variables = base.cast_floating(_init(model, images), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, images.astype(jnp.bfloat16)))(variables)
    return set(operand_dtypes(jaxpr.jaxpr))

  assert matmul_dtypes(config) == {"bfloat16"}
  config["model"]["dtype_mm"] = "float32"
  assert "float32" in matmul_dtypes(config)
  assert models.from_config(dict(config, compute_dtype=None)).dtype_mm == "float32"


@pytest.mark.parametrize("kwargs,field", [
    (dict(variant="X/16"), "variant"), (dict(variant="S/15"), "variant"),
    (dict(pool_type="max"), "pool_type"), (dict(posemb="rope"), "posemb"),
    (dict(final_norm="none"), "final_norm"), (dict(dtype_mm="int8"), "dtype_mm"),
    (dict(width=30, num_heads=4), "num_heads"), (dict(drop_path=1.0), "drop_path")])
def test_bad_config_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    vit.Model(num_classes=2, **kwargs)


def test_variant_error_lists_accepted_values():
  with pytest.raises(ValueError, match=r"Ti, S, M, B, L, H.*8, 14, 16, 32"):
    vit.Model(variant="XL/16")


def test_bad_images_are_rejected():
  model = vit.Model(num_classes=2, **TINY)
  with pytest.raises(ValueError, match="NHWC"):
    _init(model, np.zeros((2, 3, 32, 32), np.float32))
  with pytest.raises(ValueError, match="NHWC"):
    _init(model, np.zeros((2, 32, 32, 3), np.uint8))
