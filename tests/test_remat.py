"""remat_policy: every policy gives each transformer model's logits and gradients of the
plain model (same params, same names), is really applied (the traced forward holds remat
blocks), and an unknown one is named."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import models

SMALL = dict(width=16, depth=1, mlp_dim=32, num_heads=2)
CASES = {
    "vit": dict(SMALL, num_classes=3, patch_size=4),
    "navit": dict(SMALL, num_classes=3, patch_size=4),
    "deepvit": dict(SMALL, num_classes=3, patch_size=4),
    "memory_vit": dict(SMALL, num_classes=3, patch_size=4, pool_type="tok", task_classes=(2,),
                       num_memory=2),
    "text_transformer": dict(SMALL, vocab_size=50, max_len=8, num_classes=3, causal=True),
}
POLICIES = ("full", "dots", "dots_with_no_batch_dims")


def inputs(name: str) -> np.ndarray:
  rng = np.random.default_rng(0)
  if name == "text_transformer":
    tokens = rng.integers(2, 50, (2, 8)).astype(np.int32)
    tokens[0, 5:] = 0  # Padding.
    return tokens
  return rng.normal(size=(2, 16, 16, 3)).astype(np.float32)


def loss_fn(model, x):
  def loss(params):
    out, _ = model.apply({"params": params}, x, train=True)
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))
  return loss


@pytest.mark.parametrize("name", sorted(CASES))
def test_policies_change_no_logits_or_gradients(name):
  """ViT under every policy, the other models (which share `layers.remat`) under "full"."""
  module, x = models.get(name), inputs(name)
  plain = module.Model(**CASES[name])
  params = plain.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jnp.ones_like(p), params)  # Zero heads too.
  want_value, want_grads = jax.jit(jax.value_and_grad(loss_fn(plain, x)))(params)
  assert "remat" not in str(jax.make_jaxpr(loss_fn(plain, x))(params))
  for policy in POLICIES if name == "vit" else ("full",):
    model = module.Model(**CASES[name], remat_policy=policy)
    assert jax.tree.structure(jax.eval_shape(model.init, jax.random.key(0), x)["params"]) == (
        jax.tree.structure(params))
    assert "remat" in str(jax.make_jaxpr(loss_fn(model, x))(params)), policy
    value, grads = jax.jit(jax.value_and_grad(loss_fn(model, x)))(params)
    np.testing.assert_allclose(value, want_value, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 grads, want_grads)


def test_unknown_policy_is_named():
  with pytest.raises(ValueError, match="'remat_policy' must be one of none, full, dots"):
    models.get("vit").Model(remat_policy="everything")
