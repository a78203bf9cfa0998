"""Writes tests/data/timm/<label>/{state.safetensors,input.npy,logits.npy} from timm.

Small timm models with every parameter and BatchNorm statistic randomised (heads and norms
included). ViT: class-token, average-pooled (fc_norm) and plain average-pooled models,
patch sizes 8, 14, 16 and 32, qkv without bias, a headless model and non-square inputs.
Needs torch and timm: `python tests/make_timm_reference.py [--out DIR] [--seed N]
[--only REGEX]`. Tests read the saved files with `load(directory)`.
"""
import argparse
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


REFERENCES: dict[str, Reference] = {
    "vit_tiny_patch16_224": Reference(
        "vit_tiny_patch16_224", dict(embed_dim=48, depth=2, num_classes=10), (64, 64)),
    "vit_small_patch16_224.augreg_in21k_ft_in1k": Reference(
        "vit_small_patch16_224.augreg_in21k_ft_in1k",
        dict(embed_dim=48, depth=2, num_classes=7, class_token=False, global_pool="avg"),
        (48, 48)),
    "vit_base_patch32_224": Reference(
        "vit_base_patch32_224",
        dict(embed_dim=48, depth=2, num_classes=5, class_token=False, global_pool="avg",
             fc_norm=False), (96, 64)),
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
    # MobileViT: byobnet takes no img_size; width_factor shrinks the convs (v1 transformer
    # widths stay). Saved: mobilevit_xxs, mobilevitv2_050, mobilevitv2_100_rect; the larger
    # ones are compared live only.
    "mobilevit_xxs": Reference(
        "mobilevit_xxs", dict(width_factor=0.25, num_classes=10), (64, 64), weight_std=0.15,
        takes_img_size=False),
    "mobilevit_xs_rect": Reference(  # 5x3 and 3x2 maps: resized for the 2x2 patches.
        "mobilevit_xs", dict(width_factor=0.5, num_classes=5), (80, 48), weight_std=0.1,
        takes_img_size=False),
    "mobilevit_s_headless": Reference(
        "mobilevit_s", dict(num_classes=0), (64, 64), weight_std=0.07, takes_img_size=False),
    "mobilevitv2_050": Reference(
        "mobilevitv2_050", dict(width_factor=0.25, num_classes=10), (64, 64), weight_std=0.2,
        takes_img_size=False),
    "mobilevitv2_100_rect": Reference(  # 5x3 and 3x2 maps: resized up (align_corners).
        "mobilevitv2_100", dict(width_factor=0.125, num_classes=7), (80, 48), weight_std=0.2,
        takes_img_size=False),
    "mobilevitv2_075_headless": Reference(
        "mobilevitv2_075", dict(num_classes=0), (64, 64), weight_std=0.1, takes_img_size=False),
    "mobilevitv2_175": Reference(  # Widths 56, 112, 224, 336, 448; stem 28.
        "mobilevitv2_175", dict(width_factor=0.5, num_classes=3), (64, 64), weight_std=0.1,
        takes_img_size=False),
}


def labels(prefix: str) -> tuple[list[str], list[str]]:
  """(all reference labels starting with `prefix`, those saved under DATA_DIR)."""
  found = sorted(label for label in REFERENCES if label.startswith(prefix))
  return found, [label for label in found if os.path.isdir(os.path.join(DATA_DIR, label))]


def make(label: str, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """Returns (state dict, NCHW input, eval-mode output) of a randomised small timm model."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  ref = REFERENCES[label]
  torch.manual_seed(seed)
  size_kwargs = {"img_size": ref.img_size} if ref.takes_img_size else {}
  model = timm.create_model(ref.timm_name.split(".")[0], pretrained=False, **size_kwargs,
                            **ref.kwargs)
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
  args = parser.parse_args()
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  for label in [label for label in REFERENCES if re.match(args.only, label)]:
    state, x, out = make(label, seed=args.seed)
    directory = os.path.join(args.out, label)
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, "state.safetensors"))
    np.save(os.path.join(directory, "input.npy"), x)
    np.save(os.path.join(directory, "logits.npy"), out)
    print(f"{label}: {len(state)} tensors, output {out.shape}")


if __name__ == "__main__":
  main()
