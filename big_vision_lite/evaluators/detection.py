"""COCO box AP / AR of a set-prediction detector (DETR), computed by pycocotools' COCOeval.

Eval config fields (type "detection"): `data`, `pp`, `batch_size`, `log_steps`, optionally
`use_ema` and `max_detections` (detections kept per image, the highest-scoring queries;
default 100, COCO's largest maxDets). The pp gives the detection batch of the data contract:
"image" [S, S, 3], "pixel_mask" [S, S], "boxes" [T, 4] (cx, cy, w, h) normalised by the
unpadded image's width and height, int "labels" [T] in [0, C), "box_mask" [T], "orig_size"
(height, width), and optionally "is_crowd" [T] bool (pp `to_boxes` keeps it when the eval pp
does not `filter_objects` crowds away; COCOeval then ignores detections matching a crowd
box, as in COCO's own evaluation) and "area" [T] (a ground-truth box's COCO area in pixels;
default: the box's area in pixels of `orig_size`).

Predictions: `task.apply_eval(variables, image, pixel_mask=...)` gives `out["logits"]`
[B, Q, C + 1] (index C is "no object") and `out["boxes"]` [B, Q, 4] (cx, cy, w, h) in [0, 1].
As DETR's PostProcess: softmax over the C + 1 classes; a query's score and label are the
maximum and arg-maximum over the C real classes; its box is scaled to absolute (x0, y0, x1,
y1) pixels of `orig_size` and written in COCO's (x, y, w, h), unclipped.

The post-processed predictions and the ground truth of each global batch are replicated to
every process (as the other evaluators' sums are), the padded rows of the last batch
(`_mask` False) are dropped, and every process runs COCOeval on the whole split: image ids
1..N in split order, category id = label (0..C-1), annotation ids from 1, iscrowd from
"is_crowd" (default 0). The
metrics are COCOeval's 12 summary numbers as fractions in [0, 1] (the project's metrics are
fractions), -1 where COCO has nothing to average (e.g. no ground-truth box of that size).
"""
import contextlib
import io
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from pycocotools import coco as coco_lib
from pycocotools import cocoeval

from big_vision_lite import sharding
from big_vision_lite.evaluators import REGISTRY
from big_vision_lite.input import data as data_lib
from big_vision_lite.losses import detr as boxes_lib

DEFAULTS = dict(max_detections=100)
# COCOeval.stats, in order.
METRICS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
           "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
BATCH_KEYS = ("image", "boxes", "labels", "box_mask", "orig_size")


def scale_boxes(boxes: jax.Array, orig_size: jax.Array) -> jax.Array:
  """Normalised (cx, cy, w, h) boxes [B, N, 4] -> absolute (x0, y0, x1, y1) pixels of the
  images' (height, width) `orig_size` [B, 2]."""
  height, width = orig_size[:, 0], orig_size[:, 1]
  scale = jnp.stack([width, height, width, height], axis=-1).astype(jnp.float32)  # [B, 4]
  return boxes_lib.box_cxcywh_to_xyxy(boxes.astype(jnp.float32)) * scale[:, None, :]


def postprocess(logits: jax.Array, boxes: jax.Array, orig_size: jax.Array,
                max_detections: int) -> dict[str, jax.Array]:
  """DETR's PostProcess, keeping each image's `max_detections` highest-scoring queries.

  logits [B, Q, C + 1], boxes [B, Q, 4] (cx, cy, w, h) in [0, 1], orig_size [B, 2] (height,
  width) -> "scores" [B, K], "labels" [B, K] int32 in [0, C), "boxes" [B, K, 4] absolute
  (x0, y0, x1, y1), K = min(max_detections, Q), best first.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :-1]  # [B, Q, C]
  scores, labels = probs.max(-1), probs.argmax(-1).astype(jnp.int32)  # [B, Q]
  scores, keep = jax.lax.top_k(scores, min(max_detections, scores.shape[1]))  # [B, K]
  return {"scores": scores, "labels": jnp.take_along_axis(labels, keep, axis=1),
          "boxes": jnp.take_along_axis(scale_boxes(boxes, orig_size), keep[..., None], axis=1)}


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
  """(x0, y0, x1, y1) [..., 4] -> COCO's (x, y, w, h)."""
  return np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def coco_inputs(outputs: dict[str, np.ndarray], num_classes: int
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(COCO ground-truth dataset, detection results) of a whole split's arrays.

  `outputs` holds, for N images: "scores", "labels" [N, K] and "boxes" [N, K, 4] (absolute
  xyxy, from `postprocess`), "gt_boxes" [N, T, 4] (absolute xyxy), "gt_labels", "box_mask"
  [N, T], "orig_size" [N, 2] and optionally "is_crowd", "area" [N, T]. Image i has id i + 1.
  """
  height_width = outputs["orig_size"]
  images = [{"id": i + 1, "height": int(h), "width": int(w)}
            for i, (h, w) in enumerate(height_width)]
  gt_xywh = xyxy_to_xywh(outputs["gt_boxes"].astype(np.float64))
  areas, crowd = outputs.get("area"), outputs.get("is_crowd")
  annotations = []
  for i, t in zip(*np.nonzero(outputs["box_mask"])):
    box = [float(v) for v in gt_xywh[i, t]]
    area = float(areas[i, t]) if areas is not None else box[2] * box[3]
    annotations.append({"id": len(annotations) + 1, "image_id": int(i) + 1,
                        "category_id": int(outputs["gt_labels"][i, t]), "bbox": box,
                        "area": area, "iscrowd": int(crowd[i, t]) if crowd is not None else 0})
  dataset = {"info": {}, "images": images, "annotations": annotations,  # loadRes reads info.
             "categories": [{"id": c, "name": str(c)} for c in range(num_classes)]}
  dt_xywh = xyxy_to_xywh(outputs["boxes"].astype(np.float64))
  detections = [{"image_id": int(i) + 1, "category_id": int(outputs["labels"][i, k]),
                 "bbox": [float(v) for v in dt_xywh[i, k]],
                 "score": float(outputs["scores"][i, k])}
                for i in range(dt_xywh.shape[0]) for k in range(dt_xywh.shape[1])]
  return dataset, detections


def coco_box_metrics(dataset: dict[str, Any], detections: list[dict[str, Any]]
                     ) -> tuple[dict[str, float], str]:
  """COCOeval(bbox) of `detections` (a non-empty list) against `dataset`; returns the 12
  named stats (fractions) and the summary table pycocotools prints, captured."""
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    ground_truth = coco_lib.COCO()
    ground_truth.dataset = dataset
    ground_truth.createIndex()
    evaluation = cocoeval.COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
  with contextlib.redirect_stdout(io.StringIO()) as table:
    evaluation.summarize()
  return dict(zip(METRICS, map(float, evaluation.stats))), table.getvalue()


@REGISTRY.register("detection")
class DetectionEvaluator:
  """COCO box AP / AR of `task.apply_eval`'s DETR outputs over `data` (module docstring).

  After `run`, `summary` holds COCOeval's printed table of the last evaluation.
  """

  @classmethod
  def validate_config(cls, eval_config: ml_collections.ConfigDict, field: str) -> None:
    """Raises a ValueError naming the field for a bad value (reads no data)."""
    value = eval_config.get("max_detections")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value <= 0):
      raise ValueError(f"Config field '{field}.max_detections' must be an int > 0 (detections "
                       f"kept per image; COCO's default 100), got {value!r}.")

  def __init__(self, task: Any, mesh: Mesh, eval_config: ml_collections.ConfigDict,
               seed: int = 0):
    del seed
    self.validate_config(eval_config, "evals.<name>")
    if not hasattr(task, "apply_eval"):
      raise ValueError(f"The detection evaluator (config field 'evals.<name>.type') needs a "
                       f"task with apply_eval (task 'detr'); got {type(task).__name__}.")
    self.task = task
    self.mesh = mesh
    self.config = eval_config
    self.max_detections = eval_config.get("max_detections") or DEFAULTS["max_detections"]
    self.summary = ""
    self._step = jax.jit(self._predict, out_shardings=sharding.replicated(mesh))

  def _predict(self, variables: dict[str, Any], batch: dict[str, jax.Array]
               ) -> dict[str, jax.Array]:
    out, _ = self.task.apply_eval(variables, batch["image"],
                                  pixel_mask=batch.get("pixel_mask"))
    outputs = postprocess(out["logits"], out["boxes"], batch["orig_size"],
                          self.max_detections)
    outputs.update(gt_boxes=scale_boxes(batch["boxes"], batch["orig_size"]),
                   gt_labels=batch["labels"].astype(jnp.int32), box_mask=batch["box_mask"],
                   orig_size=batch["orig_size"], num_classes=jnp.asarray(
                       out["logits"].shape[-1] - 1), _mask=batch["_mask"])
    outputs.update({k: batch[k] for k in ("area", "is_crowd") if k in batch})
    return outputs

  def _batches(self) -> Iterator[dict[str, np.ndarray]]:
    return data_lib.make_eval_iterator(
        self.config.data, self.config.pp, self.config.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())

  def run(self, variables: dict[str, Any]) -> dict[str, float]:
    parts: list[dict[str, np.ndarray]] = []
    for local_batch in self._batches():
      missing = [k for k in BATCH_KEYS if k not in local_batch]
      if missing:
        raise ValueError(f"The detection evaluator needs batch keys {missing} from its pp "
                         f"(config field 'evals.<name>.pp'); got {sorted(local_batch)}.")
      outputs = jax.device_get(self._step(variables, sharding.global_batch(local_batch,
                                                                           self.mesh)))
      real = outputs.pop("_mask").astype(bool)
      num_classes = int(outputs.pop("num_classes"))
      parts.append({k: np.asarray(v)[real] for k, v in outputs.items()})
    split = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    labels = split["gt_labels"][split["box_mask"].astype(bool)]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f"Ground-truth labels must be in [0, {num_classes}) (the model's "
                       f"classes); got {labels.min()}..{labels.max()} from config field "
                       "'evals.<name>.pp'.")
    metrics, self.summary = coco_box_metrics(*coco_inputs(split, num_classes))
    return metrics
