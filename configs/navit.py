r"""NaViT (Patch n' Pack): images at native aspect ratio packed into fixed-length sequences.

  python -m big_vision_lite.train --config configs/navit.py --workdir /tmp/navit

The default trains a small NaViT (width 96, 4 layers, 8 px patches) on the embedded
"shapes" dataset, whose images have sides of 24-96 px and aspect ratios 1:2 to 2:1: each
image is resized to a random size (side of the equal-area square uniform in
`res_min..res_max` px, aspect ratio kept), drops a random fraction of its tokens (beta
distributed, at most `drop_max`), and is packed with others into rows of `seq_len` tokens.
It is evaluated at native resolution ("val") and at a fixed 64 x 64 ("val_64").
Arguments: `configs/navit.py:variant=S/16,seq_len=256,res_min=64,res_max=256,...`
(`variant=mini/8` is the CPU default; any ViT variant such as Ti/16 or B/16 works), plus
any `--config.<field>=<value>` override.
"""
from big_vision_lite import config_lib
from configs import common

MINI = dict(width=96, depth=4, mlp_dim=384, num_heads=4)


def get_config(arg: str | None = None):
  """Returns the ConfigDict of a packed (NaViT) classification run."""
  arg = config_lib.parse_arg(
      arg, variant="mini/8", seq_len=256, max_images=16, batch_size=32, total_steps=400,
      res_min=32, res_max=96, drop_max=0.5, eval_res=64, lr=1.5e-3, **common.DATA_ARGS)
  config = common.new_config("packed_classification", arg.total_steps)

  size, patch = arg.variant.split("/")
  patch = int(patch)
  config.model_name = "navit"
  config.model = dict(MINI, patch_size=patch) if size == "mini" else dict(variant=arg.variant)
  config.model.num_classes = arg.num_classes
  config.model.pool_type = "map"
  config.model.posemb = "learn"
  config.model.posemb_coords = "fractional"

  packing = dict(seq_len=arg.seq_len, patch_size=patch, max_images=arg.max_images,
                 buffer_size=64)
  train_pp = 'decode|flip_lr|value_range(-1, 1)|keep("image", "label")'
  config.input = common.input_fields(arg, train_pp)  # Batches of rows of seq_len tokens.
  config.input.packing = dict(
      packing, resolution=dict(dist="uniform", low=arg.res_min, high=arg.res_max),
      token_drop=dict(dist="beta", a=1.0, b=3.0, low=0.0, high=arg.drop_max)
      if arg.drop_max > 0 else None)

  common.add_adamw(config, arg.lr, wd=1e-4)
  common.add_run_fields(config)

  eval_data = common.data_fields(arg, arg.eval_split)
  eval_pp = 'decode|value_range(-1, 1)|keep("image", "label")'
  config.evals = dict(
      val=dict(type="packed_classification", log_steps=200, batch_size=32, data=eval_data,
               pp=eval_pp, packing=packing),
      val_64=dict(type="packed_classification", log_steps=400, batch_size=32,
                  data=eval_data, packing=packing,
                  pp=eval_pp.replace("decode|", f"decode|resize({arg.eval_res})|")))
  return config
