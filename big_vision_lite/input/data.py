"""Datasets by tfds name, read with grain: deterministic, per-process, checkpointable.

`data` config dicts have `name` (a tfds name, or "shapes" for the embedded dataset),
`split` (tfds split syntax, e.g. "train[:90%]") and optional `data_dir`. Datasets are read
with `tfds.data_source`, i.e. from array_record files, which needs no TensorFlow.

Train order: one global stream (shuffled anew each epoch, augmentation seeded per element),
cut into global batches; process p reads rows [p·B/P, (p+1)·B/P) of every global batch, so
the global batch is the same whatever the number of processes.
"""
from typing import Any, Iterator, Mapping

import grain
import numpy as np
import tensorflow_datasets as tfds

from big_vision_lite.input import pp as pp_lib
from big_vision_lite.input import shapes

_STREAM_LENGTH = 10**15  # "Infinite" train stream (grain datasets are indexable).


def get_source(data: Mapping[str, Any]) -> Any:
  """The random-access tfds data source of `data` (builds "shapes" on first use)."""
  name, split, data_dir = data["name"], data["split"], data.get("data_dir")
  if name == "shapes":
    data_dir = shapes.ensure_built(data_dir)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"Config field 'data' (name={name!r}, split={split!r}, data_dir={data_dir!r}): the "
        f"dataset cannot be read ({type(e).__name__}: {e}). Prepare it first, e.g. "
        f"`tfds.builder({name!r}, data_dir=...).download_and_prepare(file_format="
        f"'array_record')`; datasets prepared as tfrecord must be re-prepared as "
        "array_record to be read without TensorFlow.") from e


def num_examples(data: Mapping[str, Any]) -> int:
  return len(get_source(data))


def _check_arrays(example: dict[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in example.items():
    array = np.asarray(value) if not isinstance(value, (list, dict)) else None
    if array is None or array.dtype == object or array.dtype.kind in "SU":
      raise ValueError(f"After preprocessing, example key {key!r} is not a numeric array "
                       f"({type(value).__name__}); drop it with keep(...) or drop(...) at the "
                       "end of the pp string.")
    out[key] = array
  return out


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"Config field 'input.batch_size' ({global_batch_size}) must be "
                     f"divisible by the number of processes ({process_count}).")
  return global_batch_size // process_count


def make_train_iterator(data: Mapping[str, Any], pp: str, global_batch_size: int, *,
                        seed: int, process_index: int = 0, process_count: int = 1,
                        num_threads: int = 2, prefetch: int = 2) -> grain.DatasetIterator:
  """Endless iterator of this process's share of each global batch (numpy dicts).

  It has `get_state()` / `set_state(state)` (JSON-ready dicts) for exact resume.
  """
  local = _local_batch_size(global_batch_size, process_count)
  preprocess = pp_lib.get_preprocess_fn(pp)
  stream = (grain.MapDataset.source(get_source(data)).seed(seed).shuffle().repeat(None)
            .random_map(lambda ex, rng: _check_arrays(preprocess(ex, rng))))
  offset = process_index * local

  def element(i: int) -> dict[str, np.ndarray]:  # [local] rows of global batch i // local.
    return stream[(i // local) * global_batch_size + offset + i % local]

  mine = grain.MapDataset.range(0, _STREAM_LENGTH).map(element).batch(local, drop_remainder=True)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(mine.to_iter_dataset(options))


def make_eval_iterator(data: Mapping[str, Any], pp: str, global_batch_size: int, *,
                       process_index: int = 0, process_count: int = 1,
                       num_threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over the split; the last batch is padded, `_mask` marks real rows."""
  local = _local_batch_size(global_batch_size, process_count)
  source = get_source(data)
  total = len(source)
  preprocess = pp_lib.get_preprocess_fn(pp)
  num_batches = -(-total // global_batch_size)
  offset = process_index * local

  def element(i: int) -> dict[str, np.ndarray]:
    index = (i // local) * global_batch_size + offset + i % local
    example = _check_arrays(preprocess(source[min(index, total - 1)],
                                       np.random.default_rng(index)))
    example["_mask"] = np.asarray(index < total)
    return example

  rows = grain.MapDataset.range(0, num_batches * local).map(element).batch(local)
  return iter(rows.to_iter_dataset(grain.ReadOptions(num_threads=num_threads)))

