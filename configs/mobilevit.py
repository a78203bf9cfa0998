r"""MobileViT v1 classification; by default MobileViT-XXS on the embedded "shapes" dataset.

  python -m big_vision_lite.train --config configs/mobilevit.py --workdir /tmp/mobilevit

On 2 CPU cores the default (XXS, 1.0M parameters with the 10-class head, at 64x64, 300
steps of batch 64) takes a few minutes. Arguments:
`configs/mobilevit.py:variant=S,res=256,dataset=imagenet2012,num_classes=1000,...`
(`variant` XXS, XS or S), plus any `--config.<field>=<value>` override. `multiscale=true`
trains with the paper's multi-scale sampler (`input.multiscale`: each step at 3/4, 1 or 5/4
of `res`, the batch scaled to keep the pixels per batch constant). The paper trains with
AdamW, lr 2e-3 (cosine, warm-up), weight decay 0.01, label smoothing 0.1, 300 epochs at a
batch of 1024 with multi-scale sampling.
"""
import ml_collections

from big_vision_lite import config_lib


def get_config(arg: str | None = None):
  """Returns the ConfigDict of a MobileViT classification run."""
  arg = config_lib.parse_arg(
      arg, variant="XXS", res=64, batch_size=64, total_steps=300, dataset="shapes",
      train_split="train", eval_split="test", num_classes=10, lr=2e-3, wd=0.01,
      multiscale=False, data_dir="")
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
  if arg.multiscale:
    config.input.multiscale = dict(
        resolutions=tuple(arg.res * k // 4 for k in (3, 4, 5)), base_res=arg.res)

  config.model_name = "mobilevit"
  config.model = dict(variant=arg.variant, num_classes=arg.num_classes)

  config.optax_name = "adamw"
  config.optax = dict(b2=0.999)
  config.lr = arg.lr
  config.wd = arg.wd
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
      type="classification", log_steps=300, batch_size=256,
      data=dict(name=arg.dataset, split=arg.eval_split, data_dir=data_dir),
      pp=f'decode|resize({arg.res})|value_range(-1, 1)|{labels}|keep("image", "labels")'))
  return config
