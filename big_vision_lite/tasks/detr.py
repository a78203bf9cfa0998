"""DETR (Carion et al. 2020): set-prediction detection with Hungarian matching.

Batch (the detection pp ops): `image` [B, S, S, 3] padded images, `pixel_mask` [B, S, S]
(True on real pixels), `boxes` [B, T, 4] (cx, cy, w, h) in [0, 1] of the unpadded image,
`labels` [B, T] and `box_mask` [B, T] (False: a padding slot). The `detr` model returns
every decoder layer's class logits [L, B, Q, C + 1] and boxes [L, B, Q, 4]; each layer is
matched to the targets on its own and adds `losses.detr.set_loss`'s terms, weighted
class_weight · ce + bbox_weight · l1 + giou_weight · giou (the same weights price the
matching, as in the official code's defaults). The box count that normalises l1 and giou
is the global batch's: the loss is the same on 1 or N devices and processes.

Config `detr` fields: `no_object_weight` (0.1), `class_weight` (1), `bbox_weight` (5),
`giou_weight` (2), `aux_loss` (True: every decoder layer; False: the last only) and
`matcher` ("optax": the exact Hungarian algorithm on the device inside the jitted step;
"scipy": linear_sum_assignment on the host through a callback).
The paper's optimiser (AdamW 1e-4, backbone 1e-5, weight decay 1e-4, gradient clipping 0.1)
is config: `lr`, `lr_mults` ((r"backbone/.*", 0.1),), `wd`, `grad_clip_norm`.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from big_vision_lite.losses import detr as detr_losses
from big_vision_lite.tasks import REGISTRY
from big_vision_lite.tasks import base
from big_vision_lite.tasks.base import Task

DEFAULTS = dict(no_object_weight=0.1, class_weight=1.0, bbox_weight=5.0, giou_weight=2.0,
                aux_loss=True, matcher="optax")
BATCH_KEYS = ("image", "pixel_mask", "boxes", "labels", "box_mask")


def options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's `detr` fields with their defaults, checked."""
  opts = base.task_fields(config, "detr", DEFAULTS)
  for name in ("no_object_weight", "class_weight", "bbox_weight", "giou_weight"):
    value = opts[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise ValueError(f"Config field 'detr.{name}' must be a number >= 0, got {value!r}.")
  if not isinstance(opts["aux_loss"], bool):
    raise ValueError(f"Config field 'detr.aux_loss' must be true or false, got "
                     f"{opts['aux_loss']!r}.")
  if opts["matcher"] not in detr_losses.MATCH_METHODS:
    raise ValueError(f"Config field 'detr.matcher' must be one of "
                     f"{', '.join(detr_losses.MATCH_METHODS)}, got {opts['matcher']!r}.")
  return opts


def _require(batch: dict[str, Any]) -> None:
  missing = [key for key in BATCH_KEYS if key not in batch]
  if missing:
    raise ValueError(f"The detr task needs batch keys {list(BATCH_KEYS)}; missing {missing} "
                     f"(the batch has {sorted(batch)}). Use the detection pp ops in config "
                     "field 'input.pp' (see configs/detr.py).")


@REGISTRY.register("detr")
class DETR(Task):
  """Padded images -> Q (class, box) predictions, trained with the Hungarian set loss."""

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    base.require_model_name(config, "detr")
    options(config)

  def __init__(self, config: ml_collections.ConfigDict, model: Any, mesh: Any = None):
    super().__init__(config, model, mesh)
    self.options = options(config)

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    params_rng, dropout_rng = jax.random.split(rng)
    return dict(self.model.init({"params": params_rng, "dropout": dropout_rng},
                                batch["image"], train=False, pixel_mask=batch.get("pixel_mask")))

  def layer_losses(self, aux: dict[str, Any], batch: dict[str, jax.Array]
                   ) -> list[dict[str, jax.Array]]:
    """`set_loss` terms of each decoder layer that the loss uses (the last one last)."""
    opts = self.options
    layer_logits, layer_boxes = aux["decoder_logits"], aux["decoder_boxes"]  # [L, B, Q, ...]
    layers = range(layer_logits.shape[0]) if opts["aux_loss"] else [layer_logits.shape[0] - 1]
    num_boxes = batch["box_mask"].sum()  # Global: the batch is sharded over all devices.
    return [detr_losses.set_loss(
        layer_logits[i], layer_boxes[i], batch["labels"], batch["boxes"], batch["box_mask"],
        num_boxes=num_boxes, no_object_weight=opts["no_object_weight"],
        class_weight=opts["class_weight"], bbox_weight=opts["bbox_weight"],
        giou_weight=opts["giou_weight"], method=opts["matcher"]) for i in layers]

  def weighted(self, terms: dict[str, jax.Array]) -> jax.Array:
    """class_weight · ce + bbox_weight · l1 + giou_weight · giou of one layer."""
    opts = self.options
    return (opts["class_weight"] * terms["ce"] + opts["bbox_weight"] * terms["l1"]
            + opts["giou_weight"] * terms["giou"])

  def loss(self, params: Any, extra: dict[str, Any], batch: dict[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, Any]]]:
    _require(batch)
    _, aux, new_extra = self.apply(params, extra, batch["image"], rng, True,
                                   pixel_mask=batch["pixel_mask"])
    per_layer = self.layer_losses(aux, batch)
    loss = sum(self.weighted(terms) for terms in per_layer)
    metrics = {"loss": loss, **{f"last_{k}": v for k, v in per_layer[-1].items()}}
    return loss, (metrics, new_extra)

  def predict(self, variables: dict[str, Any], batch: dict[str, jax.Array]
              ) -> dict[str, jax.Array]:
    """{"logits": [B, Q, C + 1], "boxes": [B, Q, 4]} (cx, cy, w, h) of the last layer."""
    out, _ = self.apply_eval(variables, batch["image"], pixel_mask=batch.get("pixel_mask"))
    return {"logits": out["logits"].astype(jnp.float32),
            "boxes": out["boxes"].astype(jnp.float32)}
