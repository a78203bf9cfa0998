r"""Kill -9 trials: a short run killed at random moments, then resumed, must lose nothing.

  python -m big_vision_lite.tools.crash_trials --trials 20 --workdir_root /tmp/crash

Runs a tiny ViT on shapes/tiny once without interruption (the reference, which fills a
JAX compilation cache that the trials start from), then per trial starts the same run as a
subprocess, kills it with SIGKILL at a moment drawn uniformly over the reference's
training time (with a checkpoint every `--ckpt_steps` steps many kills land inside a save;
`--startup_kill_fraction` of them land during start-up, before any checkpoint), and
resumes it to the end. A trial fails when the resume
 - does not start from the newest complete checkpoint left by the killed run (0 if none),
 - warns that a checkpoint does not restore (a broken checkpoint was listed as complete),
 - logs a loss that differs from the reference's at any step after the restored one, or
 - ends with params that differ from the reference's.
Prints the trials, kills (during a save: an orbax temporary directory was left), resumes,
restored steps, steps lost (progress of the killed run minus the restored step), and exits
1 on any failure. `train.py` logs every step's loss to `metrics.jsonl`, which is what is
compared; lines appended by the resumed run are told apart by the file's size at the kill.
"""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
from absl import app, flags, logging

from big_vision_lite import checkpointing
from big_vision_lite.input import shapes

flags.DEFINE_integer("trials", 20, "Number of kill-and-resume trials.")
flags.DEFINE_integer("seed", 0, "Seed of the kill times.")
flags.DEFINE_string("workdir_root", None, "Directory for the runs (one workdir per trial).")
flags.DEFINE_integer("total_steps", 24, "Steps of each run.")
flags.DEFINE_integer("ckpt_steps", 2, "Checkpoint every this many steps.")
flags.DEFINE_float("startup_kill_fraction", 0.1,
                   "Fraction of trials killed during start-up (before the first step).")
flags.DEFINE_integer("timeout", 600, "Seconds allowed for one run.")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_RESUMED = re.compile(r"Resumed from \S+ at step (\d+)\.")
_UNREADABLE = "does not restore"
_STEP_DONE = re.compile(r"\] step (\d+)/\d+ ")  # train.py's console line of a logged step.


def train_command(workdir: str, data_dir: str, total_steps: int, ckpt_steps: int) -> list[str]:
  """The train.py command of one run: a 1-layer width-16 ViT on 16x16 shapes/tiny images."""
  config = os.path.join(REPO, "configs", "vit.py") + (
      f":res=16,batch_size=8,total_steps={total_steps},dataset=shapes/tiny,"
      f"data_dir={data_dir},eval_split=test[:8]")
  return [sys.executable, "-m", "big_vision_lite.train", "--config", config,
          "--workdir", workdir, "--config.log_training_steps=1",
          f"--config.ckpt_steps={ckpt_steps}", "--config.keep_ckpt=2",
          "--config.model.width=16", "--config.model.depth=1", "--config.model.mlp_dim=32",
          "--config.model.num_heads=2", "--config.evals.val.batch_size=8",
          "--config.evals.val.log_steps=100000"]


def _env() -> dict[str, str]:
  """One CPU device whatever the caller forces; compiled steps cached across the runs."""
  path = os.environ.get("PYTHONPATH")
  return dict(os.environ, XLA_FLAGS="", PYTHONPATH=REPO + (os.pathsep + path if path else ""),
              JAX_COMPILATION_CACHE_DIR=os.path.join(flags.FLAGS.workdir_root, "jax_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def read_losses(path: str, offset: int = 0) -> dict[int, float]:
  """{step: train/loss} of the complete lines of `metrics.jsonl` from byte `offset` on."""
  if not os.path.exists(path):
    return {}
  with open(path, "rb") as f:
    f.seek(offset)
    lines = f.read().split(b"\n")[:-1]  # The last piece is empty or a partial line.
  records = [json.loads(line) for line in lines]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def complete_steps(workdir: str) -> tuple[list[int], bool]:
  """(steps whose checkpoint directory was committed, whether an orbax tmp dir is left)."""
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit()), any("tmp" in n for n in names)


def run_to_end(workdir: str, data_dir: str, timeout: int) -> str:
  """Runs (or resumes) the run in `workdir` to its end; returns its output."""
  cmd = train_command(workdir, data_dir, flags.FLAGS.total_steps, flags.FLAGS.ckpt_steps)
  done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=timeout)
  if done.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}"
                       f"{done.stderr[-3000:]}")
  return done.stdout + done.stderr


@dataclasses.dataclass
class Trial:
  killed: bool = False
  during_save: bool = False
  during_startup: bool = False
  progress: int = 0  # Last step the killed run finished (its console line).
  newest_complete: int = 0
  restored: int = 0
  mismatches: list[str] = dataclasses.field(default_factory=list)


def run_trial(workdir: str, data_dir: str, reference: dict[int, float],
              reference_params: object, startup_seconds: float, train_seconds: float,
              rng: np.random.Generator) -> Trial:
  """One kill at a random moment, one resume, and the checks listed in the docstring."""
  trial = Trial()
  metrics = os.path.join(workdir, "metrics.jsonl")
  cmd = train_command(workdir, data_dir, flags.FLAGS.total_steps, flags.FLAGS.ckpt_steps)
  with open(workdir + ".killed.log", "w") as log:
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    trial.during_startup = rng.random() < flags.FLAGS.startup_kill_fraction
    if trial.during_startup:
      deadline = time.time() + rng.uniform(0, startup_seconds)
    else:
      while proc.poll() is None and not read_losses(metrics):
        time.sleep(0.01)
      deadline = time.time() + rng.uniform(0, train_seconds)
    while proc.poll() is None and time.time() < deadline:
      time.sleep(0.005)
    trial.killed = proc.poll() is None
    if trial.killed:
      proc.send_signal(signal.SIGKILL)
    proc.wait()
  steps, trial.during_save = complete_steps(workdir)
  trial.newest_complete = steps[-1] if steps else 0
  with open(workdir + ".killed.log") as log:
    trial.progress = max(map(int, _STEP_DONE.findall(log.read())), default=0)
  offset = os.path.getsize(metrics) if os.path.exists(metrics) else 0
  output = run_to_end(workdir, data_dir, flags.FLAGS.timeout)
  match = _RESUMED.search(output)
  trial.restored = int(match.group(1)) if match else 0
  if _UNREADABLE in output:
    trial.mismatches.append("a checkpoint listed as complete did not restore")
  if trial.restored != trial.newest_complete:
    trial.mismatches.append(f"resumed from step {trial.restored}, but step "
                            f"{trial.newest_complete} was complete")
  resumed = read_losses(metrics, offset)
  expected = {s: v for s, v in reference.items() if s > trial.restored}
  if resumed != expected:
    differ = sorted(s for s in set(resumed) | set(expected) if resumed.get(s) != expected.get(s))
    trial.mismatches.append(f"losses differ from the reference at steps {differ[:8]}")
  params = checkpointing.load_params(workdir)
  if not all(np.array_equal(a, b) for a, b in zip(_leaves(params), _leaves(reference_params))):
    trial.mismatches.append("final params differ from the reference")
  return trial


def _leaves(tree: object) -> list[np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def summarize(trials: list[Trial], ckpt_steps: int) -> tuple[str, bool]:
  """The summary text and whether every trial passed."""
  killed = [t for t in trials if t.killed]
  lost = [max(t.progress - t.restored, 0) for t in killed]
  failures = [(i, m) for i, t in enumerate(trials) for m in t.mismatches]
  lines = [
      f"trials run: {len(trials)}",
      f"killed: {len(killed)} (during start-up: {sum(t.during_startup for t in killed)}, "
      f"during a save: {sum(t.during_save for t in killed)}; "
      f"{len(trials) - len(killed)} finished before the kill)",
      f"resumes: {len(trials)} (from a checkpoint: {sum(t.restored > 0 for t in trials)}, "
      f"from scratch: {sum(t.restored == 0 for t in trials)})",
      f"restored steps: {[t.restored for t in trials]}",
      f"steps lost per kill: {lost} (max {max(lost, default=0)}; checkpoints every "
      f"{ckpt_steps} steps, a kill during a save loses up to {2 * ckpt_steps - 1})",
      f"steps lost beyond the newest complete checkpoint: "
      f"{sum(t.newest_complete - t.restored for t in trials if t.restored < t.newest_complete)}",
      f"mismatches: {len(failures)}",
  ]
  lines += [f"  trial {i}: {m}" for i, m in failures]
  return "\n".join(lines), not failures


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)  # orbax warns on every read-only restore.
  root = flags.FLAGS.workdir_root
  if not root:
    raise app.UsageError("--workdir_root is required.")
  os.makedirs(root, exist_ok=True)
  total_steps = flags.FLAGS.total_steps
  data_dir = shapes.ensure_built(os.path.join(root, "tfds"), "tiny")
  reference_dir = os.path.join(root, "reference")
  if os.path.exists(reference_dir):
    raise app.UsageError(f"{root} holds earlier trials; use a new --workdir_root.")
  start = time.time()
  with open(reference_dir + ".log", "w") as log:
    proc = subprocess.Popen(train_command(reference_dir, data_dir, flags.FLAGS.total_steps,
                                          flags.FLAGS.ckpt_steps),
                            cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    metrics = os.path.join(reference_dir, "metrics.jsonl")
    while proc.poll() is None and not read_losses(metrics):
      time.sleep(0.01)
    startup_seconds = time.time() - start
    # Steps are logged one step late; the last one at the very end.
    while proc.poll() is None and max(read_losses(metrics), default=0) < total_steps - 1:
      time.sleep(0.01)
    train_seconds = time.time() - start - startup_seconds
    if proc.wait(timeout=flags.FLAGS.timeout):
      raise RuntimeError(f"The reference run failed; see {reference_dir}.log.")
  reference = read_losses(metrics)
  reference_params = checkpointing.load_params(reference_dir)
  print(f"reference: {len(reference)} steps, start-up {startup_seconds:.1f}s, "
        f"training {train_seconds:.1f}s", flush=True)
  trials = []
  for i in range(flags.FLAGS.trials):
    trial = run_trial(os.path.join(root, f"trial_{i}"), data_dir, reference, reference_params,
                      startup_seconds, train_seconds,
                      np.random.default_rng((flags.FLAGS.seed, i)))
    trials.append(trial)
    print(f"trial {i}: killed={trial.killed} during_save={trial.during_save} "
          f"progress={trial.progress} restored={trial.restored} "
          f"{'OK' if not trial.mismatches else trial.mismatches}", flush=True)
  text, ok = summarize(trials, flags.FLAGS.ckpt_steps)
  print(text, flush=True)
  if not ok:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
