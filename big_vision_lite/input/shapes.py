"""The embedded default dataset "shapes": procedurally drawn, built locally at first use.

Each image (sides 24..96 px, aspect ratios 1:2..2:1) shows one large shape of one of ten
classes, rotated by up to 10 degrees, plus 0-2 smaller distractor shapes of other classes
(drawn after it, so they may cover part of it), in random named colours on a blotchy
gradient background. Per example:
  image    PNG bytes (decoded by the `decode` pp op) of an [H, W, 3] uint8 image
  label    class of the large shape (0..9, names in CLASSES)
  objects  {"bbox": [n, 4] float32 (ymin, xmin, ymax, xmax) in [0, 1], "label": [n]}
           for every shape, the large one first
  caption  e.g. b"a large red star, a small blue ring and a small white plus on a blotchy
           background"
Configs: "full" (the default, `shapes` = `shapes/full`: train 8000, test 1000) and "tiny"
(train 256, test 64; for tests). Example i of a split is drawn from its own generator seeded
by (SEED, split, i), so every machine builds the same data and "tiny" is a prefix of "full".
Stored as array_record, so tfds reads (and writes) it without TensorFlow.
"""
import contextlib
import fcntl
import io
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

CLASSES = ("circle", "square", "triangle", "diamond", "plus", "ring", "star", "hexagon",
           "xcross", "crescent")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
          "yellow": (235, 220, 50), "magenta": (210, 50, 200), "cyan": (50, 210, 220),
          "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
          "pink": (250, 150, 180)}
SEED = 1
SPLIT_IDS = {"train": 0, "test": 1}
VERSION = "1.2.0"  # 1.2: per-example seeds and configs; 1.1: easier.


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
    return ((abs(u) <= 0.3) & (abs(v) <= 1.0)) | ((abs(v) <= 0.3) & (abs(u) <= 1.0))
  if name == "ring":
    return (r <= 1.0) & (r >= 0.6)
  if name == "star":
    return r <= 0.55 + 0.45 * np.cos(5 * np.arctan2(v, u))
  if name == "hexagon":
    return np.maximum(abs(v), abs(v) / 2 + abs(u) * 0.866) <= 0.9
  if name == "xcross":
    return ((abs(u - v) <= 0.35) | (abs(u + v) <= 0.35)) & (np.maximum(abs(u), abs(v)) <= 0.85)
  return (r <= 1.0) & ((u - 0.5)**2 + v**2 >= 0.8**2)  # crescent


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A colour gradient plus smooth low-frequency blotches (compresses well as PNG)."""
  start, end = rng.uniform(20, 160, 3), rng.uniform(20, 160, 3)
  if rng.random() < 0.5:
    ramp = np.linspace(0, 1, w)[None, :, None]  # [1, W, 1]
  else:
    ramp = np.linspace(0, 1, h)[:, None, None]  # [H, 1, 1]
  coarse = rng.normal(0, 15, (4, 4, 3)).astype(np.float32)
  blotches = np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize((w, h), Image.BILINEAR))
                       for c in range(3)], -1)  # [H, W, 3]
  return (start + (end - start) * ramp + blotches).astype(np.float32)


def draw_example(rng: np.random.Generator) -> dict[str, Any]:
  """Draws one example (see module docstring) from `rng`."""
  aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))  # width / height
  area = rng.uniform(24, 96) ** 2
  h = int(np.clip(round(np.sqrt(area / aspect)), 24, 96))
  w = int(np.clip(round(np.sqrt(area * aspect)), 24, 96))
  image = _background(rng, h, w)  # [H, W, 3]
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres, [H, W] each
  main = int(rng.integers(len(CLASSES)))
  others = rng.permutation([k for k in range(len(CLASSES)) if k != main])
  kinds = [main] + [int(k) for k in others[:rng.integers(0, 3)]]
  color_names = list(COLORS)
  words, boxes, drawn = [], [], []
  side = min(h, w)
  for i, kind in enumerate(kinds):
    radius = side * (rng.uniform(0.32, 0.45) if i == 0 else rng.uniform(0.08, 0.14))
    cy = rng.uniform(radius * 0.8, h - radius * 0.8)
    cx = rng.uniform(radius * 0.8, w - radius * 0.8)
    angle = np.deg2rad(rng.uniform(-10, 10))
    du, dv = (xx - cx) / radius, (yy - cy) / radius
    u = du * np.cos(angle) + dv * np.sin(angle)
    v = -du * np.sin(angle) + dv * np.cos(angle)
    mask = shape_mask(kind, u, v)  # [H, W]
    color_name = color_names[int(rng.integers(len(color_names)))]
    color = np.asarray(COLORS[color_name], np.float32) + rng.normal(0, 12, 3)
    if not mask.any():  # A distractor too small to cover a pixel centre.
      continue
    image[mask] = color
    ys, xs = np.nonzero(mask)
    boxes.append((ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w))
    drawn.append(kind)
    words.append(f"a {'large' if i == 0 else 'small'} {color_name} {CLASSES[kind]}")
  caption = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
  png = io.BytesIO()
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(png, format="PNG")
  return {"image": png.getvalue(), "label": main,
          "objects": {"bbox": np.asarray(boxes, np.float32).reshape(-1, 4),
                      "label": np.asarray(drawn, np.int64)},
          "caption": caption + " on a blotchy background"}


def example_rng(split: str, index: int) -> np.random.Generator:
  """The generator that draws example `index` of `split`."""
  return np.random.default_rng((SEED, SPLIT_IDS[split], index))


class ShapesConfig(tfds.core.BuilderConfig):
  """A size of the shapes dataset: `num_examples` per split."""

  def __init__(self, *, num_examples: dict[str, int], **kwargs):
    super().__init__(version=VERSION, **kwargs)
    self.num_examples = num_examples


class Shapes(tfds.core.GeneratorBasedBuilder):
  """tfds builder of the "shapes" dataset (no download; drawn from fixed seeds)."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [
      ShapesConfig(name="full", num_examples={"train": 8000, "test": 1000},
                   description="The default size."),
      ShapesConfig(name="tiny", num_examples={"train": 256, "test": 64},
                   description="A prefix of 'full' for fast tests."),
  ]
  DEFAULT_CONFIG_NAME = "full"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "label": tfds.features.ClassLabel(names=CLASSES),
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "label": tfds.features.ClassLabel(names=CLASSES)}),
            "caption": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True)  # Records stay in index order, so "train[:10]" is 0..9.

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split, n)
            for split, n in self.builder_config.num_examples.items()}

  def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, dict]]:
    for index in range(num_examples):
      yield index, draw_example(example_rng(split, index))


def default_data_dir() -> str:
  """$TFDS_DATA_DIR, else ~/tensorflow_datasets (where tfds looks by default)."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


@contextlib.contextmanager
def _exclusive(path: str) -> Iterator[None]:
  with open(path, "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_built(data_dir: str | None = None, config: str = "full") -> str:
  """Builds shapes/`config` into `data_dir` unless it is there; returns the data_dir.

  Safe when several processes call it at once: a file lock lets one build while the others
  wait, and tfds writes into an `incomplete.*` directory renamed into place when done.
  """
  data_dir = os.path.abspath(data_dir or default_data_dir())
  done = os.path.join(data_dir, "shapes", config, VERSION, "dataset_info.json")
  if os.path.exists(done):
    return data_dir
  if config not in {c.name for c in Shapes.BUILDER_CONFIGS}:
    raise ValueError(f"Unknown shapes config {config!r}; known: "
                     f"{', '.join(c.name for c in Shapes.BUILDER_CONFIGS)}.")
  os.makedirs(data_dir, exist_ok=True)
  with _exclusive(os.path.join(data_dir, ".shapes.lock")):
    if not os.path.exists(done):
      Shapes(config=config, data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir
