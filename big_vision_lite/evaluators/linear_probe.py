"""Linear probe: a linear classifier trained on frozen features, then evaluated.

Eval config fields (type "linear_probe"): `train_data`, `data`, `pp` (gives "image" and an
int "label"), `batch_size` (of feature extraction), `num_classes`, `log_steps`, optionally
`use_ema`, and the probe's training: `steps` (default 300), `lr` (default 0.01), `wd`
(default 1e-4).

Features are `task.features` of both splits, standardised per dimension with the mean and
standard deviation of the train split's features. The probe (kernel [D, C] drawn from
N(0, 0.01^2) with the evaluator's seed, zero bias) minimises the mean softmax
cross-entropy over the whole train split with AdamW (weight decay on the kernel) and a
cosine learning-rate decay, for `steps` full-batch steps inside one jitted loop; the
feature bank stays split over the data axes. Reports top-1 / top-5 on `data` and
`train_top1` / `train_loss` on `train_data`, as fractions; equal logits rank the lower
class id first.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from big_vision_lite import sharding
from big_vision_lite.evaluators import REGISTRY
from big_vision_lite.evaluators import knn
from big_vision_lite.input import data as data_lib

DEFAULTS = dict(steps=300, lr=0.01, wd=1e-4)


def standardize_stats(features: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and standard deviation [D] of the real rows (labels >= 0) of features [..., D]."""
  mask = (labels >= 0).astype(jnp.float32)[..., None]  # [..., 1]
  axes = tuple(range(features.ndim - 1))
  count = jnp.maximum(mask.sum(axes), 1.0)
  mean = (features * mask).sum(axes) / count
  var = (jnp.square(features - mean) * mask).sum(axes) / count
  return mean, jnp.sqrt(var + 1e-6)


def probe_logits(params: dict[str, jax.Array], features: jax.Array) -> jax.Array:
  """Logits [..., C] of standardised features [..., D]."""
  return jnp.einsum("...d,dc->...c", features, params["kernel"],
                    precision=jax.lax.Precision.HIGHEST) + params["bias"]


def mean_xent(params: dict[str, jax.Array], features: jax.Array, labels: jax.Array
              ) -> jax.Array:
  """Mean softmax cross-entropy over the real rows (labels >= 0)."""
  logits = probe_logits(params, features)
  mask = labels >= 0
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  return jnp.where(mask, losses, 0.0).sum() / jnp.maximum(mask.sum(), 1)


def train_probe(features: jax.Array, labels: jax.Array, num_classes: int, steps: int,
                lr: float, wd: float, rng: jax.Array) -> dict[str, jax.Array]:
  """Probe params after `steps` full-batch AdamW steps on standardised features [..., D]
  with int labels [...] (-1: not a row)."""
  dim = features.shape[-1]
  params = {"kernel": 0.01 * jax.random.normal(rng, (dim, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=wd,
                   mask={"kernel": True, "bias": False})

  def step(_, carry):
    params, opt_state = carry
    grads = jax.grad(mean_xent)(params, features, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, _ = jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))
  return params


@REGISTRY.register("linear_probe")
class LinearProbeEvaluator:
  """Linear-probe accuracy of frozen features (module docstring)."""

  @classmethod
  def check_fields(cls, eval_config: ml_collections.ConfigDict, field: str) -> None:
    """Raises a ValueError naming the field for a bad value (reads no data)."""
    knn.check_feature_eval_fields(eval_config, field)
    knn.check_positive(eval_config, field, "steps", int)
    knn.check_positive(eval_config, field, "lr", float)
    wd = eval_config.get("wd")
    if wd is not None and (isinstance(wd, bool) or not isinstance(wd, (int, float)) or wd < 0):
      raise ValueError(f"Config field '{field}.wd' must be a float >= 0, got {wd!r}.")

  @classmethod
  def validate_config(cls, eval_config: ml_collections.ConfigDict, field: str) -> None:
    cls.check_fields(eval_config, field)
    data_lib.check_split(eval_config.train_data, f"{field}.train_data")

  def __init__(self, task: Any, mesh: Mesh, eval_config: ml_collections.ConfigDict,
               seed: int = 0):
    field = "evals.<name>"
    self.check_fields(eval_config, field)
    self.config = eval_config
    self.seed = seed
    self.extract = knn.FeatureExtractor(task, mesh, eval_config, normalize=False, field=field)
    settings = {key: eval_config.get(key, default) for key, default in DEFAULTS.items()}
    self._fit_and_score = jax.jit(
        lambda *args: self._probe(*args, num_classes=eval_config.num_classes, **settings),
        out_shardings=sharding.replicated(mesh))

  @staticmethod
  def _probe(train_features: jax.Array, train_labels: jax.Array, test_features: jax.Array,
             test_labels: jax.Array, rng: jax.Array, *, num_classes: int, steps: int,
             lr: float, wd: float) -> dict[str, jax.Array]:
    """Trains on the train bank and counts hits on both banks ([nb, B, D], labels [nb, B])."""
    mean, std = standardize_stats(train_features, train_labels)
    train_features = (train_features - mean) / std
    test_features = (test_features - mean) / std
    params = train_probe(train_features, train_labels, num_classes, steps, lr, wd, rng)

    def hits(features, labels):
      logits = probe_logits(params, features).reshape(-1, num_classes)
      top1, top5 = knn.top1_top5_hits(logits, labels.reshape(-1), min(5, num_classes))
      return top1.sum(), top5.sum()

    test_top1, test_top5 = hits(test_features, test_labels)
    train_top1, _ = hits(train_features, train_labels)
    return {"top1": test_top1, "top5": test_top5, "train_top1": train_top1,
            "train_loss": mean_xent(params, train_features, train_labels)}

  def run(self, variables: dict[str, Any]) -> dict[str, float]:
    train = self.extract(variables, self.config.train_data)
    test = self.extract(variables, self.config.data)
    counts = jax.device_get(self._fit_and_score(
        train.features, train.labels, test.features, test.labels, jax.random.key(self.seed)))
    return {"top1": float(counts["top1"]) / max(test.size, 1),
            "top5": float(counts["top5"]) / max(test.size, 1),
            "train_top1": float(counts["train_top1"]) / max(train.size, 1),
            "train_loss": float(counts["train_loss"])}
