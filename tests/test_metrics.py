"""The metric writers: TensorBoard events that tensorboard's own reader reads back with the
values written, metrics.jsonl merging a step's calls, and no TensorFlow needed for either."""
import json
import os

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from big_vision_lite import metrics as metrics_lib


def test_events_and_jsonl_read_back(tmp_path):
  writer = metrics_lib.create_writer(str(tmp_path))
  writer.write_scalars(1, {"train/loss": np.float32(2.5), "train/lr": 1e-3})
  writer.write_scalars(1, {"val/top1": 0.25})
  writer.write_scalars(2, {"train/loss": float("nan")})
  writer.close()
  events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  events.Reload()
  assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/lr", "val/top1"]
  loss = events.Scalars("train/loss")
  assert [e.step for e in loss] == [1, 2]
  assert loss[0].value == 2.5 and np.isnan(loss[1].value)
  assert [(e.step, e.value) for e in events.Scalars("val/top1")] == [(1, 0.25)]
  np.testing.assert_allclose(events.Scalars("train/lr")[0].value, 1e-3, rtol=1e-7)
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line) for line in f] == [
        {"step": 1, "train/loss": 2.5, "train/lr": 1e-3, "val/top1": 0.25},
        {"step": 2, "train/loss": "nan"}]


def test_writers_need_no_tensorflow(tmp_path, run_without_tensorflow):
  run_without_tensorflow(
      "from big_vision_lite import train\n"
      "from big_vision_lite import metrics\n"
      f"writer = metrics.create_writer({str(tmp_path)!r})\n"
      "writer.write_scalars(3, {'train/loss': 1.5})\n"
      "writer.close()\n")
  assert any(name.startswith("events") for name in os.listdir(tmp_path / "tensorboard"))
