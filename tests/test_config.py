"""Config parsing and validation: every mistake fails before compute, naming the field."""
import importlib
import os
import subprocess
import sys

import ml_collections
import pytest

from big_vision_lite import config_lib
from big_vision_lite import models
from big_vision_lite import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import vit as vit_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_parse_arg_types_and_unknown_keys():
  arg = config_lib.parse_arg("variant=S/16,batch_size=64,lr=0.5,flag=false",
                             variant="Ti/16", batch_size=8, lr=1.0, flag=True)
  assert (arg.variant, arg.batch_size, arg.lr, arg.flag) == ("S/16", 64, 0.5, False)
  assert isinstance(arg.batch_size, int) and isinstance(arg.lr, float)
  with pytest.raises(ValueError, match="Unknown config argument 'bogus'; known: batch_size"):
    config_lib.parse_arg("bogus=1", batch_size=8)
  with pytest.raises(ValueError, match="'batch_size' must be int"):
    config_lib.parse_arg("batch_size=many", batch_size=8)


def test_default_config_is_valid():
  config_lib.validate(vit_config.get_config())
  config_lib.validate(vit_config.get_config("variant=S/16,res=224,num_classes=1000"))


def test_models_get_lists_known_names():
  assert models.get("vit").Model
  with pytest.raises(ValueError, match=r"Unknown model_name 'resnet'; known: .*vit"):
    models.get("resnet")


@pytest.mark.parametrize("mutate,message", [
    (lambda c: setattr(c, "model_name", "vitt"), r"Unknown model_name 'vitt'; known:"),
    (lambda c: setattr(c, "task", "segmentation"), r"Unknown task 'segmentation'.*known: "
     r"classification"),
    (lambda c: c.model.update(bogus=1), r"'model' for model_name 'vit' is invalid.*accepted"),
    (lambda c: c.model.update(pool_type="max"), r"pool_type"),
    (lambda c: setattr(c.input, "pp", "decode|blur(3)"), r"blur.*known"),
    (lambda c: setattr(c.evals.val, "type", "knn2"), r"Unknown evaluator 'knn2' \(config field "
     r"'evals.val.type'\); known: classification"),
    (lambda c: setattr(c, "optax_name", "adamx"), r"Unknown optax_name 'adamx'; known: adamw"),
    (lambda c: c.schedule.update(decay_type="exp"), r"'schedule.decay_type' must be one of"),
    (lambda c: setattr(c, "compute_dtype", "float16"), r"'compute_dtype' must be"),
    (lambda c: setattr(c, "mesh", [("data", "all")]), r"'mesh' must be a list of"),
    (lambda c: setattr(c, "grad_accum_steps", 3), r"divisible by 'grad_accum_steps'"),
    (lambda c: setattr(c, "loss", "hinge"), r"'loss' must be one of softmax_xent"),
])
def test_bad_config_names_the_field(mutate, message):
  config = vit_config.get_config()
  mutate(config)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_wrong_field_type_is_named():
  """A config file that sets a field to the wrong type (overrides are type-checked already)."""
  fields = vit_config.get_config().to_dict()
  fields["total_steps"] = 1.5
  with pytest.raises(ValueError, match=r"'total_steps' must be int, got float"):
    config_lib.validate(ml_collections.ConfigDict(fields))
  fields = vit_config.get_config().to_dict()
  fields["input"]["batch_size"] = "64"
  with pytest.raises(ValueError, match=r"'input.batch_size' must be int, got str"):
    config_lib.validate(ml_collections.ConfigDict(fields))


def test_errors_come_before_any_training(tmp_path):
  config = vit_config.get_config()
  config.model_name = "nope"
  with pytest.raises(ValueError, match="Unknown model_name"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_command_line_override_of_wrong_type_fails():
  proc = subprocess.run(
      [sys.executable, "-m", "big_vision_lite.train", "--config",
       os.path.join(REPO, "configs/vit.py"), "--workdir", "/tmp/unused",
       "--config.total_steps=many"], cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, XLA_FLAGS=""))
  assert proc.returncode != 0
  assert "total_steps" in proc.stderr


@pytest.mark.parametrize("name", sorted(
    f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f != "common.py"
    and f.endswith(".py")))
def test_every_config_takes_the_fault_overrides_when_locked(name):
  """`--config.debug.inject_nan_step=N` and `--config.input.bad_records=skip` reach a
  locked config (as from the command line) for every model: configs/common.py sets both."""
  config = importlib.import_module(f"configs.{name}").get_config()
  config.lock()
  assert (config.debug.inject_nan_step, config.input.bad_records) == (0, "fail")
  config.debug.inject_nan_step = 3
  config.input.bad_records = "skip"
  config_lib.validate(config)
