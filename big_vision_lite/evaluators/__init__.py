"""Evaluators, registered by the `type` of a `config.evals.<name>` entry.

An evaluator is built as `Evaluator(task, mesh, eval_config, seed)` and called as
`evaluator.run(variables) -> dict[str, float]` (metrics without the eval-name prefix).
"""
import importlib

from big_vision_lite.registry import Registry

REGISTRY = Registry("evaluator")

for _module in ("classification", "detection", "knn", "linear_probe", "retrieval", "zeroshot"):
  importlib.import_module(f"{__name__}.{_module}")
