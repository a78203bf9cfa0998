"""Writes tests/data/timm_vit/<label>/{state.safetensors,input.npy,logits.npy} from timm.

Small timm ViTs with every parameter randomised (heads and norms included), covering
class-token, average-pooled (fc_norm) and plain average-pooled models, patch sizes 8, 14,
16 and 32, qkv without bias, a headless model and non-square inputs. Needs torch and timm:
`python tests/make_timm_reference.py [--out DIR] [--seed N]`.
"""
import argparse
import os
from typing import Any

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(__file__), "data", "timm_vit")

# label -> (timm name, timm.create_model kwargs, input (H, W)).
REFERENCES: dict[str, tuple[str, dict[str, Any], tuple[int, int]]] = {
    "vit_tiny_patch16_224": (
        "vit_tiny_patch16_224", dict(embed_dim=48, depth=2, num_classes=10), (64, 64)),
    "vit_small_patch16_224.augreg_in21k_ft_in1k": (
        "vit_small_patch16_224.augreg_in21k_ft_in1k",
        dict(embed_dim=48, depth=2, num_classes=7, class_token=False, global_pool="avg"),
        (48, 48)),
    "vit_base_patch32_224": (
        "vit_base_patch32_224",
        dict(embed_dim=48, depth=2, num_classes=5, class_token=False, global_pool="avg",
             fc_norm=False), (96, 64)),
    "vit_small_patch8_224_rect_nobias": (
        "vit_small_patch8_224", dict(embed_dim=48, depth=1, num_classes=3, qkv_bias=False),
        (24, 40)),
    "vit_large_patch14_224_headless": (
        "vit_large_patch14_224", dict(embed_dim=64, depth=1, num_classes=0), (56, 56)),
}


def make(label: str, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """Returns (state dict, NCHW input, eval-mode output) of a randomised small timm model."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  timm_name, kwargs, img_size = REFERENCES[label]
  torch.manual_seed(seed)
  model = timm.create_model(timm_name.split(".")[0], pretrained=False, img_size=img_size,
                            **kwargs)
  model.eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith(".weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
    x = torch.randn(2, 3, *img_size, generator=torch.Generator().manual_seed(seed + 1))
    out = model(x)
  state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  return state, x.numpy(), out.numpy()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default=DATA_DIR)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  for label in REFERENCES:
    state, x, out = make(label, seed=args.seed)
    directory = os.path.join(args.out, label)
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, "state.safetensors"))
    np.save(os.path.join(directory, "input.npy"), x)
    np.save(os.path.join(directory, "logits.npy"), out)
    print(f"{label}: {len(state)} tensors, output {out.shape}")


if __name__ == "__main__":
  main()
