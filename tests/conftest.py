"""Test set-up: 8 virtual CPU devices and a JAX compilation cache shared by the session
(both set before jax is imported), the `slow` marker and the live timm references."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# XLA's backend (LLVM) optimisations off: the tests' programs are small and run a few
# steps, so compiling dominates, and it takes about half as long (a MobileViT train step
# 26 s -> 12 s) for a slower run (10 steps 0.20 s -> 0.32 s); the HLO passes still run.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Many tests train the same small configs: their steps compile once per session, not once
# per test (subprocesses inherit the cache). A cache dir set by the caller is kept.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="bvl_test_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_unconfigure(config):
  del config
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long end-to-end test, excluded from the default CI "
                          "run (`-m 'not slow'`).")


@pytest.fixture(scope="session")
def timm_live_dir(tmp_path_factory):
  """tests/make_timm_reference.py run now with a new seed (and installed timm's ViT
  definitions), in a subprocess (torch stays out of the test process, which may also hold
  TensorFlow); skips when timm is missing."""
  if importlib.util.find_spec("timm") is None or importlib.util.find_spec("torch") is None:
    pytest.skip("timm/torch not installed, so no live comparison; the saved references in "
                "tests/data/timm still cover the conversions. Install with: pip install "
                "torch==2.14.1 torchvision==0.29.1 timm")
  out = tmp_path_factory.mktemp("timm_live")
  script = os.path.join(os.path.dirname(__file__), "make_timm_reference.py")
  subprocess.run([sys.executable, script, "--out", str(out), "--seed", "3", "--vit-definitions"],
                 check=True, capture_output=True, timeout=900)
  return str(out)


@pytest.fixture
def train_losses(tmp_path):
  """run(config, log_every) trains `config` in tmp_path on one device without evals and
  returns the logged training losses."""
  def run(config, log_every: int) -> list[float]:
    from big_vision_lite import train  # pylint: disable=g-import-not-at-top
    config.log_training_steps = log_every
    config.mesh = [("data", 1)]
    config.evals = {}
    train.train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
      return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  return run


HIDE_TENSORFLOW = ("import sys\n"
                   "class Hide:\n"
                   "  def __init__(self, f): self.f = f\n"
                   "  def find_spec(self, name, path=None, target=None):\n"
                   "    if name.split('.')[0] == 'tensorflow': return None\n"
                   "    return self.f.find_spec(name, path, target)\n"
                   "sys.meta_path[:] = [Hide(f) for f in sys.meta_path]\n")


@pytest.fixture
def run_without_tensorflow():
  """run(code) runs Python `code` in a subprocess (in the repository) where TensorFlow
  cannot be imported, then checks it exited 0 without importing it."""
  def run(code: str) -> None:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = HIDE_TENSORFLOW + code + "\nassert 'tensorflow' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
  return run
