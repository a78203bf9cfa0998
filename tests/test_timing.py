"""benchmarks/timing.py: the analytic ViT FLOPs against XLA's count of the same train step."""
import jax
import jax.numpy as jnp
import optax
import pytest

from benchmarks import timing
from big_vision_lite.models import vit


# (width, mlp_dim, heads, patch, res): wide, where the projections and MLP dominate, and
# long (256 tokens), where q·kᵀ and attention·v are a quarter of the FLOPs. XLA also counts
# the elementwise ops the analytic count leaves out: 1-2% here.
@pytest.mark.parametrize("width,mlp_dim,heads,patch,res", [(256, 1024, 4, 8, 32),
                                                           (128, 512, 2, 4, 64)])
@pytest.mark.parametrize("pool_type", ["tok", "gap"])
def test_vit_train_flops_match_xlas_count_of_the_step(width, mlp_dim, heads, patch, res,
                                                      pool_type):
  depth, classes, batch = 2, 10, 2
  model = vit.Model(num_classes=classes, width=width, depth=depth, mlp_dim=mlp_dim,
                    num_heads=heads, patch_size=patch, pool_type=pool_type)
  images = jnp.zeros((batch, res, res, 3))
  labels = jnp.zeros((batch,), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1]))["params"]

  def loss(params):
    logits, _ = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  xla = timing.step_flops(jax.jit(jax.grad(loss)).lower(params))
  analytic = batch * timing.vit_train_flops(width, depth, mlp_dim, patch, res, classes,
                                            class_token=pool_type == "tok")
  assert analytic <= xla <= 1.03 * analytic, (analytic, xla)
  tokens = (res // patch) ** 2
  if pool_type == "gap":  # The closed form, term by term.
    layer = 8 * tokens * width**2 + 4 * tokens * width * mlp_dim + 4 * tokens**2 * width
    embedding = 2 * tokens * 3 * patch**2 * width
    assert analytic == batch * (3 * (depth * layer + 2 * width * classes) + 2 * embedding)
