"""The README's commands, read from its ```bash blocks and run as written at a tiny size.

Paths under /tmp/ in a command go to the test's tmp dir; extra `--config.*` flags make
runs tiny. The README's runs on real datasets (imagenet2012) are only validated: they must
either pass or stop with the clear "dataset not prepared" error, before any compute.
"""
import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from big_vision_lite import checkpointing
from big_vision_lite import config_lib
from big_vision_lite import models
from big_vision_lite import train
from big_vision_lite import utils
from big_vision_lite.tools import import_timm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import vit as vit_config  # pylint: disable=g-import-not-at-top,wrong-import-position

TIMM_TINY = os.path.join(REPO, "tests/data/timm/vit_tiny_patch16_224/state.safetensors")
# The timm names of the tiny state dict above (width 48, depth 2, class token), imported as
# vit_small_patch16_224 (6 heads of 8 channels): the sizes a tiny run must restate.
TINY_IMPORT_FLAGS = ["--config.model.width=48", "--config.model.depth=2",
                     "--config.model.mlp_dim=192", "--config.model.num_heads=6",
                     "--config.model.patch_size=(16, 16)"]


def readme_commands() -> list[str]:
  """Every command line of the README's ```bash blocks (continuations joined, comments
  and blank lines dropped), whitespace normalised."""
  with open(os.path.join(REPO, "README.md")) as f:
    blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
  commands = []
  for block in blocks:
    for line in block.replace("\\\n", " ").splitlines():
      line = " ".join(line.split())
      if line and not line.startswith("#"):
        commands.append(line)
  return commands


def readme_command(prefix: str, contains: str = "") -> str:
  found = [c for c in readme_commands() if c.startswith(prefix) and contains in c]
  assert len(found) == 1, (prefix, contains, found)
  return found[0]


def argv_of(command: str, tmp_path) -> list[str]:
  """The command's argv, `python` as this interpreter and /tmp/ paths under `tmp_path`."""
  argv = [a.replace("/tmp/", f"{tmp_path}/") for a in shlex.split(command)]
  assert argv[0] == "python", command
  return [sys.executable] + argv[1:]


def run(argv: list[str], cwd, extra_env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
  """Runs `argv` in `cwd` on one CPU device with the repo importable."""
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="", **(extra_env or {}))
  return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def link_configs(cwd) -> None:
  """Commands name configs/... relative to the repository root, which is `cwd` here."""
  os.symlink(os.path.join(REPO, "configs"), os.path.join(cwd, "configs"))


def config_of(argv: list[str]):
  """The ConfigDict a train command builds: its `--config` file argument, then its
  `--config.<field>=<value>` overrides (Python literals, else strings)."""
  config, overrides = None, []
  for i, arg in enumerate(argv):
    if arg == "--config":
      path, _, config_arg = argv[i + 1].partition(":")
      name = os.path.splitext(os.path.basename(path))[0]
      config = __import__(name).get_config(config_arg)
    elif arg.startswith("--config."):
      overrides.append(arg[len("--config."):].split("=", 1))
  for field, text in overrides:
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, key = field.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[key] = value
  return config


def timm_vit_state(width: int, depth: int, num_classes: int, tokens: int, patch: int = 16,
                   fill=np.zeros) -> dict[str, np.ndarray]:
  """A timm VisionTransformer state dict (class token, qkv bias, no fc_norm)."""
  mlp = 4 * width
  state = {"cls_token": fill((1, 1, width)), "pos_embed": fill((1, 1 + tokens, width)),
           "patch_embed.proj.weight": fill((width, 3, patch, patch)),
           "patch_embed.proj.bias": fill((width,)), "norm.weight": fill((width,)),
           "norm.bias": fill((width,)), "head.weight": fill((num_classes, width)),
           "head.bias": fill((num_classes,))}
  for i in range(depth):
    for name, shape in (("norm1.weight", (width,)), ("norm1.bias", (width,)),
                        ("attn.qkv.weight", (3 * width, width)), ("attn.qkv.bias", (3 * width,)),
                        ("attn.proj.weight", (width, width)), ("attn.proj.bias", (width,)),
                        ("norm2.weight", (width,)), ("norm2.bias", (width,)),
                        ("mlp.fc1.weight", (mlp, width)), ("mlp.fc1.bias", (mlp,)),
                        ("mlp.fc2.weight", (width, mlp)), ("mlp.fc2.bias", (width,))):
      state[f"blocks.{i}.{name}"] = fill(shape)
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


def test_readme_has_the_commands_this_file_runs():
  commands = readme_commands()
  assert any(c.startswith("python -m big_vision_lite.tools.import_timm") for c in commands)
  assert sum(c.startswith("python -m big_vision_lite.train") for c in commands) >= 6, commands


def test_readme_timm_fine_tune_runs(tmp_path):
  """The README's import command as written (a tiny timm state dict as model.safetensors,
  with a class token), then its fine-tune command: the class token and exact GELU come from
  the import. As written (variant=S/16) the tiny import is refused naming model.variant
  (checked in-process); restating the tiny sizes instead, one step runs, loads the import
  and records its fields."""
  shutil.copy(TIMM_TINY, tmp_path / "model.safetensors")
  link_configs(tmp_path)
  import_command = readme_command("python -m big_vision_lite.tools.import_timm", "vit_small")
  imported = run(argv_of(import_command, tmp_path), tmp_path)
  assert imported.returncode == 0, imported.stderr[-3000:]
  with open(tmp_path / "timm_s16" / "model.json") as f:
    recorded = json.load(f)["model"]
  assert (recorded["pool_type"], recorded["gelu_approximate"]) == ("tok", False)

  command = readme_command("python -m big_vision_lite.train", "init_from=/tmp/timm_s16")
  with pytest.raises(ValueError, match=r"Config field 'model.variant' \('S/16'\) gives "
                     r"width=384, .* is an import of width=48"):
    train.train_and_evaluate(config_of(argv_of(command, tmp_path)), str(tmp_path / "ft"))
  assert not os.path.exists(tmp_path / "ft")  # Refused before the workdir is made.

  tiny = [a.replace("variant=S/16,res=224", "res=32,batch_size=8")
          for a in argv_of(command, tmp_path)]
  assert tiny != argv_of(command, tmp_path)
  tiny += TINY_IMPORT_FLAGS + ["--config.total_steps=1", "--config.lr=0.0",
                               "--config.evals.val.data.split=test[:8]",
                               "--config.evals.val.batch_size=8"]
  tuned = run(tiny, tmp_path)
  assert tuned.returncode == 0, tuned.stderr[-3000:]
  with open(tmp_path / "ft" / "config.json") as f:
    written = json.load(f)
  for field in ("pool_type", "gelu_approximate", "final_norm", "num_heads", "layernorm_eps"):
    assert written["model"][field] == recorded[field], field
  assert written["model"]["num_classes"] == 10 and written["init_skip"] == ["head/.*"]
  # lr = 0: the encoder is the import's, except pos_embedding resampled from 14x14 to 2x2.
  source = import_timm.convert("vit_small_patch16_224", import_timm.read_state_dict(TIMM_TINY))
  expected = utils.flatten_names(source[2]["params"])
  got = utils.flatten_names(checkpointing.load_params(str(tmp_path / "ft")))
  assert got["pos_embedding"].shape == (1, 4, 48)
  for name in ("cls", "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel",
               "Transformer/encoder_norm/scale"):
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_readme_s16_fine_tune_loads_vit_small(tmp_path):
  """The README's fine-tune config (variant=S/16, res=224, init_skip of the head) against
  the model.json import_timm writes for a real-sized vit_small_patch16_224 state dict: it
  validates, and the model it builds has every imported param name and shape but the head
  (before the fix: 'cls' was not in the gap-pooled model). Shapes only, no compute."""
  name, kwargs, variables = import_timm.convert("vit_small_patch16_224",
                                                timm_vit_state(384, 12, 1000, 196))
  imported = tmp_path / "timm_s16"
  (imported / "params").mkdir(parents=True)
  with open(imported / "model.json", "w") as f:
    json.dump({"model_name": name, "model": kwargs}, f)
  command = readme_command("python -m big_vision_lite.train", "init_from=/tmp/timm_s16")
  config = config_of(argv_of(command, tmp_path))
  assert config.init_from == str(imported) and config.model.pool_type == "gap"
  resolved = config_lib.with_init_from_model(config)
  config_lib.validate(resolved)
  model = models.get(resolved.model_name).Model(**resolved.model)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  ours = {k: v.shape for k, v in utils.flatten_names(shapes["params"]).items()}
  theirs = {k: v.shape for k, v in utils.flatten_names(variables["params"]).items()}
  head = lambda names: {k for k in names if re.fullmatch(r"head/.*", k)}
  assert set(ours) - head(ours) == set(theirs) - head(theirs)
  assert all(ours[k] == theirs[k] for k in set(ours) - head(ours)), "shapes differ"
  assert ours["head/kernel"] == (384, 10) and ours["cls"] == (1, 1, 384)


ALLOWED_STOPS = (
    r"Dataset 'imagenet2012' \(config field 'input.data.name'\) is not prepared",
    r"Config field 'init_from': \S+ is not a directory",  # The output of an earlier command.
)


@pytest.mark.parametrize("command", [
    c for c in readme_commands() if c.startswith("python -m big_vision_lite.train")
    and "$i" not in c])
def test_readme_train_command_validates(command, tmp_path):
  """Each train command's config validates, or stops with a clear error (a dataset that is
  not prepared here, an init_from that an earlier README command writes)."""
  config = config_of(argv_of(command, tmp_path))
  try:
    config_lib.validate(config_lib.with_init_from_model(config))
  except ValueError as e:
    assert any(re.search(p, str(e)) for p in ALLOWED_STOPS), str(e)


@pytest.mark.slow
def test_readme_timm_fine_tune_at_full_size(tmp_path):
  """Both timm commands exactly as written, with random full-size vit_small_patch16_224
  weights; only the run's length and the eval are shortened."""
  rng = np.random.default_rng(0)
  state = timm_vit_state(384, 12, 1000, 196,
                         fill=lambda shape: 0.02 * rng.standard_normal(shape))
  save_file(state, str(tmp_path / "model.safetensors"))
  link_configs(tmp_path)
  import_command = readme_command("python -m big_vision_lite.tools.import_timm", "vit_small")
  imported = run(argv_of(import_command, tmp_path), tmp_path)
  assert imported.returncode == 0, imported.stderr[-3000:]
  command = readme_command("python -m big_vision_lite.train", "init_from=/tmp/timm_s16")
  tuned = run(argv_of(command, tmp_path) + [
      "--config.total_steps=1", "--config.input.batch_size=2",
      "--config.evals.val.data.split=test[:2]", "--config.evals.val.batch_size=2"], tmp_path)
  assert tuned.returncode == 0, tuned.stderr[-3000:]
  with open(tmp_path / "ft" / "config.json") as f:
    assert json.load(f)["model"]["pool_type"] == "tok"
