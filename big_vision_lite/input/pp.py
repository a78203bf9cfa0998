"""Preprocessing ops in the big_vision style, looked up by name in `OPS`.

A pp string chains ops with "|": `decode|resize(48)|value_range(-1, 1)|onehot(10)`.
Arguments are Python literals only (parsed with `ast`, never evaluated); `validate(pp)`
checks a string at config time. Each op is a factory returning
`fn(example: dict, rng: np.random.Generator) -> dict` working in numpy on one example;
random ops draw from `rng`, so an example's augmentation is fixed by the pipeline's seed
and the example's position. Image ops take `key="image"`; images are [H, W, 3] arrays.

Resizing uses PIL: uint8 images as one RGB image, other dtypes channel by channel in
float32. Its bilinear/bicubic/area/lanczos filters widen with the downscaling factor, so
shrinking is antialiased (like `tf.image.resize(..., antialias=True)`); "nearest" is not.

Self-supervised augmentation (on uint8, before value_range): `color_jitter`,
`random_grayscale`, `gaussian_blur`, `solarize`, `random_invert` (torchvision's / the
official DINO code's definitions, each applied with a probability p), and `multicrop`,
which turns one image into DINO's "global_crops" [2, g, g, 3] and "local_crops"
[N, l, l, 3] float32.

Detection. Boxes travel through the geometric ops as tfds gives them, in the nested dict
`example["objects"]` = {"bbox": [n, 4] float32 (ymin, xmin, ymax, xmax) normalised to [0, 1]
by the image's height and width, "label": [n], and any other per-object arrays, e.g. coco's
"is_crowd", "area", "id"}. Every op that moves pixels moves these boxes with the image when
"objects" is present: `flip_lr` mirrors them; `random_crop`, `central_crop`,
`inception_crop` and `random_size_crop` clip them to the crop and drop (with all their
per-object arrays) those left with no area; resizes keep normalised boxes as they are.
The batcher takes flat numeric arrays only, so a detection pp string ends with
`to_cxcywh|pad_boxes(T)`, which replaces "objects" by flat keys (a leftover nested dict is
an error naming it). The DETR ops, in pipeline order:
  orig_size          "orig_size" int32 [2] = the current image's (H, W) (put after decode)
  normalize          (x / 255 - mean) / std with ImageNet's mean and std (DETR's Normalize)
  filter_objects     drops crowd objects (coco's "is_crowd") and boxes of no area
  random_resize      DETR's RandomResize: shorter side to one of `sizes`, longer <= max_size
  random_size_crop   DETR's RandomSizeCrop(min_size, max_size)
  random_select      DETR's RandomSelect: one of two pp strings, the first with p
  to_cxcywh          objects -> "boxes" [n, 4] float32 (cx, cy, w, h) in [0, 1], "labels"
                     [n] int32 (and "is_crowd" [n] bool, "area" [n] float32 if present, for
                     the detection evaluator's COCOeval); removes "objects"
  pad_boxes          pads those to max_boxes T rows (zeros) with "box_mask" [T] bool; more
                     than T boxes is an error naming the op and the count (no truncation)
  pad_image          pads the image bottom/right with zeros to S x S, "pixel_mask" [S, S]
                     bool (True on real pixels); boxes stay normalised by the unpadded image

Text. `choose(k, inkey, outkey)` samples k of an example's captions (tfds coco_captions'
"captions/text"; a nested field is read with "a/b"), `tokenize(max_len, tokenizer, inkey,
outkey)` turns a text into int32 [max_len] (a list of K into [K, max_len]) with a tokenizer of
`tokenizers.get` ("bytes" or "sentencepiece:PATH"). For shapes:
`decode|resize(32)|value_range(-1, 1)|tokenize(16, inkey="caption")|keep("image", "text")`;
for coco_captions: `...|choose(1)|tokenize(64)|keep("image", "text")` (the batcher refuses
text and nested dicts, so keep only arrays).
"""
import ast
import inspect
import io
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from PIL import ImageFilter

from big_vision_lite.input import tokenizers
from big_vision_lite.registry import Registry

OPS = Registry("pp op")
Example = dict[str, Any]
OpFn = Callable[[Example, np.random.Generator], Example]
RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "area": Image.BOX, "lanczos": Image.LANCZOS}


def _split(pp: str) -> list[str]:
  """Splits `pp` at the "|" that are outside brackets and string literals."""
  parts, depth, quote, start = [], 0, None, 0
  for i, char in enumerate(pp):
    if quote:
      quote = None if char == quote and pp[i - 1] != "\\" else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "|" and depth == 0:
      parts.append(pp[start:i])
      start = i + 1
  parts.append(pp[start:])
  return [part.strip() for part in parts]


def _parse_op(text: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
  """Parses one op, `name` or `name(literal, ..., key=literal)`, to (name, args, kwargs)."""
  form = f"pp op {text!r} is not of the form name or name(arg, ..., key=value)."
  try:
    node = ast.parse(text, mode="eval").body
  except (SyntaxError, ValueError):
    raise ValueError(form) from None
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or any(
      k.arg is None for k in node.keywords):
    raise ValueError(form)
  try:
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except (ValueError, TypeError, SyntaxError, RecursionError):
    raise ValueError(f"pp op {text!r}: arguments must be Python literals "
                     "(numbers, strings, tuples, lists, dicts, None, True, False).") from None
  return node.func.id, args, kwargs


def _parse(pp: str) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
  """Parses `pp` and checks op names and arguments against the op signatures."""
  if not pp.strip():
    return []
  ops = []
  for text in _split(pp):
    if not text:
      raise ValueError(f"pp string {pp!r} has an empty op (two '|' in a row, or one at an end).")
    name, args, kwargs = _parse_op(text)
    factory = OPS.get(name)
    try:
      inspect.signature(factory).bind(*args, **kwargs)
    except TypeError as e:
      raise ValueError(f"pp op {text!r}: bad arguments for {name}{inspect.signature(factory)} "
                       f"({e}).") from None
    ops.append((name, args, kwargs))
  return ops


def validate(pp: str) -> None:
  """Checks that `pp` parses, names known ops (ValueError listing them otherwise) and gives
  them arguments their signatures and factories accept; runs no op on data."""
  for name, args, kwargs in _parse(pp):
    OPS.get(name)(*args, **kwargs)


def get_preprocess_fn(pp: str) -> OpFn:
  """Composes the ops of `pp` into one `fn(example, rng) -> example` (input not mutated)."""
  fns = [OPS.get(name)(*args, **kwargs) for name, args, kwargs in _parse(pp)]

  def preprocess(example: Example, rng: np.random.Generator) -> Example:
    example = dict(example)
    for fn in fns:
      example = fn(example, rng)
    return example
  return preprocess


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _check_method(method: str) -> str:
  if method not in RESAMPLE:
    raise ValueError(f"pp resize method must be one of {', '.join(RESAMPLE)}; got {method!r}.")
  return method


def resize_image(image: np.ndarray, h: int, w: int, method: str) -> np.ndarray:
  """PIL resize of [H, W, C] uint8 (as one image) or float (channel by channel)."""
  if image.shape[:2] == (h, w):
    return image
  if image.dtype == np.uint8:
    return np.asarray(Image.fromarray(image).resize((w, h), RESAMPLE[method]))
  channels = [np.asarray(Image.fromarray(image[..., c].astype(np.float32)).resize(
      (w, h), RESAMPLE[method])) for c in range(image.shape[-1])]
  return np.stack(channels, -1).astype(image.dtype)


def _check_image(image: Any, key: str) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"Example key {key!r} must be an [H, W, 3] image, got shape "
                     f"{image.shape} dtype {image.dtype}.")
  return image


@OPS.register("decode")
def decode(key: str = "image") -> OpFn:
  """PNG/JPEG bytes -> [H, W, 3] uint8 (RGB); decoded arrays pass through, checked."""
  def fn(example, rng):
    del rng
    value = example[key]
    if isinstance(value, (bytes, np.bytes_)):
      value = np.asarray(Image.open(io.BytesIO(value)).convert("RGB"))
    image = _check_image(value, key)
    if image.dtype != np.uint8:
      raise ValueError(f"decode: example key {key!r} must be uint8, got shape {image.shape} "
                       f"dtype {image.dtype}.")
    return dict(example, **{key: image})
  return fn


@OPS.register("resize")
def resize(size: int | Sequence[int], key: str = "image", method: str = "bilinear") -> OpFn:
  """Resizes to `size` (int: square) ignoring the aspect ratio."""
  h, w = _hw(size)
  _check_method(method)
  def fn(example, rng):
    del rng
    return dict(example, **{key: resize_image(_check_image(example[key], key), h, w, method)})
  return fn


@OPS.register("resize_small")
def resize_small(size: int, key: str = "image", method: str = "bilinear") -> OpFn:
  """Resizes so that the shorter side is `size`, keeping the aspect ratio."""
  _check_method(method)
  def fn(example, rng):
    del rng
    image = _check_image(example[key], key)
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_hw = max(int(round(h * scale)), size), max(int(round(w * scale)), size)
    return dict(example, **{key: resize_image(image, *new_hw, method)})
  return fn


def _crop(image: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
  return image[top:top + h, left:left + w]


OBJECTS = "objects"  # The nested per-object dict, as tfds names it.
MIN_BOX_PIXELS = 1e-3  # Crops drop boxes thinner than this (float32 rounding, not content).


def _bbox(objects: Any, op: str) -> np.ndarray:
  """objects["bbox"] as [n, 4] float64, checked."""
  if not isinstance(objects, dict) or "bbox" not in objects:
    got = f"keys {sorted(objects)}" if isinstance(objects, dict) else type(objects).__name__
    raise ValueError(f"pp op {op}: example key {OBJECTS!r} must be a dict with 'bbox' [n, 4] "
                     f"(ymin, xmin, ymax, xmax) in [0, 1], got {got}.")
  return np.asarray(objects["bbox"], np.float64).reshape(-1, 4)


def _select(objects: dict[str, Any], keep: np.ndarray) -> dict[str, np.ndarray]:
  """The objects where `keep` [n] is True, every per-object array alike."""
  return {k: np.asarray(v)[keep] for k, v in objects.items()}


def _crop_objects(example: Example, window: tuple[int, int, int, int],
                  image_hw: tuple[int, int], op: str) -> Example:
  """Moves example["objects"] (if any) into the crop `window` (top, left, h, w) of an image
  of `image_hw`: boxes clipped to it and renormalised; those left with no area (less than
  MIN_BOX_PIXELS of height or width: float32 boxes on a crop edge) dropped."""
  if OBJECTS not in example:
    return example
  top, left, h, w = window
  boxes = _bbox(example[OBJECTS], op) * np.tile(image_hw, 2)  # [n, 4] pixels
  clipped = np.clip(boxes - [top, left, top, left], 0, [h, w, h, w])  # [n, 4] crop pixels
  keep = ((clipped[:, 2] - clipped[:, 0] > MIN_BOX_PIXELS)
          & (clipped[:, 3] - clipped[:, 1] > MIN_BOX_PIXELS))
  objects = _select(example[OBJECTS], keep)
  objects["bbox"] = (clipped[keep] / [h, w, h, w]).astype(np.float32)
  return dict(example, **{OBJECTS: objects})


def _crop_example(example: Example, key: str, image: np.ndarray,
                  window: tuple[int, int, int, int], op: str) -> Example:
  """example with example[key] = the `window` (top, left, h, w) of `image`, boxes moved."""
  example = _crop_objects(example, window, image.shape[:2], op)
  return dict(example, **{key: _crop(image, *window)})


@OPS.register("central_crop")
def central_crop(size: int | Sequence[int], key: str = "image") -> OpFn:
  """Crops the central `size` window (the image must be at least that large)."""
  h, w = _hw(size)
  def fn(example, rng):
    del rng
    image = _check_image(example[key], key)
    if image.shape[0] < h or image.shape[1] < w:
      raise ValueError(f"central_crop({size}): image {image.shape} is smaller.")
    top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    return _crop_example(example, key, image, (top, left, h, w), "central_crop")
  return fn


@OPS.register("random_crop")
def random_crop(size: int | Sequence[int], key: str = "image") -> OpFn:
  """Crops a uniformly placed `size` window."""
  h, w = _hw(size)
  def fn(example, rng):
    image = _check_image(example[key], key)
    if image.shape[0] < h or image.shape[1] < w:
      raise ValueError(f"random_crop({size}): image {image.shape} is smaller.")
    top = int(rng.integers(0, image.shape[0] - h + 1))
    left = int(rng.integers(0, image.shape[1] - w + 1))
    return _crop_example(example, key, image, (top, left, h, w), "random_crop")
  return fn


def inception_box(height: int, width: int, area_min: float, area_max: float,
                  rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a random box of area_min..area_max % of a height x width image,
  aspect (w / h) log-uniform in 3/4..4/3; after 10 misfits, the whole image."""
  for _ in range(10):
    area = height * width * rng.uniform(area_min, area_max) / 100
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    h, w = int(round(np.sqrt(area / aspect))), int(round(np.sqrt(area * aspect)))
    if 0 < h <= height and 0 < w <= width:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  return 0, 0, height, width  # The fallback of the usual implementations.


@OPS.register("inception_crop")
def inception_crop(size: int | Sequence[int] | None = None, area_min: float = 5,
                   area_max: float = 100, key: str = "image",
                   method: str = "bilinear") -> OpFn:
  """Random crop of area_min..area_max % of the image with aspect 3/4..4/3, resized."""
  _check_method(method)
  def fn(example, rng):
    image = _check_image(example[key], key)
    window = inception_box(*image.shape[:2], area_min, area_max, rng)
    example = _crop_example(example, key, image, window, "inception_crop")
    if size is not None:
      example[key] = resize_image(example[key], *_hw(size), method)
    return example
  return fn


@OPS.register("flip_lr")
def flip_lr(key: str = "image") -> OpFn:
  """Flips left-right with probability 1/2 (and example["objects"]'s boxes with it)."""
  def fn(example, rng):
    image = _check_image(example[key], key)
    if rng.random() >= 0.5:
      return example
    if OBJECTS in example:
      boxes = _bbox(example[OBJECTS], "flip_lr")  # [n, 4] (ymin, xmin, ymax, xmax)
      flipped = np.stack([boxes[:, 0], 1 - boxes[:, 3], boxes[:, 2], 1 - boxes[:, 1]], -1)
      example = dict(example, **{OBJECTS: dict(example[OBJECTS],
                                               bbox=flipped.astype(np.float32))})
    return dict(example, **{key: image[:, ::-1]})
  return fn


@OPS.register("value_range")
def value_range(vmin: float = -1, vmax: float = 1, in_min: float = 0, in_max: float = 255,
                key: str = "image") -> OpFn:
  """Maps [in_min, in_max] linearly to [vmin, vmax] as float32."""
  def fn(example, rng):
    del rng
    x = np.asarray(example[key], np.float32)
    scaled = vmin + (x - in_min) * (vmax - vmin) / (in_max - in_min)
    return dict(example, **{key: scaled.astype(np.float32)})
  return fn


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, of images in [0, 1] (torchvision's Normalize).
IMAGENET_STD = (0.229, 0.224, 0.225)


@OPS.register("normalize")
def normalize(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              in_max: float = 255, key: str = "image") -> OpFn:
  """(x / in_max - mean) / std per channel, float32: torchvision's Normalize after ToTensor,
  ImageNet's statistics by default (what timm/torchvision ResNets, and DETR, expect)."""
  for name, values in (("mean", mean), ("std", std)):
    if not (isinstance(values, (tuple, list)) and len(values) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
      raise ValueError(f"pp op normalize: {name} must be 3 numbers (R, G, B); got {values!r}.")
  if min(std) <= 0 or not isinstance(in_max, (int, float)) or in_max <= 0:
    raise ValueError(f"pp op normalize: std and in_max must be > 0; got {std!r}, {in_max!r}.")
  mean_array, std_array = np.float32(mean), np.float32(std)
  def fn(example, rng):
    del rng
    x = np.asarray(example[key], np.float32) / np.float32(in_max)
    return dict(example, **{key: ((x - mean_array) / std_array).astype(np.float32)})
  return fn


@OPS.register("onehot")
def onehot(depth: int, key: str = "label", key_result: str | None = None, on: float = 1.0,
           off: float = 0.0) -> OpFn:
  """Int label(s) -> [depth] (or [n, depth]) float32 one-hot; out of range raises."""
  def fn(example, rng):
    del rng
    label = np.asarray(example[key])
    if np.any(label < 0) or np.any(label >= depth):
      raise ValueError(f"onehot({depth}): label {label} of key {key!r} is out of range.")
    out = np.full(label.shape + (depth,), off, np.float32)
    np.put_along_axis(out, label[..., None].astype(np.int64), on, axis=-1)
    return dict(example, **{key_result or key: out})
  return fn


@OPS.register("keep")
def keep(*keys: str) -> OpFn:
  """Keeps only `keys` (missing ones raise, naming them)."""
  def fn(example, rng):
    del rng
    missing = [k for k in keys if k not in example]
    if missing:
      raise ValueError(f"keep: keys {missing} are not in the example (has {sorted(example)}).")
    return {k: example[k] for k in keys}
  return fn


@OPS.register("drop")
def drop(*keys: str) -> OpFn:
  """Removes `keys` if present."""
  def fn(example, rng):
    del rng
    return {k: v for k, v in example.items() if k not in keys}
  return fn


@OPS.register("copy")
def copy(inkey: str, outkey: str) -> OpFn:
  """example[outkey] = example[inkey]."""
  def fn(example, rng):
    del rng
    return dict(example, **{outkey: example[inkey]})
  return fn


def _check_probability(op: str, name: str, p: float) -> float:
  if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p <= 1:
    raise ValueError(f"pp op {op}: {name} must be a probability in [0, 1]; got {p!r}.")
  return float(p)


def _check_uint8(image: Any, key: str, op: str) -> np.ndarray:
  image = _check_image(image, key)
  if image.dtype != np.uint8:
    raise ValueError(f"pp op {op}: example key {key!r} must be a uint8 image (apply it before "
                     f"value_range), got dtype {image.dtype}.")
  return image


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _luma(image: np.ndarray) -> np.ndarray:
  """ITU-R 601-2 luma of [H, W, 3] -> [H, W] float32."""
  return image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _blend(image: np.ndarray, other: np.ndarray | float, factor: float) -> np.ndarray:
  """factor * image + (1 - factor) * other, rounded and clipped to uint8."""
  return _to_uint8(factor * image.astype(np.float32) + (1 - factor) * other)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """uint8 [H, W, 3] blended with black (torchvision's adjust_brightness)."""
  return _blend(image, 0.0, factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """uint8 [H, W, 3] blended with the mean of its luma (torchvision's adjust_contrast)."""
  return _blend(image, float(_luma(image).mean()), factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
  """uint8 [H, W, 3] blended with its luma (torchvision's adjust_saturation)."""
  return _blend(image, _luma(image)[..., None], factor)


def adjust_hue(image: np.ndarray, shift: float) -> np.ndarray:
  """uint8 [H, W, 3] with the HSV hue shifted by `shift` turns (torchvision's adjust_hue)."""
  rgb = image.astype(np.float32) / 255
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  value, chroma = rgb.max(-1), rgb.max(-1) - rgb.min(-1)
  saturation = np.where(value > 0, chroma / np.where(value > 0, value, 1), 0)
  divisor = np.where(chroma > 0, chroma, 1)
  hue = np.where(value == r, (g - b) / divisor,
                 np.where(value == g, 2 + (b - r) / divisor, 4 + (r - g) / divisor))
  hue = (hue / 6 + shift) % 1.0
  sector = np.floor(hue * 6)
  frac = hue * 6 - sector
  p = value * (1 - saturation)
  q = value * (1 - saturation * frac)
  t = value * (1 - saturation * (1 - frac))
  table = np.stack([value, t, p, q, value, p, p, value, t, p, q, value, t, p, value,
                    value, p, q], -1).reshape(hue.shape + (6, 3))  # [H, W, sector, rgb]
  index = (sector.astype(np.int64) % 6)[..., None, None]
  return _to_uint8(np.take_along_axis(table, index, -2)[..., 0, :] * 255)


def _with_probability(op: str, p: float, key: str,
                      transform: Callable[[np.ndarray, np.random.Generator], np.ndarray]
                      ) -> OpFn:
  """An op that, with probability p (one uniform draw), replaces the uint8 image at `key` by
  transform(image, rng); the transform may draw more."""
  p = _check_probability(op, "p", p)
  def fn(example, rng):
    image = _check_uint8(example[key], key, op)
    if rng.random() >= p:
      return example
    return dict(example, **{key: transform(image, rng)})
  return fn


@OPS.register("color_jitter")
def color_jitter(brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.2,
                 hue: float = 0.1, p: float = 0.8, key: str = "image") -> OpFn:
  """With probability p, torchvision's ColorJitter on uint8: brightness, contrast and
  saturation factors uniform in [max(0, 1 - x), 1 + x], a hue shift uniform in [-hue, hue],
  the four applied in a random order (a strength of 0 skips its adjustment).

  Draws: one uniform for p; if applied, a permutation of 4, then the 4 factors in the order
  brightness, contrast, saturation, hue.
  """
  for name, strength in (("brightness", brightness), ("contrast", contrast),
                         ("saturation", saturation)):
    if not isinstance(strength, (int, float)) or strength < 0:
      raise ValueError(f"pp op color_jitter: {name} must be a number >= 0; got {strength!r}.")
  if not isinstance(hue, (int, float)) or not 0 <= hue <= 0.5:
    raise ValueError(f"pp op color_jitter: hue must be a number in [0, 0.5]; got {hue!r}.")
  adjustments = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
  strengths = (brightness, contrast, saturation, hue)
  ranges = [(max(0.0, 1 - x), 1 + x) for x in strengths[:3]] + [(-hue, hue)]

  def jitter(image, rng):
    order = rng.permutation(4)
    factors = [rng.uniform(low, high) for low, high in ranges]
    for i in order:
      if strengths[i] > 0:
        image = adjustments[i](image, factors[i])
    return image
  return _with_probability("color_jitter", p, key, jitter)


@OPS.register("random_grayscale")
def random_grayscale(p: float = 0.2, key: str = "image") -> OpFn:
  """With probability p, uint8 RGB -> its rounded ITU-R 601-2 luma in all 3 channels."""
  return _with_probability(
      "random_grayscale", p, key,
      lambda image, rng: np.repeat(_to_uint8(_luma(image))[..., None], 3, -1))


@OPS.register("gaussian_blur")
def gaussian_blur(p: float, sigma_min: float = 0.1, sigma_max: float = 2.0,
                  key: str = "image") -> OpFn:
  """With probability p, PIL's GaussianBlur(radius=sigma), sigma uniform in
  [sigma_min, sigma_max] (the official DINO code's blur), on uint8."""
  if not (isinstance(sigma_min, (int, float)) and isinstance(sigma_max, (int, float))
          and 0 <= sigma_min <= sigma_max):
    raise ValueError("pp op gaussian_blur: sigma_min and sigma_max must be numbers with "
                     f"0 <= sigma_min <= sigma_max; got {sigma_min!r}, {sigma_max!r}.")
  def blur(image, rng):
    radius = rng.uniform(sigma_min, sigma_max)
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=radius)))
  return _with_probability("gaussian_blur", p, key, blur)


@OPS.register("solarize")
def solarize(p: float, threshold: int = 128, key: str = "image") -> OpFn:
  """With probability p, uint8 pixels >= threshold become 255 - pixel (PIL's solarize)."""
  if not isinstance(threshold, (int, float)) or not 0 <= threshold <= 256:
    raise ValueError(f"pp op solarize: threshold must be a number in [0, 256]; "
                     f"got {threshold!r}.")
  return _with_probability("solarize", p, key,
                           lambda image, rng: np.where(image >= threshold, 255 - image, image))


@OPS.register("random_invert")
def random_invert(p: float = 0.5, key: str = "image") -> OpFn:
  """With probability p, uint8 pixels -> 255 - pixel (torchvision's RandomInvert)."""
  return _with_probability("random_invert", p, key, lambda image, rng: 255 - image)


def _check_size(name: str, size: Any) -> int:
  if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
    raise ValueError(f"pp op multicrop: {name} must be an int > 0; got {size!r}.")
  return size


def _check_scale(name: str, scale: Any) -> tuple[float, float]:
  if not (isinstance(scale, (tuple, list)) and len(scale) == 2
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scale)
          and 0 < scale[0] <= scale[1] <= 1):
    raise ValueError(f"pp op multicrop: {name} must be (min, max) area fractions with "
                     f"0 < min <= max <= 1; got {scale!r}.")
  return float(scale[0]), float(scale[1])


@OPS.register("multicrop")
def multicrop(global_size: int, local_size: int, num_local: int,
              global_scale: Sequence[float] = (0.4, 1.0),
              local_scale: Sequence[float] = (0.05, 0.4),
              blur_sigma: Sequence[float] = (0.1, 2.0),
              jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1), grayscale_p: float = 0.2,
              invert_p: float = 0.0, vmin: float = -1, vmax: float = 1, key: str = "image",
              method: str = "bicubic") -> OpFn:
  """DINO's multi-crop: uint8 example[key] -> "global_crops" [2, g, g, 3] and
  "local_crops" [num_local, l, l, 3], float32 in [vmin, vmax]; removes example[key].

  Each crop, drawn in turn from the one `rng` (global 1, global 2, then the local ones), is
  `inception_crop(size, 100 * scale[0], 100 * scale[1], method)|flip_lr|color_jitter(*jitter)|
  random_grayscale(grayscale_p)|random_invert(invert_p)|gaussian_blur(b, *blur_sigma)` (no
  random_invert when invert_p is 0, the paper's chain), then for global 2
  `solarize(0.2)`, then `value_range(vmin, vmax)`; blur b = 1.0 (global 1), 0.1 (global 2),
  0.5 (local). Scales are area fractions of the image; blur sigmas are in pixels; `jitter` is
  color_jitter's (brightness, contrast, saturation, hue), the paper's by default.
  """
  global_size = _check_size("global_size", global_size)
  local_size = _check_size("local_size", local_size)
  if not isinstance(num_local, int) or isinstance(num_local, bool) or num_local < 0:
    raise ValueError(f"pp op multicrop: num_local must be an int >= 0; got {num_local!r}.")
  global_scale = _check_scale("global_scale", global_scale)
  local_scale = _check_scale("local_scale", local_scale)
  if not (isinstance(blur_sigma, (tuple, list)) and len(blur_sigma) == 2
          and all(isinstance(x, (int, float)) for x in blur_sigma)
          and 0 <= blur_sigma[0] <= blur_sigma[1]):
    raise ValueError("pp op multicrop: blur_sigma must be (min, max) in pixels with "
                     f"0 <= min <= max; got {blur_sigma!r}.")
  _check_method(method)
  if not (isinstance(jitter, (tuple, list)) and len(jitter) == 4):
    raise ValueError("pp op multicrop: jitter must be (brightness, contrast, saturation, "
                     f"hue); got {jitter!r}.")
  jitter_op = color_jitter(*jitter, key=key)  # Checks each strength.
  grayscale_op = random_grayscale(grayscale_p, key=key)
  invert_ops = [random_invert(invert_p, key=key)] if invert_p else []

  def pipeline(size, scale, blur_p, solarize_p=0.0):
    ops = [inception_crop(size, 100 * scale[0], 100 * scale[1], key, method), flip_lr(key),
           jitter_op, grayscale_op, *invert_ops,
           gaussian_blur(blur_p, *blur_sigma, key=key)]
    if solarize_p:
      ops.append(solarize(solarize_p, key=key))
    return ops + [value_range(vmin, vmax, key=key)]

  global_pipelines = (pipeline(global_size, global_scale, 1.0),
                      pipeline(global_size, global_scale, 0.1, 0.2))
  local_pipeline = pipeline(local_size, local_scale, 0.5)

  def fn(example, rng):
    image = _check_uint8(example[key], key, "multicrop")
    def augmented_crop(ops):
      view = {key: image}
      for op in ops:
        view = op(view, rng)
      return view[key]
    global_crops = np.stack([augmented_crop(ops) for ops in global_pipelines])  # [2, g, g, 3]
    local_crops = np.zeros((num_local, local_size, local_size, 3), np.float32)
    for i in range(num_local):
      local_crops[i] = augmented_crop(local_pipeline)
    out = {k: v for k, v in example.items() if k != key}
    return dict(out, global_crops=global_crops, local_crops=local_crops)
  return fn


def _check_positive_int(op: str, name: str, value: Any) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"pp op {op}: {name} must be an int > 0; got {value!r}.")
  return value


@OPS.register("orig_size")
def orig_size(key: str = "image", key_result: str = "orig_size") -> OpFn:
  """example[key_result] = int32 [2] (height, width) of example[key] (put after decode)."""
  def fn(example, rng):
    del rng
    image = _check_image(example[key], key)
    return dict(example, **{key_result: np.asarray(image.shape[:2], np.int32)})
  return fn


@OPS.register("filter_objects")
def filter_objects(drop_crowd: bool = True, drop_empty: bool = True) -> OpFn:
  """Drops from example["objects"] those marked "is_crowd" (when that key is present, as in
  tfds coco) and those whose box has no width or height, as DETR's COCO loader does."""
  for name, value in (("drop_crowd", drop_crowd), ("drop_empty", drop_empty)):
    if not isinstance(value, bool):
      raise ValueError(f"pp op filter_objects: {name} must be True or False; got {value!r}.")
  def fn(example, rng):
    del rng
    objects = example[OBJECTS]
    boxes = _bbox(objects, "filter_objects")
    keep = np.ones(len(boxes), bool)
    if drop_crowd and "is_crowd" in objects:
      keep &= ~np.asarray(objects["is_crowd"], bool).reshape(-1)
    if drop_empty:
      keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return dict(example, **{OBJECTS: _select(objects, keep)})
  return fn


def detr_resized_hw(height: int, width: int, size: int, max_size: int | None
                    ) -> tuple[int, int]:
  """DETR's get_size_with_aspect_ratio: (h, w) with the shorter side `size`, lowered (to
  round(max_size * short / long)) if the longer side would pass `max_size`; the longer side
  is truncated to int. Unlike DETR's, the longer side is then clipped to `max_size`, which
  that rounding can pass by a pixel."""
  short, long = min(height, width), max(height, width)
  limit = np.inf if max_size is None else max_size
  if max_size is not None and long / short * size > max_size:
    size = int(round(max_size * short / long))
  if short == size and long <= limit:
    return height, width
  if width < height:
    return int(min(size * height / width, limit)), size
  return size, int(min(size * width / height, limit))


@OPS.register("random_resize")
def random_resize(sizes: int | Sequence[int], max_size: int | None = None, key: str = "image",
                  method: str = "bilinear") -> OpFn:
  """DETR's RandomResize: the shorter side to one of `sizes` (uniformly drawn; an int is one
  size), the longer side then capped at `max_size` (see `detr_resized_hw`). Normalised boxes
  in example["objects"] need no change."""
  choices = (sizes,) if isinstance(sizes, int) and not isinstance(sizes, bool) else sizes
  if not (isinstance(choices, (tuple, list)) and choices and all(
      isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in choices)):
    raise ValueError("pp op random_resize: sizes must be an int > 0 or a non-empty list of "
                     f"ints > 0; got {sizes!r}.")
  if max_size is not None:
    _check_positive_int("random_resize", "max_size", max_size)
  _check_method(method)
  def fn(example, rng):
    image = _check_image(example[key], key)
    size = choices[int(rng.integers(len(choices)))]
    h, w = detr_resized_hw(*image.shape[:2], size, max_size)
    return dict(example, **{key: resize_image(image, h, w, method)})
  return fn


@OPS.register("random_size_crop")
def random_size_crop(min_size: int, max_size: int, key: str = "image") -> OpFn:
  """DETR's RandomSizeCrop: a crop of width uniform in [min_size, min(W, max_size)], then
  height likewise in [min_size, min(H, max_size)] (a side shorter than min_size is kept
  whole), uniformly placed; boxes in example["objects"] are clipped to it and those left
  with no area dropped with their labels."""
  _check_positive_int("random_size_crop", "min_size", min_size)
  _check_positive_int("random_size_crop", "max_size", max_size)
  if min_size > max_size:
    raise ValueError(f"pp op random_size_crop: min_size must be <= max_size; got {min_size!r} "
                     f"and {max_size!r}.")
  def fn(example, rng):
    image = _check_image(example[key], key)
    height, width = image.shape[:2]
    w = int(rng.integers(min(min_size, width), min(width, max_size) + 1))
    h = int(rng.integers(min(min_size, height), min(height, max_size) + 1))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    return _crop_example(example, key, image, (top, left, h, w), "random_size_crop")
  return fn


@OPS.register("random_select")
def random_select(first: str, second: str, p: float = 0.5) -> OpFn:
  """DETR's RandomSelect: runs pp string `first` with probability p, else `second`."""
  p = _check_probability("random_select", "p", p)
  branches = []
  for name, pp in (("first", first), ("second", second)):
    if not isinstance(pp, str):
      raise ValueError(f"pp op random_select: {name} must be a pp string; got {pp!r}.")
    try:
      branches.append(get_preprocess_fn(pp))
    except ValueError as e:
      raise ValueError(f"pp op random_select: {name} {pp!r}: {e}") from None
  def fn(example, rng):
    return branches[0 if rng.random() < p else 1](example, rng)
  return fn


# Per-object arrays that to_cxcywh and pad_boxes carry along when present (for COCOeval):
# tfds coco's crowd flag and area (COCO's, in pixels of the decoded image; not rescaled).
EXTRA_OBJECT_KEYS = {"is_crowd": bool, "area": np.float32}


@OPS.register("to_cxcywh")
def to_cxcywh() -> OpFn:
  """example["objects"] -> "boxes" [n, 4] float32 (cx, cy, w, h), normalised by the current
  image's width and height, "labels" [n] int32 and, when the objects have them, "is_crowd"
  [n] bool and "area" [n] float32 (EXTRA_OBJECT_KEYS); removes "objects"."""
  def fn(example, rng):
    del rng
    objects = example[OBJECTS]
    ymin, xmin, ymax, xmax = _bbox(objects, "to_cxcywh").T
    if "label" not in objects:
      raise ValueError(f"pp op to_cxcywh: example[{OBJECTS!r}] has no 'label' (has "
                       f"{sorted(objects)}).")
    boxes = np.stack([(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin, ymax - ymin], -1)
    out = {k: v for k, v in example.items() if k != OBJECTS}
    out["boxes"] = boxes.astype(np.float32).reshape(-1, 4)
    out["labels"] = np.asarray(objects["label"], np.int32).reshape(-1)
    for name, dtype in EXTRA_OBJECT_KEYS.items():
      if name in objects:
        out[name] = np.asarray(objects[name], dtype).reshape(-1)
    return out
  return fn


@OPS.register("pad_boxes")
def pad_boxes(max_boxes: int) -> OpFn:
  """Pads "boxes" [n, 4], "labels" [n] (and "is_crowd", "area" [n] if present) with zeros
  to max_boxes rows and adds "box_mask" [max_boxes] bool (True on the n real boxes); n >
  max_boxes raises (nothing is truncated)."""
  _check_positive_int("pad_boxes", "max_boxes", max_boxes)
  def fn(example, rng):
    del rng
    if "boxes" not in example or "labels" not in example:
      raise ValueError(f"pp op pad_boxes({max_boxes}): the example has no 'boxes' and 'labels' "
                       f"(has {sorted(example)}); put to_cxcywh before it.")
    count = len(example["boxes"])
    if count > max_boxes:
      raise ValueError(f"pp op pad_boxes({max_boxes}): an image has {count} boxes, more than "
                       f"max_boxes={max_boxes}; raise max_boxes.")
    out = dict(example, box_mask=np.arange(max_boxes) < count)
    for key in ("boxes", "labels", *EXTRA_OBJECT_KEYS):
      if key in example:
        value = np.asarray(example[key])
        padded = np.zeros((max_boxes,) + value.shape[1:], value.dtype)
        padded[:count] = value
        out[key] = padded
    return out
  return fn


@OPS.register("pad_image")
def pad_image(size: int | Sequence[int], key: str = "image",
              key_mask: str = "pixel_mask") -> OpFn:
  """Pads example[key] at the bottom and right with zeros to `size` (int: square) and adds
  example[key_mask] [h, w] bool, True on the image's own pixels; a larger image raises."""
  sides = (size,) if isinstance(size, int) else size
  if not (isinstance(sides, (tuple, list)) and len(sides) in (1, 2)) or any(
      not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in sides) or (
          len(sides) == 1 and not isinstance(size, int)):
    raise ValueError(f"pp op pad_image: size must be an int > 0 or (height, width) ints > 0; "
                     f"got {size!r}.")
  h, w = _hw(size)
  def fn(example, rng):
    del rng
    image = _check_image(example[key], key)
    height, width = image.shape[:2]
    if height > h or width > w:
      raise ValueError(f"pp op pad_image({size}): image {key!r} is {height}x{width} (HxW), "
                       f"larger than {h}x{w}; resize it first (e.g. random_resize with "
                       f"max_size <= {min(h, w)}).")
    padded = np.zeros((h, w, 3), image.dtype)
    padded[:height, :width] = image
    mask = np.zeros((h, w), bool)
    mask[:height, :width] = True
    return dict(example, **{key: padded, key_mask: mask})
  return fn


TEXT_TYPES = (str, bytes, np.str_, np.bytes_)


def _lookup(example: Example, path: str, op: str) -> Any:
  """example[path]; "a/b" reads example["a"]["b"] (tfds decodes a Sequence of dicts as a
  dict of lists: coco_captions' captions are example["captions"]["text"])."""
  value = example
  for part in path.split("/"):
    if not isinstance(value, dict) or part not in value:
      has = sorted(value) if isinstance(value, dict) else type(value).__name__
      raise ValueError(f"pp op {op}: inkey {path!r}: no key {part!r} (there: {has}).")
    value = value[part]
  return value


def _text_list(value: Any, op: str, inkey: str) -> tuple[list[Any], bool]:
  """(the texts of `value`, whether it was one text rather than a list of them)."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, TEXT_TYPES):
    return [value], True
  if isinstance(value, (list, tuple, np.ndarray)) and all(
      isinstance(v, TEXT_TYPES) for v in value):
    return list(value), False
  hint = (f" (a dict: name its text field, e.g. inkey='{inkey}/text')"
          if isinstance(value, dict) else "")
  raise ValueError(f"pp op {op}: inkey {inkey!r} must hold a str/bytes text or a list of "
                   f"them; got {type(value).__name__}{hint}.")


def _check_text_keys(op: str, inkey: Any, outkey: Any) -> None:
  if not isinstance(inkey, str) or not inkey or "" in inkey.split("/"):
    raise ValueError(f"pp op {op}: inkey must be a key, or 'a/b' for a nested one; got "
                     f"{inkey!r}.")
  if not isinstance(outkey, str) or not outkey or "/" in outkey:
    raise ValueError(f"pp op {op}: outkey must be a top-level key (no '/'); got {outkey!r}.")


@OPS.register("tokenize")
def tokenize(max_len: int, tokenizer: str = "bytes", inkey: str = "text",
             outkey: str = "text") -> OpFn:
  """A text (str or bytes) -> int32 [max_len], a list of K texts -> [K, max_len]: its
  tokens, then EOS, then padding (0); longer texts are truncated, keeping the EOS.
  `tokenizer` is a spec of `tokenizers.get`: "bytes" (UTF-8 bytes, no file) or
  "sentencepiece:/path/to/model"; inkey "a/b" reads a nested field."""
  _check_positive_int("tokenize", "max_len", max_len)
  _check_text_keys("tokenize", inkey, outkey)
  try:
    text_tokenizer = tokenizers.get(tokenizer)
  except ValueError as e:
    raise ValueError(f"pp op tokenize: tokenizer: {e}") from None
  def fn(example, rng):
    del rng
    texts, single = _text_list(_lookup(example, inkey, "tokenize"), "tokenize", inkey)
    if not texts:
      raise ValueError(f"pp op tokenize: inkey {inkey!r} holds an empty list of texts.")
    ids = text_tokenizer.encode(texts, max_len)  # [K, max_len]
    return dict(example, **{outkey: ids[0] if single else ids})
  return fn


@OPS.register("choose")
def choose(k: int = 1, inkey: str = "captions/text", outkey: str = "text") -> OpFn:
  """Samples k of the texts (e.g. captions) of an example: k = 1 gives one text, k > 1 a
  list of k. From n >= k texts, k distinct ones in random order; from n < k, all n in
  random order, then k - n more drawn with replacement (one caption is repeated k times).
  Draws from the example's rng, so a pipeline's choice is fixed by its seed. The default
  inkey is tfds coco_captions' nested field; shapes' one caption is "caption"."""
  _check_positive_int("choose", "k", k)
  _check_text_keys("choose", inkey, outkey)
  def fn(example, rng):
    texts, _ = _text_list(_lookup(example, inkey, "choose"), "choose", inkey)
    if not texts:
      raise ValueError(f"pp op choose: inkey {inkey!r} holds no texts to choose from.")
    if k == 1:
      return dict(example, **{outkey: texts[int(rng.integers(len(texts)))]})
    order = rng.permutation(len(texts))[:k]
    extra = rng.integers(len(texts), size=k - len(order))
    return dict(example, **{outkey: [texts[int(i)] for i in np.concatenate([order, extra])]})
  return fn
