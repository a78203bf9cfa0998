"""The detection evaluator against pycocotools' COCOeval run directly by the test on COCO
json files it writes itself (its own post-processing in float64 numpy, its own ids), on
random predictions and ground truth with empty images, non-square images and a padded last
eval batch, in 1 process and split over 2; perfect predictions; a closed-form IoU case; the
box scaling by (height, width); the PNG of tools/draw_boxes."""
import contextlib
import io
import itertools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from pycocotools import coco as coco_lib
from pycocotools import cocoeval

from big_vision_lite import evaluators
from big_vision_lite import sharding
from big_vision_lite.evaluators import detection
from big_vision_lite.input import data as data_lib
from big_vision_lite.tools import draw_boxes

NUM_IMAGES = 13
BATCH_SIZE = 8  # 2 global batches; the last holds 5 real rows and 3 copies of image 12.
NUM_QUERIES = 6
NUM_CLASSES = 3
SLOTS = 4
SIDE = 4  # Image side: the fake model reads only the image index at pixel (0, 0).
PP = 'keep("image", "pixel_mask", "boxes", "labels", "box_mask", "orig_size")'
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


class LookupTask:
  """A stand-in task: the outputs of image i are row i of the params' tables, the image index
  being stored in the image's first value."""

  def apply_eval(self, variables: dict[str, Any], images: jax.Array,
                 pixel_mask: jax.Array | None = None) -> tuple[dict[str, jax.Array], dict]:
    assert pixel_mask is not None and pixel_mask.shape == images.shape[:3]
    index = images[:, 0, 0, 0].astype(jnp.int32)  # [B]
    params = variables["params"]
    return {"logits": params["logits"][index], "boxes": params["boxes"][index]}, {}


def random_xyxy(rng: np.random.Generator, n: int) -> np.ndarray:
  """n normalised (x0, y0, x1, y1) boxes inside [0, 1] of side 0.05..0.6."""
  size = rng.uniform(0.05, 0.6, (n, 2))
  low = rng.uniform(0, 1 - size)
  return np.concatenate([low, low + size], axis=-1)


def to_cxcywh(xyxy: np.ndarray) -> np.ndarray:
  return np.concatenate([(xyxy[..., :2] + xyxy[..., 2:]) / 2, xyxy[..., 2:] - xyxy[..., :2]],
                        axis=-1)


def random_split(seed: int = 0, crowd_and_area: bool = False
                 ) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
  """(records in the data contract, model tables): non-square images of 40..400 pixels, 0 to
  SLOTS boxes (images 2 and 7 none, the last one SLOTS), predictions near the ground truth
  (jittered, some with a wrong class) or random. `crowd_and_area`: records also carry
  "is_crowd" (a third of the boxes) and "area" (a random fraction of the box's)."""
  rng = np.random.default_rng(seed)
  records = []
  logits = rng.normal(0, 2, (NUM_IMAGES, NUM_QUERIES, NUM_CLASSES + 1))
  boxes = to_cxcywh(random_xyxy(rng, NUM_IMAGES * NUM_QUERIES)).reshape(NUM_IMAGES, NUM_QUERIES, 4)
  for i in range(NUM_IMAGES):
    count = 0 if i in (2, 7) else SLOTS if i == NUM_IMAGES - 1 else int(rng.integers(1, SLOTS + 1))
    gt = np.zeros((SLOTS, 4))
    gt[:count] = to_cxcywh(random_xyxy(rng, count))
    labels = np.zeros(SLOTS, np.int32)
    labels[:count] = rng.integers(0, NUM_CLASSES, count)
    for q in range(min(count, NUM_QUERIES - 2)):
      boxes[i, q] = gt[q] * rng.uniform(0.93, 1.07, 4)
      logits[i, q, labels[q]] += 4.0
    image = np.zeros((SIDE, SIDE, 3), np.float32)
    image[0, 0, 0] = i
    records.append({"image": image, "pixel_mask": np.ones((SIDE, SIDE), bool),
                    "boxes": gt.astype(np.float32), "labels": labels,
                    "box_mask": np.arange(SLOTS) < count,
                    "orig_size": rng.integers(40, 401, 2).astype(np.int32)})
    if crowd_and_area:
      height, width = records[-1]["orig_size"]
      records[-1]["is_crowd"] = records[-1]["box_mask"] & (rng.uniform(size=SLOTS) < 0.33)
      records[-1]["area"] = (gt[:, 2] * gt[:, 3] * height * width
                             * rng.uniform(0.3, 1, SLOTS)).astype(np.float32)
  tables = {"logits": logits.astype(np.float32),
            "boxes": np.clip(boxes, 0, 1).astype(np.float32)}
  return records, tables


def reference_stats(records: list[dict[str, np.ndarray]], tables: dict[str, np.ndarray],
                    max_detections: int, tmp_path) -> np.ndarray:
  """COCOeval's 12 stats from json files written here: image ids 100 + i, category ids
  label + 1, DETR's PostProcess in float64 numpy; area and iscrowd from the records, if
  there, else the box's area and 0."""
  images, annotations, results = [], [], []
  for i, record in enumerate(records):
    height, width = (int(v) for v in record["orig_size"])
    images.append({"id": 100 + i, "height": height, "width": width})
    for t in np.flatnonzero(record["box_mask"]):
      cx, cy, w, h = record["boxes"][t].astype(np.float64)
      xywh = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
      annotations.append({
          "id": 7 + len(annotations), "image_id": 100 + i,
          "category_id": int(record["labels"][t]) + 1, "bbox": xywh,
          "area": float(record["area"][t]) if "area" in record else xywh[2] * xywh[3],
          "iscrowd": int(record["is_crowd"][t]) if "is_crowd" in record else 0})
    logits = tables["logits"][i].astype(np.float64)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    scores, labels = probs[:, :-1].max(-1), probs[:, :-1].argmax(-1)
    for q in np.argsort(-scores)[:max_detections]:
      cx, cy, w, h = tables["boxes"][i, q].astype(np.float64)
      results.append({"image_id": 100 + i, "category_id": int(labels[q]) + 1,
                      "bbox": [(cx - w / 2) * width, (cy - h / 2) * height, w * width,
                               h * height], "score": float(scores[q])})
  gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
  categories = [{"id": c + 1, "name": f"c{c}"} for c in range(NUM_CLASSES)]
  gt_path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations,
                                 "categories": categories}))
  dt_path.write_text(json.dumps(results))
  with contextlib.redirect_stdout(io.StringIO()):
    gt = coco_lib.COCO(str(gt_path))
    run = cocoeval.COCOeval(gt, gt.loadRes(str(dt_path)), "bbox")
    run.evaluate()
    run.accumulate()
    run.summarize()
  return run.stats


def make_evaluator(monkeypatch, records: list[dict[str, np.ndarray]], pp: str = PP,
                   **fields: Any) -> detection.DetectionEvaluator:
  monkeypatch.setattr(data_lib, "get_source", lambda data: records)
  eval_config = ml_collections.ConfigDict(dict(
      type="detection", data=dict(name="fixed", split="test"), pp=pp, batch_size=BATCH_SIZE,
      **fields))
  return evaluators.REGISTRY.get("detection")(LookupTask(), sharding.make_mesh(), eval_config)


def two_process_batches(eval_config: ml_collections.ConfigDict, seen: list[int]):
  """Global batches as 2 processes assemble them from their own eval iterators; appends the
  real examples' indices to `seen`."""
  parts = [data_lib.make_eval_iterator(eval_config.data, eval_config.pp, eval_config.batch_size,
                                       process_index=p, process_count=2) for p in range(2)]
  for local_batches in itertools.zip_longest(*parts):
    batch = {k: np.concatenate([b[k] for b in local_batches]) for k in local_batches[0]}
    seen += [int(i) for i in batch["image"][batch["_mask"], 0, 0, 0]]
    yield batch


@pytest.mark.parametrize("max_detections,crowd_and_area", [(None, False), (4, True)])
def test_metrics_equal_pycocotools_on_its_own_json(monkeypatch, tmp_path, max_detections,
                                                   crowd_and_area):
  records, tables = random_split(crowd_and_area=crowd_and_area)
  fields = {} if max_detections is None else {"max_detections": max_detections}
  pp = PP[:-1] + ', "is_crowd", "area")' if crowd_and_area else PP
  evaluator = make_evaluator(monkeypatch, records, pp, **fields)
  variables = {"params": jax.tree.map(jnp.asarray, tables)}
  want = reference_stats(records, tables, max_detections or 100, tmp_path)
  assert 0.1 < want[0] < 0.9 and (want[3:6] > 0).all()  # Every box size; AP not 0 or 1.

  one = evaluator.run(variables)
  assert tuple(one) == STAT_NAMES
  np.testing.assert_allclose([one[k] for k in STAT_NAMES], want, rtol=1e-6, atol=1e-9)
  assert "Average Precision" in evaluator.summary

  seen = []
  monkeypatch.setattr(evaluator, "_batches", lambda: two_process_batches(evaluator.config, seen))
  two = evaluator.run(variables)
  assert sorted(seen) == list(range(NUM_IMAGES))
  np.testing.assert_allclose([two[k] for k in STAT_NAMES], want, rtol=1e-6, atol=1e-9)


def test_perfect_predictions_give_ap_one(monkeypatch):
  records, tables = random_split(seed=1)
  logits = np.full((NUM_IMAGES, NUM_QUERIES, NUM_CLASSES + 1), -5.0, np.float32)
  logits[..., NUM_CLASSES] = 5.0  # "No object" wins except on the matched queries.
  boxes = np.full((NUM_IMAGES, NUM_QUERIES, 4), 0.5, np.float32)
  for i, record in enumerate(records):
    count = int(record["box_mask"].sum())
    boxes[i, :count] = record["boxes"][:count]
    logits[i, np.arange(count), record["labels"][:count]] = 5.0 + np.arange(count)
  evaluator = make_evaluator(monkeypatch, records)
  metrics = evaluator.run({"params": {"logits": jnp.asarray(logits), "boxes": jnp.asarray(boxes)}})
  for key in ("AP", "AP50", "AP75", "AR10", "AR100"):
    np.testing.assert_allclose(metrics[key], 1.0, err_msg=key)
  assert metrics["AR1"] < 1.0  # Images with several boxes: 1 detection finds one of them.


def test_one_box_at_iou_062_counts_at_thresholds_up_to_060(monkeypatch):
  """Image 100 high x 200 wide; ground truth x 40..60, y 20..70 px; the prediction x 40..60,
  y 20..51 px: IoU 0.62, a hit at IoU thresholds 0.50, 0.55, 0.60 of COCO's ten: AP 0.3."""
  gt = np.array([[50 / 200, 45 / 100, 20 / 200, 50 / 100]], np.float32)  # cx, cy, w, h
  image = np.zeros((SIDE, SIDE, 3), np.float32)
  record = {"image": image, "pixel_mask": np.ones((SIDE, SIDE), bool), "boxes": gt,
            "labels": np.array([1], np.int32), "box_mask": np.array([True]),
            "orig_size": np.array([100, 200], np.int32)}
  logits = np.array([[[0.0, 4.0, 0.0, 0.0]]], np.float32)
  boxes = np.array([[[50 / 200, 35.5 / 100, 20 / 200, 31 / 100]]], np.float32)
  evaluator = make_evaluator(monkeypatch, [record])
  metrics = evaluator.run({"params": {"logits": jnp.asarray(logits), "boxes": jnp.asarray(boxes)}})
  np.testing.assert_allclose([metrics["AP50"], metrics["AP75"], metrics["AP"]], [1.0, 0.0, 0.3],
                             atol=1e-9)
  # 20 x 50 = 1000 px < 32^2: a small box; COCO's "no such box" marker elsewhere.
  assert metrics["AP_small"] == pytest.approx(0.3) and metrics["AP_medium"] == -1.0


def test_postprocess_scales_width_and_height_separately():
  logits = jnp.asarray([[[0.0, 1.0, 3.0], [2.0, 0.0, 0.0], [0.0, 0.0, 9.0]]])  # [1, 3, C + 1]
  boxes = jnp.asarray([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.8, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]])
  postprocess = jax.jit(detection.postprocess, static_argnums=3)
  out = jax.device_get(postprocess(logits, boxes, jnp.asarray([[100, 300]]), 2))
  probs = np.exp(np.asarray(logits[0])) / np.exp(np.asarray(logits[0])).sum(-1, keepdims=True)
  # Query 2's "no object" is ignored: its best real class still scores, lowest here.
  np.testing.assert_allclose(out["scores"][0], [probs[1, 0], probs[0, 1]], rtol=1e-6)
  np.testing.assert_array_equal(out["labels"][0], [0, 1])
  np.testing.assert_allclose(out["boxes"][0], [[0.0, 70.0, 60.0, 90.0], [120.0, 30.0, 180.0, 70.0]],
                             atol=1e-4)


def test_bad_max_detections_is_named():
  for value in (0, 2.5, True):
    with pytest.raises(ValueError, match=r"'evals.det.max_detections' must be an int > 0"):
      detection.DetectionEvaluator.validate_config(
          ml_collections.ConfigDict({"max_detections": value}), "evals.det")


def test_a_pp_without_orig_size_is_named(monkeypatch):
  records, tables = random_split()
  evaluator = make_evaluator(monkeypatch, records, PP.replace(', "orig_size"', ""))
  with pytest.raises(ValueError, match=r"needs batch keys \['orig_size'\].*'evals.<name>.pp'"):
    evaluator.run({"params": tables})


def test_draw_boxes_outlines_land_on_the_boxes(tmp_path):
  """Box outlines on a black 40 x 80 image: ground truth and the prediction above the score
  threshold are drawn where their pixels are, the one below it is not."""
  image = np.zeros((40, 80, 3), np.float32)
  gt = np.array([[10.0, 5.0, 30.0, 25.0]])  # absolute x0, y0, x1, y1
  pred = np.array([[40.0, 10.0, 70.0, 35.0], [2.0, 30.0, 8.0, 38.0]])
  path = tmp_path / "boxes.png"
  draw_boxes.draw_grid([image], [gt], [np.array([0])], [pred], [np.array([1, 2])],
                       [np.array([0.9, 0.2])], str(path), score_threshold=0.5, scale=1,
                       class_names=["a", "b", "c"])
  pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
  top, left = draw_boxes.TILE_MARGIN, draw_boxes.TILE_MARGIN
  lit = lambda x, y: pixels[top + y, left + x].sum() > 100
  assert lit(10, 15) and lit(30, 15) and lit(20, 5) and lit(20, 25)  # Ground-truth edges.
  assert lit(40, 20) and lit(70, 20) and lit(55, 35)  # The kept prediction's edges.
  assert not lit(20, 15) and not lit(2, 34)  # A box's inside; the dropped prediction.
  assert tuple(pixels[top + 15, left + 10]) != tuple(pixels[top + 20, left + 40])  # Two colours.
