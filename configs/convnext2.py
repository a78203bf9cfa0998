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
from big_vision_lite import config_lib
from configs import common


def get_config(arg: str | None = None):
  """Returns the ConfigDict of a ConvNeXt V2 classification run."""
  arg = config_lib.parse_arg(arg, variant="atto", res=32, batch_size=128, total_steps=400,
                             lr=2e-3, wd=0.05, drop_path=0.0, grn=True, **common.DATA_ARGS)
  model = dict(variant=arg.variant, num_classes=arg.num_classes,
               drop_path=arg.drop_path, grn=arg.grn)
  # Weight decay is decoupled, on kernels only (not norms, biases or GRN gamma/beta).
  return common.classification(arg, "convnext2", model, wd=arg.wd)
