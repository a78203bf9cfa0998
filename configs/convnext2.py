r"""ConvNeXt V2 classification; by default ConvNeXt V2-Atto on the embedded "shapes" dataset.

  python -m big_vision_lite.train --config configs/convnext2.py --workdir /tmp/convnext2

The default (Atto, 3.4M parameters, on 32x32 images, 400 steps of batch 128) needs about
9 CPU-minutes, i.e. roughly 5 minutes on 2 free cores, and reaches ~47% top-1 / ~80% top-5
test accuracy (chance: 10% / 50%).
Arguments: `configs/convnext2.py:variant=tiny,res=224,dataset=imagenet2012,num_classes=1000,
eval_split=validation,...` (variant: atto, femto, pico, nano, tiny, small, base, large,
huge), `drop_path` (stochastic depth of the last block, rising linearly from 0),
`grn=false` (the model without Global Response Normalization), plus any
`--config.<field>=<value>` override.
Fine-tuning from an FCMAE pre-training run or a timm import (`tools/import_timm.py`):
`--config.init_from=DIR --config.init_skip="('head/.*',)"` (skip `head_norm/.*` too where
the checkpoint has no trained head norm).
"""
import ml_collections

from big_vision_lite import config_lib


def get_config(arg: str | None = None):
  """Returns the ConfigDict of a ConvNeXt V2 classification run."""
  arg = config_lib.parse_arg(
      arg, variant="atto", res=32, batch_size=128, total_steps=400, dataset="shapes",
      train_split="train", eval_split="test", num_classes=10, lr=2e-3, wd=0.05,
      drop_path=0.0, grn=True, data_dir="")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = "classification"
  config.total_steps = arg.total_steps

  config.input = dict(batch_size=arg.batch_size)
  data_dir = arg.data_dir or None
  config.input.data = dict(name=arg.dataset, split=arg.train_split, data_dir=data_dir)
  labels = f'onehot({arg.num_classes}, key="label", key_result="labels")'
  config.input.pp = (f"decode|resize({arg.res})|flip_lr|"
                     f'value_range(-1, 1)|{labels}|keep("image", "labels")')

  config.model_name = "convnext2"
  config.model = dict(variant=arg.variant, num_classes=arg.num_classes,
                      drop_path_rate=arg.drop_path, grn=arg.grn)

  config.optax_name = "adamw"
  config.optax = dict(b2=0.999)
  config.lr = arg.lr
  config.wd = arg.wd  # Decoupled, on kernels only (not norms, biases or GRN gamma/beta).
  config.schedule = dict(decay_type="cosine", warmup_percent=0.05)
  config.grad_clip_norm = 1.0

  config.log_training_steps = 50
  config.ckpt_steps = 200
  config.keep_ckpt = 2
  config.init_from = ""  # A run or import dir to start from (FCMAE, `tools/import_timm.py`).
  config.init_skip = ()  # Regexes of params kept fresh, e.g. ("head/.*",) for a new head.
  config.mesh = (("data", -1),)
  config.sharding_rules = ((".*", "replicate"),)

  config.evals = dict(val=dict(
      type="classification", log_steps=200, batch_size=256,
      data=dict(name=arg.dataset, split=arg.eval_split, data_dir=data_dir),
      pp=f'decode|resize({arg.res})|value_range(-1, 1)|{labels}|keep("image", "labels")'))
  return config
