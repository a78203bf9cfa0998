r"""MobileViT v2 (separable self-attention) classification; by default width 0.5 on "shapes".

  python -m big_vision_lite.train --config configs/mobilevit2.py --workdir /tmp/mobilevit2

configs/mobilevit.py with the `mobilevit2` model: `variant` is the width multiplier, named
as timm does ("050", "075", "100", "125", "150", "175", "200"; default "050", 1.1M
parameters with the 10-class head) or as a number in [0.5, 2] (`variant=0.6`), and the
weight decay defaults to the paper's 0.05. Every other argument is configs/mobilevit.py's
(`res`, `batch_size`, `total_steps`, `dataset`, `multiscale`, ...), e.g.
`configs/mobilevit2.py:variant=100,res=256,dataset=imagenet2012,num_classes=1000`.
"""
from big_vision_lite.models import mobilevit2
from configs import mobilevit as mobilevit_config


def get_config(arg: str | None = None):
  """Returns the ConfigDict of a MobileViT v2 classification run."""
  defaults = {"variant": "050", "wd": 0.05}
  parts = [p for p in (arg or "").split(",") if p]
  given = {p.split("=")[0] for p in parts}
  parts += [f"{key}={value}" for key, value in defaults.items() if key not in given]
  config = mobilevit_config.get_config(",".join(parts))
  config.model_name = "mobilevit2"
  variant = config.model.variant
  if variant not in mobilevit2.VARIANTS:
    try:
      multiplier = float(variant)
    except ValueError:
      raise ValueError(f"Config argument 'variant' must be one of "
                       f"{', '.join(mobilevit2.VARIANTS)} or a width multiplier such as 0.6, "
                       f"got {variant!r}.") from None
    config.model = dict(width_multiplier=multiplier, num_classes=config.model.num_classes)
  return config
