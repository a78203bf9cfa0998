"""Multi-scale sampler (MobileViT): each train step at a resolution drawn from a set, with the
batch size scaled so that the pixels per batch stay constant.

Config `input.multiscale = dict(resolutions=(48, 64, 80), base_res=64)`: step s trains at
`resolutions[k_s]` (k_s drawn uniformly, a pure function of the seed and s) on a global
batch of `input.batch_size · (base_res / res)²` images, rounded down to a multiple of the
number of data-parallel devices (and of `grad_accum_steps`). The pp string must leave `image` at any
size: the sampler resizes it to the step's square resolution after preprocessing. The
jitted train step compiles once per resolution (jax caches one executable per shape).

Images are read from the global stream in order: step s covers stream positions
[start(s), start(s) + batch(s)), so every image is read once per epoch whatever the
resolutions; the iterator state is the next step.
"""
from typing import Any, Callable, Mapping

import grain
import numpy as np

from big_vision_lite.input import pp as pp_lib

_BLOCK = 4096  # Steps whose resolutions are drawn by one RNG call.


def validate(multiscale: Mapping[str, Any], batch_size: int, batch_multiple: int,
             field: str) -> None:
  """Raises a ValueError naming the field for a sampler config that cannot work."""
  unknown = sorted(set(multiscale) - {"resolutions", "base_res"})
  if unknown:
    raise ValueError(f"Config field '{field}' has unknown keys {unknown}; accepted: "
                     "resolutions, base_res.")
  resolutions = multiscale.get("resolutions")
  if (not isinstance(resolutions, (tuple, list)) or not resolutions or any(
      isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in resolutions)):
    raise ValueError(f"Config field '{field}.resolutions' must be a non-empty tuple of "
                     f"positive ints (image sides), got {resolutions!r}.")
  base_res = multiscale.get("base_res")
  if isinstance(base_res, bool) or not isinstance(base_res, int) or base_res <= 0:
    raise ValueError(f"Config field '{field}.base_res' must be a positive int (the side at "
                     f"which the batch has 'input.batch_size' images), got {base_res!r}.")
  for res in resolutions:
    if scaled_batch_size(batch_size, base_res, res, batch_multiple) == 0:
      raise ValueError(f"Config field '{field}.resolutions': at {res}x{res} the scaled batch "
                       f"{batch_size}·({base_res}/{res})² holds fewer than {batch_multiple} "
                       "images (the data-parallel devices times grad_accum_steps); raise "
                       "'input.batch_size' or drop that resolution.")


def scaled_batch_size(batch_size: int, base_res: int, res: int, multiple: int) -> int:
  """`batch_size · (base_res / res)²` rounded down to a multiple of `multiple`."""
  return int(batch_size * base_res**2 // res**2) // multiple * multiple


class Schedule:
  """Resolution, global batch size and first stream position of every step."""

  def __init__(self, multiscale: Mapping[str, Any], batch_size: int, batch_multiple: int,
               seed: int):
    self.resolutions = np.asarray(multiscale["resolutions"], np.int64)
    self.batch_sizes = np.asarray([
        scaled_batch_size(batch_size, multiscale["base_res"], int(r), batch_multiple)
        for r in self.resolutions], np.int64)
    self._seed = seed
    self._choices: list[np.ndarray] = []  # Per block: [_BLOCK] resolution indices.
    self._block_starts = [0]  # Stream position of each block's first step.

  def _choice(self, step: int) -> int:
    block, within = divmod(step, _BLOCK)
    while len(self._choices) <= block:
      rng = np.random.default_rng([self._seed, len(self._choices)])
      choices = rng.integers(len(self.resolutions), size=_BLOCK)
      self._choices.append(choices)
      self._block_starts.append(self._block_starts[-1] + int(self.batch_sizes[choices].sum()))
    return int(self._choices[block][within])

  def resolution(self, step: int) -> int:
    return int(self.resolutions[self._choice(step)])

  def batch_size(self, step: int) -> int:
    return int(self.batch_sizes[self._choice(step)])

  def start(self, step: int) -> int:
    """Stream position of step `step`'s first image."""
    block, within = divmod(step, _BLOCK)
    self._choice(step)
    head = self._choices[block][:within]
    return self._block_starts[block] + int(self.batch_sizes[head].sum())


def make_train_iterator(stream: grain.MapDataset, schedule: Schedule, process_index: int,
                        process_count: int,
                        stack: Callable[[list[dict[str, np.ndarray]]], dict[str, np.ndarray]],
                        options: grain.ReadOptions) -> "MultiScaleIterator":
  """This process's rows of every step's batch; `stream` holds preprocessed examples."""

  def batch(step: int) -> dict[str, np.ndarray]:
    res, size, start = schedule.resolution(step), schedule.batch_size(step), schedule.start(step)
    local = size // process_count
    examples = []
    for i in range(start + process_index * local, start + (process_index + 1) * local):
      example = dict(stream[i])
      example["image"] = pp_lib.resize_image(example["image"], res, res, "bilinear")
      examples.append(example)
    return stack(examples)

  return MultiScaleIterator(grain.MapDataset.range(0, 10**15).map(batch), options)


class MultiScaleIterator:
  """Endless iterator over step batches of varying shape; state = the next step."""

  def __init__(self, batches: grain.MapDataset, options: grain.ReadOptions):
    self._batches, self._options = batches, options
    self.set_state({"next_step": 0})

  def __iter__(self) -> "MultiScaleIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    self._next_step += 1
    return next(self._reader)

  def get_state(self) -> dict[str, Any]:
    return {"next_step": self._next_step}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._next_step = int(state["next_step"])
    self._reader = iter(self._batches[self._next_step:].to_iter_dataset(self._options))
