"""Classification evaluators against numpy on fixed logits: top-1 / top-5 / loss over exactly
the real examples of a padded last batch, in 1 process and split over 2 (simulated: each
process's rows from the eval iterator, assembled into the global batch), with the loss the
task trains with (softmax or sigmoid cross-entropy), unpacked and packed."""
import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_vision_lite import sharding
from big_vision_lite.evaluators import classification as evaluators
from big_vision_lite.input import data as data_lib
from big_vision_lite.tasks import classification
from big_vision_lite.tasks import packed_classification

NUM_EXAMPLES = 21
NUM_CLASSES = 10
BATCH_SIZE = 8  # 3 global batches; the last holds 5 real rows and 3 of padding.


class LogitsLookup(nn.Module):
  """A 'model' whose logits are rows of its `table` param [NUM_EXAMPLES, C], picked by the
  example index each input carries in its first value: images [B, 1] -> [B, C]; packed
  patches [B, L, P] (index of slot s at patches[:, s, 0]) -> [B, S, C]."""

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False,
               image_sizes: jax.Array | None = None, **unused: Any) -> tuple[jax.Array, dict]:
    del train, unused
    table = self.param("table", nn.initializers.zeros, (NUM_EXAMPLES, NUM_CLASSES))
    if image_sizes is None:
      return table[inputs[:, 0].astype(jnp.int32)], {}
    return table[inputs[:, :image_sizes.shape[1], 0].astype(jnp.int32)], {}


def fixed_logits() -> tuple[np.ndarray, np.ndarray]:
  """(logits [N, C], int labels [N]) with the label of example i at rank i % C: ranks 0..9
  all occur, so top-1 (3 of 21) and top-5 (11 of 21) differ from top-k for other k. The
  last example, the one the iterator repeats as padding, is a top-1 hit."""
  logits = np.random.default_rng(0).normal(size=(NUM_EXAMPLES, NUM_CLASSES)).astype(np.float32)
  order = np.argsort(-logits, axis=-1)
  labels = order[np.arange(NUM_EXAMPLES), np.arange(NUM_EXAMPLES) % NUM_CLASSES]
  return logits, labels


def multi_hot(labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
  """[N, C]: each int label, plus for odd examples the class ranked (3i + 1) % C."""
  out = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
  order = np.argsort(-logits, axis=-1)
  for i in range(1, len(labels), 2):
    out[i, order[i, (3 * i + 1) % NUM_CLASSES]] = 1.0
  return out


def numpy_metrics(logits: np.ndarray, targets: np.ndarray, loss: str) -> dict[str, float]:
  """Top-1, top-5 and mean training loss over all rows, in float64 numpy. targets [N, C]."""
  logits = logits.astype(np.float64)
  ranked = np.argsort(-logits, axis=-1)  # [N, C], best first
  positive = np.take_along_axis(targets, ranked, axis=-1) > 0  # [N, C]
  if loss == "softmax_xent":
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    per_example = -(targets * log_softmax).sum(-1)
  else:  # -log sigmoid(x) = log(1 + e^-x); -log(1 - sigmoid(x)) = log(1 + e^x).
    per_example = (targets * np.logaddexp(0, -logits)
                   + (1 - targets) * np.logaddexp(0, logits)).sum(-1)
  return {"top1": positive[:, 0].mean(), "top5": positive[:, :5].any(-1).mean(),
          "loss": per_example.mean()}


def make_evaluator(monkeypatch, loss: str, records: list[dict[str, np.ndarray]], pp: str
                   ) -> tuple[evaluators.ClassificationEvaluator, classification.Classification]:
  """The classification evaluator of a `loss`-trained task on `records` (a stand-in
  source), on all 8 CPU devices."""
  monkeypatch.setattr(data_lib, "get_source", lambda data: records)
  task = classification.Classification(ml_collections.ConfigDict(dict(loss=loss)),
                                       LogitsLookup())
  eval_config = ml_collections.ConfigDict(dict(
      data=dict(name="fixed", split="test"), pp=pp, batch_size=BATCH_SIZE))
  return evaluators.ClassificationEvaluator(task, sharding.make_mesh(), eval_config), task


def two_process_batches(eval_config: ml_collections.ConfigDict, seen: list[int]):
  """Global batches as 2 processes assemble them: each process's rows of every batch (its
  own eval iterator), concatenated; appends the real examples' indices to `seen`."""
  parts = [data_lib.make_eval_iterator(eval_config.data, eval_config.pp,
                                       eval_config.batch_size, process_index=p, process_count=2)
           for p in range(2)]
  for local_batches in itertools.zip_longest(*parts):
    assert None not in local_batches, "the processes yield different numbers of batches"
    assert all(len(b["_mask"]) == BATCH_SIZE // 2 for b in local_batches)
    batch = {k: np.concatenate([b[k] for b in local_batches]) for k in local_batches[0]}
    seen += [int(i) for i in batch["image"][batch["_mask"], 0]]
    yield batch


@pytest.mark.parametrize("loss,label_format", [
    ("softmax_xent", "int"), ("softmax_xent", "multi_hot"), ("sigmoid_xent", "onehot"),
    ("sigmoid_xent", "multi_hot")])
def test_metrics_match_numpy_with_padding_in_one_and_two_processes(monkeypatch, loss,
                                                                   label_format):
  logits, labels = fixed_logits()
  targets = (multi_hot(labels, logits) if label_format == "multi_hot"
             else np.eye(NUM_CLASSES, dtype=np.float32)[labels])
  index = lambda i: np.array([i], np.float32)
  if label_format == "int":
    records = [{"image": index(i), "label": labels[i]} for i in range(NUM_EXAMPLES)]
    pp = 'keep("image", "label")'
  elif label_format == "onehot":
    records = [{"image": index(i), "label": labels[i]} for i in range(NUM_EXAMPLES)]
    pp = f'onehot({NUM_CLASSES}, key="label", key_result="labels")|keep("image", "labels")'
  else:
    records = [{"image": index(i), "labels": targets[i]} for i in range(NUM_EXAMPLES)]
    pp = 'keep("image", "labels")'
  evaluator, task = make_evaluator(monkeypatch, loss, records, pp)
  variables = {"params": {"table": jnp.asarray(logits)}}
  want = numpy_metrics(logits, targets, loss)
  assert want["top1"] != want["top5"]

  one = evaluator.run(variables)
  assert set(one) == {"top1", "top5", "loss"}
  for key, value in want.items():
    np.testing.assert_allclose(one[key], value, rtol=1e-5, err_msg=key)

  seen = []
  monkeypatch.setattr(evaluator, "_batches", lambda: two_process_batches(evaluator.config, seen))
  two = evaluator.run(variables)
  assert sorted(seen) == list(range(NUM_EXAMPLES))  # Each real example exactly once.
  for key, value in want.items():
    np.testing.assert_allclose(two[key], value, rtol=1e-5, err_msg=key)

  # The same loss as the task's training step on all examples at once.
  batch = {"image": jnp.asarray(np.stack([r["image"] for r in records])),
           "labels": jnp.asarray(targets)}
  train_loss, _ = task.loss(variables["params"], {}, batch, jax.random.key(0))
  np.testing.assert_allclose(one["loss"], float(train_loss), rtol=1e-5)


@pytest.mark.parametrize("loss", ["softmax_xent", "sigmoid_xent"])
def test_packed_metrics_match_numpy_over_the_real_slots(loss):
  """2 rows x 3 image slots; the empty slots' examples would be top-1 hits if counted."""
  logits, labels = fixed_logits()
  slots = np.array([[0, 20, 10], [3, 20, 20]])  # Example index per slot; [0,2], [1,1:] empty.
  label_mask = np.array([[True, True, False], [True, False, False]])
  patches = np.zeros((2, 8, 4), np.float32)
  patches[:, :3, 0] = slots
  batch = {"patches": patches, "segment_ids": np.ones((2, 8), np.int32),
           "positions": np.zeros((2, 8, 2), np.int32),
           "image_sizes": np.ones((2, 3, 2), np.int32),
           "labels": labels[slots], "label_mask": label_mask}
  config = ml_collections.ConfigDict(dict(loss=loss))
  task = packed_classification.PackedClassification(config, LogitsLookup())
  evaluator = evaluators.PackedClassificationEvaluator(
      task, sharding.make_mesh([("data", 2)]), ml_collections.ConfigDict())
  variables = {"params": {"table": jnp.asarray(logits)}}
  counts = jax.device_get(evaluator._step(variables, sharding.global_batch(batch,
                                                                           evaluator.mesh)))
  real = slots[label_mask]
  want = numpy_metrics(logits[real], np.eye(NUM_CLASSES)[labels[real]], loss)
  assert counts["count"] == 3
  for key, value in want.items():
    np.testing.assert_allclose(counts[key] / 3, value, rtol=1e-5, err_msg=key)


def test_a_task_without_a_classification_loss_is_named():
  class Reconstruction:
    pass

  with pytest.raises(ValueError, match="needs a task with a classification loss.*Reconstruction"):
    evaluators.ClassificationEvaluator(Reconstruction(), sharding.make_mesh(),
                                       ml_collections.ConfigDict())
