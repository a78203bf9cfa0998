r"""Merges tasks fine-tuned separately from one base into one `memory_vit` model.

    python -m big_vision_lite.tools.concat_memory --inputs=RUN_A,RUN_B --out=DIR

Each input is a run dir or an import dir of a `memory_vit` (e.g. one new task fine-tuned
with configs/memory_vit.py) or of a plain `vit` (the base alone, which contributes no
task: `--inputs=VIT_DIR` alone turns a vit checkpoint into a memory_vit base that
`--config.init_from` accepts). Every input must share the base (every non-task parameter,
the original head included) bit for bit, which recipes head, head_cls and memory keep
frozen and recipe full does not. The output, `DIR/params` and `DIR/model.json` (the layout
`init_from` reads), holds the base and every input's tasks in input order, renumbered
task_1..task_T, and returns every task's logits in one forward pass.
"""
from typing import Any, Mapping, Sequence

import numpy as np
from absl import app, flags

from big_vision_lite import checkpointing
from big_vision_lite import utils
from big_vision_lite.models import memory_vit

# Base-model fields that must agree across inputs (besides the shapes of the params).
ARCHITECTURE_FIELDS = ("posemb", "pool_type", "final_norm", "gelu_approximate",
                       "layernorm_eps")


def _architecture(model: memory_vit.Model) -> dict[str, Any]:
  arch = {f: getattr(model, f) for f in ARCHITECTURE_FIELDS}
  arch.update(model.hparams(), num_classes=model.num_classes or 0)
  return arch


def as_memory_vit(model_name: str, kwargs: Mapping[str, Any], where: str
                  ) -> memory_vit.Model:
  """The `memory_vit.Model` of a `vit` or `memory_vit` checkpoint's model kwargs (every
  `vit` field has the same name and default in `memory_vit`)."""
  if model_name not in ("vit", "memory_vit"):
    raise ValueError(f"{where} holds model_name={model_name!r}; concat_memory takes 'vit' "
                     "or 'memory_vit' checkpoints.")
  return memory_vit.Model(**kwargs)


def concat(inputs: Sequence[tuple[str, Mapping[str, Any], Mapping[str, Any]]],
           names: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """[(model_name, model kwargs, params)] sharing one base -> (memory_vit kwargs, params).

  `names` (e.g. the input paths) label the inputs in errors.
  """
  if not inputs:
    raise ValueError("concat_memory needs at least one input.")
  names = list(names or [f"input {i}" for i in range(len(inputs))])
  task_classes: list[int] = []
  num_memory: list[int] = []
  tasks: list[Any] = []
  first_base, first_arch, first_model = None, None, None
  for name, (model_name, kwargs, params) in zip(names, inputs):
    model = as_memory_vit(model_name, kwargs, name)
    base, input_tasks = memory_vit.split_params(params)
    if len(input_tasks) != len(model.task_classes):
      raise ValueError(f"{name} has {len(input_tasks)} task params but its model kwargs name "
                       f"{len(model.task_classes)} tasks (task_classes).")
    arch = _architecture(model)
    if first_base is None:
      first_base, first_arch, first_model = base, arch, model
    else:
      if arch != first_arch:
        diff = sorted(k for k in arch if arch[k] != first_arch[k])
        raise ValueError(f"{name} has another base architecture than {names[0]}: "
                         + ", ".join(f"{k}={arch[k]!r} vs {first_arch[k]!r}" for k in diff))
      _check_same_base(first_base, base, names[0], name)
    task_classes += [int(c) for c in model.task_classes]
    num_memory += list(model.memory_per_task())
    tasks += input_tasks
  kwargs = dict(first_arch, dtype_mm=first_model.dtype_mm,
                head_zeroinit=first_model.head_zeroinit, task_classes=task_classes,
                num_memory=num_memory, train_task=-1)
  kwargs["patch_size"] = list(kwargs["patch_size"])
  params = dict(first_base)
  params.update({memory_vit.task_name(t + 1): p for t, p in enumerate(tasks)})
  return kwargs, params


def _check_same_base(reference: Any, other: Any, reference_name: str, name: str) -> None:
  """Raises a ValueError naming the first base param of `other` that differs."""
  ref_flat, other_flat = utils.flatten_names(reference), utils.flatten_names(other)
  if sorted(ref_flat) != sorted(other_flat):
    only = sorted(set(ref_flat) ^ set(other_flat))
    raise ValueError(f"{name} and {reference_name} have different base params: "
                     f"{', '.join(only[:8])}.")
  for key in sorted(ref_flat):
    a, b = np.asarray(ref_flat[key]), np.asarray(other_flat[key])
    if a.shape != b.shape or not np.array_equal(a, b):
      detail = (f"shape {b.shape} vs {a.shape}" if a.shape != b.shape
                else f"max abs difference {np.abs(a - b).max():.3g}")
      raise ValueError(f"Base param {key!r} of {name} differs from {reference_name} "
                       f"({detail}): tasks can only be concatenated when fine-tuned from one "
                       "base kept frozen (recipe head, head_cls or memory; not full).")


def concat_dirs(paths: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads checkpoint dirs (runs or imports) and concatenates them: (kwargs, variables)."""
  inputs = []
  for path in paths:
    model_name, kwargs = checkpointing.read_run_model(path)
    if model_name is None:
      raise ValueError(f"{path} has no model.json or config.json naming its model.")
    inputs.append((model_name, kwargs or {}, checkpointing.load_params(path)))
  kwargs, params = concat(inputs, names=list(paths))
  return kwargs, {"params": params}


def concat_to_dir(paths: Sequence[str], out: str) -> dict[str, Any]:
  """Concatenates checkpoint dirs `paths` into `out` (params/ + model.json); returns the
  model kwargs."""
  kwargs, variables = concat_dirs(paths)
  checkpointing.write_import(out, "memory_vit", kwargs, variables)
  return kwargs


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  kwargs = concat_to_dir(flags.FLAGS.inputs, flags.FLAGS.out)
  print(f"Wrote memory_vit with {len(kwargs['task_classes'])} new tasks "
        f"(classes {kwargs['task_classes']}, memory {kwargs['num_memory']}) to "
        f"{flags.FLAGS.out}")


if __name__ == "__main__":
  flags.DEFINE_list("inputs", None, "Checkpoint dirs (runs or imports) sharing one base.")
  flags.DEFINE_string("out", None, "Output checkpoint directory (for init_from).")
  flags.mark_flags_as_required(["inputs", "out"])
  app.run(main)
