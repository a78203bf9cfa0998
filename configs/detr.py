r"""DETR detection (Carion et al. 2020); by default a small DETR on "shapes".

  python -m big_vision_lite.train --config configs/detr.py --workdir /tmp/detr
  python -m big_vision_lite.evaluate --config configs/detr.py --workdir /tmp/detr
  python -m big_vision_lite.tools.draw_boxes --workdir /tmp/detr --out boxes.png

The CPU default: every shape of the embedded dataset (1-3 per image, 10 classes) as a box;
a ResNet-18-layout backbone of width 16 trained from scratch (BatchNorm with batch
statistics, features of stage 2 at stride 8: the objects are 3-40 px), a 2-layer encoder
and 2-layer decoder of width 64 with 10 queries; images resized (shorter side 32-48,
DETR's random resize and random-size-crop branch, flips) and padded to 64 x 64; batch 32,
3000 steps. COCO box AP of the test split (pycocotools) every `eval_steps` and at the end.

The paper's COCO recipe (ResNet-50 with frozen BatchNorm from ImageNet weights, 100
queries, 6 + 6 layers of width 256, AdamW 1e-4 with the backbone at 1e-5, weight decay
1e-4, gradient clipping 0.1, batch 64, 500 epochs of 1849 steps with the lr dropped 10x
after 400; 42.0 AP on val2017):
  configs/detr.py:recipe=paper
needs `coco/2017` prepared for tfds (in `data_dir`; `coco/2017` is tfrecord, read through
TensorFlow) and ImageNet ResNet-50 weights for the backbone, imported from timm
(`python -m big_vision_lite.tools.import_timm --name resnet50 --weights
resnet50.safetensors --workdir /tmp/r50`, then `--config.init_from=/tmp/r50`).
Arguments: `recipe` (cpu | paper), `batch_size`, `total_steps`, `lr`,
`backbone_lr_mult`, `num_queries`, `eval_steps`, `dataset`, `train_split`, `eval_split`,
`data_dir` (left unset: the recipe's value), plus `--config.<field>=<value>` overrides.
"""
from big_vision_lite import config_lib
from configs import common

KEEP = 'keep("image", "pixel_mask", "boxes", "labels", "box_mask", "orig_size")'
RECIPES = ("cpu", "paper")


def _train_pp(sizes: list[int], max_size: int, crop_sizes: list[int],
              crop: tuple[int, int], pad: int, max_boxes: int) -> str:
  """DETR's train augmentation: flip, then either a random resize or a random resize,
  random-size crop and random resize (RandomSelect); normalised and padded."""
  resize = f"random_resize({sizes}, max_size={max_size})"
  crop_branch = f"random_resize({crop_sizes})|random_size_crop{crop}|{resize}"
  return (f'decode|orig_size|filter_objects|flip_lr|random_select("{resize}", '
          f'"{crop_branch}")|normalize|to_cxcywh|pad_boxes({max_boxes})|pad_image({pad})|'
          f"{KEEP}")


def _eval_pp(size: int, max_size: int, pad: int, max_boxes: int) -> str:
  return (f"decode|orig_size|random_resize({size}, max_size={max_size})|normalize|to_cxcywh|"
          f"pad_boxes({max_boxes})|pad_image({pad})|{KEEP}")


def get_config(arg: str | None = None):
  """Returns the ConfigDict of a DETR training run."""
  arg = config_lib.parse_arg(
      arg, recipe="cpu", batch_size=0, total_steps=0, lr=0.0, backbone_lr_mult=-1.0,
      num_queries=0, eval_steps=0, dataset="", train_split="train", eval_split="",
      data_dir="")
  if arg.recipe not in RECIPES:
    raise ValueError(f"Config argument 'recipe' must be one of {', '.join(RECIPES)}, got "
                     f"{arg.recipe!r}.")
  paper = arg.recipe == "paper"
  # Zero / negative / empty arguments take the recipe's value.
  defaults = dict(batch_size=64 if paper else 32, total_steps=500 * 1849 if paper else 3000,
                  lr=1e-4 if paper else 1e-3, backbone_lr_mult=0.1 if paper else 1.0,
                  num_queries=100 if paper else 10, eval_steps=1849 * 10 if paper else 1000,
                  dataset="coco/2017" if paper else "shapes",
                  eval_split="validation" if paper else "test")
  for name, value in defaults.items():
    if arg[name] in (0, 0.0, -1.0, ""):
      arg[name] = value

  config = common.new_config("detr", arg.total_steps)
  if paper:
    max_boxes, pad = 100, 1333
    train_pp = _train_pp(list(range(480, 801, 32)), 1333, [400, 500, 600], (384, 600), pad,
                         max_boxes)
    eval_pp = _eval_pp(800, 1333, pad, max_boxes)
    num_classes = 91  # COCO's category ids 1..90 (and 0) as DETR's class indices.
    config.model = dict(num_classes=num_classes, num_queries=arg.num_queries, hidden=256,
                        num_heads=8, enc_layers=6, dec_layers=6, mlp_dim=2048, dropout=0.1,
                        backbone="resnet", backbone_kwargs=dict(depth=50, frozen_bn=True))
  else:
    max_boxes, pad = 4, 64
    train_pp = _train_pp([32, 40, 48], 64, [32, 40, 48], (24, 48), pad, max_boxes)
    eval_pp = _eval_pp(40, 64, pad, max_boxes)
    config.model = dict(num_classes=10, num_queries=arg.num_queries, hidden=64, num_heads=4,
                        enc_layers=2, dec_layers=2, mlp_dim=128, dropout=0.0,
                        backbone="resnet", backbone_stage="stage2",
                        backbone_kwargs=dict(depth=18, width=16, frozen_bn=False))
  config.input = common.input_fields(arg, train_pp)
  config.model_name = "detr"
  config.detr = dict(no_object_weight=0.1, class_weight=1.0, bbox_weight=5.0, giou_weight=2.0,
                     aux_loss=True, matcher="optax")

  common.add_adamw(config, arg.lr, 1e-4, grad_clip_norm=0.1)
  if paper:  # The lr drops 10x after 400 of the 500 epochs.
    config.schedule = dict(decay_type="step", warmup_steps=0, drop_at=(0.8,), drop_factor=0.1)
  else:
    config.schedule = dict(decay_type="cosine", warmup_steps=50, end_lr_ratio=0.01)
  config.lr_mults = ((r"backbone/.*", arg.backbone_lr_mult),)
  common.add_run_fields(config, log_training_steps=50, ckpt_steps=500)
  config.evals = dict(coco=dict(
      type="detection", log_steps=arg.eval_steps, batch_size=arg.batch_size,
      data=common.data_fields(arg, arg.eval_split), pp=eval_pp, max_detections=100))
  return config
