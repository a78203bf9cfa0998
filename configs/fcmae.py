r"""FCMAE pre-training of ConvNeXt V2 (Woo et al. 2023); by default Atto on "shapes".

  python -m big_vision_lite.train --config configs/fcmae.py --workdir /tmp/fcmae
  python -m big_vision_lite.tools.fcmae_reconstruct --run_dir /tmp/fcmae --out recon.png
  python -m big_vision_lite.train --config configs/convnext2.py:res=64 \
      --config.init_from=/tmp/fcmae --workdir /tmp/fcmae_ft

60% of the 32 x 32 cells of each image are masked at random; the encoder sees the visible
cells only (convnext2's masked path), a one-block ConvNeXt V2 decoder of width 512 with
a learned mask token predicts the pixels, and the loss is the MSE on the masked cells of
per-patch normalised pixels. Fine-tuning (`configs/convnext2.py` with `init_from`) takes
the encoder and starts a fresh head (`convnext2.load`); use the same `variant` and a
resolution that is a multiple of 32 for the pre-training.
The default: 64 x 64 images (a 2 x 2 grid, 1 cell visible), 200 steps of batch 32, the
paper's AdamW betas and weight decay with a larger learning rate for the short run; about
7 minutes on a 2-core CPU (~100 s compile, ~1.5 s per step).
Arguments: `variant` (atto ... huge), `res` (multiple of 32; 224 for ImageNet),
`mask_ratio`, `decoder_dim`, `decoder_depth`, `norm_pix_loss`, `grn` (false: the encoder
without GRN, for the feature-collapse comparison), `dataset`, `batch_size`, `total_steps`,
`lr`, `data_dir`, plus `--config.<field>=<value>` overrides.
"""
from big_vision_lite import config_lib
from configs import common


def get_config(arg: str | None = None):
  """Returns the ConfigDict of an FCMAE pre-training run."""
  arg = config_lib.parse_arg(
      arg, variant="atto", res=64, batch_size=32, total_steps=200, dataset="shapes",
      train_split="train", mask_ratio=0.6, decoder_dim=512, decoder_depth=1,
      norm_pix_loss=True, grn=True, lr=2e-3, wd=0.05, data_dir="")
  if arg.res % 32:
    raise ValueError(f"Config argument 'res' must be a multiple of 32 (FCMAE masks 32 x 32 "
                     f"cells), got {arg.res}.")
  config = common.new_config("fcmae", arg.total_steps)
  config.fcmae = dict(mask_ratio=arg.mask_ratio, norm_pix_loss=arg.norm_pix_loss)

  config.input = common.input_fields(arg, f"decode|inception_crop({arg.res}, area_min=20)|"
                                          'flip_lr|value_range(-1, 1)|keep("image")')

  config.model_name = "fcmae"
  config.model = dict(variant=arg.variant, grn=arg.grn, decoder_dim=arg.decoder_dim,
                      decoder_depth=arg.decoder_depth)

  # Weight decay is decoupled, on kernels only.
  common.add_adamw(config, arg.lr, arg.wd, grad_clip_norm=None, optax=dict(b1=0.9, b2=0.95),
                   warmup_percent=0.1)
  common.add_run_fields(config, log_training_steps=25, ckpt_steps=100, init_from=False)
  config.evals = {}
  return config
