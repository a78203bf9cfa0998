"""Multi-process training and elastic restore.

2 processes x 4 CPU devices (gloo collectives) train like 1 process x 8 devices (per-step
losses equal to float rounding, ~1e-7 relative), and checkpoints resume on other device and
process counts with exactly the saved params.
"""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
import pytest
from absl import app

from big_vision_lite import checkpointing
from big_vision_lite import models
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite import train
from big_vision_lite.input import data as data_lib
from test_train import REPO, parse_config, read_metrics

# test_train's tiny ViT (2 layers, width 32, 32x32 shapes images), as command-line flags.
CLI_ARGS = [
    "--config", os.path.join(REPO, "configs/vit.py:res=32,batch_size=16,total_steps=8"),
    "--config.log_training_steps=1", "--config.ckpt_steps=2", "--config.keep_ckpt=10",
    "--config.model.width=32", "--config.model.depth=2", "--config.model.mlp_dim=64",
    "--config.model.num_heads=2", "--config.model.patch_size=(8, 8)",
    "--config.schedule.warmup_percent=0.0", "--config.evals.val.log_steps=1000",
    "--config.evals.val.batch_size=64", "--config.evals.val.data.split=test[:64]"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_processes(args: list[str], workdir: str, num_processes: int, devices: int
                    ) -> tuple[list[subprocess.Popen], list[str]]:
  """Starts `python -m big_vision_lite.train` as `num_processes` local processes; returns
  them and their log files."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  coordinator = f"--coordinator_address=localhost:{free_port()}"
  logs = [os.path.join(os.path.dirname(workdir), f"process_{i}.log")
          for i in range(num_processes)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as out:  # A file, not a pipe: a full pipe would block the process.
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "big_vision_lite.train", *args, "--workdir", workdir,
           coordinator, f"--num_processes={num_processes}", f"--process_id={i}"],
          cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
  return procs, logs


def wait_processes(procs: list[subprocess.Popen], logs: list[str]) -> list[str]:
  """Waits for the processes; asserts each exited 0; returns their logs' texts."""
  try:
    codes = [p.wait(timeout=400) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  texts = []
  for code, log in zip(codes, logs):
    with open(log) as f:
      texts.append(f.read())
    assert code == 0, texts[-1][-5000:]
  return texts


def run_processes(args: list[str], workdir: str, num_processes: int, devices: int) -> None:
  """Runs `python -m big_vision_lite.train` as `num_processes` local processes."""
  wait_processes(*start_processes(args, workdir, num_processes, devices))


def losses(workdir: str) -> dict[int, float]:
  return {l["step"]: l["train/loss"] for l in read_metrics(workdir) if "train/loss" in l}


def restore(config, workdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params, data positions) of the newest checkpoint restored onto `config`'s mesh, as
  the train loop does."""
  mesh = sharding.make_mesh(config.mesh)
  task = tasks.REGISTRY.get(config.task)(config, models.get(config.model_name).Model(
      **config.model))
  res, batch = 32, config.input.batch_size
  batch_spec = {"image": jax.ShapeDtypeStruct((batch, res, res, 3), np.float32),
                "labels": jax.ShapeDtypeStruct((batch, 10), np.float32)}
  abstract_state = train.build_training(config, task, mesh, batch_spec).abstract_state
  checkpointer = checkpointing.Checkpointer(workdir)
  state, data_state, _ = checkpointer.restore_latest(abstract_state)
  checkpointer.close()
  return state["params"], data_state


def test_distributed_settings_flags_override_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "env:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert train.distributed_settings(env=env) == dict(
      coordinator_address="env:1", num_processes=4, process_id=3)
  assert train.distributed_settings("flag:2", 2, 1, env=env) == dict(
      coordinator_address="flag:2", num_processes=2, process_id=1)
  assert train.distributed_settings(process_id=0, env=env)["process_id"] == 0
  assert train.distributed_settings(env={}) is None
  assert train.distributed_settings(env={"JAX_NUM_PROCESSES": "1"}) is None
  # On a cluster jax detects what is unset.
  assert train.distributed_settings(env={"SLURM_JOB_ID": "7"}) == dict(
      coordinator_address=None, num_processes=None, process_id=None)
  with pytest.raises(app.UsageError, match="--coordinator_address"):
    train.distributed_settings(num_processes=2, process_id=0, env={})


def test_each_process_reads_its_own_rows():
  """Per step, the processes' rows are disjoint and together are the 1-process batch."""
  spec = dict(name="shapes", split="train[:40]")
  pp = 'decode|resize(8)|keep("image", "label")'
  ids = lambda batch: [hashlib.sha1(image.tobytes()).hexdigest() for image in batch["image"]]
  whole = data_lib.make_train_iterator(spec, pp, 8, seed=0)
  parts = [data_lib.make_train_iterator(spec, pp, 8, seed=0, process_index=p, process_count=2)
           for p in range(2)]
  seen = []
  for _ in range(10):  # Two epochs of 5 global batches.
    mine = [ids(next(part)) for part in parts]
    assert not set(mine[0]) & set(mine[1])
    assert mine[0] + mine[1] == ids(next(whole))
    seen += mine[0] + mine[1]
  assert len(set(seen[:40])) == 40 and sorted(seen[:40]) == sorted(seen[40:])


@pytest.fixture(scope="module",
                params=["fsdp", pytest.param("replicate", marks=pytest.mark.slow)])
def eight_devices(request, tmp_path_factory) -> tuple[list[str], str]:
  """(flags, workdir) of a 1-process run on 8 devices, with checkpoints every 2 steps."""
  args = CLI_ARGS + [f'--config.sharding_rules=((".*", "{request.param}"),)']
  workdir = str(tmp_path_factory.mktemp("eight") / "run")
  train.train_and_evaluate(parse_config(args), workdir)
  return args, workdir


def rule_of(args: list[str]) -> str:
  """The sharding rule ("fsdp" or "replicate") of the flags of `eight_devices`."""
  return parse_config(args).sharding_rules[0][1]


def copy_checkpoint(workdir: str, step: int, new_workdir: str) -> None:
  """A new workdir holding only `step`'s checkpoint of `workdir`."""
  shutil.copytree(os.path.join(workdir, "checkpoints", str(step)),
                  os.path.join(new_workdir, "checkpoints", str(step)))


def assert_layout(params: dict[str, Any], rule: str, devices: int) -> None:
  """Each device holds whole leaves ("replicate"), or ("fsdp") 1/`devices` of each leaf
  having a dimension divisible by `devices` and whole leaves otherwise."""
  for leaf in jax.tree.leaves(params):
    assert leaf.sharding.mesh.size == devices
    split = rule == "fsdp" and any(d % devices == 0 for d in leaf.shape)
    for shard in leaf.addressable_shards:
      assert shard.data.size * (devices if split else 1) == leaf.size, (rule, leaf.shape,
                                                                         leaf.sharding)


def check_restores(config, workdir: str, devices: int, rule: str) -> dict[str, Any]:
  """Checks that the train loop's restore onto `config`'s mesh of `devices` gives exactly
  the saved params, laid out by `rule`; returns the restored data positions."""
  params, data_state = restore(config, workdir)
  assert_layout(params, rule, devices)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
               checkpointing.load_params(workdir))
  return data_state


def test_two_processes_match_one_and_restore_in_one(eight_devices, tmp_path):
  """2 processes x 4 devices train like 1 process x 8 devices (same config, losses, params);
  the 2-process checkpoint, each process writing its part, restores in 1 process on 2
  devices. That a restored checkpoint continues exactly is checked below.
  """
  args, single = eight_devices
  multi = str(tmp_path / "multi")
  run_processes(args, multi, num_processes=2, devices=4)
  config_json = lambda d: json.load(open(os.path.join(d, "config.json")))
  assert config_json(multi) == config_json(single)
  # Only process 0 wrote metrics: one line per step.
  assert [l["step"] for l in read_metrics(multi)] == list(range(9))
  assert list(losses(multi)) == list(range(1, 9))
  np.testing.assert_allclose(list(losses(multi).values()), list(losses(single).values()),
                             rtol=1e-6)
  last = lambda d: read_metrics(d)[-1]
  assert last(multi)["val/top1"] == last(single)["val/top1"]
  state_dir = os.path.join(multi, "checkpoints", "8", "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))
  # Adam turns rounding differences of near-zero gradients (|g| << eps = 1e-8) into updates
  # of lr · g / eps: over 8 steps at lr 1.5e-3 up to ~1e-5 apart on such leaves (seen: 1.04e-5
  # once XLA's backend optimisations are off), against lr-sized (1e-3) steps of a real bug.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=5e-5),
               checkpointing.load_params(multi), checkpointing.load_params(single))

  config = parse_config(args)
  config.mesh = (("data", 2),)
  multi_4, single_4 = str(tmp_path / "multi_4"), str(tmp_path / "single_4")
  copy_checkpoint(multi, 4, multi_4)
  copy_checkpoint(single, 4, single_4)
  # Same data position; the params' fingerprints differ with their last bits.
  position = lambda data_state: {k: v for k, v in data_state.items() if k != "state_fingerprint"}
  assert position(check_restores(config, multi_4, devices=2, rule=rule_of(args))) == position(
      restore(config, single_4)[1])


@pytest.mark.parametrize("hops", [
    ((8, "other"), (1, "own"), (8, "own")),
    pytest.param(((2, "own"), (1, "own"), (8, "own")), marks=pytest.mark.slow)])
def test_checkpoints_resume_on_other_devices_and_rules(eight_devices, hops, tmp_path):
  """The 8-device run continues two steps per hop, ending at step 8, on the hop's device
  count under its rules ("own": the run's, "other": replicated for an FSDP run, FSDP for
  a replicated one): every hop restores exactly the saved params, in the layout of its
  mesh and rules, and the losses follow the straight 8-device run."""
  args, straight = eight_devices
  rules = {"own": rule_of(args),
           "other": {"fsdp": "replicate", "replicate": "fsdp"}[rule_of(args)]}
  workdir = str(tmp_path / "hops")
  start = 8 - 2 * len(hops)
  copy_checkpoint(straight, start, workdir)
  for devices, rule in hops:
    config = parse_config(args)
    config.mesh = (("data", devices),)
    config.sharding_rules = ((".*", rules[rule]),)
    check_restores(config, workdir, devices, rules[rule])
    train.train_and_evaluate(config, workdir, stop_after_steps=2)
  assert list(losses(workdir)) == list(range(start + 1, 9))
  np.testing.assert_allclose(list(losses(workdir).values()),
                             [losses(straight)[s] for s in range(start + 1, 9)], rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
               checkpointing.load_params(workdir), checkpointing.load_params(straight))


def test_sigterm_to_one_process_stops_all_on_one_step(tmp_path):
  """A preemption notice (SIGTERM) to process 1 alone: both processes stop after the same
  step, save it together and exit 0."""
  workdir = str(tmp_path / "run")
  args = CLI_ARGS + ["--config.total_steps=100000", "--config.ckpt_steps=100000"]
  procs, logs = start_processes(args, workdir, num_processes=2, devices=1)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(metrics_path) and len(read_metrics(workdir)) >= 4:
      break
    time.sleep(0.5)
  procs[1].send_signal(signal.SIGTERM)
  texts = wait_processes(procs, logs)
  steps = checkpointing.Checkpointer(workdir).all_steps()
  assert len(steps) == 1 and 3 <= steps[0] < 100000, steps
  for text in texts:
    assert f"Stopped by SIGTERM at step {steps[0]}" in text, text[-3000:]


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two(eight_devices, tmp_path):
  """The 1-process run's step 4 continues in 2 processes x 4 devices as it did in one."""
  args, single = eight_devices
  resumed = str(tmp_path / "resumed")
  copy_checkpoint(single, 4, resumed)
  run_processes(args, resumed, num_processes=2, devices=4)
  np.testing.assert_allclose([losses(resumed)[s] for s in range(5, 9)],
                             [losses(single)[s] for s in range(5, 9)], rtol=1e-6)


@pytest.mark.slow
def test_init_from_in_two_processes(eight_devices, tmp_path):
  """init_from loads params that the new run splits over processes (FSDP); with lr=0 they
  stay exactly those of the source run."""
  args, source = eight_devices
  workdir = str(tmp_path / "finetune")
  run_processes(args + [f"--config.init_from={source}", "--config.lr=0.0",
                        "--config.total_steps=1"], workdir, num_processes=2, devices=4)
  jax.tree.map(np.testing.assert_array_equal, checkpointing.load_params(workdir),
               checkpointing.load_params(source))
