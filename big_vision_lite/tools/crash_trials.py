r"""Kill -9 trials: a short run killed at chosen moments, then resumed, must lose nothing.

  python -m big_vision_lite.tools.crash_trials --trials 20 --workdir_root /tmp/crash

Runs a tiny ViT on shapes/tiny once without interruption (the reference, which fills a
JAX compilation cache that the trials start from, and whose step times and save windows
are recorded), then per trial starts the same run as a subprocess, kills it with SIGKILL
and resumes it to the end. The kill moment of a trial is one of three kinds, in the
proportions of the flags (whole trials, in an order drawn from `--seed`):
 - start-up (`--startup_kill_fraction`): uniform over the reference's start-up, or when
   the trial logs its first step if that comes first (before any checkpoint);
 - save (`--save_kill_fraction`): inside a checkpoint save drawn from all saves (the final
   one included): once that step's orbax temporary directory appears, after a delay
   uniform up to the shortest save of the reference;
 - any: uniform over the reference's training from its first logged step to the line of
   step `total_steps - 2`, found again in the trial from its logged steps (saves run in
   the background, so many of these land inside a save too).
A trial fails when the run finished before its kill (nothing was tested), or the resume
 - does not start from the newest complete checkpoint left by the killed run (0 if none),
 - warns that a checkpoint does not restore (a broken checkpoint was listed as complete),
 - logs a loss that differs from the reference's at any step after the restored one, or
 - ends with params that differ from the reference's.
Prints each trial, then the figures as text and, last, as one JSON line (also written to
`--json`): trials, kills (before the first step, inside a save: an orbax temporary
directory was left), runs that finished before their kill, resumes (from a checkpoint,
from scratch), restored steps, steps lost per kill (progress of the killed run minus the
restored step), steps lost beyond the newest complete checkpoint, mismatches. Exits 1 on
any failure.
`train.py` logs every step's loss to `metrics.jsonl`, which is what is compared; lines
appended by the resumed run are told apart by the file's size at the kill.
"""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags, logging

from big_vision_lite import checkpointing
from big_vision_lite.input import shapes

flags.DEFINE_integer("trials", 20, "Number of kill-and-resume trials.")
flags.DEFINE_integer("seed", 0, "Seed of the kill kinds and moments.")
flags.DEFINE_string("workdir_root", None, "Directory for the runs (one workdir per trial).")
flags.DEFINE_integer("total_steps", 24, "Steps of each run.")
flags.DEFINE_integer("ckpt_steps", 2, "Checkpoint every this many steps.")
flags.DEFINE_float("startup_kill_fraction", 0.1,
                   "Fraction of trials killed during start-up (before the first step).")
flags.DEFINE_float("save_kill_fraction", 0.5,
                   "Fraction of trials killed inside a checkpoint save drawn from all saves.")
flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
flags.DEFINE_integer("timeout", 600, "Seconds allowed for one run.")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_RESUMED = re.compile(r"Resumed from \S+ at step (\d+)\.")
_UNREADABLE = "does not restore"
_STEP_DONE = re.compile(r"\] step (\d+)/\d+ ")  # train.py's console line of a logged step.
_TMP_STEP = re.compile(r"(\d+)\.orbax-checkpoint-tmp")  # orbax's name of a step being saved.
_POLL_SECONDS = 0.002


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


def checkpoint_names(workdir: str) -> list[str]:
  directory = os.path.join(workdir, "checkpoints")
  return os.listdir(directory) if os.path.isdir(directory) else []


def complete_steps(workdir: str) -> tuple[list[int], bool]:
  """(steps whose checkpoint directory was committed, whether an orbax tmp dir is left)."""
  names = checkpoint_names(workdir)
  return sorted(int(n) for n in names if n.isdigit()), any(_TMP_STEP.match(n) for n in names)


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
class Reference:
  """The uninterrupted run: its results and the timeline the kill moments are drawn on."""
  losses: dict[int, float]
  params: Any
  startup_seconds: float  # From the start to its first logged step.
  logged_at: dict[int, float]  # {step: seconds after the start when its line was logged}
  save_seconds: dict[int, float]  # {step: seconds its temporary directory was seen}


def run_reference(workdir: str, data_dir: str) -> Reference:
  """Runs the reference, watching its metrics file and checkpoint directory."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  logged_at, tmp_seen, committed_seen = {}, {}, {}
  start = time.time()
  with open(workdir + ".log", "w") as log:
    proc = subprocess.Popen(train_command(workdir, data_dir, flags.FLAGS.total_steps,
                                          flags.FLAGS.ckpt_steps),
                            cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    while proc.poll() is None and time.time() - start < flags.FLAGS.timeout:
      now = time.time() - start
      for step in read_losses(metrics):
        logged_at.setdefault(step, now)
      for name in checkpoint_names(workdir):
        match = _TMP_STEP.match(name)
        if match:
          tmp_seen.setdefault(int(match.group(1)), now)
        elif name.isdigit():
          committed_seen.setdefault(int(name), now)
      time.sleep(_POLL_SECONDS)
    if proc.wait(timeout=flags.FLAGS.timeout):
      raise RuntimeError(f"The reference run failed; see {workdir}.log.")
  save_seconds = {s: committed_seen[s] - t for s, t in tmp_seen.items() if s in committed_seen}
  if not logged_at or not save_seconds:
    raise RuntimeError(f"The reference run logged no step or no save was seen; see "
                       f"{workdir}.log.")
  return Reference(read_losses(metrics), checkpointing.load_params(workdir),
                   min(logged_at.values()), logged_at, save_seconds)


@dataclasses.dataclass
class Trial:
  kind: str  # "startup", "save" or "any".
  killed: bool = False
  during_save: bool = False
  progress: int = 0  # Last step the killed run finished (its console line).
  newest_complete: int = 0
  restored: int = 0
  mismatches: list[str] = dataclasses.field(default_factory=list)


def trial_kinds(trials: int, rng: np.random.Generator) -> list[str]:
  """`trials` kinds in the proportions of the flags, in a random order."""
  startup = round(trials * flags.FLAGS.startup_kill_fraction)
  save = round(trials * flags.FLAGS.save_kill_fraction)
  kinds = ["startup"] * startup + ["save"] * save + ["any"] * (trials - startup - save)
  return [kinds[i] for i in rng.permutation(trials)]


def _wait(proc: subprocess.Popen, ready: Any) -> None:
  """Polls until `ready()` or the process ends."""
  while proc.poll() is None and not ready():
    time.sleep(_POLL_SECONDS)


def wait_for_kill_moment(kind: str, proc: subprocess.Popen, workdir: str,
                         reference: Reference, rng: np.random.Generator) -> None:
  """Returns at the trial's kill moment (or when the run has ended)."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  if kind == "startup":
    # The trials reuse the reference's compiled steps and start faster: at the latest when
    # the run logs its first step (its metrics file appears).
    deadline = time.time() + rng.uniform(0, reference.startup_seconds)
    _wait(proc, lambda: time.time() >= deadline or os.path.exists(metrics))
    return
  if kind == "save":
    total, every = flags.FLAGS.total_steps, flags.FLAGS.ckpt_steps
    step = int(rng.choice(list(range(every, total, every)) + [total]))  # Periodic and final.
    started = lambda: any(n.startswith(f"{step}.orbax") or n == str(step)
                          for n in checkpoint_names(workdir))
    _wait(proc, started)
    delay = rng.uniform(0, min(reference.save_seconds.values()))
  else:
    # Up to the line of step total_steps - 2, so the run is still training at the kill:
    # a logged step, then a fraction of its gap to the next one in the reference.
    anchors = sorted((t, s) for s, t in reference.logged_at.items()
                     if s <= flags.FLAGS.total_steps - 2)
    moment = rng.uniform(anchors[0][0], anchors[-1][0])
    at, step = max(a for a in anchors if a[0] <= moment)
    _wait(proc, lambda: step in read_losses(metrics))
    delay = moment - at
  deadline = time.time() + delay
  _wait(proc, lambda: time.time() >= deadline)


def run_trial(kind: str, workdir: str, data_dir: str, reference: Reference,
              rng: np.random.Generator) -> Trial:
  """One kill at a moment of `kind`, one resume, and the checks listed in the docstring."""
  trial = Trial(kind)
  metrics = os.path.join(workdir, "metrics.jsonl")
  cmd = train_command(workdir, data_dir, flags.FLAGS.total_steps, flags.FLAGS.ckpt_steps)
  with open(workdir + ".killed.log", "w") as log:
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    wait_for_kill_moment(kind, proc, workdir, reference, rng)
    trial.killed = proc.poll() is None
    if trial.killed:
      proc.send_signal(signal.SIGKILL)
    proc.wait()
  if not trial.killed:
    trial.mismatches.append(f"the run finished (exit code {proc.returncode}) before its kill")
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
  expected = {s: v for s, v in reference.losses.items() if s > trial.restored}
  if resumed != expected:
    differ = sorted(s for s in set(resumed) | set(expected) if resumed.get(s) != expected.get(s))
    trial.mismatches.append(f"losses differ from the reference at steps {differ[:8]}")
  params = checkpointing.load_params(workdir)
  if not all(np.array_equal(a, b) for a, b in zip(_leaves(params), _leaves(reference.params))):
    trial.mismatches.append("final params differ from the reference")
  return trial


def _leaves(tree: object) -> list[np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def figures(trials: list[Trial]) -> dict[str, Any]:
  """The counts the tool reports (and a test reads)."""
  killed = [t for t in trials if t.killed]
  return {
      "trials": len(trials),
      "kills": len(killed),
      "kills_before_first_step": sum(t.progress == 0 for t in killed),
      "kills_during_save": sum(t.during_save for t in killed),
      "finished_before_kill": len(trials) - len(killed),
      "resumes": len(trials),
      "resumes_from_checkpoint": sum(t.restored > 0 for t in trials),
      "resumes_from_scratch": sum(t.restored == 0 for t in trials),
      "restored_steps": [t.restored for t in trials],
      "steps_lost_per_kill": [max(t.progress - t.restored, 0) for t in killed],
      "steps_lost_beyond_checkpoint": sum(max(t.newest_complete - t.restored, 0)
                                          for t in trials),
      "mismatches": sum(len(t.mismatches) for t in trials),
      "failures": [[i, m] for i, t in enumerate(trials) for m in t.mismatches],
  }


def summarize(counts: dict[str, Any], ckpt_steps: int) -> str:
  """The figures as text."""
  lost = counts["steps_lost_per_kill"]
  lines = [
      f"trials run: {counts['trials']}",
      f"killed: {counts['kills']} (before the first step: {counts['kills_before_first_step']}, "
      f"during a save: {counts['kills_during_save']}; "
      f"{counts['finished_before_kill']} finished before the kill)",
      f"resumes: {counts['resumes']} (from a checkpoint: {counts['resumes_from_checkpoint']}, "
      f"from scratch: {counts['resumes_from_scratch']})",
      f"restored steps: {counts['restored_steps']}",
      f"steps lost per kill: {lost} (max {max(lost, default=0)}; checkpoints every "
      f"{ckpt_steps} steps: a save in flight blocks the next one, so a kill loses up to "
      f"{2 * ckpt_steps})",
      f"steps lost beyond the newest complete checkpoint: "
      f"{counts['steps_lost_beyond_checkpoint']}",
      f"mismatches: {counts['mismatches']}",
  ]
  lines += [f"  trial {i}: {m}" for i, m in counts["failures"]]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)  # orbax warns on every read-only restore.
  root = flags.FLAGS.workdir_root
  if not root:
    raise app.UsageError("--workdir_root is required.")
  startup_fraction, save_fraction = (flags.FLAGS.startup_kill_fraction,
                                     flags.FLAGS.save_kill_fraction)
  if min(startup_fraction, save_fraction) < 0 or startup_fraction + save_fraction > 1:
    raise app.UsageError(f"--startup_kill_fraction ({startup_fraction}) and "
                         f"--save_kill_fraction ({save_fraction}) must be >= 0 with a sum "
                         "<= 1.")
  os.makedirs(root, exist_ok=True)
  reference_dir = os.path.join(root, "reference")
  if os.path.exists(reference_dir):
    raise app.UsageError(f"{root} holds earlier trials; use a new --workdir_root.")
  data_dir = shapes.ensure_built(os.path.join(root, "tfds"), "tiny")
  reference = run_reference(reference_dir, data_dir)
  print(f"reference: {len(reference.losses)} steps, start-up {reference.startup_seconds:.1f}s, "
        f"training {max(reference.logged_at.values()) - reference.startup_seconds:.1f}s, "
        f"saves {min(reference.save_seconds.values()):.3f}-"
        f"{max(reference.save_seconds.values()):.3f}s", flush=True)
  kinds = trial_kinds(flags.FLAGS.trials, np.random.default_rng(flags.FLAGS.seed))
  trials = []
  for i, kind in enumerate(kinds):
    trial = run_trial(kind, os.path.join(root, f"trial_{i}"), data_dir, reference,
                      np.random.default_rng((flags.FLAGS.seed, i)))
    trials.append(trial)
    print(f"trial {i}: kind={kind} killed={trial.killed} during_save={trial.during_save} "
          f"progress={trial.progress} newest_complete={trial.newest_complete} "
          f"restored={trial.restored} {'OK' if not trial.mismatches else trial.mismatches}",
          flush=True)
  counts = figures(trials)
  print(summarize(counts, flags.FLAGS.ckpt_steps), flush=True)
  print(json.dumps(counts), flush=True)
  if flags.FLAGS.json:
    with open(flags.FLAGS.json, "w") as f:
      json.dump(counts, f, indent=2)
  if counts["failures"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
