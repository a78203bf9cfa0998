"""Patch n' Pack (NaViT): images of any size and aspect ratio packed into fixed-length rows.

An image of h x w patches becomes h·w tokens (flattened p·p·3 pixels each, row-major) with
their (y, x) patch indices. Tokens of several images share one row of `seq_len` tokens:

  patches      [L, p·p·3] float32   pixels of each token (0 for padding)
  segment_ids  [L] int32            1..n for the n images of the row, 0 for padding
  positions    [L, 2] int32         (y, x) patch index of each token inside its image
  image_sizes  [S, 2] int32         (h, w) in patches of each image slot (before dropping)
  labels       [S] int32            label of each image slot; slot s holds segment s + 1
  label_mask   [S] bool             which of the `max_images` = S slots hold an image

Packing is best-fit decreasing over a pool of `buffer_size` images (default 64): a row
takes the pooled images largest first, each one as long as the row can still end within
`fill_slack` (4) tokens of the fullest fill any set of pooled images reaches (at most
`max_images` images), so small images stay in the pool to fill later rows exactly. An
image that has waited while `max_wait` (4 x buffer_size) newer images arrived leads its
row, so none waits forever. On the NaViT paper's mix (rows of 256 tokens, 16 px patches,
images with an equal-area side of 64..256 px and aspect ratios 1:2..2:1) this pads 0.8%
of the tokens, where first-fit decreasing from the oldest image padded 1.9% (2.5% over a
pool of 32); `python -m benchmarks.navit` measures it.

Training also samples each image's resolution (aspect ratio kept: `resolution` is the side
of the square with the same area) and drops a per-image random fraction of its tokens
(`token_drop`) before packing, so a row carries more images. Both are distributions:
  dict(dist="fixed", value=v) | dict(dist="uniform", low=a, high=b)
  | dict(dist="beta", a=α, b=β, low=0.0, high=1.0) | dict(dist="choice", values=(...)).
The train iterator is deterministic and checkpointable: its state is the stream position
and the stream indices of the pooled images (each image is a pure function of its index).
"""
import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import grain
import numpy as np

from big_vision_lite.input import pp as pp_lib

DISTRIBUTIONS = {"fixed": ("value",), "uniform": ("low", "high"), "beta": ("a", "b"),
                 "choice": ("values",)}
DEFAULT_BUFFER_SIZE = 64  # Images pooled by the packer.
FILL_SLACK = 4  # Tokens a row may end short of the fullest fill, to take larger images.


def check_distribution(spec: Mapping[str, Any] | None, field: str, *, low: float = -math.inf,
                       high: float = math.inf) -> None:
  """Raises a ValueError naming `field` unless `spec` is a valid distribution in [low, high]."""
  if spec is None:
    return
  kind = spec.get("dist") if hasattr(spec, "get") and hasattr(spec, "keys") else None
  if kind not in DISTRIBUTIONS:
    raise ValueError(f"Config field {field!r} must be a dict with 'dist' one of "
                     f"{', '.join(DISTRIBUTIONS)} (e.g. dict(dist='uniform', low=0.0, "
                     f"high=0.5)); got {spec!r}.")
  missing = [k for k in DISTRIBUTIONS[kind] if k not in spec]
  if missing:
    raise ValueError(f"Config field {field!r}: dist={kind!r} needs keys "
                     f"{DISTRIBUTIONS[kind]}; missing {missing}.")
  if kind == "beta" and not (spec["a"] > 0 and spec["b"] > 0):
    raise ValueError(f"Config field {field!r}: beta needs a > 0 and b > 0, got {spec!r}.")
  if kind == "choice" and not spec["values"]:
    raise ValueError(f"Config field {field!r}: 'values' of dist='choice' is empty.")
  lo, hi = support(spec)
  if lo > hi:
    raise ValueError(f"Config field {field!r}: low ({lo}) must not exceed high ({hi}).")
  if lo < low or hi > high:
    raise ValueError(f"Config field {field!r}: values must lie in [{low}, {high}]; the "
                     f"distribution {spec!r} covers [{lo}, {hi}].")


def support(spec: Mapping[str, Any]) -> tuple[float, float]:
  """Smallest and largest value `spec` can produce."""
  kind = spec["dist"]
  if kind == "fixed":
    return float(spec["value"]), float(spec["value"])
  if kind == "choice":
    return float(min(spec["values"])), float(max(spec["values"]))
  default = (0.0, 1.0) if kind == "beta" else (None, None)
  return float(spec.get("low", default[0])), float(spec.get("high", default[1]))


def sample(spec: Mapping[str, Any], rng: np.random.Generator) -> float:
  """One draw from the distribution `spec` (see module docstring)."""
  kind = spec["dist"]
  if kind == "fixed":
    return float(spec["value"])
  if kind == "choice":
    return float(spec["values"][rng.integers(len(spec["values"]))])
  low, high = support(spec)
  unit = rng.beta(spec["a"], spec["b"]) if kind == "beta" else rng.random()
  return low + (high - low) * float(unit)


def grid_size(height: int, width: int, patch_size: int, side: float | None = None,
              max_tokens: int | None = None) -> tuple[int, int]:
  """(h, w) in patches for an image of `height` x `width` pixels, aspect ratio kept.

  `side` (pixels) is the side of the square of the same area as the result (None keeps
  the native area); the result is capped at `max_tokens` tokens, at least 1 x 1.
  """
  scale = 1.0 if side is None else side / math.sqrt(height * width)
  h, w = height * scale / patch_size, width * scale / patch_size
  if max_tokens is not None and h * w > max_tokens:
    shrink = math.sqrt(max_tokens / (h * w))
    h, w = h * shrink, w * shrink
  h, w = max(1, round(h)), max(1, round(w))
  while max_tokens is not None and h * w > max_tokens:  # Rounding up may overshoot.
    h, w = (h - 1, w) if h >= w else (h, w - 1)
  return h, w


def patchify(image: np.ndarray, patch_size: int, grid: tuple[int, int] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """Image [H, W, 3] -> (patches [h·w, p·p·3] row-major, positions [h·w, 2] as (y, x)).

  The image is first resized to `grid` patches (default: the nearest whole number of
  patches per side, at least one), so every pixel lands in a patch. Host-side numpy for
  the input pipeline; each patch's pixels are laid out as `models.layers.patchify`'s (the
  model side's, on jax arrays, with no resize): row-major, channels last.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"Example key 'image' must be an [H, W, 3] image, got shape {image.shape}.")
  if grid is None:
    grid = grid_size(image.shape[0], image.shape[1], patch_size)
  h, w = grid
  image = pp_lib.resize_image(image, h * patch_size, w * patch_size, "bilinear")
  patches = image.reshape(h, patch_size, w, patch_size, 3).transpose(0, 2, 1, 3, 4)
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  positions = np.stack([ys.ravel(), xs.ravel()], -1).astype(np.int32)  # [h·w, 2]
  return patches.reshape(h * w, -1).astype(np.float32), positions


def tokenize(example: Mapping[str, Any], patch_size: int, *, max_tokens: int,
             resolution: Mapping[str, Any] | None = None,
             token_drop: Mapping[str, Any] | None = None,
             rng: np.random.Generator | None = None) -> dict[str, Any]:
  """One example with "image" -> its tokens: patches, positions, image_size, other keys.

  `resolution` / `token_drop` distributions are sampled with `rng` (None: native
  resolution capped at `max_tokens`, no dropping). Dropped tokens are removed, the rest
  keep their order and positions.
  """
  image = np.asarray(example["image"])
  if image.ndim != 3 or image.shape[-1] != 3 or not np.issubdtype(image.dtype, np.number):
    raise ValueError(f"Packing needs example key 'image' as a numeric [H, W, 3] array, got "
                     f"{image.dtype} {image.shape}.")
  side = sample(resolution, rng) if resolution is not None else None
  grid = grid_size(image.shape[0], image.shape[1], patch_size, side, max_tokens)
  patches, positions = patchify(image, patch_size, grid)
  if token_drop is not None:
    rate = sample(token_drop, rng)
    keep = max(1, round(len(patches) * (1.0 - rate)))
    kept = np.sort(rng.permutation(len(patches))[:keep])
    patches, positions = patches[kept], positions[kept]
  out = {k: np.asarray(v) for k, v in example.items() if k != "image"}
  out = {k: v.astype(np.int32) if v.dtype == np.int64 else v for k, v in out.items()}
  out.update(patches=patches, positions=positions, image_size=np.asarray(grid, np.int32))
  return out


def best_fit_decreasing(sizes: Sequence[int], capacity: int, slots: int, slack: int
                        ) -> list[int]:
  """Positions in `sizes` of the items of one bin of `capacity` with at most `slots` items.

  Items are taken largest first (the earlier position first among equal sizes), each one
  as long as a total of at least best - `slack` stays reachable with the items after it,
  best being the largest total any `slots` items reach within `capacity`.
  """
  order = sorted((i for i in range(len(sizes)) if sizes[i] <= capacity),
                 key=lambda i: -sizes[i])
  # Sets of (count, total) as the bits count * stride + total of one int. Totals above
  # capacity are masked off after each shift by a size <= capacity, and stride leaves room
  # for them, so they never carry into the next count.
  stride = 2 * (capacity + 1)
  totals = (1 << (capacity + 1)) - 1  # Totals 0..capacity of one count.
  fits = sum(totals << (k * stride) for k in range(slots + 1))  # Counts 0..slots.
  reachable = [1]  # reachable[j]: (count, total) of subsets of order[j:]; the empty set.
  for i in reversed(order):
    rest = reachable[-1]
    reachable.append(rest | ((rest << (stride + sizes[i])) & fits))
  reachable.reverse()
  any_count = 0
  for k in range(slots + 1):
    any_count |= (reachable[0] >> (k * stride)) & totals
  best = any_count.bit_length() - 1
  near_best = totals & ~((1 << max(0, best - slack)) - 1)
  wanted = sum(near_best << (k * stride) for k in range(slots + 1))
  chosen, total = [], 0
  for j, i in enumerate(order):
    if total + sizes[i] > capacity:
      continue
    # Taking i: the rest of a subset of order[j + 1:] lands at count len(chosen) + 1 + k.
    if (reachable[j + 1] << ((len(chosen) + 1) * stride + total + sizes[i])) & wanted:
      chosen.append(i)
      total += sizes[i]
  return chosen


class Packer:
  """Best-fit-decreasing packing of tokenized images into rows (see module docstring).

  `fill_slack` >= seq_len with `max_wait` = 0 is first-fit decreasing from the oldest image.
  """

  def __init__(self, seq_len: int, max_images: int, buffer_size: int = DEFAULT_BUFFER_SIZE,
               *, fill_slack: int = FILL_SLACK, max_wait: int | None = None):
    self.seq_len, self.max_images, self.buffer_size = seq_len, max_images, buffer_size
    self.fill_slack = fill_slack
    self.max_wait = 4 * buffer_size if max_wait is None else max_wait
    self.pool: list[tuple[int, dict[str, Any]]] = []  # (stream index, tokenized), oldest first

  def add(self, index: int, tokenized: dict[str, Any]) -> None:
    n = len(tokenized["patches"])
    if n > self.seq_len:
      raise ValueError(f"An image of {n} tokens ({tuple(tokenized['image_size'])} patches) does "
                       f"not fit in a packed row of seq_len={self.seq_len} (config field "
                       "'input.packing.seq_len'); raise seq_len or lower the resolution.")
    self.pool.append((index, tokenized))

  @property
  def full(self) -> bool:
    return len(self.pool) >= self.buffer_size

  def choose(self) -> list[int]:
    """Pool positions of the images of the next row, in their order in the row."""
    sizes = [len(tokenized["patches"]) for _, tokenized in self.pool]
    newest = max(index for index, _ in self.pool)
    if newest - self.pool[0][0] < self.max_wait:
      return best_fit_decreasing(sizes, self.seq_len, self.max_images, self.fill_slack)
    rest = best_fit_decreasing(sizes[1:], self.seq_len - sizes[0], self.max_images - 1,
                               self.fill_slack)
    return [0] + [i + 1 for i in rest]  # The oldest image has waited long enough.

  def emit(self) -> dict[str, np.ndarray]:
    """Packs one row from the pool (which must not be empty) and removes its images."""
    chosen = self.choose()
    row = self._assemble([self.pool[i][1] for i in chosen])
    chosen_set = set(chosen)
    self.pool = [item for i, item in enumerate(self.pool) if i not in chosen_set]
    return row

  def _assemble(self, images: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    length, slots = self.seq_len, self.max_images
    dim = images[0]["patches"].shape[1]
    row = {"patches": np.zeros((length, dim), np.float32),
           "segment_ids": np.zeros((length,), np.int32),
           "positions": np.zeros((length, 2), np.int32),
           "image_sizes": np.zeros((slots, 2), np.int32),
           "label_mask": np.zeros((slots,), bool)}
    # Per-image keys other than the tokens ("label" -> "labels") get one entry per slot.
    per_image = {key: "labels" if key == "label" else key for key in images[0]
                 if key not in ("patches", "positions", "image_size")}
    for key, name in per_image.items():
      value = images[0][key]
      row[name] = np.zeros((slots,) + value.shape, value.dtype)
    start = 0
    for slot, image in enumerate(images):
      n = len(image["patches"])
      row["patches"][start:start + n] = image["patches"]
      row["positions"][start:start + n] = image["positions"]
      row["segment_ids"][start:start + n] = slot + 1
      row["image_sizes"][slot] = image["image_size"]
      row["label_mask"][slot] = True
      for key, name in per_image.items():
        row[name][slot] = image[key]
      start += n
    return row


def pack(examples: Iterable[Mapping[str, Any]], *, seq_len: int, patch_size: int,
         max_images: int, buffer_size: int = DEFAULT_BUFFER_SIZE,
         shrink_to_fit: bool = False
         ) -> Iterator[dict[str, np.ndarray]]:
  """Packs `{"image": [H, W, 3], "label": int, ...}` examples of any sizes into rows.

  Images keep their native size, rounded to whole patches. One of more than `seq_len`
  tokens is an error, or with `shrink_to_fit` is scaled down (aspect ratio kept) to fit.
  Yields dicts with the keys of the module docstring until `examples` runs out.
  """
  if seq_len < 1 or max_images < 1 or buffer_size < 1 or patch_size < 1:
    raise ValueError(f"pack needs seq_len, patch_size, max_images and buffer_size >= 1; got "
                     f"{seq_len}, {patch_size}, {max_images}, {buffer_size}.")
  packer = Packer(seq_len, max_images, buffer_size)
  for index, example in enumerate(examples):
    image = np.asarray(example["image"])
    grid = grid_size(image.shape[0], image.shape[1], patch_size) if image.ndim == 3 else None
    if grid is not None and grid[0] * grid[1] > seq_len and not shrink_to_fit:
      raise ValueError(f"Image {index} of {image.shape[0]}x{image.shape[1]} px is "
                       f"{grid[0]}x{grid[1]} patches of {patch_size} px, more than "
                       f"seq_len={seq_len} tokens; resize it or raise seq_len.")
    packer.add(index, tokenize(example, patch_size, max_tokens=seq_len))
    while packer.full:
      yield packer.emit()
  while packer.pool:
    yield packer.emit()


def validate(packing: Mapping[str, Any], field: str = "input.packing") -> None:
  """Checks a packing config (seq_len, patch_size, max_images, buffer_size, resolution,
  token_drop) before any data is read; errors name the field."""
  for key in ("seq_len", "patch_size", "max_images"):
    if key not in packing:
      raise ValueError(f"Config field '{field}' needs key {key!r}; it has {sorted(packing)}.")
  for key in ("seq_len", "patch_size", "max_images", "buffer_size"):
    value = packing.get(key, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"Config field '{field}.{key}' must be an int >= 1, got {value!r}.")
  patch, seq_len = packing["patch_size"], packing["seq_len"]
  check_distribution(packing.get("resolution"), f"{field}.resolution", low=patch)
  check_distribution(packing.get("token_drop"), f"{field}.token_drop", low=0.0, high=0.99)
  if packing.get("resolution") is not None:
    largest = support(packing["resolution"])[1]
    tokens = round(largest / patch) ** 2
    if tokens > seq_len:
      raise ValueError(f"Config field '{field}.seq_len' ({seq_len}) is too short for one "
                       f"image: '{field}.resolution' goes up to {largest:g} px, i.e. about "
                       f"{tokens} tokens of {patch} px patches. Raise seq_len to at least "
                       f"{tokens} or lower the resolution.")


def stack(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def empty_row(like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A row of padding only, shaped like `like` (pads the last eval batch)."""
  return {k: np.zeros_like(v) for k, v in like.items()}


def tokenizer(packing: Mapping[str, Any]
              ) -> Callable[[Mapping[str, Any], np.random.Generator], dict[str, Any]]:
  """`tokenize` with a packing config's patch size, token cap, resolution and token drop."""
  def tokens(example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return tokenize(example, packing["patch_size"], max_tokens=packing["seq_len"],
                    resolution=packing.get("resolution"), token_drop=packing.get("token_drop"),
                    rng=rng)
  return tokens


class PackedTrainIterator:
  """Endless iterator of packed batches, with get_state / set_state.

  `images` is this process's indexable stream of tokenized images (`tokenizer`), each a
  pure function of its index, so the state is the next index and the pooled indices.
  With `skipped_key`, each image's count of bad records it replaced (under that key) is
  taken off and summed in `skipped_records` (since creation or `set_state`).
  """

  def __init__(self, images: grain.MapDataset, local_batch_size: int,
               packing: Mapping[str, Any], options: grain.ReadOptions,
               skipped_key: str | None = None):
    self._images, self._options, self._local = images, options, local_batch_size
    self._skipped_key = skipped_key
    self.skipped_records = 0
    self._packer = Packer(packing["seq_len"], packing["max_images"],
                          packing.get("buffer_size", DEFAULT_BUFFER_SIZE))
    self._start(0)

  def _image(self, example: dict[str, Any], count: bool) -> dict[str, Any]:
    if self._skipped_key is None:
      return example
    skipped = example.pop(self._skipped_key)
    if count:
      self.skipped_records += int(skipped)
    return example

  def _start(self, next_index: int) -> None:
    self._next_index = next_index
    self._reader = iter(self._images[next_index:].to_iter_dataset(self._options))

  def _row(self) -> dict[str, np.ndarray]:
    while not self._packer.full:
      self._packer.add(self._next_index, self._image(next(self._reader), True))
      self._next_index += 1
    return self._packer.emit()

  def __iter__(self) -> "PackedTrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return stack([self._row() for _ in range(self._local)])

  def get_state(self) -> dict[str, Any]:
    return {"next_index": self._next_index,
            "pool": [index for index, _ in self._packer.pool]}

  def set_state(self, state: Mapping[str, Any]) -> None:
    # The pooled images' skips were counted before the state was saved.
    self._packer.pool = [(int(i), self._image(self._images[int(i)], False))
                         for i in state["pool"]]
    self._start(int(state["next_index"]))
    self.skipped_records = 0
