"""DeepViT: Re-Attention against plain attention and a naive formula; model shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite.models import deepvit
from big_vision_lite.models import layers


def tokens(seed=0, shape=(2, 7, 24)):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_identity_mixing_without_norm_is_plain_attention():
  x = tokens()
  reattention = deepvit.ReAttention(num_heads=3, norm="none")
  params = reattention.init(jax.random.key(0), x)["params"]
  params = dict(params, reattention_weights=jnp.eye(3))
  plain = layers.MultiHeadAttention(num_heads=3)
  plain_params = {k: v for k, v in params.items() if k != "reattention_weights"}
  got, maps = reattention.apply({"params": params}, x)
  want, want_maps = plain.apply({"params": plain_params}, x, return_attention=True)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(maps, want_maps, atol=1e-6)


def test_reattention_maps_follow_the_formula():
  x = tokens(1)
  module = deepvit.ReAttention(num_heads=4)
  params = module.init(jax.random.key(1), x)["params"]
  theta = np.random.default_rng(2).normal(size=(4, 4)).astype(np.float32)
  params = dict(params, reattention_weights=jnp.asarray(theta))
  _, maps = module.apply({"params": params}, x)
  _, plain = layers.MultiHeadAttention(num_heads=4).apply(
      {"params": {k: v for k, v in params.items()
                  if k not in ("reattention_weights", "reattention_norm")}},
      x, return_attention=True)
  mixed = np.einsum("hg,bhqk->bgqk", theta, np.asarray(plain, np.float64))
  mean, var = mixed.mean(1, keepdims=True), mixed.var(1, keepdims=True)
  want = (mixed - mean) / np.sqrt(var + 1e-6)  # LayerNorm over heads, unit scale, zero bias.
  np.testing.assert_allclose(maps, want, atol=1e-4)


def test_model_shapes_depth_override_and_attention_maps():
  model = deepvit.Model(num_classes=5, variant="Ti/16", depth=3, head_zeroinit=False)
  images = tokens(3, (2, 32, 48, 3))
  variables = model.init(jax.random.key(0), images)
  logits, aux = model.apply(variables, images, return_attention=True)
  assert logits.shape == (2, 5)
  assert len(aux["attention"]) == 3 and aux["attention"][0].shape == (2, 3, 7, 7)
  params = variables["params"]
  assert sorted(k for k in params if k.startswith("encoderblock")) == [
      "encoderblock_0", "encoderblock_1", "encoderblock_2"]
  assert params["encoderblock_0"]["ReAttention_0"]["reattention_weights"].shape == (3, 3)
  with pytest.raises(ValueError, match="reattention_norm"):
    deepvit.Model(reattention_norm="batchnorm")
  # Given fields win over the variant; with neither, a 16-block S/16.
  assert deepvit.Model(variant="Ti/16", width=96).hparams()["width"] == 96
  assert deepvit.Model().hparams() == dict(width=384, depth=16, mlp_dim=1536, num_heads=6,
                                           patch_size=(16, 16))


def test_collapse_similarity_is_one_for_equal_layers_and_plot_is_written(tmp_path):
  from big_vision_lite.tools import attention_collapse, plot  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  same = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 5, 5))), -1)
  other = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 5, 5))), -1)
  sims = attention_collapse.layer_similarity([same, same, other])
  np.testing.assert_allclose(sims[0], 1.0, atol=1e-5)
  assert abs(sims[1]) < 0.5
  plot.line_plot({"vit": sims, "deepvit": sims[::-1]}, str(tmp_path / "c.png"), title="t",
                 xlabel="layer")
  assert (tmp_path / "c.png").stat().st_size > 1000
