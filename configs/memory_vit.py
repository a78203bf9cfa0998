r"""Fine-tuning a ViT with learnable memory (Sandler et al. 2022): one new task per run.

  python -m big_vision_lite.train --config configs/vit.py --workdir /tmp/vit
  python -m big_vision_lite.train \
      --config configs/memory_vit.py:init_from=/tmp/vit,recipe=memory,memory=5 \
      --workdir /tmp/memory_vit

`init_from` (the argument) is a `vit` run or import (`tools/import_timm.py`), or a
memory_vit run or concatenation; the config reads the base's model fields from it and sets
the `init_from` field. The run adds one task (a class token, `memory`
tokens per layer and a `num_classes` head, under `task_{T}/`) to the base's tasks and
trains what `recipe` names; the rest is frozen (`frozen_params`), so the original outputs
stay unchanged bit for bit:

  head      the new head only (the new class token stays at its initial value);
  head_cls  the new head and class token;
  memory    the new head, class token and memory (the paper's method; default);
  full      every parameter (base included: such a run no longer concatenates).

Recipes head and head_cls add no memory. Runs fine-tuned from one base merge into one
model with `tools/concat_memory.py --inputs=RUN_A,RUN_B --out=DIR`.
Measured on shapes (same labels as the base, so there is little left to learn): the
configs/vit.py base reaches 39.6% test top-1; 300 steps of batch 128 of recipe memory
(m=5) give 39.3% and of recipe head 40.4%, 12.5 and 8.6 minutes on 2 CPU cores shared
with other jobs. Without `init_from` the base is a fresh `variant` (`mini/4`, the CPU
default: width 96, 4 layers, 4x4 patches on 32x32 images; or S/16, B/32, ...) with a
`base_classes` head, frozen like a loaded one, so only recipe full learns much from it.
Other arguments as configs/vit.py (`res`, `dataset`, `num_classes`, `lr`, ...).
"""
from big_vision_lite import checkpointing
from big_vision_lite import config_lib
from big_vision_lite.models import memory_vit
from configs import vit as vit_config

RECIPES = ("head", "head_cls", "memory", "full")


def frozen_params(recipe: str, task: int) -> tuple[str, ...]:
  """Regexes (fullmatch on "a/b/c" param names) of what `recipe` keeps frozen when new
  task `task` is trained."""
  name = memory_vit.task_name(task)
  trained = {"head": rf"{name}/head/.*", "head_cls": rf"{name}/(head/.*|cls)",
             "memory": rf"{name}/.*", "full": None}[recipe]
  return () if trained is None else (rf"(?!{trained}$).*",)


def _base_model(init_from: str, fresh: dict) -> dict:
  """The base's model kwargs with its tasks: those of `init_from`, or `fresh`."""
  if not init_from:
    return fresh
  model_name, kwargs = checkpointing.read_run_model(init_from)
  accepted = ("memory_vit",) + memory_vit.LOADS_FROM
  if model_name not in accepted:
    raise ValueError(f"Config argument 'init_from': {init_from} holds model_name="
                     f"{model_name!r}; it must be a {' or '.join(accepted)} checkpoint "
                     "(model.json or config.json).")
  model = memory_vit.Model(**kwargs)  # Every vit field has the same name in memory_vit.
  kwargs = dict(kwargs, task_classes=list(model.task_classes),
                num_memory=list(model.memory_per_task()))
  kwargs.pop("train_task", None)
  return kwargs


def get_config(arg: str | None = None):
  """Returns the ConfigDict of a memory-ViT fine-tuning run (one new task)."""
  own = dict(recipe="memory", memory=5, base_classes=10, init_from="", total_steps=300,
             lr=1e-3)
  parts = [p for p in (arg or "").split(",") if p]
  args = config_lib.parse_arg(",".join(p for p in parts if p.split("=")[0] in own), **own)
  if args.recipe not in RECIPES:
    raise ValueError(f"Config argument 'recipe' must be one of {', '.join(RECIPES)}, got "
                     f"{args.recipe!r}.")
  if args.memory < 0:
    raise ValueError(f"Config argument 'memory' (memory tokens per layer) must be >= 0, got "
                     f"{args.memory}.")
  if args.base_classes < 0:
    raise ValueError(f"Config argument 'base_classes' must be >= 0 (0: no original head), "
                     f"got {args.base_classes}.")
  vit_parts = [p for p in parts if p.split("=")[0] not in own]
  vit_parts += [f"total_steps={args.total_steps}", f"lr={args.lr}"]
  try:
    config = vit_config.get_config(",".join(vit_parts))
  except ValueError as e:
    raise ValueError(f"{e} configs/memory_vit.py also takes: {', '.join(own)}.") from None
  fresh = dict(config.model.to_dict(), num_classes=args.base_classes, pool_type="tok")
  model = _base_model(args.init_from, fresh)
  memory = args.memory if args.recipe in ("memory", "full") else 0
  model["task_classes"] = list(model.get("task_classes", [])) + [config.model.num_classes]
  model["num_memory"] = list(model.get("num_memory", [])) + [memory]
  model["train_task"] = -1
  config.model_name = "memory_vit"
  config.model = model
  config.recipe = args.recipe
  config.frozen_params = frozen_params(args.recipe, len(model["task_classes"]))
  config.init_from = args.init_from
  return config
