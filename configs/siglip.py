r"""Image-text contrastive training: SigLIP (sigmoid loss, default) or CLIP (softmax).

  python -m big_vision_lite.train --config configs/siglip.py --workdir /tmp/siglip
  python -m big_vision_lite.train --config configs/siglip.py:loss=softmax --workdir /tmp/clip
  python -m big_vision_lite.evaluate --config configs/siglip.py --workdir /tmp/siglip

The CPU default pairs the small ViT of configs/vit.py (4 layers, width 96, 4 x 4 patches
on 32 x 32 images, GAP) with a 2-layer width-96 text transformer over UTF-8 bytes of the
embedded dataset's captions ("a large red star and a small blue ring on a blotchy
background"), both projected to 64 dims; batch 128, 300 steps, AdamW 1e-3. Evaluations of
the test split: zero-shot classification from the 10 class names (the captions name the
large shape's class) and image <-> caption retrieval R@1/5/10.
Arguments:
  loss=sigmoid|softmax   SigLIP (t = log 10, b = -10) or CLIP (t = log(1/0.07), no bias).
  image=vit|navit        navit: a packed NaViT image tower (images at native aspect ratio,
                         several per row, one caption each; empty slots are masked out of
                         the loss exactly).
  lit=DIR                LiT: the image tower loaded from a classification run (configs/vit.py
                         in DIR, or a tools/import_timm dir) and frozen.

A real recipe, SigLIP B/16 (Zhai et al. 2023) on a prepared image-text dataset with a
32k-entry sentencepiece vocabulary (e.g. cc12m in tfds form with a "caption" feature):
  configs/siglip.py:variant=B/16,text_variant=B,res=224,max_len=64,batch_size=32768,\
total_steps=107000,lr=0.001,wd=0.0001,dataset=<your dataset>,tokenizer=sentencepiece:<spm>
with `--config.mesh='(("data", -1),)'` over a v4-256 / 128 H100s. Memory: with the
chunked ring loss each device holds its own 128 images against one 128-caption block
(128 x 128 logits) instead of 32768 x 32768 (4 GiB in float32 per device, before
gradients); `python -m big_vision_lite.tools.shard_plan --config configs/siglip.py:...`
prints the per-device parameter and optimiser memory of the plan.
"""
from big_vision_lite import config_lib
from big_vision_lite.input import tokenizers
from configs import common
from configs import vit as vit_config

IMAGES = ("vit", "navit")
TEXT_MINI = dict(width=96, depth=2, mlp_dim=384, num_heads=4)
TEMPLATES = ("a large {}", "a large {} on a blotchy background", "a picture of a large {}",
             "a large {}, drawn in some colour")


def get_config(arg: str | None = None):
  """Returns the ConfigDict of an image-text contrastive run."""
  arg = config_lib.parse_arg(
      arg, loss="sigmoid", image="vit", lit="", variant="mini/4", text_variant="mini", res=32,
      max_len=96, tokenizer="bytes", out_dim=64, batch_size=128, total_steps=300, lr=1e-3,
      wd=1e-4, seq_len=128, max_images=8, **common.DATA_ARGS)
  if arg.loss not in ("sigmoid", "softmax"):
    raise ValueError(f"Config argument 'loss' must be 'sigmoid' or 'softmax', got {arg.loss!r}.")
  if arg.image not in IMAGES:
    raise ValueError(f"Config argument 'image' must be one of {', '.join(IMAGES)}, got "
                     f"{arg.image!r}.")
  config = common.new_config("contrastive", arg.total_steps)
  text_pp = f'tokenize({arg.max_len}, tokenizer="{arg.tokenizer}", inkey="caption", outkey="text")'
  size, patch = arg.variant.split("/")
  image = dict(vit_config.MINI, patch_size=int(patch)) if size == "mini" else dict(
      variant=arg.variant)
  if arg.image == "navit":
    config.input = common.input_fields(
        arg, f'decode|flip_lr|value_range(-1, 1)|{text_pp}|keep("image", "text")')
    config.input.packing = dict(seq_len=arg.seq_len, patch_size=int(patch),
                                max_images=arg.max_images, buffer_size=64)
    image.update(pool_type="gap", posemb="learn", posemb_coords="fractional")
  else:
    config.input = common.input_fields(
        arg, f'decode|resize({arg.res})|flip_lr|value_range(-1, 1)|{text_pp}|'
             'keep("image", "text")')
    image.update(pool_type="gap", posemb="learn")
  text = dict(TEXT_MINI) if arg.text_variant == "mini" else dict(variant=arg.text_variant)
  text.update(vocab_size=tokenizers.get(arg.tokenizer).vocab_size, max_len=arg.max_len, pool_type="last", causal=False)
  config.model_name = "two_towers"
  sigmoid = arg.loss == "sigmoid"
  config.model = dict(image_model=arg.image, image=image, text=text,
                      out_dim=arg.out_dim, temperature_init=10.0 if sigmoid else 1 / 0.07,
                      bias_init=-10.0 if sigmoid else None)
  config.contrastive = dict(loss=arg.loss, chunk_size=0, impl="auto")

  common.add_adamw(config, arg.lr, arg.wd, grad_clip_norm=1.0, optax=dict(b2=0.95))
  common.add_run_fields(config, log_training_steps=25, ckpt_steps=200)
  if arg.lit:
    config.init_from = arg.lit
    config.frozen_params = (r"img/.*",)

  eval_data = common.data_fields(arg, arg.eval_split)
  eval_pp = f'decode|resize({arg.res})|value_range(-1, 1)'
  config.evals = dict(
      zeroshot=dict(type="zeroshot", log_steps=100, batch_size=256, data=eval_data,
                    pp=f'{eval_pp}|keep("image", "label")', templates=TEMPLATES,
                    tokenizer=arg.tokenizer, max_len=arg.max_len),
      retrieval=dict(type="retrieval", log_steps=100, batch_size=256, data=eval_data,
                     pp=f'{eval_pp}|{text_pp}|keep("image", "text")'))
  return config
