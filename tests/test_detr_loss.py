"""DETR's set loss against a naive per-image numpy version of the official SetCriterion
(scipy's exact matching, torch's weighted cross-entropy written out, closed-form GIoU)."""
import jax
import numpy as np
import pytest
import scipy.optimize

from big_vision_lite.losses import detr

WEIGHTS = dict(class_weight=1.0, bbox_weight=5.0, giou_weight=2.0)


def naive_giou(a, b):
  """GIoU of two (x0, y0, x1, y1) boxes, written out."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  return inter / union - (hull - union) / hull


def xyxy(box):
  cx, cy, w, h = box
  return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def naive_set_loss(logits, boxes, labels, targets, mask, no_object_weight, num_boxes):
  """The official SetCriterion (loss_labels, loss_boxes) one image at a time, float64;
  `num_boxes` as the official code's box count summed over processes."""
  batch, num_queries, num_classes_plus_1 = logits.shape
  no_object = num_classes_plus_1 - 1
  ce_num = ce_den = l1 = giou = 0.0
  for b in range(batch):
    z = logits[b].astype(np.float64)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    real = np.flatnonzero(mask[b])
    cost = np.zeros((num_queries, len(real)))
    for q in range(num_queries):
      for j, t in enumerate(real):
        cost[q, j] = (-WEIGHTS["class_weight"] * probs[q, labels[b, t]]
                      + WEIGHTS["bbox_weight"] * np.abs(boxes[b, q] - targets[b, t]).sum()
                      - WEIGHTS["giou_weight"] * naive_giou(xyxy(boxes[b, q]),
                                                            xyxy(targets[b, t])))
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    classes = np.full(num_queries, no_object)
    classes[rows] = labels[b, real[cols]]
    for q in range(num_queries):
      weight = no_object_weight if classes[q] == no_object else 1.0
      ce_num -= weight * np.log(probs[q, classes[q]])
      ce_den += weight
    for q, j in zip(rows, cols):
      target = targets[b, real[j]]
      l1 += np.abs(boxes[b, q] - target).sum()
      giou += 1.0 - naive_giou(xyxy(boxes[b, q]), xyxy(target))
  return {"ce": ce_num / ce_den, "l1": l1 / num_boxes, "giou": giou / num_boxes}


def random_problem(seed, batch=4, num_queries=6, num_targets=3, num_classes=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, num_queries, num_classes + 1)).astype(np.float32)
  centers = rng.uniform(0.2, 0.8, size=(batch, num_queries + num_targets, 2))
  sizes = rng.uniform(0.05, 0.4, size=(batch, num_queries + num_targets, 2))
  all_boxes = np.concatenate([centers, sizes], -1).astype(np.float32)
  boxes, targets = all_boxes[:, :num_queries], all_boxes[:, num_queries:]
  labels = rng.integers(0, num_classes, size=(batch, num_targets)).astype(np.int32)
  mask = rng.random((batch, num_targets)) < 0.7
  mask[0], mask[1] = False, True  # An image without boxes and one with every slot real.
  targets = np.where(mask[..., None], targets, 0.0).astype(np.float32)
  return logits, boxes, labels, targets, mask


@pytest.mark.parametrize("method", ["optax", "scipy"])
@pytest.mark.parametrize("no_object_weight,other_boxes", [(0.1, 0), (1.0, 5)])
def test_set_loss_matches_the_naive_official_criterion(method, no_object_weight, other_boxes):
  """other_boxes: boxes on other processes, which count in the normaliser only."""
  loss_fn = jax.jit(lambda *a: detr.set_loss(
      *a, num_boxes=a[-1].sum() + other_boxes, no_object_weight=no_object_weight,
      method=method, **WEIGHTS))
  for seed in range(3):
    problem = random_problem(seed)
    got = jax.device_get(loss_fn(*problem))
    expected = naive_set_loss(*problem, no_object_weight, problem[-1].sum() + other_boxes)
    for key, value in expected.items():
      np.testing.assert_allclose(got[key], value, rtol=2e-5, err_msg=key)


def test_no_targets_gives_pure_no_object_cross_entropy_and_zero_box_terms():
  logits, boxes, labels, targets, _ = random_problem(0, batch=2)
  mask = np.zeros(labels.shape, bool)
  got = jax.jit(lambda *a: detr.set_loss(*a, num_boxes=0))(logits, boxes, labels, targets,
                                                           mask)
  log_probs = jax.nn.log_softmax(logits.astype(np.float64), -1)
  np.testing.assert_allclose(got["ce"], -np.asarray(log_probs)[..., -1].mean(), rtol=1e-5)
  assert float(got["l1"]) == 0.0 and float(got["giou"]) == 0.0


def test_gradient_reaches_the_logits_and_only_the_matched_boxes():
  logits, boxes, labels, targets, mask = random_problem(1)

  def total(logits, boxes):
    terms = detr.set_loss(logits, boxes, labels, targets, mask, num_boxes=mask.sum())
    return terms["ce"] + 5 * terms["l1"] + 2 * terms["giou"]

  grad_logits, grad_boxes = jax.jit(jax.grad(total, argnums=(0, 1)))(logits, boxes)
  assert np.isfinite(grad_logits).all() and np.isfinite(grad_boxes).all()
  # Image 0 has no targets: its boxes get no gradient, its logits only the no-object term.
  assert not np.asarray(grad_boxes[0]).any()
  # Boxes of unmatched queries get none either: at most #real rows per image move.
  moved = np.abs(np.asarray(grad_boxes)).sum(-1) > 0  # [B, Q]
  np.testing.assert_array_equal(moved.sum(-1), mask.sum(-1))
