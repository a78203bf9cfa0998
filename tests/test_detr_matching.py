"""DETR boxes and matching: assignments against scipy's exact solver, (G)IoU against closed
forms and a naive numpy loop, the matching cost against a naive loop over (b, q, t)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from big_vision_lite.losses import detr


def scipy_total(cost: np.ndarray) -> float:
  rows, cols = scipy.optimize.linear_sum_assignment(np.asarray(cost, np.float64))
  return float(np.asarray(cost, np.float64)[rows, cols].sum())


def assert_valid_assignment(query_idx, target_idx, num_queries, num_targets):
  query_idx, target_idx = np.asarray(query_idx), np.asarray(target_idx)
  assert query_idx.shape == target_idx.shape == (min(num_queries, num_targets),)
  assert len(set(query_idx.tolist())) == len(query_idx)
  assert len(set(target_idx.tolist())) == len(target_idx)
  assert np.all((0 <= query_idx) & (query_idx < num_queries))
  assert np.all((0 <= target_idx) & (target_idx < num_targets))
  np.testing.assert_array_equal(query_idx, np.sort(query_idx))


@pytest.mark.parametrize("method", ["optax", "scipy"])
@pytest.mark.parametrize("num_queries,num_targets,use_jit", [
    (7, 3, True), (5, 5, True), (3, 6, True), (5, 0, True), (0, 4, True),
    (7, 3, False), (5, 0, False)])
def test_match_has_scipys_total_cost(method, num_queries, num_targets, use_jit):
  match = lambda cost: detr.hungarian_match(cost, method=method)
  match = jax.jit(match) if use_jit else match
  rng = np.random.default_rng(num_queries * 10 + num_targets)
  for _ in range(3):
    cost = rng.normal(size=(num_queries, num_targets)).astype(np.float32)
    query_idx, target_idx = match(cost)
    assert_valid_assignment(query_idx, target_idx, num_queries, num_targets)
    np.testing.assert_allclose(cost[np.asarray(query_idx), np.asarray(target_idx)].sum(),
                               scipy_total(cost), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["optax", "scipy"])
@pytest.mark.parametrize("num_queries,num_targets", [(8, 5), (6, 6), (4, 7)])
def test_match_with_many_ties_has_scipys_total_cost(method, num_queries, num_targets):
  match = jax.jit(lambda cost: detr.hungarian_match(cost, method=method))
  rng = np.random.default_rng(num_queries + num_targets)
  for _ in range(5):
    cost = rng.integers(0, 3, size=(num_queries, num_targets)).astype(np.float32)
    query_idx, target_idx = match(cost)
    assert_valid_assignment(query_idx, target_idx, num_queries, num_targets)
    assert cost[np.asarray(query_idx), np.asarray(target_idx)].sum() == scipy_total(cost)


def random_masks(rng, batch, num_targets):
  """Target masks with an all-padding and an all-real example, the rest random."""
  masks = rng.random((batch, num_targets)) < 0.6
  masks[0], masks[1] = False, True
  return masks


@pytest.mark.parametrize("method", ["optax", "scipy"])
@pytest.mark.parametrize("num_queries,num_targets,integer_costs,use_jit", [
    (6, 4, False, True), (3, 5, False, True), (5, 5, True, True), (4, 0, False, True),
    (6, 4, False, False), (4, 0, False, False)])
def test_batched_match_skips_padding_and_has_scipys_cost_on_real_targets(
    method, num_queries, num_targets, integer_costs, use_jit):
  match = lambda cost, mask: detr.batched_hungarian_match(cost, mask, method=method)
  match = jax.jit(match) if use_jit else match
  rng = np.random.default_rng(num_queries + 7 * num_targets)
  batch = 8
  if integer_costs:
    cost = rng.integers(0, 3, size=(batch, num_queries, num_targets)).astype(np.float32)
  else:
    cost = rng.normal(size=(batch, num_queries, num_targets)).astype(np.float32)
  masks = random_masks(rng, batch, num_targets)
  query_idx, target_idx, valid = map(np.asarray, match(cost, masks))
  assert query_idx.shape == target_idx.shape == valid.shape == (batch, num_targets)
  for example in range(batch):
    np.testing.assert_array_equal(target_idx[example], np.arange(num_targets))
    assert not np.any(valid[example] & ~masks[example]), "a padding target was matched"
    real = np.flatnonzero(masks[example])
    assert valid[example].sum() == min(num_queries, len(real))
    matched_queries = query_idx[example][valid[example]]
    assert len(set(matched_queries.tolist())) == len(matched_queries)
    assert np.all((0 <= matched_queries) & (matched_queries < num_queries))
    assert np.all(query_idx[example][~valid[example]] == num_queries)
    total = cost[example][matched_queries, target_idx[example][valid[example]]].sum()
    np.testing.assert_allclose(total, scipy_total(cost[example][:, real]),
                               rtol=1e-5, atol=1e-5)


def test_padding_targets_do_not_change_the_real_matches():
  """Padding columns far cheaper than the real ones leave the real pairs as the problem
  without them has them (Q < T here; random costs have a unique optimum)."""
  rng = np.random.default_rng(3)
  real_cost = rng.normal(size=(2, 4, 3)).astype(np.float32)
  padded_cost = np.concatenate([real_cost, np.full((2, 4, 2), -100.0, np.float32)], axis=-1)
  mask = np.array([[True] * 3 + [False] * 2] * 2)
  query_idx, _, valid = jax.jit(detr.batched_hungarian_match)(padded_cost, mask)
  np.testing.assert_array_equal(valid, mask)
  for example in range(2):
    rows, cols = scipy.optimize.linear_sum_assignment(real_cost[example])
    np.testing.assert_array_equal(np.asarray(query_idx)[example, cols], rows)


@pytest.mark.parametrize("method", ["optax", "scipy"])
@pytest.mark.parametrize("value", [0.0, 2.0])
def test_padding_targets_never_win_a_tie(method, value):
  """Equal costs everywhere, more targets than queries: the queries go to real targets."""
  cost = np.full((2, 2, 4), value, np.float32)
  mask = np.array([[False, False, True, True], [True, False, False, True]])
  _, _, valid = jax.jit(lambda c, m: detr.batched_hungarian_match(c, m, method=method))(
      cost, mask)
  np.testing.assert_array_equal(valid, mask)


def random_detections(rng: np.random.Generator, batch: int, num_queries: int, num_classes: int,
                      num_targets: int, box_range: tuple[float, float]):
  """(logits [B, Q, C+1], predicted boxes [B, Q, 4], labels [B, T], target boxes [B, T, 4]),
  box coordinates uniform in box_range."""
  logits = rng.normal(size=(batch, num_queries, num_classes + 1)).astype(np.float32)
  pred_boxes = rng.uniform(*box_range, size=(batch, num_queries, 4)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=(batch, num_targets))
  target_boxes = rng.uniform(*box_range, size=(batch, num_targets, 4)).astype(np.float32)
  return logits, pred_boxes, labels, target_boxes


def test_scipy_callback_and_optax_agree_inside_jit():
  rng = np.random.default_rng(4)
  batch, num_queries, num_classes, num_targets = 4, 6, 3, 4
  logits, pred_boxes, labels, target_boxes = random_detections(
      rng, batch, num_queries, num_classes, num_targets, (0.2, 0.5))
  mask = random_masks(rng, batch, num_targets)

  @jax.jit
  def both_totals(logits, pred_boxes, labels, target_boxes, mask):
    cost = detr.matching_cost(logits, pred_boxes, labels, target_boxes)
    totals = []
    for method in detr.MATCH_METHODS:
      query_idx, _, valid = detr.batched_hungarian_match(cost, mask, method=method)
      pair_cost = jnp.take_along_axis(cost, jnp.minimum(query_idx, num_queries - 1)[:, :, None],
                                      axis=1)[:, 0, :]  # [B, T] cost of target t's query
      totals.append((pair_cost * valid).sum(-1))
    single_totals = []
    for method in detr.MATCH_METHODS:
      query_idx, target_idx = detr.hungarian_match(cost[1], method=method)
      single_totals.append(cost[1][query_idx, target_idx].sum())
    return totals, single_totals

  (optax_totals, scipy_totals), (optax_single, scipy_single) = both_totals(
      logits, pred_boxes, labels, target_boxes, mask)
  np.testing.assert_allclose(optax_totals, scipy_totals, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(optax_single, scipy_single, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(optax_totals)[0] == 0.0)  # example 0 has no real target


@pytest.mark.parametrize("call", [
    lambda: detr.hungarian_match(np.zeros((2, 2)), method="lapjv"),
    lambda: detr.batched_hungarian_match(np.zeros((1, 2, 2)), method="Scipy")])
def test_unknown_method_names_the_field_and_the_choices(call):
  with pytest.raises(ValueError, match=r"method=.*'optax', 'scipy'"):
    call()


def naive_iou_giou_union(box1, box2):
  """Closed-form IoU, GIoU and union area of two (x0, y0, x1, y1) boxes, in float64."""
  area = lambda box: (box[2] - box[0]) * (box[3] - box[1])
  inter_w = max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0]))
  inter_h = max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1]))
  intersection = inter_w * inter_h
  union = area(box1) + area(box2) - intersection
  enclosing = ((max(box1[2], box2[2]) - min(box1[0], box2[0]))
               * (max(box1[3], box2[3]) - min(box1[1], box2[1])))
  iou = intersection / union
  return iou, iou - (enclosing - union) / enclosing, union


@pytest.mark.parametrize("box1,box2,expected", [
    ((0, 0, 1, 1), (0, 0, 1, 1), 1.0),  # identical
    ((0, 0, 1, 1), (2, 0, 3, 1), -1 / 3),  # disjoint: union 2, enclosing 3
    ((0, 0, 1, 1), (3, 3, 4, 4), 2 / 16 - 1),  # disjoint, far apart: -> -1
    ((0, 0, 4, 4), (1, 1, 2, 2), 1 / 16),  # nested: enclosing = union
    ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7 - 2 / 9),  # overlap 1, union 7, enclosing 9
    ((0, 0, 2, 1), (1, 0, 3, 1), 1 / 3),  # touching halves: enclosing = union
    ((0, 0, 1, 1), (1, 0, 2, 1), 0.0),  # sharing an edge
])
def test_giou_of_hand_computed_pairs(box1, box2, expected):
  giou = detr.generalized_box_iou(jnp.array([box1], jnp.float32), jnp.array([box2], jnp.float32))
  np.testing.assert_allclose(giou, [[expected]], rtol=1e-6, atol=1e-7)
  reverse = detr.generalized_box_iou(jnp.array([box2], jnp.float32),
                                     jnp.array([box1], jnp.float32))
  np.testing.assert_allclose(reverse, giou, rtol=1e-6)


def random_xyxy(rng, count):
  low = rng.uniform(0, 1, size=(count, 2))
  return np.concatenate([low, low + rng.uniform(0.05, 0.8, size=(count, 2))], -1)


def test_iou_and_giou_match_a_naive_loop_and_iou_is_symmetric():
  rng = np.random.default_rng(5)
  boxes1, boxes2 = random_xyxy(rng, 6), random_xyxy(rng, 5)
  iou, union = detr.box_iou(jnp.asarray(boxes1, jnp.float32), jnp.asarray(boxes2, jnp.float32))
  giou = detr.generalized_box_iou(jnp.asarray(boxes1, jnp.float32),
                                  jnp.asarray(boxes2, jnp.float32))
  naive = np.array([[naive_iou_giou_union(a, b) for b in boxes2] for a in boxes1])  # [N, M, 3]
  assert np.any(naive[..., 1] < 0) and np.any(naive[..., 0] > 0), "cases lack variety"
  np.testing.assert_allclose(iou, naive[..., 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(giou, naive[..., 1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(union, naive[..., 2], rtol=1e-5)
  iou_reversed, _ = detr.box_iou(jnp.asarray(boxes2, jnp.float32),
                                 jnp.asarray(boxes1, jnp.float32))
  np.testing.assert_allclose(iou_reversed, np.asarray(iou).T, rtol=1e-6)


def test_degenerate_boxes_give_zero_iou_and_finite_gradients():
  point = jnp.array([[0.5, 0.5, 0.5, 0.5]])
  iou, union = detr.box_iou(point, point)
  giou = detr.generalized_box_iou(point, point)
  assert float(union[0, 0]) == 0.0 and float(iou[0, 0]) == 0.0 and float(giou[0, 0]) == 0.0
  line = jnp.array([[0.0, 0.0, 1.0, 0.0]])  # zero area, but a unit box encloses both
  np.testing.assert_allclose(detr.generalized_box_iou(line, jnp.array([[0.0, 0.0, 1.0, 1.0]])),
                             [[0.0]], atol=1e-7)
  grad = jax.grad(lambda boxes: detr.generalized_box_iou(boxes, boxes).sum())(point)
  assert np.all(np.isfinite(grad))


def test_box_conversions_round_trip_and_area():
  rng = np.random.default_rng(6)
  cxcywh = rng.uniform(0.1, 0.9, size=(2, 3, 4)).astype(np.float32)
  xyxy = detr.box_cxcywh_to_xyxy(cxcywh)
  np.testing.assert_allclose(xyxy[..., :2], cxcywh[..., :2] - cxcywh[..., 2:] / 2, rtol=1e-6)
  np.testing.assert_allclose(xyxy[..., 2:], cxcywh[..., :2] + cxcywh[..., 2:] / 2, rtol=1e-6)
  np.testing.assert_allclose(detr.box_xyxy_to_cxcywh(xyxy), cxcywh, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(detr.box_area(xyxy), cxcywh[..., 2] * cxcywh[..., 3], rtol=1e-5)
  np.testing.assert_allclose(detr.box_xyxy_to_cxcywh(jnp.array([1.0, 2.0, 4.0, 8.0])),
                             [2.5, 5.0, 3.0, 6.0])


def test_matching_cost_matches_a_naive_loop():
  rng = np.random.default_rng(7)
  batch, num_queries, num_classes, num_targets = 2, 4, 3, 3
  logits, pred_boxes, labels, target_boxes = random_detections(
      rng, batch, num_queries, num_classes, num_targets, (0.1, 0.6))
  weights = dict(class_weight=1.5, bbox_weight=4.0, giou_weight=2.5)
  cost = jax.jit(lambda *args: detr.matching_cost(*args, **weights))(
      logits, pred_boxes, labels, target_boxes)
  to_xyxy = lambda box: (box[0] - box[2] / 2, box[1] - box[3] / 2,
                         box[0] + box[2] / 2, box[1] + box[3] / 2)
  expected = np.zeros((batch, num_queries, num_targets))
  for b, q, t in itertools.product(range(batch), range(num_queries), range(num_targets)):
    probs = np.exp(logits[b, q].astype(np.float64))
    probs /= probs.sum()
    l1 = np.abs(pred_boxes[b, q].astype(np.float64) - target_boxes[b, t]).sum()
    _, giou, _ = naive_iou_giou_union(to_xyxy(pred_boxes[b, q].astype(np.float64)),
                                 to_xyxy(target_boxes[b, t].astype(np.float64)))
    expected[b, q, t] = (-weights["class_weight"] * probs[labels[b, t]]
                         + weights["bbox_weight"] * l1 - weights["giou_weight"] * giou)
  np.testing.assert_allclose(cost, expected, rtol=1e-5, atol=1e-5)
