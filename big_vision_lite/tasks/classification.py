"""Supervised image classification: softmax or sigmoid cross-entropy on `labels`.

Batch: `image` [B, H, W, 3] float32, `labels` [B, C] (one-hot or multi-hot, from the
`onehot` pp op). Config: `loss` = "softmax_xent" (default) | "sigmoid_xent".
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from big_vision_lite.tasks import REGISTRY
from big_vision_lite.tasks.base import Task

LOSSES = ("softmax_xent", "sigmoid_xent")


def _require(batch: dict[str, Any], key: str) -> None:
  if key not in batch:
    raise ValueError(f"The classification task needs batch key {key!r}; the batch has "
                     f"{sorted(batch)}. Add e.g. `onehot(<num_classes>, key=\"label\", "
                     f"key_result=\"{key}\")` to config field 'input.pp'.")


def validate_loss(config: ml_collections.ConfigDict) -> None:
  loss = config.get("loss", "softmax_xent")
  if loss not in LOSSES:
    raise ValueError(f"Config field 'loss' must be one of {', '.join(LOSSES)}, got {loss!r}.")
  model = config.get("model", {})
  if not (model.get("num_classes") or model.get("task_classes")):
    raise ValueError(f"Config field 'model.num_classes' (or 'model.task_classes' for a model "
                     f"with several heads) must be set (> 0) for the {config.task} task.")


def per_example_loss(logits: jax.Array, labels: jax.Array, kind: str | None
                     ) -> tuple[jax.Array, jax.Array]:
  """logits, labels [..., C] -> (loss [...], top-1 correct [...]); kind as config 'loss'.

  softmax_xent: -Σ_c labels_c · log softmax(logits)_c (multi-hot labels are not
  renormalised); sigmoid_xent: the binary cross-entropy summed over the C classes.
  """
  if (kind or "softmax_xent") == "softmax_xent":
    loss = optax.softmax_cross_entropy(logits, labels)
  else:
    loss = optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1)
  correct = jnp.take_along_axis(labels, logits.argmax(-1)[..., None], axis=-1)[..., 0] > 0
  return loss, correct


@REGISTRY.register("classification")
class Classification(Task):
  """Image -> logits, trained with cross-entropy against `labels`."""

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    validate_loss(config)

  def loss(self, params: Any, extra: dict[str, Any], batch: dict[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, Any]]]:
    _require(batch, "labels")
    logits, _, new_extra = self.apply(params, extra, batch["image"], rng, train=True)
    logits = logits.astype(jnp.float32)  # [B, C]
    labels = batch["labels"].astype(jnp.float32)  # [B, C]
    per_example, correct = self.per_example_loss(logits, labels)
    loss = per_example.mean()
    return loss, ({"loss": loss, "accuracy": correct.mean()}, new_extra)

  def per_example_loss(self, logits: jax.Array, labels: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """The training loss of config field 'loss' (and top-1 correct) per example, as
    `per_example_loss`; evaluators report the same loss."""
    return per_example_loss(logits, labels, self.config.get("loss"))

  def predict(self, variables: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
    logits, _ = self.apply_eval(variables, batch["image"])
    return logits.astype(jnp.float32)  # [B, C]
