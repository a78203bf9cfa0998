r"""DINO self-supervised pre-training (Caron et al. 2021); by default a small ViT on "shapes".

  python -m big_vision_lite.train --config configs/dino.py --workdir /tmp/dino
  python -m big_vision_lite.evaluate --config configs/dino.py --workdir /tmp/dino
  python -m big_vision_lite.tools.dino_attention --workdir /tmp/dino --out attention.png
  python -m big_vision_lite.train --config configs/vit.py --config.model.pool_type=tok \
      --config.init_from=/tmp/dino --config.init_skip='("head/.*",)' --workdir /tmp/dino_ft

The CPU default: the 4-layer width-96 ViT of configs/vit.py (4 x 4 patches, class token)
on 2 global crops of 32 px and 4 local crops of 16 px of the embedded dataset, batch 64,
300 steps; k-NN and linear-probe evaluations of the teacher at the end. Packed multi-crop:
`configs/dino.py:packed=true` (a NaViT backbone, each image's crops packed into one
sequence; see tasks/dino.py). `backbone=convnext2,variant=atto,global_size=64,local_size=32`
trains a ConvNeXt V2 instead (its sizes must be multiples of 32).

The paper's ImageNet ViT-S/16 recipe (100-800 epochs of 1251 steps at batch 1024):
  configs/dino.py:variant=S/16,dataset=imagenet2012,num_classes=1000,global_size=224,\
local_size=96,num_local=10,batch_size=1024,total_steps=125100,lr=0.002,out_dim=65536,\
hidden_dim=2048,bottleneck_dim=256,ema_decay=0.996,warmup_steps=12510,\
teacher_temp=0.07,warmup_teacher_temp=0.04,teacher_temp_warmup_steps=37530,\
freeze_last_layer_steps=1251,min_lr_ratio=0.0005,hue=0.1,saturation=0.2,grayscale_p=0.2
i.e. lr 0.0005 x batch / 256 after 10 epochs of linear warm-up, cosine to 1e-6;
weight decay 0.04 -> 0.4 (cosine); teacher momentum 0.996 -> 1 (cosine); teacher
temperature 0.04 -> 0.07 over 30 epochs, student 0.1; center momentum 0.9; gradient
clipping 3.0; last layer frozen for the first epoch; global crops of 40-100% of the image,
local crops of 5-40%; colour jitter (0.4, 0.4, 0.2, 0.1), grayscale p 0.2.

The CPU default departs from it where the README's measurements on the embedded dataset
favour it: the schedules shortened to 300 steps; teacher momentum 0.99 (0.996 barely moves a
teacher in 300 steps); a constant teacher temperature of 0.02 (0.04 -> 0.07 let the
teacher's outputs drift to near-uniform); lr 5e-4 at batch 64; stronger colour
augmentation (saturation 0.8, hue 0.5, grayscale p 0.5), since a shape's and its
background's colours are random in "shapes" and otherwise tell its crops apart.
"""
from big_vision_lite import config_lib
from configs import common
from configs import vit as vit_config


def _vit(variant: str) -> dict:
  """ViT fields of `variant`: "mini/<patch>" (configs/vit.py's CPU size) or e.g. "S/16"."""
  size, patch = variant.split("/")
  return dict(vit_config.MINI, patch_size=int(patch)) if size == "mini" else dict(variant=variant)


def get_config(arg: str | None = None):
  """Returns the ConfigDict of a DINO pre-training run."""
  arg = config_lib.parse_arg(
      arg, backbone="vit", variant="mini/4", packed=False, global_size=32, local_size=16, num_local=4,
      batch_size=64, total_steps=300, lr=5e-4, min_lr_ratio=0.01, wd=0.04, wd_end=0.4,
      out_dim=4096, hidden_dim=512, bottleneck_dim=128, norm_last_layer=True, ema_decay=0.99,
      warmup_steps=30, teacher_temp=0.02, warmup_teacher_temp=0.02, teacher_temp_warmup_steps=0,
      freeze_last_layer_steps=30, hue=0.5, saturation=0.8, grayscale_p=0.5, invert_p=0.0, centering="ema",
      koleo_weight=0.0, **common.DATA_ARGS)
  if arg.backbone not in ("vit", "convnext2"):
    raise ValueError(f"Config argument 'backbone' must be 'vit' or 'convnext2', got "
                     f"{arg.backbone!r}.")
  if arg.backbone == "convnext2" and (arg.global_size % 32 or arg.local_size % 32):
    raise ValueError("Config arguments 'global_size' and 'local_size' must be multiples of 32 "
                     "for backbone=convnext2 (its stem and 3 downsamplings divide by 32), got "
                     f"{arg.global_size} and {arg.local_size}.")
  if arg.packed and arg.backbone != "vit":
    raise ValueError("Config argument 'packed' needs backbone=vit (packed crops run on its "
                     f"NaViT form), got backbone={arg.backbone!r}.")
  config = common.new_config("dino", arg.total_steps)
  # The paper's blur sigmas (0.1-2 px) are for 224 px crops: scaled to the crop size.
  blur_sigma = (round(0.1 * arg.global_size / 224, 3), round(2.0 * arg.global_size / 224, 3))
  config.input = common.input_fields(
      arg, f"decode|multicrop({arg.global_size}, {arg.local_size}, {arg.num_local}, "
           f"blur_sigma={blur_sigma}, jitter=(0.4, 0.4, {arg.saturation}, {arg.hue}), "
           f"grayscale_p={arg.grayscale_p}, invert_p={arg.invert_p})|"
           'keep("global_crops", "local_crops")')

  if arg.backbone == "convnext2":
    config.model = dict(backbone_name="convnext2", backbone=dict(variant=arg.variant))
  elif arg.packed:
    config.model = dict(backbone_name="navit", backbone=dict(_vit(arg.variant), pool_type="gap"))
  else:
    config.model = dict(backbone_name="vit",
                        backbone=dict(_vit(arg.variant), pool_type="tok", posemb="learn"))
  config.model_name = "dino"
  config.model.update(out_dim=arg.out_dim, hidden_dim=arg.hidden_dim,
                      bottleneck_dim=arg.bottleneck_dim, norm_last_layer=arg.norm_last_layer)
  config.dino = dict(student_temp=0.1, teacher_temp=arg.teacher_temp,
                     warmup_teacher_temp=arg.warmup_teacher_temp,
                     warmup_teacher_temp_steps=arg.teacher_temp_warmup_steps,
                     center_momentum=0.9, packed=arg.packed, centering=arg.centering,
                     koleo_weight=arg.koleo_weight)
  config.ema_decay = arg.ema_decay  # The teacher's momentum, cosine to 1.
  config.ema_decay_end = 1.0

  common.add_adamw(config, arg.lr, arg.wd, grad_clip_norm=3.0, optax=dict(b2=0.999))
  config.schedule = dict(decay_type="cosine", warmup_steps=arg.warmup_steps,
                         end_lr_ratio=arg.min_lr_ratio)
  config.wd_end = arg.wd_end
  # As the official code: no decay on biases and norms; the last layer's directions decay.
  config.wd_mask = (r".*kernel$", r".*last_layer_direction$", r".*pos_embedding$")
  config.frozen_for_steps = ((r"head/last_layer_.*", arg.freeze_last_layer_steps),)
  common.add_run_fields(config, log_training_steps=25, ckpt_steps=100, init_from=False)

  config.evals = common.feature_evals(arg, arg.global_size, arg.total_steps, use_ema=True)
  return config
