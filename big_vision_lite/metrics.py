"""Metric writers (clu): console, TensorBoard and `metrics.jsonl`, the one place metrics go.

Only process 0 writes files; other processes log to the console only.
"""
import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface


class JsonlWriter(interface.MetricWriter):
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
    self._pending.update({k: float(np.asarray(v)) for k, v in scalars.items()})

  def write_summaries(self, step, values, metadata=None) -> None:
    del step, values, metadata

  def write_images(self, step, images) -> None:
    del step, images

  def write_videos(self, step, videos) -> None:
    del step, videos

  def write_audios(self, step, audios, *, sample_rate) -> None:
    del step, audios, sample_rate

  def write_texts(self, step, texts) -> None:
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    del step, arrays, num_buckets

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None) -> None:
    del step, point_clouds, point_colors, configs

  def write_hparams(self, hparams) -> None:
    del hparams

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


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """Console + TensorBoard + JSON lines on process 0, console elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.LoggingWriter()
  return metric_writers.MultiWriter([
      metric_writers.LoggingWriter(),
      metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")),
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
