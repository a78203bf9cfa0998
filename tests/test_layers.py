"""Shared layers: attention, stochastic depth, channel rounding, patchify, the conv paths,
ConvBN."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import models
from big_vision_lite.models import layers


@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_matches_flax_multi_head_attention(with_mask):
  """Same parameter names, so flax's own module with our variables is the reference."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)  # [B, Nq, D]
  kv = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)  # [B, Nk, D]
  mask = None
  if with_mask:
    mask = jnp.asarray(rng.random((2, 1, 7, 5)) < 0.6).at[..., 0].set(True)  # [B, 1, Nq, Nk]
  ours = layers.MultiHeadAttention(num_heads=4)
  variables = ours.init(jax.random.key(0), x, kv, mask)
  out, weights = ours.apply(variables, x, kv, mask, return_attention=True)
  plain, no_weights = ours.apply(variables, x, kv, mask)
  reference = nn.MultiHeadDotProductAttention(num_heads=4).apply(variables, x, kv, mask=mask)
  np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(plain, reference, rtol=1e-5, atol=1e-5)
  assert no_weights is None and weights.shape == (2, 4, 7, 5)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  if with_mask:
    assert np.all(np.asarray(weights)[~np.broadcast_to(mask, weights.shape)] == 0)


def test_stochastic_depth_drops_whole_examples():
  x = np.ones((4000, 3, 2), np.float32)
  y = np.asarray(jax.jit(layers.stochastic_depth, static_argnums=1)(x, 0.25, jax.random.key(0)))
  kept = y[:, 0, 0] > 0
  assert np.all(y[kept] == 1 / 0.75) and np.all(y[~kept] == 0)
  assert abs(kept.mean() - 0.75) < 0.03


@pytest.mark.parametrize("value, round_limit, expected", [
    (37.0, 0.9, 40), (36.0, 0.9, 40), (35.0, 0.9, 32), (3.0, 0.9, 8),
    # 19 -> 16 loses more than 10%: timm's default adds one divisor; round_limit=0 does not.
    (19.0, 0.9, 24), (19.0, 0.0, 16), (96.0, 0.0, 96), (100.0, 0.0, 104)])
def test_make_divisible_matches_timm_rule(value, round_limit, expected):
  assert layers.make_divisible(value, 8, round_limit) == expected


def test_check_choice_names_field_and_accepted_values():
  with pytest.raises(ValueError, match=r"'pool_type' must be one of tok, gap; got 'max'"):
    layers.check_choice("pool_type", "max", ("tok", "gap"))


def test_patchify_layout_and_inverse():
  images = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
  patches = np.asarray(layers.patchify(jnp.asarray(images), 4))  # [2, 2, 3, 48]
  assert patches.shape == (2, 2, 3, 48)
  for y in range(2):
    for x in range(3):
      naive = images[:, 4 * y:4 * y + 4, 4 * x:4 * x + 4].reshape(2, -1)
      np.testing.assert_array_equal(patches[:, y, x], naive)
  np.testing.assert_array_equal(layers.unpatchify(jnp.asarray(patches), 3, 4), images)
  cropped = layers.patchify(jnp.asarray(images[:, :7, :13]), 4)  # Partial patches dropped.
  np.testing.assert_array_equal(cropped, patches[:, :1])


@pytest.mark.parametrize("kernel_size, strides, groups", [
    (1, 1, 1), (1, 2, 1), (3, 1, 1), (3, 2, 6), (5, 1, 6), (3, 1, 2)])
def test_conv_paths_match_flax_conv(kernel_size, strides, groups):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 10, 6)), jnp.float32)
  pad = (kernel_size - 1) // 2
  reference = nn.Conv(6, (kernel_size,) * 2, strides=strides, padding=((pad, pad),) * 2,
                      feature_group_count=groups, use_bias=False)
  variables = reference.init(jax.random.key(0), x)
  expected = reference.apply(variables, x)
  for impl in layers.CONV_IMPLS:
    conv = layers.Conv(6, kernel_size, strides, groups, impl)
    assert jax.tree.map(jnp.shape, conv.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, variables)
    out = conv.apply(variables, x)
    if impl == "xla":
      np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_conv_bn_names_zero_scale_and_bad_impl():
  x = jnp.ones((1, 4, 4, 3))
  variables = layers.ConvBN(8, 3, zero_scale=True).init(jax.random.key(0), x)
  assert set(variables["params"]) == {"conv", "bn"}
  assert set(variables["batch_stats"]["bn"]) == {"mean", "var"}
  np.testing.assert_array_equal(variables["params"]["bn"]["scale"], np.zeros(8))
  with pytest.raises(ValueError, match=r"'conv_impl' must be one of xla, shifted"):
    layers.ConvBN(8, conv_impl="fft").init(jax.random.key(0), x)


def test_layers_is_not_a_registered_model():
  assert "layers" not in models.KNOWN
  with pytest.raises(ValueError, match="Unknown model_name 'layers'"):
    models.get("layers")
