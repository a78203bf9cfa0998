"""The multi-scale sampler: constant pixels per batch, stream order, processes, resume, errors,
and a train run that compiles one step per resolution."""
import logging

import jax
import numpy as np
import pytest

from big_vision_lite import config_lib
from big_vision_lite import train
from big_vision_lite.input import data
from big_vision_lite.input import multiscale
from big_vision_lite.input import shapes
from configs import vit as vit_config

MULTISCALE = dict(resolutions=(16, 24, 32), base_res=32)
PP = ('decode|resize(32)|value_range(-1, 1)|onehot(10, key="label", key_result="labels")|'
      'keep("image", "labels")')


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return shapes.ensure_built(str(tmp_path_factory.mktemp("tfds")), "tiny")


def _iterator(data_dir, process_index=0, process_count=1, batch_size=8, seed=0):
  return data.make_train_iterator(
      dict(name="shapes/tiny", split="train", data_dir=data_dir), PP, batch_size, seed=seed,
      process_index=process_index, process_count=process_count, num_threads=1,
      multiscale=MULTISCALE, batch_multiple=2)


def test_schedule_keeps_pixels_per_batch_and_reads_the_stream_in_order():
  schedule = multiscale.Schedule(dict(resolutions=(160, 192, 256, 320), base_res=256),
                                 batch_size=128, batch_multiple=8, seed=3)
  steps = range(multiscale._BLOCK - 50, multiscale._BLOCK + 50)  # Across a block boundary.
  seen = set()
  for step in steps:
    res, size = schedule.resolution(step), schedule.batch_size(step)
    seen.add(res)
    assert size % 8 == 0
    assert size * res**2 <= 128 * 256**2 < (size + 8) * res**2  # Largest multiple that fits.
    assert schedule.start(step + 1) == schedule.start(step) + size
  assert seen == {160, 192, 256, 320}
  assert schedule.batch_size(0) == {160: 320, 192: 224, 256: 128, 320: 80}[schedule.resolution(0)]
  again = multiscale.Schedule(dict(resolutions=(160, 192, 256, 320), base_res=256),
                              batch_size=128, batch_multiple=8, seed=3)
  assert [again.resolution(s) for s in steps] == [schedule.resolution(s) for s in steps]
  assert again.start(steps[-1]) == schedule.start(steps[-1])


def test_batches_follow_the_schedule_split_over_processes_and_resume(data_dir):
  schedule = multiscale.Schedule(MULTISCALE, 8, 2, seed=0)
  single = _iterator(data_dir)
  batches = [next(single) for _ in range(6)]
  assert len({b["image"].shape for b in batches}) > 1
  for step, batch in enumerate(batches):
    res = schedule.resolution(step)
    assert batch["image"].shape == (schedule.batch_size(step), res, res, 3)
    assert batch["labels"].shape == (schedule.batch_size(step), 10)
  halves = [_iterator(data_dir, p, 2) for p in (0, 1)]
  for batch in batches:
    rows = [next(it) for it in halves]
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([r[key] for r in rows]), batch[key])
  resumed = _iterator(data_dir)
  fresh = _iterator(data_dir)
  for _ in range(3):
    next(fresh)
  resumed.set_state(fresh.get_state())
  assert resumed.get_state() == {"next_step": 3}
  for batch in batches[3:]:
    np.testing.assert_array_equal(next(resumed)["image"], batch["image"])


@pytest.mark.parametrize("multiscale_config, match", [
    (dict(resolutions=(), base_res=32), "resolutions"),
    (dict(resolutions=(32, "64"), base_res=32), "resolutions"),
    (dict(resolutions=(32,)), "base_res"),
    (dict(resolutions=(32,), base_res=32, sizes=2), "unknown keys.*sizes"),
    (dict(resolutions=(32, 512), base_res=32), "512x512.*fewer than 8"),
])
def test_bad_config_is_named(multiscale_config, match):
  config = vit_config.get_config("batch_size=64")
  config.input.multiscale = multiscale_config
  config.mesh = (("data", 8),)
  with pytest.raises(ValueError, match=rf"input\.multiscale.*{match}|{match}"):
    config_lib.validate(config)


def test_training_compiles_one_step_per_resolution(tmp_path, data_dir, caplog):
  config = vit_config.get_config("res=32,batch_size=16,total_steps=6,dataset=shapes/tiny")
  config.input.data.data_dir = data_dir
  config.model = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=(8, 8),
                      num_classes=10, pool_type="gap", posemb="sincos2d")
  config.input.multiscale = dict(resolutions=(16, 32), base_res=32)
  config.mesh = (("data", 2),)
  config.log_training_steps = 1
  config.evals = {}
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    metrics = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["train/loss"])
  schedule = multiscale.Schedule(config.input.multiscale, 16, 2, seed=0)
  assert {schedule.resolution(s) for s in range(6)} == {16, 32}
  compiled = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("Compiling jit(step)")]
  assert len(compiled) == 2
