"""Tasks: what a train step computes. The train loop is generic; a task supplies the rest.

A task is a class registered in `REGISTRY` by name (the config's `task` field), built as
`Task(config, model, mesh=None)`, with
  - `validate_config(config)` (classmethod): task-specific checks before any compute;
  - `init(rng, batch) -> variables`: model variables ({"params": ..., other collections});
  - `loss(params, extra, batch, rng) -> (loss, (metrics, new_extra))`, differentiated
    w.r.t. `params`; `extra` holds the non-param collections (e.g. batch_stats);
  - `predict(variables, batch) -> outputs` used by evaluators.
"""
import importlib

from big_vision_lite.registry import Registry

REGISTRY = Registry("task")

for _module in ("classification", "contrastive", "detr", "dino", "fcmae",
                "packed_classification"):
  importlib.import_module(f"{__name__}.{_module}")
