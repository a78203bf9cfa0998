r"""ViT classification; by default a small ViT on the embedded "shapes" dataset.

  python -m big_vision_lite.train --config configs/vit.py --workdir /tmp/vit

On 2 CPU cores the default (a 4-layer width-96 ViT with 4x4 patches on 32x32 images,
400 steps of batch 128) takes about 5 minutes and reaches ~40% top-1 / ~89% top-5 test
accuracy (chance: 10% / 50%; a linear classifier on the pixels gets 12-15%).
Arguments: `configs/vit.py:variant=S/16,res=224,dataset=imagenet2012,num_classes=1000,...`
(`variant=mini/4` is the CPU default; any ViT variant such as Ti/16, S/16, B/32 works),
plus any `--config.<field>=<value>` override.
"""
import ml_collections

from big_vision_lite import config_lib

MINI = dict(width=96, depth=4, mlp_dim=384, num_heads=4)


def get_config(arg: str | None = None):
  """Returns the ConfigDict of a ViT classification run."""
  arg = config_lib.parse_arg(
      arg, variant="mini/4", res=32, batch_size=128, total_steps=400, dataset="shapes",
      train_split="train", eval_split="test", num_classes=10, lr=1.5e-3, data_dir="")
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
  config.input.bad_records = "fail"  # Or "skip": replace and count undecodable records.

  config.model_name = "vit"
  size, patch = arg.variant.split("/")
  if size == "mini":
    config.model = dict(MINI, patch_size=(int(patch), int(patch)))
  else:
    config.model = dict(variant=arg.variant)
  config.model.num_classes = arg.num_classes
  config.model.pool_type = "gap"
  config.model.posemb = "learn"

  config.optax_name = "adamw"
  config.optax = dict(b2=0.999)
  config.lr = arg.lr
  config.wd = 1e-4
  config.schedule = dict(decay_type="cosine", warmup_percent=0.05)
  config.grad_clip_norm = 1.0

  config.log_training_steps = 50
  config.ckpt_steps = 200
  config.keep_ckpt = 2
  config.init_from = ""  # A run or import dir to start from (`tools/import_timm.py`).
  config.init_skip = ()  # Regexes of params kept fresh, e.g. ("head/.*",) for a new head.
  config.mesh = (("data", -1),)
  config.sharding_rules = ((".*", "replicate"),)
  config.debug = dict(inject_nan_step=0)  # > 0: that step's loss is NaN (tests the stop).

  config.evals = dict(val=dict(
      type="classification", log_steps=200, batch_size=256,
      data=dict(name=arg.dataset, split=arg.eval_split, data_dir=data_dir),
      pp=f'decode|resize({arg.res})|value_range(-1, 1)|{labels}|keep("image", "labels")'))
  return config
