"""Metric writers: console, TensorBoard and `metrics.jsonl`, the one place metrics go.

Only process 0 writes files; other processes log to the console only. The TensorBoard
events are written with tensorboard's own TF-free event writer (clu's SummaryWriter
imports TensorFlow, a 1.3 GB install for this one purpose). Every writer has
`write_scalars(step, {name: scalar})`, `flush()` and `close()`.
"""
import json
import math
import os
import time
from typing import Any, Mapping, Protocol, Sequence

import jax
import numpy as np
from absl import logging
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer import event_file_writer


class Writer(Protocol):
  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...
  def flush(self) -> None: ...
  def close(self) -> None: ...


def _floats(scalars: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in scalars.items()}


class LoggingWriter:
  """Logs "[step] name=value, ..." (names sorted) at INFO level."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = ", ".join(f"{k}={v:.6g}" for k, v in sorted(_floats(scalars).items()))
    logging.info("[%d] %s", step, values)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class TensorBoardWriter:
  """Scalars as TensorBoard events (simple values) in `logdir`."""

  def __init__(self, logdir: str):
    self._events = event_file_writer.EventFileWriter(logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in _floats(scalars).items()])
    self._events.add_event(event_pb2.Event(step=int(step), wall_time=time.time(),
                                           summary=summary))

  def flush(self) -> None:
    self._events.flush()

  def close(self) -> None:
    self._events.close()


class JsonlWriter:
  """Appends one JSON object per step to `<workdir>/metrics.jsonl` (scalars only).

  Scalars written for the same step in several calls (train and eval metrics) are merged
  into one line, written when a later step arrives or on flush. A resumed run appends to
  the file, after dropping a last line left half-written by a killed run.
  """

  def __init__(self, path: str):
    self._path = path
    _drop_partial_last_line(path)
    self._step: int | None = None
    self._pending: dict[str, Any] = {}

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if self._step is not None and step != self._step:
      self.flush()
    self._step = int(step)
    self._pending.update(_floats(scalars))

  def flush(self) -> None:
    if self._step is None or not self._pending:
      return
    record = {"step": self._step}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in self._pending.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")
    self._pending = {}

  def close(self) -> None:
    self.flush()


class MultiWriter:
  """Writes to each of `writers` in turn."""

  def __init__(self, writers: Sequence[Writer]):
    self._writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for writer in self._writers:
      writer.write_scalars(step, scalars)

  def flush(self) -> None:
    for writer in self._writers:
      writer.flush()

  def close(self) -> None:
    for writer in self._writers:
      writer.close()


def _drop_partial_last_line(path: str) -> None:
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    size = f.seek(0, os.SEEK_END)
    tail_start = max(0, size - 65536)  # Lines are far shorter.
    f.seek(tail_start)
    tail = f.read()
    if tail and not tail.endswith(b"\n"):
      f.truncate(tail_start + tail.rfind(b"\n") + 1)


def create_writer(workdir: str) -> Writer:
  """Console + TensorBoard + JSON lines on process 0, console elsewhere."""
  if jax.process_index() != 0:
    return LoggingWriter()
  return MultiWriter([
      LoggingWriter(),
      TensorBoardWriter(os.path.join(workdir, "tensorboard")),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
  ])


class Throughput:
  """Steps/s, examples/s, core-hours and ETA between two log points."""

  def __init__(self, total_steps: int, start_step: int):
    self.total_steps = total_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self._examples = 0
    self.core_hours = 0.0

  def count(self, examples: int) -> None:
    """Adds the rows of one global batch (batch sizes may vary from step to step)."""
    self._examples += examples

  def measure(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    dt = max(now - self._last_time, 1e-9)
    steps_per_sec = (step - self._last_step) / dt
    self.core_hours += dt * jax.device_count() / 3600
    examples_per_sec = self._examples / dt
    self._last_step, self._last_time, self._examples = step, now, 0
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
    return {"steps_per_sec": steps_per_sec,
            "examples_per_sec": examples_per_sec,
            "examples_per_sec_per_core": examples_per_sec / jax.device_count(),
            "core_hours": self.core_hours, "eta_seconds": eta}


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
