"""Packed (NaViT) classification: several images per sequence, one label per image slot.

Batch (from `input.packing`): `patches` [B, L, p·p·3], `segment_ids` [B, L], `positions`
[B, L, 2], `image_sizes` [B, S, 2], `labels` [B, S] int, `label_mask` [B, S]. The loss is
the mean over real images of the global batch; empty slots add nothing to the loss, its
gradient or the metrics. Config: `loss` as for "classification"; `input.packing` required.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from big_vision_lite import models
from big_vision_lite.tasks import REGISTRY
from big_vision_lite.tasks import classification

MODEL_INPUTS = ("segment_ids", "positions", "image_sizes")


def check_patch_size(packing: dict[str, Any], model: dict[str, Any], model_name: str,
                     field: str) -> None:
  """The packer's patch size must be the model's (after its `variant`)."""
  patch = models.get(model_name).Model(**model).hparams()["patch_size"]
  if packing.get("patch_size") != patch:
    raise ValueError(f"Config field '{field}.patch_size' ({packing.get('patch_size')!r}) must "
                     f"equal the model's patch size ({patch}).")


@REGISTRY.register("packed_classification")
class PackedClassification(classification.Classification):
  """Packed patches -> per-image logits [B, S, C], cross-entropy on real image slots.

  Shares `per_example_loss` (config field 'loss') with the unpacked task."""

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    classification.validate_loss(config)
    packing = config.input.get("packing")
    if not packing:
      raise ValueError("The packed_classification task needs config field 'input.packing' "
                       "(seq_len, patch_size, max_images, ...; see input/packing.py).")
    check_patch_size(packing, config.model, config.model_name, "input.packing")
    for name, ev in (config.get("evals") or {}).items():
      if ev.get("packing"):
        check_patch_size(ev.packing, config.model, config.model_name, f"evals.{name}.packing")

  def _model_inputs(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    missing = [k for k in ("patches", "labels", "label_mask", *MODEL_INPUTS) if k not in batch]
    if missing:
      raise ValueError(f"The packed_classification task needs packed batches; keys {missing} "
                       f"are missing from {sorted(batch)} (is 'input.packing' set?).")
    return {k: batch[k] for k in MODEL_INPUTS}

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    params_rng, dropout_rng = jax.random.split(rng)
    return dict(self.model.init({"params": params_rng, "dropout": dropout_rng},
                                batch["patches"], train=False, **self._model_inputs(batch)))

  def loss(self, params: Any, extra: dict[str, Any], batch: dict[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, Any]]]:
    logits, _, new_extra = self.apply(params, extra, batch["patches"], rng, train=True,
                                      **self._model_inputs(batch))
    logits = logits.astype(jnp.float32)  # [B, S, C]
    labels = jax.nn.one_hot(batch["labels"], logits.shape[-1])  # [B, S, C]
    mask = batch["label_mask"].astype(jnp.float32)  # [B, S]
    per_image, correct = self.per_example_loss(logits, labels)  # [B, S]
    count = jnp.maximum(mask.sum(), 1.0)
    loss = (per_image * mask).sum() / count
    tokens = (batch["segment_ids"] > 0).mean()
    return loss, ({"loss": loss, "accuracy": (correct * mask).sum() / count,
                   "images_per_row": mask.sum(-1).mean(), "token_fill": tokens}, new_extra)

  def predict(self, variables: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
    logits, _ = self.apply_eval(variables, batch["patches"], **self._model_inputs(batch))
    return logits.astype(jnp.float32)  # [B, S, C]
