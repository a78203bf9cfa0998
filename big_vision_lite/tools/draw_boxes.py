r"""DETR boxes: predicted and ground-truth boxes over test images, as one PNG grid.

  python -m big_vision_lite.tools.draw_boxes --workdir /tmp/detr --out boxes.png \
      [--num_images 8 --score_threshold 0.5 --split test --eval NAME --scale 2 \
       --class_names a,b,c]

Loads the newest checkpoint of a DETR run (its config.json), preprocesses the first
`--num_images` images of `--split` with the pp of the run's `detection` eval (`--eval` names
one when there are several), runs the model in eval mode and draws, on each image (its
values rescaled to [0, 1] over the real pixels), the ground-truth boxes in green and the
predicted boxes whose score is at least `--score_threshold` in red with "name score" (DETR's
PostProcess: score and label are the maximum over the real classes of the softmax). Class
names come from `--class_names` (comma-separated) or the dataset's `objects/label`
ClassLabel, else class ids.

`draw_grid` draws from arrays (images, absolute boxes), for notebooks.
"""
import argparse
import json
import os
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from big_vision_lite import checkpointing
from big_vision_lite import models
from big_vision_lite.evaluators import detection
from big_vision_lite.input import data as data_lib

TILE_MARGIN = 4  # White pixels around each image of the grid.
GT_COLOUR = (0, 200, 0)
PRED_COLOUR = (255, 40, 40)


def draw_grid(images: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray],
              gt_labels: Sequence[np.ndarray], pred_boxes: Sequence[np.ndarray],
              pred_labels: Sequence[np.ndarray], pred_scores: Sequence[np.ndarray], out: str,
              *, score_threshold: float = 0.5, class_names: Sequence[str] | None = None,
              scale: int = 2, columns: int = 4) -> None:
  """Writes a PNG grid of `images`, each [H, W, 3] in [0, 1], with boxes drawn over it.

  Per image: gt_boxes [T, 4] and pred_boxes [K, 4] absolute (x0, y0, x1, y1) pixels of that
  image, int gt_labels [T] / pred_labels [K], pred_scores [K]. Ground truth is green;
  predictions scoring at least `score_threshold` are red, captioned "name score" on black
  inside their top-left corner; outlines are max(1, scale // 2) wide. Tiles are
  `scale` pixels per image pixel, `columns` per row, with TILE_MARGIN white pixels around.
  """
  if not 0.0 <= score_threshold <= 1.0:
    raise ValueError(f"--score_threshold must be in [0, 1], got {score_threshold!r}.")
  if scale < 1 or columns < 1 or not len(images):
    raise ValueError(f"--scale ({scale}), columns ({columns}) and the number of images "
                     f"({len(images)}) must be >= 1.")
  name = lambda label: class_names[label] if class_names else str(label)
  width = max(1, scale // 2)
  tile_h = max(im.shape[0] for im in images) * scale + 2 * TILE_MARGIN
  tile_w = max(im.shape[1] for im in images) * scale + 2 * TILE_MARGIN
  columns = min(columns, len(images))
  rows = -(-len(images) // columns)
  grid = Image.new("RGB", (columns * tile_w, rows * tile_h), "white")
  pen = ImageDraw.Draw(grid)
  for index, image in enumerate(images):
    left = (index % columns) * tile_w + TILE_MARGIN
    top = (index // columns) * tile_h + TILE_MARGIN
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    grid.paste(Image.fromarray(pixels).resize(
        (image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST), (left, top))
    place = lambda box: [left + scale * float(box[0]), top + scale * float(box[1]),
                         left + scale * float(box[2]), top + scale * float(box[3])]
    kept = [(place(box), label, score) for box, label, score in zip(
        pred_boxes[index], pred_labels[index], pred_scores[index]) if score >= score_threshold]
    for corners, label, score in kept:  # Captions first: outlines stay visible over them.
      corner = (corners[0] + width + 1, corners[1] + width + 1)
      caption = f"{name(int(label))} {score:.2f}"
      pen.rectangle(pen.textbbox(corner, caption), fill="black")
      pen.text(corner, caption, fill=PRED_COLOUR)
    for box in gt_boxes[index]:
      pen.rectangle(place(box), outline=GT_COLOUR, width=width)
    for corners, _, _ in kept:
      pen.rectangle(corners, outline=PRED_COLOUR, width=width)
  grid.save(out)


def unpadded_sizes(pixel_mask: np.ndarray) -> np.ndarray:
  """(height, width) [B, 2] of the real (unpadded, top-left) region of pixel_mask [B, S, S]."""
  return np.stack([pixel_mask.any(2).sum(1), pixel_mask.any(1).sum(1)], axis=-1)


def to_unit(image: np.ndarray, pixel_mask: np.ndarray) -> np.ndarray:
  """image [H, W, 3] rescaled to [0, 1] by its minimum and maximum over real pixels."""
  real = image[pixel_mask]
  low, high = real.min(), real.max()
  return (image - low) / max(high - low, 1e-6) * pixel_mask[..., None]


def detection_eval(config: dict[str, Any], eval_name: str | None) -> dict[str, Any]:
  """The run config's eval entry of type "detection" (`eval_name` picks one of several)."""
  evals = {name: ev for name, ev in (config.get("evals") or {}).items()
           if ev.get("type") == "detection"}
  if eval_name is not None and eval_name not in evals:
    raise ValueError(f"--eval {eval_name!r} is not a detection eval of the run (config field "
                     f"'evals'); detection evals: {sorted(evals) or 'none'}.")
  if eval_name is None and len(evals) != 1:
    raise ValueError(f"The run has {len(evals)} detection evals (config field 'evals': "
                     f"{sorted(evals)}); name the one whose data and pp to use with --eval.")
  return evals[eval_name or next(iter(evals))]


def dataset_class_names(data: dict[str, Any]) -> list[str] | None:
  """The names of the dataset's `objects/label` ClassLabel, None if it has none."""
  features = data_lib._prepared_builder(data).info.features  # pylint: disable=protected-access
  try:
    return list(features["objects"]["label"].names)
  except (KeyError, AttributeError, TypeError):
    return None


def draw(workdir: str, out: str, *, num_images: int = 8, score_threshold: float = 0.5,
         split: str = "test", eval_name: str | None = None, scale: int | None = None,
         class_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Writes the PNG (see the module docstring); returns the drawn arrays: "images" [B, S, S,
  3], "pred_boxes" [B, Q, 4] and "gt_boxes" [B, T, 4] (absolute xyxy of the preprocessed
  image), "pred_labels", "pred_scores" [B, Q], "gt_labels", "box_mask" [B, T]. `scale`
  defaults to tiles of about 256 pixels."""
  if num_images < 1:
    raise ValueError(f"--num_images must be >= 1, got {num_images}.")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"--workdir: {workdir} has no config.json (not a train run dir).")
  with open(path) as f:
    config = json.load(f)
  ev = detection_eval(config, eval_name)
  data = dict(ev["data"], split=split)
  model_name, kwargs = checkpointing.read_run_model(workdir)
  model = models.get(model_name).Model(**kwargs)
  variables = checkpointing.load_variables(workdir)
  batch = next(data_lib.make_eval_iterator(data, ev["pp"], num_images))
  batch = {k: np.asarray(v)[batch["_mask"]] for k, v in batch.items()}
  out_arrays, _ = model.apply(variables, jnp.asarray(batch["image"]), train=False,
                              pixel_mask=jnp.asarray(batch["pixel_mask"]))
  sizes = jnp.asarray(unpadded_sizes(batch["pixel_mask"]))
  pred = {k: np.asarray(v) for k, v in detection.postprocess(
      out_arrays["logits"], out_arrays["boxes"], sizes, out_arrays["logits"].shape[1]).items()}
  gt_boxes = np.asarray(detection.scale_boxes(jnp.asarray(batch["boxes"]), sizes))
  box_mask = batch["box_mask"].astype(bool)
  images = np.stack([to_unit(im, m) for im, m in zip(batch["image"], batch["pixel_mask"])])
  names = class_names or dataset_class_names(data)
  draw_grid(images, [b[m] for b, m in zip(gt_boxes, box_mask)],
            [l[m] for l, m in zip(batch["labels"], box_mask)], pred["boxes"], pred["labels"],
            pred["scores"], out, score_threshold=score_threshold, class_names=names,
            scale=scale or max(1, 256 // max(images.shape[1:3])))
  return {"images": images, "pred_boxes": pred["boxes"], "pred_labels": pred["labels"],
          "pred_scores": pred["scores"], "gt_boxes": gt_boxes, "gt_labels": batch["labels"],
          "box_mask": box_mask}


def main(argv: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """The command line (see the module docstring)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="A DETR run dir (config.json, "
                      "checkpoints/).")
  parser.add_argument("--out", default="boxes.png", help="Where to write the PNG.")
  parser.add_argument("--num_images", type=int, default=8, help="Test images drawn.")
  parser.add_argument("--score_threshold", type=float, default=0.5,
                      help="Predictions scoring less are not drawn.")
  parser.add_argument("--split", default="test", help="Split of the eval's dataset.")
  parser.add_argument("--eval", default=None, help="Name of the run's detection eval whose "
                      "data and pp to use (needed when it has several).")
  parser.add_argument("--scale", type=int, default=None,
                      help="Pixels per image pixel (default: tiles of about 256 pixels).")
  parser.add_argument("--class_names", default=None,
                      help="Comma-separated class names (default: the dataset's).")
  args = parser.parse_args(argv)
  result = draw(args.workdir, args.out, num_images=args.num_images,
                score_threshold=args.score_threshold, split=args.split, eval_name=args.eval,
                scale=args.scale,
                class_names=args.class_names.split(",") if args.class_names else None)
  kept = int((result["pred_scores"] >= args.score_threshold).sum())
  print(f"wrote {args.out}: {len(result['images'])} images, {int(result['box_mask'].sum())} "
        f"ground-truth boxes, {kept} predictions scoring >= {args.score_threshold:g}")
  return result


if __name__ == "__main__":
  main()
