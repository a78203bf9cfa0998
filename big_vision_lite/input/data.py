"""Datasets by tfds name, read with grain: deterministic, per-process, checkpointable.

`data` config dicts have `name` (a tfds name such as "cifar10" or "coco/2017", or "shapes"
/ "shapes/tiny" for the embedded dataset), `split` (tfds split syntax, e.g. "train[:90%]")
and optional `data_dir`. Datasets are read with tfds's random-access data sources, i.e.
from array_record files, which needs no TensorFlow.

Train order: one global stream (shuffled anew each epoch, augmentation seeded per stream
position), cut into global batches; process p reads rows [p·B/P, (p+1)·B/P) of every global
batch, so a global batch is the same whatever the number of processes. Iterator states are
JSON dicts ({"next_index": n}, the number of local batches read).

Bad records (`input.bad_records`): a train record that does not read or preprocess (an
image that does not decode), or whose preprocessed arrays differ in shape or dtype from the
first good record's, fails the run with a `BadRecordError` naming the dataset, split and
record ("fail", the default), or is replaced by the record that the same stream position
holds one epoch later ("skip"): batches keep their size, the order stays deterministic and
resumable, and the iterator counts the replacements in `skipped_records`.
"""
import dataclasses
import json
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
import tensorflow_datasets as tfds

from big_vision_lite.input import multiscale as multiscale_lib
from big_vision_lite.input import packing as packing_lib
from big_vision_lite.input import pp as pp_lib
from big_vision_lite.input import shapes

_STREAM_LENGTH = 10**15  # "Infinite" train stream (grain datasets are indexable).
_FIELD = "config field 'input.data' (or 'evals.<name>.data')"
_RANDOM_ACCESS_FORMATS = ("array_record", "parquet")
BAD_RECORDS = ("fail", "skip")
SKIPPED_KEY = "_skipped"  # Per row in "skip" mode: bad records replaced to fill it.
_MAX_REPLACEMENTS = 64  # Bad records in a row at one position before giving up.
_REFERENCE_TRIES = 8  # First records tried for the reference shapes.


class BadRecordError(ValueError):
  """A train record that does not read or preprocess, or has unexpected shapes."""


@dataclasses.dataclass(frozen=True)
class _Bad:
  index: int  # Record within the split.
  error: str


class _IndexedSource:
  """Random access to (index, record), or (index, the exception reading it)."""

  def __init__(self, source: Sequence[Any]):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> tuple[int, Any]:
    try:
      return index, self._source[index]
    except Exception as e:  # pylint: disable=broad-except
      return index, e


def _prepare_hint(name: str, data_dir: str | None) -> str:
  where = f", data_dir={data_dir!r}" if data_dir else ""
  return (f"Prepare it once (with network access) with `python -c \"import tensorflow_datasets "
          f"as tfds; tfds.builder({name!r}{where}).download_and_prepare(file_format="
          "'array_record')\"`.")


def _prepared_builder(data: Mapping[str, Any], field: str = f"{_FIELD}, field 'name'") -> Any:
  """The tfds builder of `data`, prepared as array_record (builds "shapes" on first use);
  ValueErrors name `field`, the config field of the dataset's name."""
  name, data_dir = data["name"], data.get("data_dir")
  dataset, _, config = name.split(":")[0].partition("/")
  if dataset == "shapes":
    data_dir = shapes.ensure_built(data_dir, config or "full")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except ValueError as e:  # Includes tfds's DatasetNotFoundError.
    raise ValueError(f"Unknown dataset name {name!r} ({field}): "
                     f"{str(e).splitlines()[0]}") from None
  if not builder.is_prepared():
    raise ValueError(f"Dataset {name!r} ({field}) is not prepared in "
                     f"{builder.data_dir}. {_prepare_hint(name, data_dir)}")
  file_format = builder.info.file_format
  if file_format is None or file_format.value not in _RANDOM_ACCESS_FORMATS:
    raise ValueError(
        f"Dataset {name!r} ({field}) is prepared in {builder.data_dir} as "
        f"{getattr(file_format, 'value', file_format)}, which has no random access; grain needs "
        f"array_record. Re-prepare it into another data_dir (or after deleting it): "
        f"{_prepare_hint(name, data_dir)}")
  return builder


def check_split(data: Mapping[str, Any], field: str) -> None:
  """Raises a ValueError naming `field` (e.g. "evals.val.data") unless `data`'s dataset is
  prepared and its split exists and selects examples; reads metadata only."""
  builder = _prepared_builder(data, f"config field '{field}.name'")
  splits = ", ".join(map(repr, builder.info.splits))
  try:
    count = builder.info.splits[data["split"]].num_examples
  except (ValueError, KeyError) as e:
    reason = str(e).splitlines()[0]
    reason = "" if reason.startswith("Unknown split") else f" ({reason})"
    raise ValueError(f"Config field '{field}.split' is {data['split']!r}, not a split of "
                     f"dataset {data['name']!r}{reason}; its splits: {splits} (slices such "
                     "as 'train[:90%]' or 'test[:128]' work too).") from None
  if count <= 0:
    raise ValueError(f"Config field '{field}.split' is {data['split']!r}, which selects no "
                     f"example of dataset {data['name']!r}; its splits: {splits}.")


def get_source(data: Mapping[str, Any]) -> Sequence[dict[str, Any]]:
  """The random-access tfds data source of `data` (builds "shapes" on first use)."""
  builder = _prepared_builder(data)
  try:
    return builder.as_data_source(split=data["split"])
  except ValueError as e:
    raise ValueError(f"Bad split {data['split']!r} of dataset {data['name']!r} ({_FIELD}, "
                     f"field 'split'): {e}") from None


def num_examples(data: Mapping[str, Any]) -> int:
  """Number of examples in `data`'s split (after slicing)."""
  return len(get_source(data))


def _check_arrays(example: dict[str, Any]) -> dict[str, np.ndarray]:
  """The example as flat numeric arrays; a nested dict or non-numeric value raises."""
  out = {}
  for key, value in example.items():
    if isinstance(value, dict):
      raise ValueError(
          f"After preprocessing, example key {key!r} is a nested dict (keys {sorted(value)}); "
          "batches hold flat numeric arrays only. For detection objects end the pp string "
          "with to_cxcywh|pad_boxes(max_boxes) (flat 'boxes', 'labels', 'box_mask'); "
          "otherwise drop it with keep(...) or drop(...).")
    array = None if isinstance(value, list) else np.asarray(value)
    if array is None or array.dtype == object or array.dtype.kind in "SU":
      raise ValueError(f"After preprocessing, example key {key!r} is not a numeric array "
                       f"({type(value).__name__}); drop it with keep(...) or drop(...) at the "
                       "end of the pp string.")
    out[key] = array
  return out


def _stack(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks examples into a batch; differing shapes raise naming the key."""
  batch = {}
  for key in examples[0]:
    shapes_seen = {ex[key].shape for ex in examples}
    if len(shapes_seen) > 1:
      raise ValueError(f"Example key {key!r} has different shapes within a batch "
                       f"({sorted(shapes_seen)[:4]}); make them equal in the pp string, e.g. "
                       "with resize(...) or a crop (pad_image(size) and pad_boxes(max_boxes) "
                       "for detection).")
    batch[key] = np.stack([ex[key] for ex in examples])
  return batch


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"Config field 'input.batch_size' ({global_batch_size}) must be "
                     f"divisible by the number of processes ({process_count}).")
  return global_batch_size // process_count


def _reference_spec(source: Sequence[Any], fn: Callable[..., dict[str, np.ndarray]]
                    ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{key: (shape, dtype)} of the first of the first records that preprocesses; if none
  does, the pp string (not the data) is wrong, and the first record's error is raised."""
  first_error = None
  for index in range(min(len(source), _REFERENCE_TRIES)):
    try:
      example = fn(source[index], np.random.default_rng(0))
    except Exception as e:  # pylint: disable=broad-except
      first_error = first_error or e
      continue
    return {k: (v.shape, v.dtype) for k, v in example.items()}
  raise first_error


def _check_like(example: dict[str, np.ndarray],
                reference: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
  if set(example) != set(reference):
    raise ValueError(f"example keys {sorted(example)} differ from the first good record's "
                     f"{sorted(reference)}")
  for key, (shape, dtype) in reference.items():
    if example[key].shape != shape or example[key].dtype != dtype:
      raise ValueError(
          f"example key {key!r} has shape {example[key].shape} {example[key].dtype}, unlike "
          f"the first good record's {shape} {dtype}: examples of different shapes cannot be "
          "batched (if most records differ, make them equal in the pp string, e.g. with "
          "resize(...) or a crop; pad_image(size) and pad_boxes(max_boxes) for detection)")


def _train_stream(data: Mapping[str, Any], seed: int,
                  fn: Callable[[dict[str, Any], np.random.Generator], dict[str, Any]],
                  bad_records: str = "fail", check_shapes: bool = False) -> grain.MapDataset:
  """The endless global train stream: shuffled anew each epoch, `fn(example, rng)` seeded
  by the stream position; bad records fail or are replaced (see the module docstring)."""
  source = get_source(data)
  reference = _reference_spec(source, fn) if check_shapes else None

  def guarded(item: tuple[int, Any], rng: np.random.Generator) -> Any:
    index, record = item
    try:
      if isinstance(record, Exception):
        raise record
      example = fn(record, rng)
      if reference is not None:
        _check_like(example, reference)
      return example
    except Exception as e:  # pylint: disable=broad-except
      return _Bad(index, f"{type(e).__name__}: {e}")

  raw = (grain.MapDataset.source(_IndexedSource(source)).seed(seed).shuffle().repeat(None)
         .random_map(guarded))
  where = f"dataset {data['name']!r} split {data['split']!r}"

  def resolve(position: int) -> dict[str, Any]:
    for tries in range(_MAX_REPLACEMENTS + 1):
      example = raw[position + tries * len(source)]
      if not isinstance(example, _Bad):
        return dict(example, **{SKIPPED_KEY: np.int32(tries)}) if bad_records == "skip" else example
      message = f"Bad record {example.index} of {where}: {example.error}"
      if bad_records == "fail":
        raise BadRecordError(f"{message}. To skip such records (counted in the metric "
                             "input/skipped_records), set config field 'input.bad_records' "
                             "to 'skip'.")
      logging.warning("%s; skipped.", message)
    raise BadRecordError(f"{_MAX_REPLACEMENTS + 1} bad records in a row at train position "
                         f"{position}; the last: {message}. Does the pp string fit this "
                         "dataset?")

  return grain.MapDataset.range(0, _STREAM_LENGTH).map(resolve)


class _SkipCounter:
  """Takes SKIPPED_KEY off each batch; `skipped_records` counts since creation/set_state."""

  def __init__(self, iterator: Any):
    self._iterator = iterator
    self.skipped_records = 0

  def __iter__(self) -> "_SkipCounter":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self.skipped_records += int(batch.pop(SKIPPED_KEY).sum())
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._iterator.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._iterator.set_state(state)
    self.skipped_records = 0


def count_skipped(train_iterator: Any) -> int:
  """Records skipped by the train iterators of all processes since their creation or last
  `set_state` (a collective call when there are several processes)."""
  local = getattr(train_iterator, "skipped_records", 0)
  if jax.process_count() == 1:
    return local
  return int(multihost_utils.process_allgather(np.int64(local)).sum())


def make_train_iterator(data: Mapping[str, Any], pp: str, global_batch_size: int, *,
                        seed: int, process_index: int = 0, process_count: int = 1,
                        num_threads: int = 2, prefetch: int = 2,
                        packing: Mapping[str, Any] | None = None,
                        multiscale: Mapping[str, Any] | None = None,
                        batch_multiple: int = 1, bad_records: str = "fail") -> Any:
  """Endless iterator of this process's rows of each global batch (dicts of numpy arrays).

  Deterministic given `seed`; `get_state()` returns a JSON-ready dict and `set_state(state)`
  on a fresh iterator of the same arguments continues with exactly the same batches.
  With `packing` (see `packing.py`), rows are packed sequences of several images; each
  process then packs its own share of the image stream. With `multiscale` (see
  `multiscale.py`), each step has its own resolution and a batch size that is a multiple
  of `batch_multiple`. `bad_records` is "fail" or "skip" (see the module docstring).
  """
  local = _local_batch_size(global_batch_size, process_count)
  preprocess = pp_lib.get_preprocess_fn(pp)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  if packing:
    tokens = packing_lib.tokenizer(packing)
    stream = _train_stream(data, seed, lambda ex, rng: tokens(preprocess(ex, rng), rng),
                           bad_records)
    images = grain.MapDataset.range(0, _STREAM_LENGTH).map(  # This process's images.
        lambda i: stream[i * process_count + process_index])
    return packing_lib.PackedTrainIterator(images, local, packing, options,
                                           SKIPPED_KEY if bad_records == "skip" else None)
  counted = _SkipCounter if bad_records == "skip" else lambda iterator: iterator
  if multiscale:
    stream = _train_stream(data, seed, lambda ex, rng: _check_arrays(preprocess(ex, rng)),
                           bad_records)
    schedule = multiscale_lib.Schedule(multiscale, global_batch_size, batch_multiple, seed)
    return counted(multiscale_lib.make_train_iterator(
        stream, schedule, process_index, process_count, _stack, options))
  stream = _train_stream(data, seed, lambda ex, rng: _check_arrays(preprocess(ex, rng)),
                         bad_records, check_shapes=True)
  offset = process_index * local

  def element(i: int) -> dict[str, np.ndarray]:  # Row i % local of local batch i // local.
    return stream[(i // local) * global_batch_size + offset + i % local]

  rows = grain.MapDataset.range(0, _STREAM_LENGTH).map(element)
  batches = rows.batch(local, drop_remainder=True, batch_fn=_stack)
  return counted(iter(batches.to_iter_dataset(options)))


def make_eval_iterator(data: Mapping[str, Any], pp: str, global_batch_size: int, *,
                       process_index: int = 0, process_count: int = 1,
                       num_threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over the split in batches of fixed size.

  Every process yields the same number of batches; the last global batch is padded with
  copies of the final example, and the boolean `_mask` [B] marks real rows, so each example
  counts exactly once over all processes.
  """
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

  rows = grain.MapDataset.range(0, num_batches * local).map(element)
  batches = rows.batch(local, batch_fn=_stack)
  return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=num_threads)))


def make_packed_eval_iterator(data: Mapping[str, Any], pp: str, global_batch_size: int,
                              packing: Mapping[str, Any], *, process_index: int = 0,
                              process_count: int = 1,
                              num_threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over the split, packed without dropping at the pp's resolution.

  Images of more than `seq_len` tokens are scaled down to fit (aspect ratio kept).

  Process p packs examples p, p + P, ...; every process yields the same number of batches
  (a process that has run out yields rows of padding, whose `label_mask` is all False), so
  each example counts exactly once.
  """
  local = _local_batch_size(global_batch_size, process_count)
  source = get_source(data)
  preprocess = pp_lib.get_preprocess_fn(pp)
  indices = range(process_index, len(source), process_count)
  examples = grain.MapDataset.source(indices).map(
      lambda i: preprocess(source[i], np.random.default_rng(i)))
  rows = packing_lib.pack(
      iter(examples.to_iter_dataset(grain.ReadOptions(num_threads=num_threads))),
      seq_len=packing["seq_len"], patch_size=packing["patch_size"],
      max_images=packing["max_images"],
      buffer_size=packing.get("buffer_size", packing_lib.DEFAULT_BUFFER_SIZE), shrink_to_fit=True)
  template = None
  while True:
    batch = [row for _, row in zip(range(local), rows)]
    template = template or (batch[0] if batch else None)
    has_rows = bool(batch)
    if process_count > 1:
      has_rows = bool(np.any(multihost_utils.process_allgather(np.int32(has_rows))))
    if not has_rows:
      return
    if template is None:
      raise ValueError(f"Process {jax.process_index()} got no examples of {data['name']!r} "
                       f"split {data['split']!r} to evaluate; use a split with at least "
                       f"{process_count} examples.")
    batch += [packing_lib.empty_row(template)] * (local - len(batch))
    yield packing_lib.stack(batch)


def gather_iterator_states(state: Mapping[str, Any]) -> dict[str, Any]:
  """The checkpoint entry of every process's train iterator state (a collective call).

  {"train_iterator": state} when all processes are at the same position (plain
  iterators), else {"train_iterator_per_process": [state of process 0, 1, ...]} (packed).
  """
  if jax.process_count() == 1:
    return {"train_iterator": dict(state)}
  encoded = np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(len(encoded)))  # [P]
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(encoded)] = encoded
  rows = multihost_utils.process_allgather(padded)  # [P, max length]
  states = [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]
  if all(s == states[0] for s in states):
    return {"train_iterator": states[0]}
  return {"train_iterator_per_process": states}


def select_iterator_state(data_state: Mapping[str, Any]) -> dict[str, Any]:
  """This process's train iterator state from a checkpoint entry (see above)."""
  if "train_iterator" in data_state:
    return data_state["train_iterator"]
  states = data_state["train_iterator_per_process"]
  if len(states) != jax.process_count():
    raise ValueError(f"The checkpoint's packed-data positions were saved by {len(states)} "
                     f"processes; resume with {len(states)} processes (this run has "
                     f"{jax.process_count()}), since each process packs its own images.")
  return states[jax.process_index()]
