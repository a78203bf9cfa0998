r"""DeepViT classification: configs/vit.py with Re-Attention blocks and a deeper default.

  python -m big_vision_lite.train --config configs/deepvit.py:depth=16 --workdir /tmp/deepvit

Arguments: `depth` (default 12) plus every argument of configs/vit.py (`variant`, `res`,
`dataset`, ...); `variant=mini/4` is a width-96 model with 4 heads and 4x4 patches.
Compare with the same depth of plain ViT: `configs/vit.py --config.model.depth=12`.
"""
from big_vision_lite import config_lib
from configs import vit as vit_config


def get_config(arg: str | None = None):
  """Returns the ConfigDict of a DeepViT classification run."""
  own = {"depth": 12}
  parts = [p for p in (arg or "").split(",") if p]
  args = config_lib.parse_arg(",".join(p for p in parts if p.split("=")[0] in own), **own)
  try:
    config = vit_config.get_config(",".join(p for p in parts if p.split("=")[0] not in own))
  except ValueError as e:
    raise ValueError(f"{e} configs/deepvit.py also takes: {', '.join(own)}.") from None
  config.model_name = "deepvit"
  config.model.depth = args.depth
  return config
