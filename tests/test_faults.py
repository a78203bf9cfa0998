"""Faults: injected NaN, corrupt checkpoints, unusable workdirs, bad records, kill -9."""
import errno
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from big_vision_lite import checkpointing
from big_vision_lite import config_lib
from big_vision_lite import metrics as metrics_lib
from big_vision_lite import train
from big_vision_lite.input import data as data_lib
from big_vision_lite.input import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import vit as vit_config  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS = 8


def fault_config(data_dir, **overrides):
  """A 1-layer width-16 ViT on 16x16 shapes/tiny images; checkpoints every 2 steps."""
  config = vit_config.get_config(f"res=16,batch_size=8,total_steps={STEPS},"
                                 f"dataset=shapes/tiny,data_dir={data_dir}")
  config.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
  config.log_training_steps = 1
  config.ckpt_steps = 2
  config.mesh = [("data", 1)]
  config.evals = {}
  for key, value in overrides.items():
    config[key] = value
  return config


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return shapes.ensure_built(str(tmp_path_factory.mktemp("tfds")), "tiny")


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """An uninterrupted run: (its per-step losses, its final params, its workdir)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  train.train_and_evaluate(fault_config(data_dir), workdir)
  return losses(workdir), checkpointing.load_params(workdir), workdir


def assert_same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_fault_options_are_validated(data_dir):
  cases = [({"debug": {"inject_nan_step": "3"}}, r"'debug.inject_nan_step' must be an int"),
           ({"debug": {"inject_nan_step": -1}}, r"'debug.inject_nan_step' must be an int"),
           ({"debug": {"nan_step": 3}}, r"'debug' has unknown keys \['nan_step'\]; accepted: "
            "inject_nan_step"),
           ({"input.bad_records": "ignore"}, r"'input.bad_records' must be one of 'fail', "
            "'skip', got 'ignore'")]
  for overrides, message in cases:
    config = fault_config(data_dir)
    for key, value in overrides.items():
      section, _, field = key.rpartition(".")
      (config[section] if section else config)[field] = value
    with pytest.raises(ValueError, match=message):
      config_lib.validate(config)


def test_injected_nan_stops_naming_step_and_keeps_checkpoints(data_dir, reference, tmp_path):
  """NaN at step 6, a checkpoint step, with no log step to catch it first: the run stops
  naming step 6 and the loss, step 6 is never saved, and the run resumes from step 4."""
  workdir = str(tmp_path)
  config = fault_config(data_dir, log_training_steps=100)
  config.debug.inject_nan_step = 6
  with pytest.raises(train.NonFiniteError, match=r"metric 'loss' is nan at step 6"):
    train.train_and_evaluate(config, workdir)
  assert checkpointing.Checkpointer(workdir).all_steps() == [2, 4]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(checkpointing.load_params(workdir)))
  config = fault_config(data_dir)  # The same run without the option.
  train.train_and_evaluate(config, workdir)
  assert losses(workdir) == {s: v for s, v in reference[0].items() if s > 4}
  assert_same_params(checkpointing.load_params(workdir), reference[1])


def test_truncated_latest_checkpoint_falls_back_and_matches(data_dir, reference, tmp_path):
  """The reference run's final step 8, truncated, falls back to step 6 and redoes 7, 8."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[2], workdir)
  assert checkpointing.Checkpointer(workdir).all_steps() == [6, 8]
  # Every data file of the step (each d/ directory: the processes' and the root's, which
  # orbax may fill when it merges them), cut in half, as a copy stopped half way would leave
  # them. Which single file is largest, and which d/ holds what, depends on the state's
  # layout and on orbax's timing; _METADATA and the manifests restore does not need whole.
  files = [os.path.join(root, name) for root, _, names in os.walk(f"{workdir}/checkpoints/8")
           for name in names if root.endswith("/d")]
  assert files
  for path in files:
    os.truncate(path, os.path.getsize(path) // 2)
  offset = os.path.getsize(os.path.join(workdir, "metrics.jsonl"))
  train.train_and_evaluate(fault_config(data_dir), workdir)
  aside = [n for n in os.listdir(f"{workdir}/checkpoints") if n.startswith("8.unreadable-")]
  assert len(aside) == 1, os.listdir(f"{workdir}/checkpoints")  # kept for inspection
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    f.seek(offset)
    resumed = {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}
  assert resumed == {s: v for s, v in reference[0].items() if s > 6}
  assert_same_params(checkpointing.load_params(workdir), reference[1])


def test_bit_flip_in_latest_checkpoint_is_detected(tmp_path, caplog):
  """orbax reads a flipped bit back silently; the saved fingerprints catch it."""
  state = {"params": {"w": jax.random.normal(jax.random.key(0), (4096,))},
           "step": np.int32(0), "rng": jax.random.key(1)}
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  checkpointer.save(1, state, {"train_iterator": {"next_index": 1}})
  checkpointer.save(2, dict(state, params={"w": state["params"]["w"] + 1}),
                    {"train_iterator": {"next_index": 2}})
  checkpointer.close()
  files = [os.path.join(root, name) for root, _, names in os.walk(tmp_path / "checkpoints" / "2")
           for name in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.seek(os.path.getsize(largest) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      np.shape(x), x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), state)
  restored, data_state, step = checkpointing.Checkpointer(str(tmp_path)).restore_latest(abstract)
  assert step == 1 and data_state["train_iterator"] == {"next_index": 1}
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  assert "differ from their fingerprint at save time, e.g. params/w" in caplog.text


def test_unusable_workdir_fails_at_start(data_dir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(OSError, match=r"--workdir .*a_file/run is not a writable directory"):
    train.train_and_evaluate(fault_config(data_dir), str(blocker / "run"))


def test_read_only_workdir_fails_at_start(data_dir, tmp_path):
  if os.geteuid() == 0:
    pytest.skip("root writes into a 0o500 directory; the path-under-a-file test covers it")
  workdir = tmp_path / "run"
  workdir.mkdir(mode=0o500)
  with pytest.raises(OSError, match=r"--workdir .*run is not a writable directory"):
    train.train_and_evaluate(fault_config(data_dir), str(workdir))


def test_full_disk_fails_at_start(data_dir, tmp_path, monkeypatch):
  usage = lambda path: type("Usage", (), {"free": 1000})()
  monkeypatch.setattr(checkpointing.shutil, "disk_usage", usage)
  with pytest.raises(OSError, match=r"has 0.0 MiB free, less than one checkpoint"):
    train.train_and_evaluate(fault_config(data_dir), str(tmp_path))
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_failed_save_names_step_and_keeps_previous(data_dir, tmp_path, monkeypatch):
  """The disk fills while step 4 is written in the background: the run stops naming step
  4 and the workdir; step 2 stays complete."""
  workdir = str(tmp_path)
  original = ocp.JsonCheckpointHandler._save_fn

  async def disk_full(self, x, directory):
    if f"{os.sep}4.orbax-checkpoint-tmp" in str(directory):
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    await original(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full)
  with pytest.raises(checkpointing.CheckpointSaveError,
                     match=r"step 4 into .*/checkpoints failed \(OSError: .*No space left.*"
                     r"Complete checkpoints: \[2\]; a rerun resumes from step 2"):
    train.train_and_evaluate(fault_config(data_dir), workdir)
  assert checkpointing.Checkpointer(workdir).all_steps() == [2]
  assert np.isfinite(checkpointing.load_params(workdir)["head"]["kernel"]).all()


def test_metrics_file_drops_a_half_written_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 1, "train/loss": 2.5}\n{"step": 2, "train/lo')
  writer = metrics_lib.JsonlWriter(path)
  writer.write_scalars(2, {"train/loss": 2.25})
  writer.flush()
  with open(path) as f:
    assert [json.loads(line) for line in f] == [{"step": 1, "train/loss": 2.5},
                                                {"step": 2, "train/loss": 2.25}]


class CorruptImages(tfds.core.GeneratorBasedBuilder):
  """32 PNGs of 16x16 noise; record 5 is not an image, record 9 is 12x16."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "label": tfds.features.ClassLabel(num_classes=10)}), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for index in range(32):
      pixels = rng.integers(0, 256, (12 if index == 9 else 16, 16, 3), dtype=np.uint8)
      png = io.BytesIO()
      Image.fromarray(pixels).save(png, format="PNG")
      image = b"not an image" if index == 5 else png.getvalue()
      yield index, {"image": image, "label": index % 10}


BAD_PP = ('decode|value_range(-1, 1)|onehot(10, key="label", key_result="labels")|'
          'keep("image", "labels")')


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("corrupt_tfds"))
  CorruptImages(data_dir=directory, file_format="array_record").download_and_prepare()
  return directory


def test_bad_records_fail_naming_the_record(corrupt_dir):
  cases = [("train[:8]", r"Bad record 5 of dataset 'corrupt_images' split 'train\[:8\]': "
            r"UnidentifiedImageError.*set config field 'input.bad_records' to 'skip'"),
           ("train[8:16]", r"Bad record 1 of dataset 'corrupt_images' split 'train\[8:16\]': "
            r"ValueError: example key 'image' has shape \(12, 16, 3\) float32, unlike the first "
            r"good record's \(16, 16, 3\) float32")]
  for split, message in cases:
    spec = dict(name="corrupt_images", split=split, data_dir=corrupt_dir)
    iterator = data_lib.make_train_iterator(spec, BAD_PP, 4, seed=0)
    with pytest.raises(data_lib.BadRecordError, match=message):
      for _ in range(2):
        next(iterator)


def test_bad_records_skipped_and_counted_across_resume(corrupt_dir, tmp_path):
  """Two epochs of 32 records (2 bad) in batches of 8: 4 records are replaced, and the
  count survives a resume."""
  config = fault_config(corrupt_dir, total_steps=8)
  config.input.data = dict(name="corrupt_images", split="train", data_dir=corrupt_dir)
  config.input.pp = BAD_PP
  config.input.bad_records = "skip"
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir, stop_after_steps=3)
  final = train.train_and_evaluate(config, workdir)
  assert final["input/skipped_records"] == 4
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    counts = [r["input/skipped_records"] for r in map(json.loads, f) if "train/loss" in r]
  assert counts == sorted(counts) and len(losses(workdir)) == 8


def test_packed_bad_records_are_counted_across_resume(corrupt_dir):
  """Packed rows of one 16-token image each: 64 images (two epochs of 32 with one
  undecodable record) replace 2 bad records; a resumed iterator counts on from its state."""
  spec = dict(name="corrupt_images", split="train", data_dir=corrupt_dir)
  packing = dict(seq_len=16, patch_size=4, max_images=1, buffer_size=1)
  make = lambda: data_lib.make_train_iterator(
      spec, 'decode|value_range(-1, 1)|keep("image", "label")', 16, seed=0, packing=packing,
      bad_records="skip")
  straight = make()
  for _ in range(4):
    next(straight)
  assert straight.skipped_records == 2

  first = make()
  next(first)
  state = json.loads(json.dumps(first.get_state()))
  resumed = make()
  resumed.set_state(state)
  for _ in range(3):
    next(resumed)
  assert first.skipped_records + resumed.skipped_records == 2


def _crash_trials(tmp_path, trials, *flags):
  """Runs the kill -9 tool on 8-step runs (checkpoints every 2 steps) with `flags`; returns
  its figures after checking them and, independently, every trial's logged losses and final
  params."""
  figures_path = tmp_path / "figures.json"
  cmd = [sys.executable, "-m", "big_vision_lite.tools.crash_trials", f"--trials={trials}",
         f"--workdir_root={tmp_path}", "--total_steps=8", f"--json={figures_path}", *flags]
  env = dict(os.environ, PYTHONPATH=REPO)
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  figures = json.loads(figures_path.read_text())
  assert json.loads(done.stdout.strip().splitlines()[-1]) == figures  # Its last line.
  assert figures["trials"] == trials and figures["resumes"] == trials, figures
  # Every run was killed while it ran: a run that finished first tested nothing.
  assert figures["kills"] == trials and figures["finished_before_kill"] == 0, figures
  assert figures["kills_during_save"] >= 1, figures
  assert figures["resumes_from_checkpoint"] >= 1, figures
  assert figures["mismatches"] == 0 and figures["failures"] == [], figures
  assert figures["steps_lost_beyond_checkpoint"] == 0, figures
  assert all(step in (0, 2, 4, 6, 8) for step in figures["restored_steps"]), figures
  # A save in flight blocks the next one: a kill loses at most 2 checkpoint intervals.
  assert len(figures["steps_lost_per_kill"]) == trials, figures
  assert max(figures["steps_lost_per_kill"]) <= 4, figures
  # Whatever the tool compared: every loss a trial logged, killed run or resume, is the
  # reference's at that step, and each trial ends with the reference's params.
  reference = str(tmp_path / "reference")
  assert sorted(losses(reference)) == list(range(1, 9))
  for i in range(trials):
    trial = str(tmp_path / f"trial_{i}")
    with open(os.path.join(trial, "metrics.jsonl")) as f:
      logged = [(r["step"], r["train/loss"]) for r in map(json.loads, f) if "train/loss" in r]
    assert {step for step, _ in logged} == set(range(1, 9)), (i, logged)
    assert all(loss == losses(reference)[step] for step, loss in logged), (i, logged)
    assert_same_params(checkpointing.load_params(trial), checkpointing.load_params(reference))
  return figures


def test_kill_9_trials(tmp_path):
  """A run killed inside a save (seed 0: the final save, of step 8, the hardest moment: a
  save in flight and step 6 the newest complete one) resumes from its newest complete
  checkpoint and then logs the reference's losses and ends with its params. One trial (3
  runs, not the 5 of two trials) keeps the default run short; kills at moments uniform over
  training and during start-up are the slow test_kill_9_trials_20's."""
  figures = _crash_trials(tmp_path, 1, "--startup_kill_fraction=0", "--save_kill_fraction=1")
  assert figures["restored_steps"] == [6], figures


@pytest.mark.slow
def test_kill_9_trials_20(tmp_path):
  """Twenty kills: 2 during start-up, 10 aimed inside a save, 8 uniform over training
  (about 10-25 minutes on 2 busy cores)."""
  figures = _crash_trials(tmp_path, 20)
  assert figures["kills_during_save"] >= 10, figures
  assert figures["resumes_from_scratch"] >= 1, figures
