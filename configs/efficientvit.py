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
from big_vision_lite import config_lib
from configs import common


def get_config(arg: str | None = None):
  """Returns the ConfigDict of an EfficientViT classification run."""
  arg = config_lib.parse_arg(arg, variant="M0", res=64, batch_size=64, total_steps=400,
                             lr=2e-3, **common.DATA_ARGS)
  model = dict(variant=arg.variant, num_classes=arg.num_classes)
  return common.classification(arg, "efficientvit", model, wd=0.025)
