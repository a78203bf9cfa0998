"""Converts timm checkpoints to big_vision_lite parameters (no torch needed).

    python -m big_vision_lite.tools.import_timm --name vit_small_patch16_224 \
        --weights model.safetensors --workdir DIR

writes `DIR/params` (orbax, `{"params": ...}`) and `DIR/model.json`
(`{"model_name": ..., "model": kwargs}`), the layout `--config.init_from=DIR` reads.
`convert(timm_name, state_dict)` does the same in memory: state-dict values are numpy
arrays named as in timm; each family's converter consumes every key it understands and
raises a ValueError naming any key left over (an unsupported timm feature).
"""
import json
import os
import re
from typing import Any, Callable, Mapping

import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
from absl import app, flags

Converter = Callable[[str, "_StateDict"], tuple[str, dict[str, Any], dict[str, Any]]]

# timm ViT size word -> number of attention heads (width/depth come from the weights).
VIT_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16,
             "giant": 16}
VIT_PATTERN = re.compile(rf"^vit_({'|'.join(VIT_HEADS)})_patch(8|14|16|32)(?:[_.]|$)")


class _StateDict:
  """A state dict whose values are taken (as float32 numpy) exactly once."""

  def __init__(self, state_dict: Mapping[str, Any]):
    self._arrays = {k: np.asarray(v) for k, v in state_dict.items()}
    self._taken: set[str] = set()

  def __contains__(self, key: str) -> bool:
    return key in self._arrays

  def keys(self) -> list[str]:
    return list(self._arrays)

  def take(self, key: str) -> np.ndarray:
    if key not in self._arrays:
      raise ValueError(f"timm state dict lacks the expected key {key!r}.")
    self._taken.add(key)
    return self._arrays[key].astype(np.float32)

  def check_all_taken(self, timm_name: str) -> None:
    left = [k for k in self._arrays if k not in self._taken]
    if left:
      raise ValueError(f"Unsupported timm parameter {left[0]!r} in {timm_name!r} (not "
                       f"converted: {', '.join(left)}).")


def _linear(sd: _StateDict, prefix: str) -> dict[str, np.ndarray]:
  """torch Linear [out, in] -> flax Dense {kernel [in, out], bias}."""
  return {"kernel": sd.take(f"{prefix}.weight").T, "bias": sd.take(f"{prefix}.bias")}


def _layernorm(sd: _StateDict, prefix: str) -> dict[str, np.ndarray]:
  return {"scale": sd.take(f"{prefix}.weight"), "bias": sd.take(f"{prefix}.bias")}


def _convert_vit(timm_name: str, sd: _StateDict) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """timm VisionTransformer (tok / avg pooling, no registers or layer scale) -> `vit`."""
  match = VIT_PATTERN.match(timm_name)
  if not match:
    raise ValueError(f"Unsupported timm ViT name {timm_name!r}; supported: "
                     f"{VIT_PATTERN.pattern}.")
  num_heads, patch = VIT_HEADS[match.group(1)], int(match.group(2))
  conv = sd.take("patch_embed.proj.weight")  # [D, 3, p, p]
  width = conv.shape[0]
  if conv.shape[2:] != (patch, patch):
    raise ValueError(f"{timm_name!r} names patch {patch} but patch_embed.proj.weight has "
                     f"shape {conv.shape}.")
  params: dict[str, Any] = {"embedding": {"kernel": conv.transpose(2, 3, 1, 0),
                                          "bias": sd.take("patch_embed.proj.bias")}}
  has_cls, has_fc_norm = "cls_token" in sd, "fc_norm.weight" in sd
  if has_cls and has_fc_norm:
    raise ValueError(f"Unsupported timm parameter 'fc_norm.weight' in {timm_name!r}: average "
                     "pooling that excludes the class token has no big_vision_lite equivalent.")
  posemb = sd.take("pos_embed")  # [1, (1 +) N, D]
  if has_cls:
    cls = sd.take("cls_token")  # [1, 1, D]
    n = posemb.shape[1]
    if not _is_square(n) and _is_square(n - 1):  # timm adds pos_embed to the class token too.
      cls, posemb = cls + posemb[:, :1], posemb[:, 1:]
    params["cls"] = cls
  params["pos_embedding"] = posemb
  depth = 0
  blocks = {}
  while f"blocks.{depth}.norm1.weight" in sd:
    p = f"blocks.{depth}"
    qkv_w = sd.take(f"{p}.attn.qkv.weight").reshape(3, num_heads, width // num_heads, width)
    qkv_b = sd.take(f"{p}.attn.qkv.bias").reshape(3, num_heads, width // num_heads)
    attn = {name: {"kernel": qkv_w[i].transpose(2, 0, 1), "bias": qkv_b[i]}  # [D, H, Dh]
            for i, name in enumerate(("query", "key", "value"))}
    proj = _linear(sd, f"{p}.attn.proj")
    attn["out"] = {"kernel": proj["kernel"].reshape(num_heads, width // num_heads, width),
                   "bias": proj["bias"]}
    blocks[f"encoderblock_{depth}"] = {
        "LayerNorm_0": _layernorm(sd, f"{p}.norm1"),
        "MultiHeadDotProductAttention_0": attn,
        "LayerNorm_1": _layernorm(sd, f"{p}.norm2"),
        "MlpBlock_0": {"Dense_0": _linear(sd, f"{p}.mlp.fc1"),
                       "Dense_1": _linear(sd, f"{p}.mlp.fc2")},
    }
    depth += 1
  if "norm.weight" in sd:
    blocks["encoder_norm"] = _layernorm(sd, "norm")
  params["Transformer"] = blocks
  if has_fc_norm:
    params["fc_norm"] = _layernorm(sd, "fc_norm")
  num_classes = 0
  if "head.weight" in sd:
    params["head"] = _linear(sd, "head")
    num_classes = params["head"]["kernel"].shape[1]
  sd.check_all_taken(timm_name)
  if not has_fc_norm and "encoder_norm" not in blocks:
    raise ValueError(f"timm model {timm_name!r} has neither 'norm' nor 'fc_norm' weights.")
  mlp_dim = blocks["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"].shape[1] if depth else None
  kwargs = dict(
      num_classes=num_classes, width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
      patch_size=[patch, patch], posemb="learn", pool_type="tok" if has_cls else "gap",
      final_norm="post_pool" if has_fc_norm else "pre_pool", gelu_approximate=False,
      layernorm_eps=1e-6)
  return "vit", kwargs, {"params": params}


def _is_square(n: int) -> bool:
  return n > 0 and int(round(np.sqrt(n))) ** 2 == n


# Name prefix -> (converter, names it accepts); the longest matching prefix wins.
CONVERTERS: dict[str, tuple[Converter, str]] = {
    "vit_": (_convert_vit, "vit_{tiny,small,medium,base,large,huge,giant}_patch{8,14,16,32}_*"),
}


def convert(timm_name: str, state_dict: Mapping[str, np.ndarray]
            ) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """timm name + state dict -> (model_name, model_kwargs, {"params": numpy tree})."""
  prefixes = sorted((p for p in CONVERTERS if timm_name.startswith(p)), key=len, reverse=True)
  if not prefixes:
    supported = "; ".join(pattern for _, pattern in CONVERTERS.values())
    raise ValueError(f"Unsupported timm model name {timm_name!r}; supported: {supported}.")
  converter, _ = CONVERTERS[prefixes[0]]
  return converter(timm_name, _StateDict(state_dict))


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` or `.npz` state dict as numpy arrays."""
  if path.endswith(".safetensors"):
    return safetensors.numpy.load_file(path)
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  raise ValueError(f"Flag 'weights' must be a .safetensors or .npz file, got {path!r}.")


def write_checkpoint(workdir: str, model_name: str, model_kwargs: dict[str, Any],
                     variables: dict[str, Any]) -> None:
  """Writes `workdir/params` (orbax) and `workdir/model.json` for `init_from`."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(workdir, "params"), {"params": variables["params"]},
                    force=True)
  checkpointer.wait_until_finished()
  with open(os.path.join(workdir, "model.json"), "w") as f:
    json.dump({"model_name": model_name, "model": model_kwargs}, f, indent=2)


def main(argv: list[str]) -> None:
  del argv
  args = flags.FLAGS
  model_name, kwargs, variables = convert(args.name, read_state_dict(args.weights))
  write_checkpoint(args.workdir, model_name, kwargs, variables)
  print(f"Wrote {model_name} {kwargs} to {os.path.abspath(args.workdir)}")


if __name__ == "__main__":
  flags.DEFINE_string("name", None, "timm model name, e.g. vit_small_patch16_224.")
  flags.DEFINE_string("weights", None, "State dict as .safetensors or .npz.")
  flags.DEFINE_string("workdir", None, "Output directory.")
  flags.mark_flags_as_required(["name", "weights", "workdir"])
  app.run(main)
