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
"""
import ast
import inspect
import io
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

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
  them arguments their signatures accept; runs nothing."""
  _parse(pp)


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
    return dict(example, **{key: _crop(image, top, left, h, w)})
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
    return dict(example, **{key: _crop(image, top, left, h, w)})
  return fn


@OPS.register("inception_crop")
def inception_crop(size: int | Sequence[int] | None = None, area_min: float = 5,
                   area_max: float = 100, key: str = "image",
                   method: str = "bilinear") -> OpFn:
  """Random crop of area_min..area_max % of the image with aspect 3/4..4/3, resized."""
  _check_method(method)
  def fn(example, rng):
    image = _check_image(example[key], key)
    height, width = image.shape[:2]
    for _ in range(10):
      area = height * width * rng.uniform(area_min, area_max) / 100
      aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
      h, w = int(round(np.sqrt(area / aspect))), int(round(np.sqrt(area * aspect)))
      if 0 < h <= height and 0 < w <= width:
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        break
    else:  # Fall back to the whole image, as the usual implementations do.
      top, left, h, w = 0, 0, height, width
    image = _crop(image, top, left, h, w)
    if size is not None:
      image = resize_image(image, *_hw(size), method)
    return dict(example, **{key: image})
  return fn


@OPS.register("flip_lr")
def flip_lr(key: str = "image") -> OpFn:
  """Flips left-right with probability 1/2."""
  def fn(example, rng):
    image = _check_image(example[key], key)
    return dict(example, **{key: image[:, ::-1] if rng.random() < 0.5 else image})
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
