"""Small PNG pictures drawn with PIL (no plotting library): line plots and image grids."""
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ("red", "blue", "green", "orange", "purple", "black")


def line_plot(curves: dict[str, Sequence[float]], path: str, *, title: str, xlabel: str,
              y_range: tuple[float, float] = (0.0, 1.0)) -> None:
  """One line per curve (value per layer index) on a fixed y range, with a legend."""
  width, height, margin = 640, 400, 50
  image = Image.new("RGB", (width, height), "white")
  pen = ImageDraw.Draw(image)
  pen.rectangle((margin, margin, width - margin, height - margin), outline="black")
  layers = max(len(c) for c in curves.values())
  low, high = y_range
  to_xy = lambda i, v: (margin + (width - 2 * margin) * i / max(layers - 1, 1),
                        height - margin - (height - 2 * margin) * (v - low) / (high - low))
  for v in np.linspace(low, high, 3):
    pen.text((8, to_xy(0, v)[1] - 6), f"{v:.2f}", fill="black")
  pen.text((width // 2 - 90, height - 30), xlabel, fill="black")
  pen.text((margin, 15), title, fill="black")
  for index, ((label, values), colour) in enumerate(zip(curves.items(), COLOURS)):
    points = [to_xy(i, float(v)) for i, v in enumerate(values)]
    pen.line(points, fill=colour, width=2)
    pen.text((width - margin - 120, margin + 8 + 14 * index), label, fill=colour)
  image.save(path)


def image_grid(rows: Sequence[np.ndarray], path: str, scale: int = 1, gap: int = 2) -> None:
  """rows: each [N, H, W, 3] floats in [0, 1] -> one PNG, a row per entry, N columns."""
  n, h, w, _ = rows[0].shape
  grid = np.ones((len(rows) * (h * scale + gap) + gap, n * (w * scale + gap) + gap, 3))
  for r, images in enumerate(rows):
    for c, image in enumerate(images):
      big = np.repeat(np.repeat(np.clip(image, 0, 1), scale, 0), scale, 1)
      top, left = gap + r * (h * scale + gap), gap + c * (w * scale + gap)
      grid[top:top + h * scale, left:left + w * scale] = big
  Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)
