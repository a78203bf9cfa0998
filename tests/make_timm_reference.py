"""Writes tests/data/timm/<label>/{state.safetensors,input.npy,logits.npy,meta.json} from timm.

Small timm models with every parameter and BatchNorm statistic randomised (heads and norms
included); `meta.json` records the timm and torch versions and the seed that made them.
ViT: class-token and average-pooled models, 3 to 16 heads, exact and tanh GELU, patch sizes
8, 14, 16 and 32, qkv without bias, a headless model and non-square inputs. ResNet: basic
and bottleneck blocks at width 8 with fewer blocks, a headless one on a non-square input.
Needs torch and timm: `python tests/make_timm_reference.py [--out DIR] [--seed N] [--only REGEX]
[--vit-definitions]`; the last also writes `vit_definitions.json`, what installed timm
defines for every `vit_*_patch{8,14,16,32}_*` name. Tests read the saved files with
`load(directory)`.
"""
import argparse
import dataclasses
import json
import os
import re
from typing import Any, NamedTuple

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(__file__), "data", "timm")


class Reference(NamedTuple):
  timm_name: str  # What `import_timm.convert` is called with.
  kwargs: dict[str, Any]  # timm.create_model kwargs (besides img_size).
  img_size: tuple[int, int]  # Input (H, W).
  weight_std: float = 0.2  # Std of the random non-norm parameters.
  takes_img_size: bool = True  # Whether timm.create_model accepts `img_size`.
  # MobileViT v1: (transformer width, depth) of each MobileViT block, replacing timm's
  # (width_factor leaves them as they are).
  mobilevit_transformers: tuple[tuple[int, int], ...] | None = None


REFERENCES: dict[str, Reference] = {
    "vit_tiny_patch16_224": Reference(
        "vit_tiny_patch16_224", dict(embed_dim=48, depth=2, num_classes=10), (64, 64)),
    "vit_small_patch16_224.augreg_in21k_ft_in1k": Reference(
        "vit_small_patch16_224.augreg_in21k_ft_in1k", dict(embed_dim=48, depth=2, num_classes=7),
        (48, 48)),
    "vit_base_patch32_224": Reference(
        "vit_base_patch32_224", dict(embed_dim=48, depth=2, num_classes=5), (96, 64)),
    "vit_base_patch16_gap_224": Reference(  # 16 heads (not ViT-B's 12), no class token.
        "vit_base_patch16_gap_224", dict(embed_dim=48, depth=2, num_classes=6), (48, 32)),
    "vit_base_patch32_siglip_gap_256": Reference(  # Average pooling, tanh GELU.
        "vit_base_patch32_siglip_gap_256", dict(embed_dim=24, depth=1, num_classes=4),
        (64, 64)),
    "vit_small_patch8_224_rect_nobias": Reference(
        "vit_small_patch8_224", dict(embed_dim=48, depth=1, num_classes=3, qkv_bias=False),
        (24, 40)),
    "vit_large_patch14_224_headless": Reference(
        "vit_large_patch14_224", dict(embed_dim=64, depth=1, num_classes=0), (56, 56)),
    "convnextv2_atto_shrunk": Reference(  # conv_mlp: 1x1-conv MLP, channels-first norms.
        "convnextv2_atto", dict(dims=(16, 24, 32, 40), depths=(1, 1, 2, 1), num_classes=10),
        (64, 64), weight_std=0.1, takes_img_size=False),
    "convnextv2_tiny_rect_headless": Reference(  # Linear MLP, no classifier.
        "convnextv2_tiny", dict(dims=(16, 24, 32, 48), depths=(1, 1, 1, 1), num_classes=0),
        (96, 64), weight_std=0.1, takes_img_size=False),
    "efficientvit_m0": Reference(  # Stage maps 4x4 (2x2 windows), 2x2 and 1x1.
        "efficientvit_m0", dict(embed_dim=(16, 24, 32), key_dim=(4, 4, 4), depth=(1, 2, 1),
                                num_heads=(4, 4, 4), window_size=(2, 2, 2), num_classes=10),
        (64, 64), weight_std=0.1),
    "efficientvit_m4_pad_headless": Reference(  # 3x3 stage-0 map: zero-padded 2x2 windows.
        "efficientvit_m4", dict(embed_dim=(16, 24, 32), key_dim=(4, 4, 8), depth=(1, 1, 2),
                                num_heads=(4, 3, 2), window_size=(2, 2, 2), num_classes=0),
        (48, 48), weight_std=0.1),
    # MobileViT: byobnet takes no img_size; width_factor shrinks the convs, v1 transformers
    # are shrunk by `mobilevit_transformers`. The "_full" ones (timm's own sizes, kwargs
    # just the variant) are compared live only; every other one is saved.
    "mobilevit_xxs": Reference(
        "mobilevit_xxs", dict(width_factor=0.25, num_classes=10), (64, 64), weight_std=0.15,
        takes_img_size=False, mobilevit_transformers=((16, 2), (24, 2), (32, 1))),
    "mobilevit_xs_rect": Reference(  # 5x3 and 3x2 maps: resized for the 2x2 patches.
        "mobilevit_xs", dict(width_factor=0.25, num_classes=5), (80, 48), weight_std=0.1,
        takes_img_size=False, mobilevit_transformers=((16, 1), (24, 2), (32, 1))),
    "mobilevit_s_headless": Reference(
        "mobilevit_s", dict(width_factor=0.125, num_classes=0), (64, 64), weight_std=0.1,
        takes_img_size=False, mobilevit_transformers=((16, 2), (16, 1), (24, 1))),
    "mobilevit_s_full_headless": Reference(
        "mobilevit_s", dict(num_classes=0), (64, 64), weight_std=0.07, takes_img_size=False),
    "mobilevitv2_050": Reference(
        "mobilevitv2_050", dict(width_factor=0.25, num_classes=10), (64, 64), weight_std=0.2,
        takes_img_size=False),
    "mobilevitv2_100_rect": Reference(  # 5x3 and 3x2 maps: resized up (align_corners).
        "mobilevitv2_100", dict(width_factor=0.125, num_classes=7), (80, 48), weight_std=0.2,
        takes_img_size=False),
    "mobilevitv2_075_headless": Reference(  # Widths 8, 16, 24, 40, 48; stem 3.
        "mobilevitv2_075", dict(width_factor=0.125, num_classes=0), (64, 64), weight_std=0.2,
        takes_img_size=False),
    "mobilevitv2_075_full_headless": Reference(
        "mobilevitv2_075", dict(num_classes=0), (64, 64), weight_std=0.1, takes_img_size=False),
    "mobilevitv2_175": Reference(  # Widths 8, 16, 32, 40, 56; stem 4.
        "mobilevitv2_175", dict(width_factor=0.0625, num_classes=3), (64, 64), weight_std=0.2,
        takes_img_size=False),
    # ResNet: `channels` shrinks the stages to width 8 (the 7x7 stem stays 64 wide: timm
    # reads stem_width only for deep stems), `layers` the depth.
    "resnet18_shrunk": Reference(
        "resnet18", dict(channels=(8, 16, 32, 64), num_classes=10), (64, 64),
        weight_std=0.1, takes_img_size=False),
    "resnet34_rect_headless": Reference(  # Basic blocks, 3x2 final map.
        "resnet34", dict(channels=(8, 16, 32, 64), layers=(1, 2, 1, 1),
                         num_classes=0), (96, 64), weight_std=0.1, takes_img_size=False),
    "resnet50_shrunk": Reference(  # Bottlenecks, downsampling shortcut in every stage.
        "resnet50", dict(channels=(8, 16, 32, 64), layers=(2, 1, 2, 1),
                         num_classes=7), (64, 64), weight_std=0.1, takes_img_size=False),
}


def labels(prefix: str) -> tuple[list[str], list[str]]:
  """(all reference labels starting with `prefix`, those saved under DATA_DIR)."""
  found = sorted(label for label in REFERENCES if label.startswith(prefix))
  return found, [label for label in found if os.path.isdir(os.path.join(DATA_DIR, label))]


def _shrink_mobilevit_transformers(timm_name: str, sizes: tuple[tuple[int, int], ...]
                                   ) -> tuple[Any, ...]:
  """timm's byobnet block configs of `timm_name` with each MobileViT block's transformer
  width and depth replaced by `sizes` (in order)."""
  from timm.models import mobilevit  # pylint: disable=import-outside-toplevel
  remaining = list(sizes)

  def shrink(block):  # A stage is a block config or a tuple of them.
    if isinstance(block, tuple):
      return tuple(map(shrink, block))
    if block.type != "mobilevit":
      return block
    width, depth = remaining.pop(0)
    return dataclasses.replace(block, block_kwargs={
        **block.block_kwargs, "transformer_dim": width, "transformer_depth": depth})

  blocks = tuple(map(shrink, mobilevit.model_cfgs[timm_name].blocks))
  if remaining:
    raise ValueError(f"{timm_name} has fewer MobileViT blocks than {sizes}.")
  return blocks


def make(label: str, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """Returns (state dict, NCHW input, eval-mode output) of a randomised small timm model."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  ref = REFERENCES[label]
  torch.manual_seed(seed)
  base_name = ref.timm_name.split(".")[0]
  kwargs = dict(ref.kwargs)
  if ref.takes_img_size:
    kwargs["img_size"] = ref.img_size
  if ref.mobilevit_transformers:
    kwargs["blocks"] = _shrink_mobilevit_transformers(base_name, ref.mobilevit_transformers)
  model = timm.create_model(base_name, pretrained=False, **kwargs)
  model.eval()
  norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)
  norm_weights = {f"{m}.weight" for m, module in model.named_modules()
                  if isinstance(module, norm_types)}
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name in norm_weights:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(ref.weight_std * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.2 * torch.randn_like(b))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand_like(b))
    img_size = ref.img_size
    x = torch.randn(2, 3, *img_size, generator=torch.Generator().manual_seed(seed + 1))
    out = model(x)
  state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()
           if not k.endswith("num_batches_tracked")}
  return state, x.numpy(), out.numpy()


def vit_definitions() -> dict[str, dict[str, Any]]:
  """What installed timm builds for each `vit_*_patch{8,14,16,32}_*` name of its
  vision_transformer module (one block, on torch's meta device): model and block classes,
  heads, class token, pooling, norms, activation and the optional parts a converter must
  know about. Names from other modules get `model_class` None."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  found = {}
  in_vit_module = set(timm.list_models("vit_*", module="vision_transformer"))
  for name in timm.list_models("vit_*"):
    if not re.match(r"^vit_[a-z0-9]+_patch(8|14|16|32)_", name):
      continue
    if name not in in_vit_module:  # Eva and others: another class, some need their depth.
      found[name] = {"model_class": None}
      continue
    with torch.device("meta"):
      model = timm.create_model(name, pretrained=False, depth=1)
    found[name] = {"model_class": type(model).__name__}
    blocks = getattr(model, "blocks", None)
    if type(model).__name__ != "VisionTransformer" or type(blocks[0]).__name__ != "Block":
      found[name]["block_class"] = type(blocks[0]).__name__ if blocks else None
      continue
    block = blocks[0]

    def present(module) -> bool:
      return module is not None and not isinstance(module, torch.nn.Identity)

    act = block.mlp.act
    found[name].update(
        block_class="Block", attn_class=type(block.attn).__name__,
        mlp_class=type(block.mlp).__name__, num_heads=block.attn.num_heads,
        class_token=model.cls_token is not None, reg_tokens=model.num_reg_tokens,
        global_pool=model.global_pool, no_embed_class=model.no_embed_class,
        pos_embed=model.pos_embed is not None, patch_bias=model.patch_embed.proj.bias is not None,
        dynamic_img_pad=model.patch_embed.dynamic_img_pad, norm_pre=present(model.norm_pre),
        norm=type(model.norm).__name__, norm_eps_final=getattr(model.norm, "eps", None),
        fc_norm=present(model.fc_norm),
        attn_pool=present(model.attn_pool), block_norm=type(block.norm1).__name__,
        norm_eps=block.norm1.eps, layer_scale=present(block.ls1) or present(block.ls2),
        qk_norm=present(block.attn.q_norm) or present(block.attn.k_norm),
        attn_norm=present(block.attn.norm), mlp_norm=present(block.mlp.norm),
        act=type(act).__name__, gelu_approximate=getattr(act, "approximate", None))
  return found


def load(directory: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """Reads (state dict, NCHW input, timm output) written by this script."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return (load_file(os.path.join(directory, "state.safetensors")),
          np.load(os.path.join(directory, "input.npy")),
          np.load(os.path.join(directory, "logits.npy")))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default=DATA_DIR)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--only", default=".*", help="Regex of the labels to write.")
  parser.add_argument("--vit-definitions", action="store_true",
                      help="Also write OUT/vit_definitions.json (see vit_definitions()).")
  args = parser.parse_args()
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  for label in [label for label in REFERENCES if re.match(args.only, label)]:
    state, x, out = make(label, seed=args.seed)
    directory = os.path.join(args.out, label)
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, "state.safetensors"))
    np.save(os.path.join(directory, "input.npy"), x)
    np.save(os.path.join(directory, "logits.npy"), out)
    meta = dict(timm=timm.__version__, torch=torch.__version__, seed=args.seed,
                **REFERENCES[label]._asdict())
    with open(os.path.join(directory, "meta.json"), "w") as f:
      json.dump(meta, f, indent=1)
      f.write("\n")
    print(f"{label}: {len(state)} tensors, output {out.shape}")
  if args.vit_definitions:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vit_definitions.json"), "w") as f:
      json.dump(vit_definitions(), f, indent=1)


if __name__ == "__main__":
  main()
