"""Classification evaluator: top-1 / top-5 accuracy and loss over a whole split.

Each example counts exactly once: the eval iterator pads the last batch and marks real
examples in `_mask`. Labels come from `labels` (one-/multi-hot: a prediction is correct
when its class has a positive label) or an int `label`.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from big_vision_lite import sharding
from big_vision_lite.evaluators import REGISTRY
from big_vision_lite.input import data as data_lib


@REGISTRY.register("classification")
class ClassificationEvaluator:
  """Runs `task.predict` over `eval_config.data` and sums correct predictions."""

  def __init__(self, task: Any, mesh: Mesh, eval_config: ml_collections.ConfigDict,
               seed: int = 0):
    del seed
    self.task = task
    self.mesh = mesh
    self.config = eval_config
    self._step = jax.jit(self._counts, out_shardings=sharding.replicated(mesh))

  def _counts(self, variables: dict[str, Any], batch: dict[str, jax.Array]) -> dict[str, Any]:
    logits = self.task.predict(variables, batch)  # [B, C]
    num_classes = logits.shape[-1]
    if "labels" in batch:
      labels = batch["labels"].astype(jnp.float32)  # [B, C]
    elif "label" in batch:
      labels = jax.nn.one_hot(batch["label"], num_classes)
    else:
      raise ValueError("The classification evaluator needs batch key 'labels' or 'label'; "
                       f"got {sorted(batch)} (check field 'pp' of this eval).")
    mask = batch["_mask"].astype(jnp.float32)  # [B]
    top5 = jax.lax.top_k(logits, min(5, num_classes))[1]  # [B, 5]
    hits = jnp.take_along_axis(labels, top5, axis=-1) > 0  # [B, 5]
    loss = optax.softmax_cross_entropy(logits, labels / jnp.maximum(
        labels.sum(-1, keepdims=True), 1e-9))
    return {"top1": (hits[:, 0] * mask).sum(), "top5": (hits.any(-1) * mask).sum(),
            "loss": (loss * mask).sum(), "count": mask.sum()}

  def run(self, variables: dict[str, Any]) -> dict[str, float]:
    totals: dict[str, float] = {}
    batches = data_lib.make_eval_iterator(
        self.config.data, self.config.pp, self.config.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    for local_batch in batches:
      counts = jax.device_get(self._step(variables, sharding.global_batch(local_batch,
                                                                          self.mesh)))
      for k, v in counts.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.pop("count", 0.0), 1.0)
    return {k: v / count for k, v in totals.items()}
