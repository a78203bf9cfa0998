r"""Runs a config's evaluators on the newest checkpoint of a run, or on an import.

  python -m big_vision_lite.evaluate --config configs/dino.py --workdir /tmp/dino \
      --evals knn,linear_probe

`--workdir` is a run's workdir (its newest checkpoint step) or an import dir written by
tools/import_*.py (model.json and params/; its model fields decide the model's structure,
as `init_from` does in training). The task, mesh and evaluators are built from the config
as the train loop builds them (`config.evals`, all of them unless `--evals` names some);
each eval reads the EMA params when its `use_ema` is set. Results are printed and written
to `--output` (default <workdir>/eval_results.json): {"step": ..., "workdir": ...,
"<eval name>": {"<metric>": value}}.
"""
import json
import os
import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from big_vision_lite import checkpointing
from big_vision_lite import config_lib
from big_vision_lite import evaluators
from big_vision_lite import models
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite import train
from big_vision_lite import utils

# --config, --workdir and the distributed flags are the train loop's (big_vision_lite.train).
flags.DEFINE_list("evals", None, "Names of config.evals to run (default: all).")
flags.DEFINE_string("output", None, "Where to write the results as JSON "
                    "(default: <workdir>/eval_results.json).")


def checkpoint_step(workdir: str) -> int | None:
  """The newest checkpoint step of a run's `workdir`, or None for an import; a ValueError
  when it holds neither."""
  if checkpointing.is_import(workdir):
    return None
  directory = os.path.join(workdir, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
      directory) else []
  if not steps:
    held = sorted(os.listdir(workdir)) if os.path.isdir(workdir) else None
    what = ("does not exist" if held is None else
            f"holds no checkpoint (it contains {', '.join(held[:6]) or 'nothing'})")
    raise ValueError(f"--workdir {workdir} {what}; give a run's workdir with a complete "
                     "step under checkpoints/<step>/ or an import (model.json and params/, "
                     "written by tools/import_*.py).")
  return steps[-1]


def select_evals(config: ml_collections.ConfigDict, names: Sequence[str] | None
                 ) -> list[str]:
  """The eval names to run: `names`, all of `config.evals` if None; a ValueError lists the
  known ones for an unknown name."""
  known = list(config.get("evals") or {})
  if not known:
    raise ValueError("Config field 'evals' is empty: there is nothing to evaluate; add e.g. "
                     "a 'knn' or 'linear_probe' entry.")
  names = list(names) if names else known
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"--evals names {', '.join(map(repr, unknown))}, not in config field "
                     f"'evals'; known: {', '.join(known)}.")
  return names


def place_variables(variables: dict[str, Any], mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, Any]] | None) -> dict[str, Any]:
  """Numpy variables as global arrays, laid out by the config's `sharding_rules` as in the
  train state ("params/...", "extra/<collection>/..."); rules for other state entries (e.g.
  the optimiser's) are left out."""
  tree = {"params": variables["params"],
          "extra": {k: v for k, v in variables.items() if k != "params"}}
  names = list(utils.flatten_names(tree))
  rules = [(pattern, spec) for pattern, spec in (rules or ())
           if any(re.fullmatch(pattern, n) for n in names)]
  shardings = sharding.infer_shardings(tree, mesh, rules)
  placed = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: x[index]),
      tree, shardings)
  return {"params": placed["params"], **placed["extra"]}


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             names: Sequence[str] | None = None, output: str | None = None
             ) -> dict[str, dict[str, float]]:
  """Runs the evals `names` (default: all) of `config` on `workdir`; returns and writes
  {eval name: {metric: value}} (see the module docstring)."""
  workdir = os.path.abspath(workdir)
  step = checkpoint_step(workdir)
  names = select_evals(config, names)
  if step is None:  # An import decides the model's structure, as init_from does in training.
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.init_from = workdir
  config = config_lib.with_init_from_model(config)
  config_lib.validate(config)
  if step is not None:
    train._check_same_architecture(config, workdir)  # pylint: disable=protected-access
  mesh = sharding.make_mesh(config.get("mesh"))
  task = tasks.REGISTRY.get(config.task)(config, models.from_config(config), mesh)
  seed = config.get("seed", 0)
  loaded: dict[bool, dict[str, Any]] = {}
  results: dict[str, Any] = {}
  for name in names:
    ev = config.evals[name]
    use_ema = bool(ev.get("use_ema", False))
    if use_ema not in loaded:
      loaded[use_ema] = place_variables(checkpointing.load_variables(workdir, use_ema=use_ema),
                                        mesh, config.get("sharding_rules"))
    runner = evaluators.REGISTRY.get(ev.type, field=f"evals.{name}.type")(task, mesh, ev, seed)
    results[name] = runner.run(loaded[use_ema])
    for metric, value in results[name].items():
      logging.info("%s/%s: %.6g", name, metric, value)
      print(f"{name}/{metric}: {value:.6g}", flush=True)
  record = {"step": step, "workdir": workdir, **results}
  output = output or os.path.join(workdir, "eval_results.json")
  if jax.process_index() == 0:
    with open(output + ".tmp", "w") as f:
      json.dump(record, f, indent=2)
    os.replace(output + ".tmp", output)
  return results


def main(argv: list[str]) -> None:
  del argv
  train.maybe_initialize_distributed(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                                     flags.FLAGS.process_id)
  config = flags.FLAGS.config
  if config is None or flags.FLAGS.workdir is None:
    raise app.UsageError("--config and --workdir are required.")
  evaluate(config, flags.FLAGS.workdir, flags.FLAGS.evals, flags.FLAGS.output)


if __name__ == "__main__":
  app.run(main)
