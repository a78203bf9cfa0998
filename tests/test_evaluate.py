"""`python -m big_vision_lite.evaluate` on a tiny trained ViT run: the CLI's k-NN and
linear-probe results equal those the train loop's evaluators logged for the final step,
EMA params where an eval asks for them; and its errors for bad input."""
import json
import os
import sys
import textwrap

import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags

from big_vision_lite import checkpointing
from big_vision_lite import evaluate
from big_vision_lite import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = textwrap.dedent('''\
    """A 2-step one-layer ViT on 64 "shapes" images, with k-NN and linear-probe evals."""
    from configs import vit


    def get_config():
      config = vit.get_config("total_steps=2,batch_size=16")
      config.model.depth = 1
      config.input.data.split = "train[:64]"
      config.ema_decay = 0.5
      config.mesh = (("data", 1),)  # Compiles faster; tests/test_knn.py covers 8 devices.
      pp = 'decode|resize(32)|value_range(-1, 1)|keep("image", "label")'
      feature_eval = dict(train_data=dict(name="shapes", split="train[:48]"),
                          data=dict(name="shapes", split="test[:24]"), pp=pp, batch_size=16,
                          num_classes=10, log_steps=1000)
      config.evals = dict(
          knn=dict(feature_eval, type="knn", k=5, query_chunk=8),
          probe=dict(feature_eval, type="linear_probe", steps=20, lr=0.05),
          probe_ema=dict(feature_eval, type="linear_probe", steps=20, lr=0.05, use_ema=True))
      return config
    ''')


def load_config(path: str):
  """`get_config()` of the config file at `path` (which imports from the repository)."""
  namespace: dict = {}
  sys.path.insert(0, ROOT)
  try:
    with open(path) as f:
      exec(compile(f.read(), path, "exec"), namespace)  # pylint: disable=exec-used
  finally:
    sys.path.remove(ROOT)
  return namespace["get_config"]()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """(config path, workdir, the final step's eval metrics logged by the train loop)."""
  root = tmp_path_factory.mktemp("evaluate")
  config_path = root / "tiny_feature_evals.py"
  config_path.write_text(CONFIG)
  workdir = str(root / "run")
  metrics = train.train_and_evaluate(load_config(str(config_path)), workdir)
  return str(config_path), workdir, metrics


def test_cli_results_equal_the_train_loops_evaluators(trained_run):
  config_path, workdir, logged = trained_run
  output = os.path.join(workdir, "cli_results.json")
  # The command line, parsed in this process (a subprocess would import jax anew).
  flags.FLAGS(["evaluate", f"--config={config_path}", f"--workdir={workdir}",
               f"--output={output}"])
  sys.path.insert(0, ROOT)
  try:
    evaluate.main([])
  finally:
    sys.path.remove(ROOT)
    flags.FLAGS.unparse_flags()
  with open(output) as f:
    results = json.load(f)
  assert results["step"] == 2
  for name in ("knn", "probe", "probe_ema"):
    for metric, value in results[name].items():
      assert value == pytest.approx(logged[f"{name}/{metric}"], rel=1e-6, abs=1e-9), (
          name, metric)
  assert set(results["knn"]) == {"top1", "top5"}
  assert 0 < results["knn"]["top1"] < results["knn"]["top5"] <= 1
  # The EMA params are another model: its probe fits the train split differently.
  assert results["probe_ema"]["train_loss"] != results["probe"]["train_loss"]


def test_load_variables_use_ema_reads_the_ema_params(trained_run, tmp_path):
  _, workdir, _ = trained_run
  params = checkpointing.load_variables(workdir)["params"]
  ema = checkpointing.load_variables(workdir, use_ema=True)["params"]
  kernel = lambda p: p["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert kernel(params).shape == kernel(ema).shape
  assert not np.allclose(kernel(params), kernel(ema))

  without_ema = tmp_path / "no_ema"
  with checkpointing.Checkpointer(str(without_ema)) as checkpointer:
    checkpointer.save(3, {"params": {"w": np.ones(2, np.float32)}, "extra": {}}, {})
  np.testing.assert_array_equal(checkpointing.load_variables(str(without_ema))["params"]["w"],
                                np.ones(2))
  with pytest.raises(ValueError, match=r"has no EMA params .* at step 3.*use_ema=False"):
    checkpointing.load_variables(str(without_ema), use_ema=True)

  imported = tmp_path / "import"
  imported.mkdir()
  (imported / "model.json").write_text("{}")
  ocp.PyTreeCheckpointer().save(str(imported / "params"), {"params": {"w": np.ones(2)}})
  with pytest.raises(ValueError, match=r"is an import, .* no EMA params"):
    checkpointing.load_variables(str(imported), use_ema=True)


def test_errors_name_the_problem(trained_run, tmp_path):
  config_path, workdir, _ = trained_run
  config = load_config(config_path)
  with pytest.raises(ValueError, match=r"--evals names 'val'.*known: knn, probe, probe_ema"):
    evaluate.evaluate(config, workdir, ["knn", "val"])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"empty holds no checkpoint \(it contains nothing\)"):
    evaluate.evaluate(config, str(tmp_path / "empty"))
  with pytest.raises(ValueError, match=r"missing does not exist"):
    evaluate.evaluate(config, str(tmp_path / "missing"))
  config.evals.knn.k = 49  # Validation (before any compute) knows the bank's size.
  with pytest.raises(ValueError, match=r"'evals.knn.k' is 49, more than the 48 examples"):
    evaluate.evaluate(config, workdir, ["knn"])


def test_an_import_evaluates_like_its_run(trained_run, tmp_path):
  """An import dir (model.json and params/, as tools/import_*.py write them) of the run's
  params gives the run's k-NN results; it has no EMA params to evaluate."""
  config_path, workdir, logged = trained_run
  config = load_config(config_path)
  imported = str(tmp_path / "import")
  checkpointing.write_import(imported, config.model_name, config.model.to_dict(),
                               checkpointing.load_variables(workdir))
  results = evaluate.evaluate(config, imported, ["knn"])
  assert results["knn"] == {k: logged[f"knn/{k}"] for k in ("top1", "top5")}
  with open(os.path.join(imported, "eval_results.json")) as f:
    assert json.load(f)["step"] is None
  with pytest.raises(ValueError, match=r"is an import, .* no EMA params"):
    evaluate.evaluate(config, imported, ["probe_ema"])
