r"""Writes tests/data/internimage/<label>/ from the official InternImage PyTorch model.

Each label holds `state.safetensors` (the official state dict, every parameter and
BatchNorm statistic randomised, float32), `input.npy` (NCHW), `logits.npy` (the eval-mode
output, computed in float64 so that it holds no float32 rounding of its own)
and `meta.json` (the official constructor kwargs and what `tools/import_internimage.convert`
needs besides the weights). The official code is read at generation time, never copied:
`models/intern_image.py` of the official classification/ directory is loaded from
`--official_repo`, with the pure-PyTorch DCNv3 (`core_op="DCNv3_pytorch"`, whose core is
`dcnv3_core_pytorch`), so no CUDA op is built; the compiled extension `DCNv3` and
`pkg_resources` that `ops_dcnv3/functions/dcnv3_func.py` imports for the CUDA path are
replaced by empty stand-ins while it is imported.

To regenerate (needs torch and timm, which the official model file imports; no GPU):

  git clone https://github.com/OpenGVLab/InternImage /tmp/InternImage
  # The saved references come from commit 31c962dc6c1ceb23e580772f7daaa6944694fbe6.
  python tests/make_internimage_reference.py --official_repo /tmp/InternImage/classification

Options: `--out DIR` (default tests/data/internimage), `--seed N` (default 0), `--only REGEX`
(labels to write). Run it in its own process: torch and TensorFlow must not share one.
"""
import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import sys
import types
from typing import Any, NamedTuple

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(__file__), "data", "internimage")


class Reference(NamedTuple):
  kwargs: dict[str, Any]  # Official InternImage(...) kwargs besides core_op.
  img_size: tuple[int, int]  # Input (H, W).
  batch: int = 2


# Tiny models under the stacking rules (C' = 8, to keep the files small): a T-like
# pre-norm model with a classifier, and an L/XL-like post-norm model with layer scale,
# offset_scale 2 and no classifier, on non-square inputs. (C1 = 8, not 4: a LayerNorm over
# the stem's C1/2 = 2 channels is too ill-conditioned to compare to 1e-4.)
REFERENCES: dict[str, Reference] = {
    "tiny_prenorm": Reference(
        dict(channels=8, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], num_classes=10,
             mlp_ratio=4.0), (48, 40)),
    "tiny_postnorm_layerscale": Reference(
        dict(channels=8, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], num_classes=0,
             mlp_ratio=2.0, layer_scale=1e-5, post_norm=True, offset_scale=2.0),
        (40, 56), batch=1),
}


def load_official(official_repo: str) -> types.ModuleType:
  """Imports the official `models/intern_image.py` from the classification/ directory."""
  path = os.path.join(official_repo, "models", "intern_image.py")
  if not os.path.isfile(path):
    raise ValueError(f"--official_repo must be InternImage's classification/ directory; "
                     f"{path} does not exist.")
  distribution = types.SimpleNamespace(version="1.0")
  stand_ins = {"DCNv3": types.ModuleType("DCNv3"),
               "pkg_resources": types.ModuleType("pkg_resources")}
  stand_ins["pkg_resources"].get_distribution = lambda name: distribution
  saved = {name: sys.modules.get(name) for name in stand_ins}
  sys.modules.update(stand_ins)
  sys.path.insert(0, os.path.abspath(official_repo))
  try:
    spec = importlib.util.spec_from_file_location("official_intern_image", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(os.path.abspath(official_repo))
    for name, previous in saved.items():
      if previous is None:
        sys.modules.pop(name)
      else:
        sys.modules[name] = previous
  return module


def make(official: types.ModuleType, label: str, seed: int = 0
         ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """Returns (float32 state dict, float32 NCHW input, eval-mode output computed in float64)
  of a randomised official model."""
  import torch  # pylint: disable=import-outside-toplevel
  ref = REFERENCES[label]
  torch.manual_seed(seed)
  with contextlib.redirect_stdout(io.StringIO()):  # The constructor prints its settings.
    model = official.InternImage(core_op="DCNv3_pytorch", drop_path_rate=0.0, **ref.kwargs)
  model.eval()
  norm_types = (torch.nn.LayerNorm, torch.nn.BatchNorm2d)
  norm_weights = {f"{m}.weight" for m, module in model.named_modules()
                  if isinstance(module, norm_types)}
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name in norm_weights:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif re.search(r"gamma\d$", name):  # Layer scale: large enough for the branches to
        # count, small enough that the post-norm stack does not amplify float32 rounding.
        p.copy_(0.2 + 0.3 * torch.rand_like(p))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))
      else:  # Unit gain over the fan-in, but offsets of ~1-2 pixels (away from the grid)
        # and DCNv3 outputs of O(1) (which the post-norm LayerNorm would otherwise amplify).
        gain = {"offset": 2.0, "output_proj": 3.0}.get(name.split(".")[-2], 1.0)
        p.copy_(gain * torch.randn_like(p) / np.sqrt(p[0].numel()))
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.2 * torch.randn_like(b))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand_like(b))
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    x = torch.randn(ref.batch, 3, *ref.img_size,
                    generator=torch.Generator().manual_seed(seed + 1))
    out = model.double()(x.double())  # The float32 weights and input, computed in float64.
  return state, x.numpy(), out.numpy()


def load(directory: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray,
                                  dict[str, Any]]:
  """Reads (state dict, NCHW input, official output, meta) written by this script."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  with open(os.path.join(directory, "meta.json")) as f:
    meta = json.load(f)
  return (load_file(os.path.join(directory, "state.safetensors")),
          np.load(os.path.join(directory, "input.npy")),
          np.load(os.path.join(directory, "logits.npy")), meta)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--official_repo", required=True,
                      help="The official repository's classification/ directory.")
  parser.add_argument("--out", default=DATA_DIR)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--only", default="", help="Regex of the labels to write.")
  args = parser.parse_args()
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  official = load_official(args.official_repo)
  for label, ref in REFERENCES.items():
    if args.only and not re.search(args.only, label):
      continue
    state, x, logits = make(official, label, args.seed)
    directory = os.path.join(args.out, label)
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, "state.safetensors"))
    np.save(os.path.join(directory, "input.npy"), x)
    np.save(os.path.join(directory, "logits.npy"), logits)
    meta = dict(official_kwargs=ref.kwargs,
                offset_scale=ref.kwargs.get("offset_scale", 1.0), seed=args.seed)
    with open(os.path.join(directory, "meta.json"), "w") as f:
      json.dump(meta, f, indent=2)
    print(f"{label}: {len(state)} arrays, {sum(v.size for v in state.values())} values, "
          f"output {logits.shape}, |output| max {np.abs(logits).max():.3f}")


if __name__ == "__main__":
  main()
