"""DETR's boxes and Hungarian matching (Carion et al. 2020): box conversions, pairwise
(G)IoU with torchvision's semantics, the official HungarianMatcher's cost, and an exact
minimum-cost assignment run on the device (optax's jittable Hungarian algorithm) or on the
host (scipy's linear_sum_assignment through a callback), both usable inside jit.

Boxes are (cx, cy, w, h) or (x0, y0, x1, y1) in the last axis. Degenerate boxes: a pair whose
union has zero area has IoU 0 (torchvision gives NaN), and when the enclosing box has zero
area the GIoU penalty term is 0, so GIoU = IoU; the guards keep values and gradients finite.
Boxes with x1 < x0 or y1 < y0 give meaningless values (torchvision asserts instead).
"""
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

MatchMethod = Literal["optax", "scipy"]
MATCH_METHODS = ("optax", "scipy")


def box_cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """(cx, cy, w, h) -> (x0, y0, x1, y1), any leading shape [..., 4]."""
  center, size = boxes[..., :2], boxes[..., 2:]
  return jnp.concatenate([center - 0.5 * size, center + 0.5 * size], axis=-1)


def box_xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """(x0, y0, x1, y1) -> (cx, cy, w, h), any leading shape [..., 4]."""
  low, high = boxes[..., :2], boxes[..., 2:]
  return jnp.concatenate([0.5 * (low + high), high - low], axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
  """Area of (x0, y0, x1, y1) boxes [..., 4] -> [...]."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator where denominator > 0, else 0 (finite gradients too)."""
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pairwise IoU and union area of (x0, y0, x1, y1) boxes [N, 4] and [M, 4] -> ([N, M],
  [N, M]); IoU is 0 where the union is empty."""
  area1, area2 = box_area(boxes1), box_area(boxes2)  # [N], [M]
  low = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
  high = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [N, M, 2]
  overlap = jnp.clip(high - low, min=0)  # [N, M, 2]
  intersection = overlap[..., 0] * overlap[..., 1]  # [N, M]
  union = area1[:, None] + area2[None, :] - intersection  # [N, M]
  return _safe_divide(intersection, union), union


def generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Pairwise generalized IoU (Rezatofighi et al. 2019) of (x0, y0, x1, y1) boxes [N, 4] and
  [M, 4] -> [N, M] in [-1, 1]: IoU - (enclosing area - union) / enclosing area."""
  iou, union = box_iou(boxes1, boxes2)
  low = jnp.minimum(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
  high = jnp.maximum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [N, M, 2]
  extent = jnp.clip(high - low, min=0)  # [N, M, 2]
  enclosing = extent[..., 0] * extent[..., 1]  # [N, M]
  return iou - _safe_divide(enclosing - union, enclosing)


def matching_cost(pred_logits: jax.Array, pred_boxes: jax.Array, target_labels: jax.Array,
                  target_boxes: jax.Array, *, class_weight: float = 1.0,
                  bbox_weight: float = 5.0, giou_weight: float = 2.0) -> jax.Array:
  """The official DETR HungarianMatcher's cost [B, Q, T] between every query and target:
  -class_weight * softmax(pred_logits)[target class] + bbox_weight * L1(cxcywh boxes)
  - giou_weight * GIoU.

  pred_logits [B, Q, C + 1] (last class: no object), pred_boxes [B, Q, 4] and target_boxes
  [B, T, 4] as (cx, cy, w, h), target_labels [B, T] ints in [0, C). Padding targets may hold
  any label and box (labels are clipped into range); their columns are finite and the
  matchers ignore them through target_mask.
  """
  num_classes = pred_logits.shape[-1]
  probs = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)  # [B, Q, C + 1]
  labels = jnp.clip(target_labels, 0, num_classes - 1)  # [B, T]
  labels = jnp.broadcast_to(labels[:, None, :], probs.shape[:2] + labels.shape[1:])  # [B, Q, T]
  class_prob = jnp.take_along_axis(probs, labels, axis=-1)  # [B, Q, T]
  pred_boxes = pred_boxes.astype(jnp.float32)
  target_boxes = target_boxes.astype(jnp.float32)
  l1 = jnp.abs(pred_boxes[:, :, None, :] - target_boxes[:, None, :, :]).sum(-1)  # [B, Q, T]
  giou = jax.vmap(generalized_box_iou)(box_cxcywh_to_xyxy(pred_boxes),
                                       box_cxcywh_to_xyxy(target_boxes))  # [B, Q, T]
  return -class_weight * class_prob + bbox_weight * l1 - giou_weight * giou


def _check_method(method: str) -> None:
  if method not in MATCH_METHODS:
    raise ValueError(f"method={method!r}: the matcher must be one of {MATCH_METHODS}.")


def _scipy_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Host: scipy's minimum-cost assignment of one [Q, T] cost, rows ascending, int32."""
  query_idx, target_idx = scipy.optimize.linear_sum_assignment(np.asarray(cost, np.float64))
  return query_idx.astype(np.int32), target_idx.astype(np.int32)


def hungarian_match(cost: jax.Array, *,
                    method: MatchMethod = "optax") -> tuple[jax.Array, jax.Array]:
  """A minimum-cost assignment of a finite cost [Q, T] (queries x targets), jittable.

  Returns (query_idx [K], target_idx [K]) int32 with K = min(Q, T), sorted by query, with no
  repeated query or target; cost[query_idx, target_idx].sum() is the minimum (ties may pick a
  different assignment than scipy). method="optax" solves on the device
  (optax.assignment.hungarian_algorithm), "scipy" on the host (linear_sum_assignment through
  jax.pure_callback).
  """
  _check_method(method)
  cost = jnp.asarray(cost, jnp.float32)
  num_matches = min(cost.shape)
  if method == "scipy":
    out_shape = jax.ShapeDtypeStruct((num_matches,), jnp.int32)
    return jax.pure_callback(_scipy_assignment, (out_shape, out_shape), cost,
                             vmap_method="sequential")
  query_idx, target_idx = optax.assignment.hungarian_algorithm(cost)  # [K], [K]
  order = jnp.argsort(query_idx)
  return query_idx[order].astype(jnp.int32), target_idx[order].astype(jnp.int32)


def _mask_targets(cost: jax.Array, target_mask: jax.Array) -> jax.Array:
  """Padding columns of one cost [Q, T] set to 1 + the largest real cost (at least 1).

  Any assignment that leaves a real target unmatched while a query sits on a padding target
  gets cheaper by moving that query to the real target, so the minimum matches min(Q, #real)
  real targets; the padding columns then add the same constant to every such assignment, so
  the real pairs are a minimum-cost assignment of the real columns alone.
  """
  largest = jnp.max(cost, where=target_mask[None, :], initial=0.0)
  return jnp.where(target_mask[None, :], cost, largest + 1.0)


def _scipy_batched_assignment(cost: np.ndarray, target_mask: np.ndarray) -> np.ndarray:
  """Host: the query matched to each real target of costs [B, Q, T] ([B, T] int32, Q where
  the target is padding or unmatched), scipy on the real columns only."""
  batch, num_queries, num_targets = cost.shape
  query_for_target = np.full((batch, num_targets), num_queries, np.int32)
  for example in range(batch):
    real_targets = np.flatnonzero(target_mask[example])
    query_idx, column_idx = _scipy_assignment(cost[example][:, real_targets])
    query_for_target[example, real_targets[column_idx]] = query_idx
  return query_for_target


def batched_hungarian_match(
    cost: jax.Array, target_mask: jax.Array | None = None, *,
    method: MatchMethod = "optax") -> tuple[jax.Array, jax.Array, jax.Array]:
  """Minimum-cost assignments of a batch of finite costs [B, Q, T] whose padding targets
  (target_mask [B, T] False) are never matched; jittable, fixed shapes, T = 0 allowed.

  Returns, target-major, (query_idx [B, T], target_idx [B, T], valid [B, T]): target t of
  example b is matched to query query_idx[b, t] where valid[b, t]; target_idx[b] is
  arange(T). Every real target is matched when Q >= #real targets (else min(Q, #real) of
  them are). Where valid is False, query_idx is Q (out of range: scatters with JAX's default
  mode drop it, gathers clamp it, so weight them by valid). The valid pairs of each example
  are a minimum-cost assignment of its real targets. method as in hungarian_match ("optax"
  vmaps the device solver over the batch, "scipy" makes one host callback per batch).
  """
  _check_method(method)
  cost = jnp.asarray(cost, jnp.float32)
  batch, num_queries, num_targets = cost.shape
  if target_mask is None:
    target_mask = jnp.ones((batch, num_targets), bool)
  target_mask = jnp.asarray(target_mask, bool)
  if method == "scipy":
    query_for_target = jax.pure_callback(
        _scipy_batched_assignment, jax.ShapeDtypeStruct((batch, num_targets), jnp.int32),
        cost, target_mask, vmap_method="sequential")
  else:
    def one_example(example_cost, example_mask):  # [Q, T], [T] -> [T]
      query_idx, target_idx = optax.assignment.hungarian_algorithm(
          _mask_targets(example_cost, example_mask))  # [K], [K]
      unmatched = jnp.full((num_targets,), num_queries, jnp.int32)
      return unmatched.at[target_idx].set(query_idx.astype(jnp.int32))

    query_for_target = jax.vmap(one_example)(cost, target_mask)  # [B, T]
  valid = target_mask & (query_for_target < num_queries)
  query_idx = jnp.where(valid, query_for_target, num_queries)
  target_idx = jnp.broadcast_to(jnp.arange(num_targets, dtype=jnp.int32), (batch, num_targets))
  return query_idx, target_idx, valid


def set_loss(pred_logits: jax.Array, pred_boxes: jax.Array, target_labels: jax.Array,
             target_boxes: jax.Array, target_mask: jax.Array, *, num_boxes: jax.Array,
             no_object_weight: float = 0.1, class_weight: float = 1.0,
             bbox_weight: float = 5.0, giou_weight: float = 2.0,
             method: MatchMethod = "optax") -> dict[str, jax.Array]:
  """DETR's SetCriterion on one decoder layer: Hungarian matching on `matching_cost` (no
  gradient through it), then the unweighted loss terms.

  pred_logits [B, Q, C + 1] (class C: no object), pred_boxes [B, Q, 4], target_boxes
  [B, T, 4] (cx, cy, w, h), target_labels [B, T], target_mask [B, T] (False: padding).
  Returns scalars:
    ce:    cross-entropy of every query against its matched label or "no object", weighted
           by `no_object_weight` for no-object queries and normalised by the sum of the
           weights (torch's weighted `cross_entropy`, here over the whole global batch);
    l1:    sum over matched pairs of the L1 distance of the (cx, cy, w, h) boxes / num_boxes;
    giou:  sum over matched pairs of 1 - GIoU / num_boxes;
    class_error: 100 - top-1 accuracy (%) of the matched queries (a logged diagnostic).
  `num_boxes` is the number of real target boxes (DETR sums it over all processes; inside
  jit on global arrays `target_mask.sum()` already is that sum), clamped to at least 1.
  """
  num_classes = pred_logits.shape[-1] - 1
  pred_logits = pred_logits.astype(jnp.float32)
  pred_boxes = pred_boxes.astype(jnp.float32)
  cost = matching_cost(jax.lax.stop_gradient(pred_logits), jax.lax.stop_gradient(pred_boxes),
                       target_labels, target_boxes, class_weight=class_weight,
                       bbox_weight=bbox_weight, giou_weight=giou_weight)  # [B, Q, T]
  query_idx, _, valid = batched_hungarian_match(cost, target_mask, method=method)  # [B, T]
  batch, num_queries = pred_logits.shape[:2]
  rows = jnp.arange(batch)[:, None]  # [B, 1]
  # Unmatched targets carry query index Q, which the scatter drops.
  query_labels = jnp.full((batch, num_queries), num_classes, jnp.int32).at[
      rows, query_idx].set(target_labels.astype(jnp.int32), mode="drop")  # [B, Q]
  weights = jnp.where(query_labels == num_classes, no_object_weight, 1.0)  # [B, Q]
  log_probs = jax.nn.log_softmax(pred_logits, axis=-1)  # [B, Q, C + 1]
  nll = -jnp.take_along_axis(log_probs, query_labels[..., None], axis=-1)[..., 0]  # [B, Q]
  ce = (weights * nll).sum() / weights.sum()

  matched = jnp.minimum(query_idx, num_queries - 1)[..., None]  # [B, T, 1]; `valid` marks real
  matched_boxes = jnp.take_along_axis(pred_boxes, matched, axis=1)  # [B, T, 4]
  matched_logits = jnp.take_along_axis(pred_logits, matched, axis=1)  # [B, T, C + 1]
  target_boxes = target_boxes.astype(jnp.float32)
  num_boxes = jnp.maximum(jnp.asarray(num_boxes, jnp.float32), 1.0)
  l1 = jnp.abs(matched_boxes - target_boxes).sum(-1)  # [B, T]
  giou = jax.vmap(jax.vmap(lambda a, b: generalized_box_iou(a[None], b[None])[0, 0]))(
      box_cxcywh_to_xyxy(matched_boxes), box_cxcywh_to_xyxy(target_boxes))
  correct = matched_logits.argmax(-1) == target_labels  # [B, T]
  num_matched = jnp.maximum(valid.sum(), 1)
  return {"ce": ce,
          "l1": jnp.where(valid, l1, 0.0).sum() / num_boxes,
          "giou": jnp.where(valid, 1.0 - giou, 0.0).sum() / num_boxes,
          "class_error": 100.0 - 100.0 * jnp.where(valid, correct, False).sum() / num_matched}
