"""Classification evaluators: top-1 / top-5 accuracy and loss over a whole split.

"classification": one image per row. Each example counts exactly once: the eval iterator
pads the last batch and marks real examples in `_mask`. Labels come from `labels`
(one-/multi-hot: a prediction is correct when its class has a positive label) or an int
`label`. The loss is the task's training loss (`task.per_example_loss`, config field
'loss': softmax or sigmoid cross-entropy).
"packed_classification": images packed NaViT-style (eval field `packing`: seq_len,
patch_size, max_images), at the resolution the eval's pp leaves them (native without a
resize, or any fixed size with `resize(...)`; images of more than seq_len tokens are
scaled down to fit); real images are the slots in `label_mask`.
"""
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from big_vision_lite import sharding
from big_vision_lite.evaluators import REGISTRY
from big_vision_lite.input import data as data_lib
from big_vision_lite.input import packing as packing_lib


ExampleLoss = Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]]


def count_hits(logits: jax.Array, labels: jax.Array, mask: jax.Array,
               per_example_loss: ExampleLoss) -> dict[str, jax.Array]:
  """Sums of top-1 / top-5 hits, loss and count over rows where `mask` [N] is set.

  logits [N, C]; labels [N, C] (one-/multi-hot) or int [N]; `per_example_loss(logits,
  labels [N, C]) -> (loss [N], ...)` is the task's.
  """
  num_classes = logits.shape[-1]
  if labels.ndim == 1:
    labels = jax.nn.one_hot(labels, num_classes)
  labels = labels.astype(jnp.float32)  # [N, C]
  mask = mask.astype(jnp.float32)  # [N]
  top5 = jax.lax.top_k(logits, min(5, num_classes))[1]  # [N, 5]
  hits = jnp.take_along_axis(labels, top5, axis=-1) > 0  # [N, 5]
  loss, _ = per_example_loss(logits, labels)  # [N]
  return {"top1": (hits[:, 0] * mask).sum(), "top5": (hits.any(-1) * mask).sum(),
          "loss": (loss * mask).sum(), "count": mask.sum()}


@REGISTRY.register("classification")
class ClassificationEvaluator:
  """Runs `task.predict` over `eval_config.data` and sums correct predictions."""

  def __init__(self, task: Any, mesh: Mesh, eval_config: ml_collections.ConfigDict,
               seed: int = 0):
    del seed
    if not hasattr(task, "per_example_loss"):
      raise ValueError(f"The {type(self).__name__} (config field 'evals.<name>.type') needs a "
                       "task with a classification loss (task 'classification' or "
                       f"'packed_classification'); got {type(task).__name__}.")
    self.task = task
    self.mesh = mesh
    self.config = eval_config
    self._step = jax.jit(self._counts, out_shardings=sharding.replicated(mesh))

  def _counts(self, variables: dict[str, Any], batch: dict[str, jax.Array]) -> dict[str, Any]:
    logits = self.task.predict(variables, batch)  # [B, C]
    for key in ("labels", "label"):
      if key in batch:
        return count_hits(logits, batch[key], batch["_mask"], self.task.per_example_loss)
    raise ValueError("The classification evaluator needs batch key 'labels' or 'label'; "
                     f"got {sorted(batch)} (check field 'pp' of this eval).")

  def _batches(self) -> Iterator[dict[str, np.ndarray]]:
    return data_lib.make_eval_iterator(
        self.config.data, self.config.pp, self.config.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())

  def run(self, variables: dict[str, Any]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for local_batch in self._batches():
      counts = jax.device_get(self._step(variables, sharding.global_batch(local_batch,
                                                                          self.mesh)))
      for k, v in counts.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.pop("count", 0.0), 1.0)
    return {k: v / count for k, v in totals.items()}


@REGISTRY.register("packed_classification")
class PackedClassificationEvaluator(ClassificationEvaluator):
  """Accuracy of per-image logits [B, S, C] over the image slots of packed batches."""

  @classmethod
  def validate_config(cls, eval_config: ml_collections.ConfigDict, field: str) -> None:
    if not eval_config.get("packing"):
      raise ValueError(f"Config field '{field}.packing' (seq_len, patch_size, max_images) is "
                       "required by the packed_classification evaluator.")
    packing_lib.validate(eval_config.packing, f"{field}.packing")

  def _counts(self, variables: dict[str, Any], batch: dict[str, jax.Array]) -> dict[str, Any]:
    logits = self.task.predict(variables, batch)  # [B, S, C]
    return count_hits(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                      batch["label_mask"].reshape(-1), self.task.per_example_loss)

  def _batches(self) -> Iterator[dict[str, np.ndarray]]:
    return data_lib.make_packed_eval_iterator(
        self.config.data, self.config.pp, self.config.batch_size, self.config.packing,
        process_index=jax.process_index(), process_count=jax.process_count())
