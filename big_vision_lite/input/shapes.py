"""The embedded default dataset "shapes": procedurally drawn, built locally at first use.

Each image (sides 24..96 px, aspect ratios 1:2..2:1) shows one large shape of one of ten
classes, rotated by up to 10 degrees, plus 0-2 smaller distractor shapes of other classes,
in random named colours on a blotchy gradient background. Per example:
  image    PNG bytes (decoded by the `decode` pp op) of an [H, W, 3] uint8 image
  label    class of the large shape (0..9, names in CLASSES)
  objects  {"bbox": [n, 4] float32 (ymin, xmin, ymax, xmax) in [0, 1], "label": [n]}
           for every shape, the large one first
  caption  e.g. b"a large red star, a small blue ring and a small white plus on a blotchy
           background"
Splits: train (8000) and test (1000), stored as array_record so tfds reads them without
TensorFlow. The content is a pure function of the split's seed, so every machine builds the
same dataset.
"""
import contextlib
import fcntl
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

CLASSES = ("circle", "square", "triangle", "diamond", "plus", "ring", "star", "hexagon",
           "xcross", "crescent")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
          "yellow": (235, 220, 50), "magenta": (210, 50, 200), "cyan": (50, 210, 220),
          "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
          "pink": (250, 150, 180)}
SPLITS = {"train": (8000, 1), "test": (1000, 2)}  # name: (examples, seed)
VERSION = "1.1.0"


def shape_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Boolean mask of shape class `kind` on coordinates (u, v) normalised to the radius."""
  r = np.sqrt(u**2 + v**2)
  name = CLASSES[kind]
  if name == "circle":
    return r <= 1.0
  if name == "square":
    return np.maximum(abs(u), abs(v)) <= 0.8
  if name == "triangle":
    return (v >= -0.9) & (v <= 0.8) & (abs(u) <= 0.95 * (v + 0.9) / 1.7)
  if name == "diamond":
    return abs(u) / 0.75 + abs(v) <= 1.0
  if name == "plus":
    return (((abs(u) <= 0.3) & (abs(v) <= 1.0)) | ((abs(v) <= 0.3) & (abs(u) <= 1.0)))
  if name == "ring":
    return (r <= 1.0) & (r >= 0.6)
  if name == "star":
    theta = np.arctan2(v, u)
    return r <= 0.55 + 0.45 * np.cos(5 * theta)
  if name == "hexagon":
    return np.maximum(abs(v), abs(v) / 2 + abs(u) * 0.866) <= 0.9
  if name == "xcross":
    return ((abs(u - v) <= 0.35) | (abs(u + v) <= 0.35)) & (np.maximum(abs(u), abs(v)) <= 0.85)
  return (r <= 1.0) & ((u - 0.5)**2 + v**2 >= 0.8**2)  # crescent


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A colour gradient plus smooth low-frequency blotches (compresses well as PNG)."""
  start, end = rng.uniform(20, 160, 3), rng.uniform(20, 160, 3)
  if rng.random() < 0.5:
    ramp = np.linspace(0, 1, w)[None, :, None]
  else:
    ramp = np.linspace(0, 1, h)[:, None, None]
  coarse = rng.normal(0, 15, (4, 4, 3))
  blotches = np.asarray(Image.fromarray(coarse[..., 0].astype(np.float32)).resize(
      (w, h), Image.BILINEAR))[..., None] + np.stack(
          [np.asarray(Image.fromarray(coarse[..., c].astype(np.float32)).resize(
              (w, h), Image.BILINEAR)) for c in range(3)], -1)
  image = start + (end - start) * ramp + blotches
  return np.broadcast_to(image, (h, w, 3)).astype(np.float32)


def draw_example(rng: np.random.Generator) -> dict:
  """Draws one example (see module docstring) from `rng`."""
  aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
  area = rng.uniform(24, 96) ** 2
  h = int(np.clip(round(np.sqrt(area / aspect)), 24, 96))
  w = int(np.clip(round(np.sqrt(area * aspect)), 24, 96))
  image = _background(rng, h, w)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
  main = int(rng.integers(len(CLASSES)))
  others = rng.permutation([k for k in range(len(CLASSES)) if k != main])
  kinds = [main] + list(others[:rng.integers(0, 3)])
  color_names = list(COLORS)
  words, boxes = [], []
  side = min(h, w)
  for i, kind in enumerate(kinds):
    radius = side * (rng.uniform(0.32, 0.45) if i == 0 else rng.uniform(0.08, 0.14))
    cy = rng.uniform(radius * 0.8, h - radius * 0.8)
    cx = rng.uniform(radius * 0.8, w - radius * 0.8)
    angle = np.deg2rad(rng.uniform(-10, 10))
    du, dv = (xx - cx) / radius, (yy - cy) / radius
    u = du * np.cos(angle) + dv * np.sin(angle)
    v = -du * np.sin(angle) + dv * np.cos(angle)
    mask = shape_mask(kind, u, v)
    if not mask.any():
      continue
    color_name = color_names[int(rng.integers(len(color_names)))]
    color = np.asarray(COLORS[color_name], np.float32) + rng.normal(0, 12, 3)
    image[mask] = color
    ys, xs = np.nonzero(mask)
    boxes.append(((ys.min()) / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w))
    words.append(f"a {'large' if i == 0 else 'small'} {color_name} {CLASSES[kind]}")
  # Later distractors may cover part of the large shape, never all of it (drawn first).
  caption = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
  png = io.BytesIO()
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(png, format="PNG")
  return {"image": png.getvalue(), "label": main,
          "objects": {"bbox": np.asarray(boxes, np.float32).reshape(-1, 4),
                      "label": np.asarray(kinds[:len(boxes)], np.int64)},
          "caption": caption + " on a blotchy background"}


class Shapes(tfds.core.GeneratorBasedBuilder):
  """tfds builder of the "shapes" dataset (no download; drawn from fixed seeds)."""

  VERSION = tfds.core.Version(VERSION)

  def _info(self) -> tfds.core.DatasetInfo:
    labels = tfds.features.ClassLabel(names=CLASSES)
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "label": labels,
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "label": tfds.features.ClassLabel(names=CLASSES)}),
            "caption": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(n, seed) for name, (n, seed) in SPLITS.items()}

  def _generate_examples(self, num_examples: int, seed: int):
    rng = np.random.default_rng(seed)
    for index in range(num_examples):
      yield index, draw_example(rng)


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


@contextlib.contextmanager
def _exclusive(path: str):
  with open(path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_built(data_dir: str | None = None) -> str:
  """Builds "shapes" into `data_dir` unless it is there; safe across processes. Returns it."""
  data_dir = os.path.abspath(data_dir or default_data_dir())
  done = os.path.join(data_dir, "shapes", VERSION, "dataset_info.json")
  if os.path.exists(done):
    return data_dir
  os.makedirs(data_dir, exist_ok=True)
  with _exclusive(os.path.join(data_dir, ".shapes.lock")):
    if not os.path.exists(done):  # tfds writes into incomplete.* and renames when done.
      Shapes(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir
