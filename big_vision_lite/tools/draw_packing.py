r"""Draws the first packed train batch of a config as a PNG.

  python -m big_vision_lite.tools.draw_packing --config configs/navit.py --out /tmp/packing.png

For each of the first --rows rows: the sequence as a strip of seq_len cells coloured by
image (segment), padding grey; below it, each packed image put back together from its
tokens at their (y, x) positions (dropped tokens are grey checkered holes), framed in its
segment colour and labelled with its segment id and class. The config needs
`input.packing`; pixel values in [-1, 1] (after pp) are mapped back to 0..255.
"""
import colorsys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image, ImageDraw, ImageFont

from big_vision_lite import config_lib
from big_vision_lite.input import data as data_lib
from big_vision_lite.input import shapes

config_flags.DEFINE_config_file("config", None, "Config file (with optional :args).")
flags.DEFINE_string("out", "/tmp/packing.png", "Output PNG path.")
flags.DEFINE_integer("rows", 4, "Rows of the batch to draw.")
flags.DEFINE_integer("scale", 2, "Upscaling of the reassembled images (nearest).")
flags.DEFINE_integer("cell", 4, "Width in px of one token in the sequence strip.")

PADDING = (150, 150, 150)
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
HOLES = (70, 100)  # Checkerboard greys of dropped tokens.
STRIP_HEIGHT, BORDER, GAP, LINE = 18, 3, 8, 14


def segment_color(segment: int) -> tuple[int, int, int]:
  """A distinct saturated colour for segment 1, 2, ... (golden-ratio hues)."""
  rgb = colorsys.hsv_to_rgb((segment * 0.618034) % 1.0, 0.8, 0.95)
  return tuple(int(255 * c) for c in rgb)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
  """Pixels in [-1, 1] -> uint8 0..255."""
  return np.clip(np.round((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)


def reassemble(patches: np.ndarray, positions: np.ndarray, grid: Sequence[int],
               patch: int) -> np.ndarray:
  """Tokens [n, p·p·3] at (y, x) `positions` [n, 2] -> uint8 image [h·p, w·p, 3] with holes."""
  h, w = int(grid[0]), int(grid[1])
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  checker = np.where((ys + xs) % 2, HOLES[1], HOLES[0]).astype(np.uint8)  # [h, w]
  image = np.repeat(np.repeat(checker, patch, 0), patch, 1)[..., None].repeat(3, -1)
  tiles = to_uint8(patches).reshape(-1, patch, patch, 3)  # [n, p, p, 3]
  for (y, x), tile in zip(positions, tiles):
    image[y * patch:(y + 1) * patch, x * patch:(x + 1) * patch] = tile
  return image


def class_name(label: int, dataset: str) -> str:
  """Class name for the "shapes" dataset, else the label number."""
  if dataset.split(":")[0].split("/")[0] == "shapes" and 0 <= label < len(shapes.CLASSES):
    return shapes.CLASSES[label]
  return f"label {label}"


def draw_row(row: Mapping[str, np.ndarray], index: int, patch: int, dataset: str,
             width: int, font: Any) -> Image.Image:
  """One row: a title, the token strip and the framed reassembled images below it."""
  segments = row["segment_ids"]  # [L]
  length = len(segments)
  cell = max(1, (width - 2 * GAP) // length)
  slots = np.flatnonzero(row["label_mask"])
  tiles = []
  for slot in slots:
    seg = int(slot) + 1
    tokens = segments == seg
    image = reassemble(row["patches"][tokens], row["positions"][tokens],
                       row["image_sizes"][slot], patch)
    image = Image.fromarray(image).resize(
        (image.shape[1] * flags.FLAGS.scale, image.shape[0] * flags.FLAGS.scale),
        Image.NEAREST)
    kept, total = int(tokens.sum()), int(np.prod(row["image_sizes"][slot]))
    label = f"{seg}: {class_name(int(row['labels'][slot]), dataset)} ({kept}/{total})"
    tiles.append((seg, image, label))

  layout, x, y, line_height = [], GAP, 0, 0  # Tiles left to right, wrapped at `width`.
  for seg, image, label in tiles:
    tile_w = max(image.width + 2 * BORDER, int(font.getlength(label)))
    tile_h = LINE + image.height + 2 * BORDER
    if x > GAP and x + tile_w > width - GAP:
      x, y, line_height = GAP, y + line_height + GAP, 0
    layout.append((seg, image, label, x, y))
    x, line_height = x + tile_w + GAP, max(line_height, tile_h)
  top = LINE + STRIP_HEIGHT + GAP
  canvas = Image.new("RGB", (width, top + y + line_height + 2 * GAP), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  padding = float((segments == 0).mean())
  images = f"{len(slots)} image{'' if len(slots) == 1 else 's'}"
  draw.text((GAP, 0), f"row {index}: {images}, {length} tokens, "
            f"{padding:.1%} padding", fill=TEXT, font=font)
  for i, seg in enumerate(segments):
    color = segment_color(int(seg)) if seg else PADDING
    draw.rectangle([GAP + i * cell, LINE, GAP + (i + 1) * cell - 1, LINE + STRIP_HEIGHT - 1],
                   fill=color)
  for seg, image, label, x, y in layout:
    draw.text((x, top + y), label, fill=TEXT, font=font)
    frame_y = top + y + LINE
    draw.rectangle([x, frame_y, x + image.width + 2 * BORDER - 1,
                    frame_y + image.height + 2 * BORDER - 1], fill=segment_color(seg))
    canvas.paste(image, (x + BORDER, frame_y + BORDER))
  return canvas


def main(argv: list[str]) -> None:
  del argv
  config = flags.FLAGS.config
  config_lib.validate(config)
  if not config.input.get("packing"):
    raise ValueError("draw_packing needs a config with 'input.packing' (e.g. configs/navit.py).")
  packing = config.input.packing
  batch = next(data_lib.make_train_iterator(
      config.input.data, config.input.pp, config.input.batch_size, seed=config.seed,
      packing=packing))
  rows = min(flags.FLAGS.rows, len(batch["segment_ids"]))
  length = batch["segment_ids"].shape[1]
  width = max(640, length * flags.FLAGS.cell + 2 * GAP)
  font = ImageFont.load_default()
  blocks = [draw_row({k: v[r] for k, v in batch.items()}, r, packing.patch_size,
                     config.input.data.name, width, font) for r in range(rows)]
  canvas = Image.new("RGB", (width, sum(b.height for b in blocks)), BACKGROUND)
  top = 0
  for block in blocks:
    canvas.paste(block, (0, top))
    top += block.height
  canvas.save(flags.FLAGS.out)
  per_row = batch["label_mask"].sum(-1)  # [B]
  print(f"wrote {flags.FLAGS.out} ({canvas.width}x{canvas.height})")
  print(f"{rows} of {len(per_row)} rows drawn; images per row {per_row[:rows].tolist()} "
        f"(batch mean {per_row.mean():.2f}); padding fraction "
        f"{float((batch['segment_ids'] == 0).mean()):.1%} of {length}-token rows")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
