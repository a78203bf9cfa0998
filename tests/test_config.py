"""Config parsing and validation: every mistake fails before compute, naming the field."""
import importlib
import json
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from big_vision_lite import checkpointing
from big_vision_lite import config_lib
from big_vision_lite import models
from big_vision_lite import sharding
from big_vision_lite import train
from big_vision_lite.tools import import_timm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import navit as navit_config  # pylint: disable=g-import-not-at-top,wrong-import-position
import vit as vit_config  # pylint: disable=g-import-not-at-top,wrong-import-position

TIMM_TINY = os.path.join(REPO, "tests/data/timm/vit_tiny_patch16_224/state.safetensors")


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


def test_stochastic_depth_is_drop_path_in_every_model():
  with_rate = [name for name in models.KNOWN
               if "drop_path" in models.get(name).Model.__dataclass_fields__]
  assert {"vit", "convnext2", "internimage", "fcmae", "mobilevit"} <= set(with_rate)
  assert not [name for name in models.KNOWN
              if "drop_path_rate" in models.get(name).Model.__dataclass_fields__]


@pytest.mark.parametrize("config_name", ["convnext2", "internimage"])
def test_old_drop_path_rate_name_is_rejected_naming_drop_path(config_name):
  config = importlib.import_module(config_name).get_config()
  config.model.update(drop_path_rate=0.1)
  with pytest.raises(ValueError, match=r"unexpected keyword argument 'drop_path_rate'.*"
                     r"accepted fields: .*\bdrop_path\b"):
    config_lib.validate(config)


def test_models_get_lists_known_names():
  assert models.get("vit").Model
  with pytest.raises(ValueError, match=r"Unknown model_name 'swin'; known: .*resnet, .*vit"):
    models.get("swin")


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
    (lambda c: setattr(c, "grad_accum_steps", 3), r"'input.batch_size' is 128, which does "
     r"not split into 'grad_accum_steps' \(3\) micro-batches"),
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


def fails_before_compute(config, match, tmp_path):
  """train_and_evaluate(config) raises a ValueError matching `match` before it creates its
  workdir (so before any data is read or anything is compiled)."""
  config.total_steps = 1  # Should the check be missing, the run that follows is short.
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(workdir))
  assert not os.path.exists(workdir)


def nearest_multiples(size, multiple):
  """The valid batch sizes next to `size`, by search (independent of the code's arithmetic)."""
  valid = [b for b in range(1, 10 * size + 10 * multiple) if b % multiple == 0]
  below = [b for b in valid if b < size]
  above = [b for b in valid if b > size]
  return ([below[-1]] if below else []) + [above[0]]


@pytest.mark.parametrize("field,size,devices,accum", [
    ("input.batch_size", 7, 2, 1), ("input.batch_size", 1, 2, 1),
    ("input.batch_size", 12, 4, 2),  # 12 / 2 = 6 rows per micro-batch over 4 devices.
    ("evals.val.batch_size", 5, 2, 1), ("evals.val.batch_size", 100, 8, 1)])
def test_batch_size_must_split_over_the_data_devices(field, size, devices, accum, tmp_path):
  config = vit_config.get_config()
  config.mesh = [("data", devices)]
  config.grad_accum_steps = accum
  section, key = field.rsplit(".", 1)
  node = config.input if section == "input" else config.evals.val
  node[key] = size
  sizes = " or ".join(map(str, nearest_multiples(size, devices * accum)))
  fails_before_compute(config, rf"'{field}' is {size},.* {devices} data-parallel devices: "
                       rf"it must be a multiple of {devices * accum}, e.g. {sizes}\.", tmp_path)
  node[key] = nearest_multiples(size, devices * accum)[-1]
  config_lib.validate(config)  # The size the error suggests is accepted.


def test_batch_size_names_the_processes(monkeypatch):
  """With 3 processes and 2 data devices a batch must be a multiple of lcm(2, 3) = 6."""
  config = vit_config.get_config()
  config.mesh = [("data", 2)]
  config.input.batch_size = 8
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  with pytest.raises(ValueError, match=r"'input.batch_size' is 8,.* the 3 processes .*multiple "
                     r"of 6, e.g. 6 or 12\."):
    config_lib.validate(config)


def test_packed_rows_must_split_over_the_data_devices(tmp_path):
  """NaViT batches are packed rows: `input.batch_size` rows, split over the data devices."""
  config = navit_config.get_config()
  config.mesh = [("data", 4)]
  config.input.batch_size = 6
  fails_before_compute(config, r"'input.batch_size' is 6,.* multiple of 4, e.g. 4 or 8",
                       tmp_path)
  config.input.batch_size = 8
  config.evals.val_64.batch_size = 2
  fails_before_compute(config, r"'evals.val_64.batch_size' is 2,.* multiple of 4, e.g. 4\.",
                       tmp_path)


@pytest.mark.parametrize("mesh,match", [
    ([("data", 16)], r"'mesh' \[\('data', 16\)\] needs 16 devices; 8 are available. Use "
     r"axis sizes whose product is at most 8, or -1"),
    ([("data", -1), ("model", 3)], r"'mesh' .*8 devices are not divisible by the fixed axis "
     r"sizes \(3\)"),
    ([("data", 0)], r"'mesh' .*every axis size must be >= 1, or -1")])
def test_mesh_must_fit_the_devices(mesh, match, tmp_path):
  assert jax.device_count() == 8  # tests/conftest.py
  config = vit_config.get_config()
  config.mesh = mesh
  fails_before_compute(config, match, tmp_path)


@pytest.mark.parametrize("rules,match", [
    ([(".*", ("model",))], r"spec \('model',\) names axis 'model'; entries must be None or "
     r"mesh axes \('data'\)"),
    ([(".*", "fsdp:model")], r"'fsdp:model' names axis 'model'; the mesh axes are 'data'"),
    ([("params/(", "replicate")], r"'params/\(' is not a regex"),
    ([(".*", "shard")], r"unknown spec 'shard'; use 'replicate', 'fsdp'")])
def test_bad_sharding_rule_is_named(rules, match, tmp_path):
  config = vit_config.get_config()
  config.sharding_rules = rules
  fails_before_compute(config, rf"'sharding_rules': {match}", tmp_path)


def test_sharding_rule_matching_nothing_fails_before_compiling(tmp_path):
  """A rule must match some name of the train state (its regex fully); the error lists
  parameter names, and comes before the step is compiled or anything saved."""
  config = vit_config.get_config("batch_size=8,total_steps=1")
  config.mesh = [("data", 1)]
  config.sharding_rules = [("params/.*/kernel", "fsdp"), ("Transformer/.*", "replicate")]
  with pytest.raises(ValueError, match=r"'sharding_rules': rule \('Transformer/\.\*', "
                     r"'replicate'\) matches no name .*such as params/\w+"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")
  tree = {"params": {"head": {"kernel": jax.ShapeDtypeStruct((4, 2), "float32")}}}
  mesh = sharding.make_mesh([("data", 1)])
  assert sharding.infer_shardings(tree, mesh, [("params/head/.*", "replicate")])
  with pytest.raises(ValueError, match=r"matches no name.*params/head/kernel"):
    sharding.infer_shardings(tree, mesh, [("head/kernel", "replicate")])


def test_init_from_must_hold_a_checkpoint(tmp_path):
  config = vit_config.get_config()
  config.init_from = str(tmp_path / "missing")
  fails_before_compute(config, r"'init_from': .*missing is not a directory", tmp_path)
  accepted = (r"accepted: an import \(model.json and params/, written by tools/import_\*.py\) "
              r"or a run's workdir with a complete step under checkpoints/<step>/")
  empty = tmp_path / "empty"
  empty.mkdir()
  config.init_from = str(empty)
  fails_before_compute(config, rf"'init_from': .*empty holds no checkpoint .*contains "
                       rf"nothing\); {accepted}", tmp_path)
  (empty / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)  # Unfinished.
  (empty / "config.json").write_text("{}")
  fails_before_compute(config, r"empty holds no checkpoint to start from \(it contains "
                       r"checkpoints, config.json\)", tmp_path)
  (empty / "checkpoints" / "3").mkdir()
  config_lib.validate(config)
  foreign = tmp_path / "foreign"
  checkpointing.write_import(str(foreign), "deepvit", {"num_classes": 10}, {"params": {}})
  config.init_from = str(foreign)
  fails_before_compute(config, r"'init_from': .*foreign holds model_name='deepvit'; a 'vit' "
                       r"run loads 'vit'", tmp_path)


@pytest.mark.parametrize("field,split,match", [
    ("evals.val.data", "validation", r"is 'validation', not a split of dataset 'shapes'; its "
     r"splits: 'train', 'test'"),
    ("input.data", "tarin[:90%]", r"is 'tarin\[:90%\]', not a split of dataset 'shapes'; "
     r"its splits: 'train', 'test'"),
    ("input.data", "train[:200%]", r"is 'train\[:200%\]', not a split .*\(Error parsing"),
    ("evals.val.data", "test[10:5]", r"is 'test\[10:5\]', which selects no example")])
def test_split_must_exist(field, split, match, tmp_path):
  config = vit_config.get_config()
  (config.input if field == "input.data" else config.evals.val).data.split = split
  fails_before_compute(config, rf"'{field}.split' {match}", tmp_path)


def test_dataset_must_be_prepared(tmp_path):
  config = vit_config.get_config("dataset=imagenet2012,num_classes=1000")
  config.input.data.data_dir = str(tmp_path)
  fails_before_compute(config, r"'imagenet2012' \(config field 'input.data.name'\) is not "
                       r"prepared .*download_and_prepare", tmp_path)


@pytest.fixture(scope="module")
def timm_import(tmp_path_factory):
  """A timm vit_small_patch16_224 state dict shrunk to width 48 (class token), imported as
  the README does: (dir, the model.json it wrote)."""
  directory = str(tmp_path_factory.mktemp("timm_import"))
  name, kwargs, variables = import_timm.convert("vit_small_patch16_224",
                                                import_timm.read_state_dict(TIMM_TINY))
  checkpointing.write_import(directory, name, kwargs, variables)
  with open(os.path.join(directory, "model.json")) as f:
    return directory, json.load(f)["model"]


def sizeless_vit_config(init_from):
  """configs/vit.py with its model sizes left to the import (pool_type stays "gap")."""
  config = vit_config.get_config()
  config.model = dict(num_classes=3, pool_type="gap", posemb="learn")
  config.init_from = init_from
  return config


def test_import_sets_the_structural_model_fields(timm_import):
  directory, recorded = timm_import
  assert recorded["pool_type"] == "tok" and recorded["gelu_approximate"] is False
  config = sizeless_vit_config(directory)
  config.lock()  # As from the command line.
  resolved = config_lib.with_init_from_model(config)
  assert config.model.pool_type == "gap"  # The caller's config is left alone.
  expected = dict(recorded, num_classes=3, patch_size=list(recorded["patch_size"]))
  got = dict(resolved.model.to_dict(), patch_size=list(resolved.model.patch_size))
  assert got == expected
  config_lib.validate(resolved)
  model = models.get("vit").Model(**resolved.model)
  assert model.hparams()["num_heads"] == recorded["num_heads"]
  # Restating the import's values is fine.
  config = sizeless_vit_config(directory)
  config.model.update(pool_type="tok", width=recorded["width"])
  assert config_lib.with_init_from_model(config).model.pool_type == "tok"


@pytest.mark.parametrize("update,match", [
    (dict(pool_type="map"), r"'model.pool_type' is 'map', but init_from .* has "
     r"pool_type='tok'; .*Set --config.model.pool_type='tok' \(a field left at the model's "
     r"default, 'gap', takes the import's value\)"),
    (dict(gelu_approximate=True, final_norm="post_pool"), r"'model.final_norm' is "
     r"'post_pool', but .* has final_norm='pre_pool'"),
    (dict(variant="S/16"), r"'model.variant' \('S/16'\) gives width=384, depth=12, "
     r"mlp_dim=1536, but init_from .* is an import of width=48, depth=2, mlp_dim=192"),
    (dict(width=96, depth=4), r"'model.width' is 96, but .* has width=48")])
def test_model_field_conflicting_with_the_import_is_named(timm_import, update, match, tmp_path):
  """Fields set to a non-default value must agree with the import (gelu_approximate=True is
  the model's default, so the import's False replaces it silently)."""
  config = sizeless_vit_config(timm_import[0])
  config.model.update(update)
  fails_before_compute(config, match, tmp_path)
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)
