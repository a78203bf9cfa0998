"""Fields shared by the training configs, written once.

`classification(arg, model_name, model, ...)` returns a whole image-classification config
(vit, efficientvit, mobilevit, convnext2, internimage and the configs built on them); the
smaller helpers are its parts, for configs with another input or task (navit, fcmae).
Every config made here has the fault-handling fields `input.bad_records` and
`debug.inject_nan_step`, so both can be overridden on the command line for every model.
"""
from typing import Any

import ml_collections

# Arguments of every classification config, with their defaults (the embedded dataset).
DATA_ARGS = dict(dataset="shapes", train_split="train", eval_split="test", num_classes=10,
                 data_dir="")


def new_config(task: str, total_steps: int) -> ml_collections.ConfigDict:
  """A config with the run's seed, task and length."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = task
  config.total_steps = total_steps
  return config


def data_fields(arg: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
  """The `split` of dataset `arg.dataset` (in `arg.data_dir`, or the default dir)."""
  return dict(name=arg.dataset, split=split, data_dir=arg.data_dir or None)


def input_fields(arg: ml_collections.ConfigDict, pp: str) -> dict[str, Any]:
  """`config.input`: batches of `arg.batch_size` of `arg.train_split`, preprocessed by `pp`."""
  return dict(batch_size=arg.batch_size, data=data_fields(arg, arg.train_split), pp=pp,
              bad_records="fail")  # Or "skip": replace and count undecodable records.


def add_adamw(config: ml_collections.ConfigDict, lr: float, wd: float,
              grad_clip_norm: float | None = 1.0, optax: dict[str, float] | None = None,
              warmup_percent: float = 0.05) -> None:
  """Sets AdamW (`optax`: its kwargs, default b2=0.999), a cosine schedule with a linear
  warm-up over `warmup_percent` of the steps, and clipping (None: no clipping)."""
  config.optax_name = "adamw"
  config.optax = optax or dict(b2=0.999)
  config.lr = lr
  config.wd = wd
  config.schedule = dict(decay_type="cosine", warmup_percent=warmup_percent)
  if grad_clip_norm is not None:
    config.grad_clip_norm = grad_clip_norm


def add_run_fields(config: ml_collections.ConfigDict, log_training_steps: int = 50,
                   ckpt_steps: int = 200, init_from: bool = True) -> None:
  """Sets logging, checkpointing, the data-parallel mesh and the fault-injection switch;
  `init_from=False` leaves out the fields of a warm start (runs that always start fresh)."""
  config.log_training_steps = log_training_steps
  config.ckpt_steps = ckpt_steps
  config.keep_ckpt = 2
  if init_from:
    config.init_from = ""  # A run or import dir to start from (`tools/import_*.py`).
    config.init_skip = ()  # Regexes of params kept fresh, e.g. ("head/.*",) for a new head.
  config.mesh = (("data", -1),)
  config.sharding_rules = ((".*", "replicate"),)
  config.debug = dict(inject_nan_step=0)  # > 0: that step's loss is NaN (tests the stop).


def classification(arg: ml_collections.ConfigDict, model_name: str, model: dict[str, Any],
                   wd: float, grad_clip_norm: float = 1.0, eval_log_steps: int = 200,
                   eval_batch_size: int = 256) -> ml_collections.ConfigDict:
  """The config of an image-classification run of `model_name(**model)`.

  `arg` holds `res`, `batch_size`, `total_steps`, `lr` and the `DATA_ARGS`; training
  images are resized to `res` and flipped, the "val" eval resizes `arg.eval_split`.
  """
  config = new_config("classification", arg.total_steps)
  labels = f'onehot({arg.num_classes}, key="label", key_result="labels")'
  config.input = input_fields(arg, f"decode|resize({arg.res})|flip_lr|"
                                   f'value_range(-1, 1)|{labels}|keep("image", "labels")')
  config.model_name = model_name
  config.model = model
  add_adamw(config, arg.lr, wd, grad_clip_norm)
  add_run_fields(config)
  config.evals = dict(val=dict(
      type="classification", log_steps=eval_log_steps, batch_size=eval_batch_size,
      data=data_fields(arg, arg.eval_split),
      pp=f'decode|resize({arg.res})|value_range(-1, 1)|{labels}|keep("image", "labels")'))
  return config


def feature_evals(arg: ml_collections.ConfigDict, res: int, log_steps: int,
                  use_ema: bool = False) -> dict[str, Any]:
  """`knn` (DINO's weighted k-NN, k=20, T=0.07) and `linear_probe` evals of a run's frozen
  features: bank / probe training on `arg.train_split`, queries on `arg.eval_split`,
  images resized to `res`; `use_ema` evaluates the EMA params (DINO's teacher)."""
  features = dict(log_steps=log_steps, batch_size=256, use_ema=use_ema,
                  pp=f'decode|resize({res})|value_range(-1, 1)|keep("image", "label")',
                  train_data=data_fields(arg, arg.train_split),
                  data=data_fields(arg, arg.eval_split), num_classes=arg.num_classes)
  return dict(knn=dict(features, type="knn", k=20, temperature=0.07),
              linear_probe=dict(features, type="linear_probe", steps=300, lr=0.01, wd=1e-4))
