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
from big_vision_lite import config_lib
from configs import common


def get_config(arg: str | None = None):
  """Returns the ConfigDict of a MobileViT classification run."""
  arg = config_lib.parse_arg(arg, variant="XXS", res=64, batch_size=64, total_steps=300,
                             lr=2e-3, wd=0.01, multiscale=False, **common.DATA_ARGS)
  model = dict(variant=arg.variant, num_classes=arg.num_classes)
  config = common.classification(arg, "mobilevit", model, wd=arg.wd, eval_log_steps=300)
  if arg.multiscale:
    config.input.multiscale = dict(
        resolutions=tuple(arg.res * k // 4 for k in (3, 4, 5)), base_res=arg.res)
  return config
