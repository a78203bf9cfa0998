"""Text transformer: against a naive numpy forward (masks, pooling, head), padding
invariance, sizes and config errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite.models import text_transformer

SMALL = dict(vocab_size=20, width=8, depth=2, mlp_dim=16, num_heads=2, max_len=8)
# Rows of tokens then padding (0), of lengths 5, 1, 3 and 8 (no padding).
TOKENS = np.array([[3, 7, 2, 9, 1, 0, 0, 0],
                   [1, 0, 0, 0, 0, 0, 0, 0],
                   [5, 5, 1, 0, 0, 0, 0, 0],
                   [4, 6, 8, 10, 12, 14, 16, 1]], np.int32)


@functools.cache
def model_and_params(**kwargs):
  """A small model and random params of its shapes (no LayerNorm scale 1, no bias 0)."""
  model = text_transformer.Model(**{**SMALL, **kwargs})
  shapes = jax.eval_shape(model.init, jax.random.key(0), TOKENS)["params"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: 0.5 * rng.normal(size=s.shape).astype(np.float32), shapes)
  return model, params


@functools.cache
def compiled_apply(model, shape):
  """`model.apply` compiled for tokens of `shape` without XLA's optimisations (cheaper to
  compile for the few calls of a test)."""
  variables = jax.eval_shape(model.init, jax.random.key(0), TOKENS)
  tokens = jax.ShapeDtypeStruct(shape, jnp.int32)
  return jax.jit(model.apply).lower(variables, tokens).compile(
      {"xla_backend_optimization_level": 0})


def apply(model, params, tokens):
  return compiled_apply(model, tokens.shape)({"params": params}, tokens)


def np_layernorm(x, p, eps=1e-6):
  x = x - x.mean(-1, keepdims=True)
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def np_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_mlp(x, p):
  h = np_gelu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def np_attention(xq, xkv, p, allowed):
  """xq [Nq, D], xkv [Nk, D], allowed [Nq, Nk] bool -> [Nq, D], one query at a time."""
  q = np.einsum("nd,dhk->nhk", xq, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("nd,dhk->nhk", xkv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("nd,dhk->nhk", xkv, p["value"]["kernel"]) + p["value"]["bias"]
  heads = np.zeros_like(q)  # [Nq, H, Dh]
  for i in range(len(xq)):
    keys = np.flatnonzero(allowed[i])
    for h in range(q.shape[1]):
      logits = k[keys, h] @ q[i, h] / np.sqrt(q.shape[-1])
      weights = np.exp(logits - logits.max())
      heads[i, h] = (weights / weights.sum()) @ v[keys, h]
  return np.einsum("nhk,hkd->nd", heads, p["out"]["kernel"]) + p["out"]["bias"]


def np_forward(params, tokens, pool_type, causal, depth):
  """The model's output for each row of `tokens`, in float64 numpy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  outs = []
  for row in tokens:
    n = len(row)
    real = np.flatnonzero(row != 0)
    x = p["embedding"]["embedding"][row] + p["pos_embedding"][0, :n]  # [L, D]
    allowed = np.zeros((n, n), bool)
    for i in range(n):
      for j in real:
        allowed[i, j] = (j <= i) or not causal
    for i in range(depth):
      block = p["Transformer"][f"encoderblock_{i}"]
      x = x + np_attention(np_layernorm(x, block["LayerNorm_0"]),
                           np_layernorm(x, block["LayerNorm_0"]),
                           block["MultiHeadDotProductAttention_0"], allowed)
      x = x + np_mlp(np_layernorm(x, block["LayerNorm_1"]), block["MlpBlock_0"])
    x = np_layernorm(x, p["Transformer"]["encoder_norm"])
    if pool_type == "last":
      pooled = x[real.max()]
    elif pool_type == "first":
      pooled = x[0]
    elif pool_type == "gap":
      pooled = x[real].mean(0)
    else:
      head = p["MAPHead_0"]
      y = np_attention(head["probe"][0], x, head["MultiHeadDotProductAttention_0"],
                       (row != 0)[None])[0]
      pooled = y + np_mlp(np_layernorm(y, head["LayerNorm_0"]), head["MlpBlock_0"])
    if "head" in p:
      pooled = pooled @ p["head"]["kernel"] + p["head"]["bias"]
    outs.append(pooled)
  return np.stack(outs)


@pytest.mark.parametrize("pool_type,causal,num_classes", [
    ("last", True, 0), ("first", False, 5), ("gap", True, 0), ("map", False, 0)])
def test_matches_naive_numpy_forward(pool_type, causal, num_classes):
  model, params = model_and_params(pool_type=pool_type, causal=causal,
                                   num_classes=num_classes)
  out, aux = apply(model, params, TOKENS)
  expected = np_forward(params, TOKENS, pool_type, causal, SMALL["depth"])
  np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-5)
  assert out.shape == (len(TOKENS), num_classes or SMALL["width"])
  assert aux["pre_logits"].shape == (len(TOKENS), SMALL["width"])


@pytest.mark.parametrize("pool_type,causal", [("last", True), ("gap", True), ("map", False)])
def test_extra_padding_changes_nothing(pool_type, causal):
  """The three padded rows give the same output padded to 8 tokens or cut to 5."""
  model, params = model_and_params(pool_type=pool_type, causal=causal, num_classes=0)
  long, _ = apply(model, params, TOKENS)
  short, _ = apply(model, params, TOKENS[:, :5])
  np.testing.assert_allclose(short[:3], long[:3], rtol=1e-5, atol=1e-6)
  assert not np.allclose(short[3], long[3], rtol=1e-3)  # The unpadded row was cut.


def test_sizes_explicit_fields_override_variant():
  hp = text_transformer.Model(variant="S").hparams()
  assert hp == dict(width=384, depth=12, mlp_dim=1536, num_heads=6)
  hp = text_transformer.Model(variant="S", width=240, depth=2).hparams()
  assert hp == dict(width=240, depth=2, mlp_dim=960, num_heads=6)
  assert text_transformer.Model().hparams() == dict(width=768, depth=12, mlp_dim=3072,
                                                    num_heads=12)


@pytest.mark.parametrize("kwargs,words", [
    (dict(pool_type="tok"), ["'pool_type'", "last, first, gap, map", "'tok'"]),
    (dict(variant="B/16"), ["'variant'", "Ti, S, M, B", "'B/16'"]),
    (dict(max_len=0), ["'max_len'", ">= 1"]),
    (dict(num_classes=-1), ["'num_classes'", ">= 0"]),
    (dict(width=10, num_heads=4), ["'width'", "'num_heads'"]),
    (dict(causal="yes"), ["'causal'", "False, True"])])
def test_bad_config_names_the_field(kwargs, words):
  with pytest.raises(ValueError) as e:
    text_transformer.Model(**{**SMALL, **kwargs})
  for word in words:
    assert word in str(e.value)


def test_bad_tokens_are_rejected():
  model, params = model_and_params()
  with pytest.raises(ValueError, match="exceed Model field 'max_len' \\(8\\)"):
    model.apply({"params": params}, np.ones((1, 9), np.int32))
  with pytest.raises(ValueError, match="integer tokens"):
    model.apply({"params": params}, np.ones((1, 4), np.float32))
  with pytest.raises(ValueError, match="integer tokens"):
    model.apply({"params": params}, np.ones((4,), np.int32))
