"""The train loop: learning, exact resume, SIGTERM, sharding equivalence, init_from, NaN stop."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from big_vision_lite import checkpointing
from big_vision_lite import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import vit as vit_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def tiny_config(**overrides):
  """A 2-layer width-32 ViT on 32x32 shapes images, fast enough for tests."""
  config = vit_config.get_config("res=32,batch_size=16,total_steps=8")
  config.model = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=(8, 8),
                      num_classes=10, pool_type="gap")
  config.log_training_steps = 1
  config.ckpt_steps = 4
  config.mesh = [("data", 1)]
  config.evals.val.log_steps = 1000
  config.evals.val.batch_size = 64
  config.evals.val.data.split = "test[:128]"
  config.schedule.warmup_percent = 0.0
  for key, value in overrides.items():
    config[key] = value
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def state_params(workdir):
  return checkpointing.load_params(workdir)


def parse_config(args: list[str]) -> ml_collections.ConfigDict:
  """The config that `python -m big_vision_lite.train <args>` runs."""
  argv = ["train"] + args
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.slow
def test_loss_falls_and_accuracy_rises(tmp_path):
  config = tiny_config(total_steps=250, lr=2e-3)
  config.model.update(width=64, patch_size=(4, 4))
  config.input.batch_size = 64
  config.log_training_steps = 25
  config.evals.val.log_steps = 250
  config.evals.val.data.split = "test[:500]"
  final = train.train_and_evaluate(config, str(tmp_path))
  lines = read_metrics(str(tmp_path))
  losses = [l["train/loss"] for l in lines if "train/loss" in l]
  assert np.mean(losses[-2:]) < losses[0] - 0.08, losses
  # Chance is 0.1; on 500 examples its standard error is 0.013, so 0.18 is 6 sigma above.
  assert final["val/top1"] > 0.18, final
  assert final["val/top5"] >= final["val/top1"]
  assert os.path.exists(tmp_path / "config.json")
  assert any(name.startswith("events") for name in os.listdir(tmp_path / "tensorboard"))
  assert [l["step"] for l in lines if "train/loss" in l] == list(range(25, 251, 25))


@pytest.mark.slow
def test_default_config_learns(tmp_path):
  """The README's main command (about 5 minutes on 2 cores)."""
  final = train.train_and_evaluate(vit_config.get_config(), str(tmp_path))
  assert final["val/top1"] > 0.3, final


def test_resume_is_exact(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  config = tiny_config(total_steps=8)
  config.model.dropout = 0.1  # Exercise the RNG: dropout masks must resume too.
  train.train_and_evaluate(config, straight)
  train.train_and_evaluate(config, resumed, stop_after_steps=3)
  assert checkpointing.Checkpointer(resumed).all_steps()[-1] == 3
  train.train_and_evaluate(config, resumed)
  a, b = state_params(straight), state_params(resumed)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  loss = lambda d: {l["step"]: l["train/loss"] for l in read_metrics(d) if "train/loss" in l}
  assert loss(straight) == loss(resumed)


def test_gradient_accumulation_matches_full_batch(tmp_path):
  config = tiny_config(total_steps=2, optax_name="sgd", lr=0.5)
  config.optax = {}
  train.train_and_evaluate(config, str(tmp_path / "full"))
  config.grad_accum_steps = 4
  train.train_and_evaluate(config, str(tmp_path / "accum"))
  a, b = state_params(str(tmp_path / "full")), state_params(str(tmp_path / "accum"))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory) -> str:
  """Workdir of tiny_config(total_steps=3) trained on 1 device (shared by the tests below)."""
  workdir = str(tmp_path_factory.mktemp("one_device"))
  train.train_and_evaluate(tiny_config(total_steps=3), workdir)
  return workdir


@pytest.mark.parametrize("devices,rules", [(8, [(".*", "replicate")]), (8, [(".*", "fsdp")])])
def test_same_loss_on_one_and_eight_devices(one_device_run, tmp_path, devices, rules):
  assert jax.device_count() >= 8, "conftest sets 8 host devices"
  sharded = tiny_config(total_steps=3, mesh=[("data", devices)], sharding_rules=rules)
  train.train_and_evaluate(sharded, str(tmp_path / "many"))
  loss = lambda d: [l["train/loss"] for l in read_metrics(d) if "train/loss" in l]
  np.testing.assert_allclose(loss(one_device_run), loss(str(tmp_path / "many")), rtol=2e-5)
  # Adam turns float-rounding differences of near-zero gradients into ~1e-6 steps.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
               state_params(one_device_run), state_params(str(tmp_path / "many")))


def test_fsdp_rules_shard_params_and_optimizer_state():
  from big_vision_lite import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh([("data", 8)])
  tree = {"params": {"kernel": jax.ShapeDtypeStruct((64, 24), jnp.float32),
                     "bias": jax.ShapeDtypeStruct((3,), jnp.float32)},
          "opt_state": {"mu": {"kernel": jax.ShapeDtypeStruct((64, 24), jnp.float32)}}}
  shardings = sharding.infer_shardings(tree, mesh, [(".*", "fsdp")])
  assert shardings["params"]["kernel"].spec == jax.sharding.PartitionSpec("data", None)
  assert shardings["opt_state"]["mu"]["kernel"].spec == jax.sharding.PartitionSpec("data", None)
  assert shardings["params"]["bias"].spec == jax.sharding.PartitionSpec()  # 3 % 8 != 0.


# The run that test_sigterm_saves_and_exits_cleanly signals: a 1-layer ViT with dropout
# (so the resumed RNG matters), no periodic checkpoint and no periodic eval.
SIGTERM_CONFIG = """
from configs import vit


def get_config():
  config = vit.get_config("res=32,batch_size=16,total_steps=100000")
  config.model.update(width=32, depth=1, mlp_dim=64, dropout=0.1)
  config.log_training_steps = 1
  config.ckpt_steps = 100000
  config.evals.val.log_steps = 100000
  config.mesh = [("data", 1)]
  return config
"""


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  """SIGTERM mid-run: the run saves the step it reached and exits 0. Resumed from that
  checkpoint for 3 more steps, it logs the losses and ends with the params of a run that
  went straight to the same step."""
  config_path = str(tmp_path / "sigterm_config.py")
  with open(config_path, "w") as f:
    f.write(SIGTERM_CONFIG)
  workdir, straight = str(tmp_path / "run"), str(tmp_path / "straight")
  cmd = [sys.executable, "-m", "big_vision_lite.train", "--config", config_path,
         "--workdir", workdir]
  # Like this process, 8 host devices (one used): the same compiled step, to the bit.
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics_path) and len(read_metrics(workdir)) >= 4:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.stdout.read()
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  steps = checkpointing.Checkpointer(workdir).all_steps()
  assert len(steps) == 1 and steps[0] >= 3, (steps, out)
  stopped = steps[0]
  assert f"Stopped by SIGTERM at step {stopped}" in out, out[-3000:]
  logged_steps = lambda d: [l["step"] for l in read_metrics(d) if "train/loss" in l]
  assert logged_steps(workdir) == list(range(1, stopped + 1))

  config = parse_config(["--config", config_path])
  train.train_and_evaluate(config, straight, stop_after_steps=stopped + 3)
  train.train_and_evaluate(config, workdir, stop_after_steps=3)
  # The resume appended steps stopped+1.. to the signalled run's lines, nothing before.
  assert logged_steps(workdir) == logged_steps(straight) == list(range(1, stopped + 4))
  loss = lambda d: {l["step"]: l["train/loss"] for l in read_metrics(d) if "train/loss" in l}
  assert loss(workdir) == loss(straight)
  jax.tree.map(np.testing.assert_array_equal, state_params(workdir), state_params(straight))


@pytest.mark.slow
def test_half_written_checkpoint_is_ignored(tmp_path):
  workdir = str(tmp_path)
  config = tiny_config(total_steps=4)
  train.train_and_evaluate(config, workdir, stop_after_steps=2)
  # An interrupted save leaves orbax's temporary directory behind, never a step directory.
  tmp_dir = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
  (tmp_dir / "state").mkdir(parents=True)
  (tmp_dir / "state" / "garbage").write_bytes(b"\0" * 100)
  assert checkpointing.Checkpointer(workdir).all_steps() == [2]
  train.train_and_evaluate(config, workdir)
  assert checkpointing.Checkpointer(workdir).all_steps()[-1] == 4


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  workdir = str(tmp_path)
  config = tiny_config(total_steps=8, ckpt_steps=2)
  train.train_and_evaluate(config, workdir, stop_after_steps=4)
  latest = tmp_path / "checkpoints" / "4" / "state"
  for root, _, files in os.walk(latest):
    for name in files:
      if name not in ("_METADATA", "_sharding", "manifest.ocdbt"):
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"corrupt")
  train.train_and_evaluate(config, workdir)
  assert "trying the previous one" in caplog.text
  assert checkpointing.Checkpointer(workdir).all_steps()[-1] == 8


def test_init_from_resamples_posemb_and_rejects_other_architecture(one_device_run, tmp_path):
  source = one_device_run
  loaded = state_params(source)
  config = tiny_config(total_steps=1, init_from=source, lr=0.0)
  config.input.pp = config.input.pp.replace("resize(32)", "resize(48)")
  config.evals = {}
  train.train_and_evaluate(config, str(tmp_path / "finetune"))
  tuned = state_params(str(tmp_path / "finetune"))
  assert tuned["pos_embedding"].shape == (1, 36, 32)
  np.testing.assert_array_equal(tuned["Transformer"]["encoder_norm"]["scale"],
                                loaded["Transformer"]["encoder_norm"]["scale"])
  other = tiny_config(total_steps=1, init_from=source)
  other.model.width = 48
  with pytest.raises(ValueError, match="does not match the configured model"):
    train.train_and_evaluate(other, str(tmp_path / "other"))


def test_workdir_of_another_architecture_is_rejected(tmp_path):
  train.train_and_evaluate(tiny_config(total_steps=1), str(tmp_path))
  other = tiny_config(total_steps=2)
  other.model.depth = 3
  with pytest.raises(ValueError, match="does not match the configured model"):
    train.train_and_evaluate(other, str(tmp_path))


def test_non_finite_loss_stops_with_step_and_metric(tmp_path):
  config = tiny_config(total_steps=6, lr=1e30, grad_clip_norm=None)
  config.optax_name = "sgd"
  config.optax = {}
  message = r"Training metric '[a-z_/]+' is (nan|inf) at step \d+"
  with pytest.raises(train.NonFiniteError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
