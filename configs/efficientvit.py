r"""EfficientViT (cascaded group attention) classification; by default M0 on "shapes".

  python -m big_vision_lite.train --config configs/efficientvit.py --workdir /tmp/efficientvit

The default (M0, 2.2M parameters, at res=64: 400 steps of batch 64) used 7 CPU-minutes
(19 minutes on 2 cores shared with other jobs) and reached 82% top-1 / 99.7% top-5 test
accuracy (chance: 10% / 50%). The stem has stride 16, so at res=64 the three stages see
4x4, 2x2 and 1x1 maps (all within one 7x7 window); res=112 gives 7x7, 4x4 and 2x2, and
res=224 the paper's 14x14 (2x2 windows of 7), 7x7 and 4x4. Arguments:
`configs/efficientvit.py:variant=M4,res=224,dataset=imagenet2012,num_classes=1000,...`
(`variant` M0..M5), plus any `--config.<field>=<value>` override. The paper trains with
AdamW, lr 1e-3 per 1024 images, weight decay 0.025, 300 epochs.
"""
import ml_collections

from big_vision_lite import config_lib


def get_config(arg: str | None = None):
  """Returns the ConfigDict of an EfficientViT classification run."""
  arg = config_lib.parse_arg(
      arg, variant="M0", res=64, batch_size=64, total_steps=400, dataset="shapes",
      train_split="train", eval_split="test", num_classes=10, lr=2e-3, data_dir="")
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

  config.model_name = "efficientvit"
  config.model = dict(variant=arg.variant, num_classes=arg.num_classes)

  config.optax_name = "adamw"
  config.optax = dict(b2=0.999)
  config.lr = arg.lr
  config.wd = 0.025
  config.schedule = dict(decay_type="cosine", warmup_percent=0.05)
  config.grad_clip_norm = 1.0

  config.log_training_steps = 50
  config.ckpt_steps = 200
  config.keep_ckpt = 2
  config.init_from = ""  # A run or import dir to start from (`tools/import_timm.py`).
  config.init_skip = ()  # Regexes of params kept fresh, e.g. ("head/.*",) for a new head.
  config.mesh = (("data", -1),)
  config.sharding_rules = ((".*", "replicate"),)

  config.evals = dict(val=dict(
      type="classification", log_steps=200, batch_size=256,
      data=dict(name=arg.dataset, split=arg.eval_split, data_dir=data_dir),
      pp=f'decode|resize({arg.res})|value_range(-1, 1)|{labels}|keep("image", "labels")'))
  return config
