r"""Converts timm checkpoints to big_vision_lite parameters (no torch needed).

    python -m big_vision_lite.tools.import_timm --name vit_small_patch16_224 \
        --weights model.safetensors --workdir DIR

writes `DIR/params` (orbax, `{"params": ...}` plus `batch_stats` for BatchNorm models) and
`DIR/model.json`
(`{"model_name": ..., "model": kwargs}`), the layout `--config.init_from=DIR` reads.
`convert(timm_name, state_dict)` does the same in memory. State-dict values are numpy
arrays named as in timm. `convert` dispatches on the name prefix through `CONVERTERS`;
each family's converter takes every key it understands and raises a ValueError naming any
key left over (a timm feature with no equivalent here).
"""
import json
import os
import re
from typing import Any, Callable, Mapping

import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
from absl import app, flags

# timm ViT size word -> number of attention heads (width and depth come from the weights).
VIT_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16,
             "giant": 16}
VIT_PATTERN = re.compile(rf"^vit_({'|'.join(VIT_HEADS)})_patch(8|14|16|32)(?:[_.]|$)")
VIT_NAMES = "vit_{tiny,small,medium,base,large,huge,giant}_patch{8,14,16,32}_*"
VIT_FAMILY = (f"{VIT_NAMES} with a class token or average pooling (no register tokens, "
              "layer scale, attention pooling, pre-norm or qk-norm)")


class StateDict:
  """A timm state dict whose arrays are taken (as float32 numpy) by a converter."""

  def __init__(self, state_dict: Mapping[str, Any], timm_name: str, family: str):
    self._arrays = {k: np.asarray(v) for k, v in state_dict.items()}
    self._taken: set[str] = set()
    self.timm_name = timm_name
    self.family = family

  def __contains__(self, key: str) -> bool:
    return key in self._arrays

  def take(self, key: str) -> np.ndarray:
    """Returns the array `key` as float32 and marks it converted."""
    if key not in self._arrays:
      raise ValueError(f"timm state dict of {self.timm_name!r} lacks {key!r}; supported: "
                       f"{self.family}.")
    self._taken.add(key)
    return self._arrays[key].astype(np.float32)

  def check_all_taken(self) -> None:
    """Raises a ValueError naming the keys no converter took."""
    left = [k for k in self._arrays if k not in self._taken]
    if left:
      raise ValueError(f"Unsupported timm parameter {left[0]!r} in {self.timm_name!r} (all "
                       f"unconverted: {', '.join(left)}); supported: {self.family}.")


def _linear(sd: StateDict, prefix: str) -> dict[str, np.ndarray]:
  """torch Linear weight [out, in] -> flax Dense {kernel [in, out], bias [out]}."""
  return {"kernel": sd.take(f"{prefix}.weight").T, "bias": sd.take(f"{prefix}.bias")}


def _layernorm(sd: StateDict, prefix: str) -> dict[str, np.ndarray]:
  return {"scale": sd.take(f"{prefix}.weight"), "bias": sd.take(f"{prefix}.bias")}


def _vit_attention(sd: StateDict, prefix: str, num_heads: int,
                   width: int) -> dict[str, dict[str, np.ndarray]]:
  """Fused qkv Linear [3D, D] -> query/key/value [D, heads, Dh]; proj -> out [heads, Dh, D]."""
  head_dim = width // num_heads
  qkv_w = sd.take(f"{prefix}.qkv.weight").reshape(3, num_heads, head_dim, width)
  if f"{prefix}.qkv.bias" in sd:  # timm models built with qkv_bias=False have none.
    qkv_b = sd.take(f"{prefix}.qkv.bias").reshape(3, num_heads, head_dim)
  else:
    qkv_b = np.zeros((3, num_heads, head_dim), np.float32)
  attn = {name: {"kernel": qkv_w[i].transpose(2, 0, 1), "bias": qkv_b[i]}
          for i, name in enumerate(("query", "key", "value"))}
  proj = _linear(sd, f"{prefix}.proj")
  attn["out"] = {"kernel": proj["kernel"].reshape(num_heads, head_dim, width),
                 "bias": proj["bias"]}
  return attn


def convert_vit(timm_name: str, sd: StateDict) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """timm VisionTransformer -> `vit`.

  Pooling: class token without fc_norm -> "tok"; fc_norm (global_pool="avg") -> "gap" with
  final_norm="post_pool"; neither -> "gap" with the encoder norm before pooling. timm adds
  `pos_embed[:, :1]` to the class token, which is folded into `cls` (timm's
  no_embed_class=True layout, used by no supported name, cannot be told apart by shapes).
  """
  match = VIT_PATTERN.match(timm_name)
  if not match:
    raise ValueError(f"Unsupported timm ViT name {timm_name!r}; supported: {VIT_NAMES}.")
  num_heads, patch = VIT_HEADS[match.group(1)], int(match.group(2))
  conv = sd.take("patch_embed.proj.weight")  # [D, 3, p, p]
  width = conv.shape[0]
  if conv.shape[2:] != (patch, patch):
    raise ValueError(f"{timm_name!r} names patch {patch} but patch_embed.proj.weight has "
                     f"shape {conv.shape}.")
  if width % num_heads:
    raise ValueError(f"{timm_name!r} has width {width}, not divisible by the {num_heads} "
                     f"heads of a ViT-{match.group(1)}.")
  params: dict[str, Any] = {"embedding": {"kernel": conv.transpose(2, 3, 1, 0),  # HWIO
                                          "bias": sd.take("patch_embed.proj.bias")}}
  has_cls, has_fc_norm = "cls_token" in sd, "fc_norm.weight" in sd
  if has_cls and has_fc_norm:
    raise ValueError(f"Unsupported timm parameter 'fc_norm.weight' in {timm_name!r} with a "
                     "class token: average pooling that skips the class token has no "
                     f"equivalent here; supported: {VIT_FAMILY}.")
  posemb = sd.take("pos_embed")  # [1, (1 +) N, D]
  if has_cls:
    params["cls"] = sd.take("cls_token") + posemb[:, :1]  # [1, 1, D]
    posemb = posemb[:, 1:]  # [1, N, D]
  params["pos_embedding"] = posemb
  blocks: dict[str, Any] = {}
  depth = 0
  while f"blocks.{depth}.norm1.weight" in sd:
    p = f"blocks.{depth}"
    blocks[f"encoderblock_{depth}"] = {
        "LayerNorm_0": _layernorm(sd, f"{p}.norm1"),
        "MultiHeadDotProductAttention_0": _vit_attention(sd, f"{p}.attn", num_heads, width),
        "LayerNorm_1": _layernorm(sd, f"{p}.norm2"),
        "MlpBlock_0": {"Dense_0": _linear(sd, f"{p}.mlp.fc1"),
                       "Dense_1": _linear(sd, f"{p}.mlp.fc2")},
    }
    depth += 1
  if not depth:
    raise ValueError(f"timm state dict of {timm_name!r} has no blocks.0.* parameters.")
  if has_fc_norm:
    params["fc_norm"] = _layernorm(sd, "fc_norm")
  else:
    blocks["encoder_norm"] = _layernorm(sd, "norm")
  params["Transformer"] = blocks
  num_classes = 0
  if "head.weight" in sd:
    params["head"] = _linear(sd, "head")
    num_classes = params["head"]["kernel"].shape[1]
  sd.check_all_taken()
  kwargs = dict(
      num_classes=num_classes, width=width, depth=depth,
      mlp_dim=blocks["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"].shape[1],
      num_heads=num_heads, patch_size=[patch, patch], posemb="learn",
      pool_type="tok" if has_cls else "gap",
      final_norm="post_pool" if has_fc_norm else "pre_pool", gelu_approximate=False,
      layernorm_eps=1e-6)
  return "vit", kwargs, {"params": params}


Converter = Callable[[str, StateDict], tuple[str, dict[str, Any], dict[str, Any]]]

# timm name prefix -> (converter, description of what it accepts); longest prefix wins.
CONVERTERS: dict[str, tuple[Converter, str]] = {
    "vit_": (convert_vit, VIT_FAMILY),
}


def find_converter(timm_name: str) -> tuple[str, Converter, str]:
  """(name without a hub prefix, converter, family description); ValueError if unsupported."""
  name = timm_name.removeprefix("hf-hub:").removeprefix("timm/")
  prefixes = sorted((p for p in CONVERTERS if name.startswith(p)), key=len, reverse=True)
  if not prefixes:
    supported = "; ".join(f"{p}* ({family})" for p, (_, family) in CONVERTERS.items())
    raise ValueError(f"Unsupported timm model name {timm_name!r}; supported: {supported}.")
  converter, family = CONVERTERS[prefixes[0]]
  return name, converter, family


def convert(timm_name: str, state_dict: Mapping[str, np.ndarray]
            ) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """timm name + state dict -> (model_name, model_kwargs, {"params": numpy tree})."""
  name, converter, family = find_converter(timm_name)
  return converter(name, StateDict(state_dict, name, family))


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
  """Writes `workdir/params` (orbax, every collection of `variables`) and `model.json`."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(workdir + "/params", dict(variables), force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  with open(os.path.join(workdir, "model.json"), "w") as f:
    json.dump({"model_name": model_name, "model": model_kwargs}, f, indent=2)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  find_converter(args.name)  # An unsupported name fails before the weights are read.
  model_name, kwargs, variables = convert(args.name, read_state_dict(args.weights))
  write_checkpoint(args.workdir, model_name, kwargs, variables)
  print(f"Wrote {model_name} {kwargs} to {os.path.abspath(args.workdir)}")


if __name__ == "__main__":
  flags.DEFINE_string("name", None, "timm model name, e.g. vit_small_patch16_224.")
  flags.DEFINE_string("weights", None, "State dict as .safetensors or .npz.")
  flags.DEFINE_string("workdir", None, "Output checkpoint directory (for init_from).")
  flags.mark_flags_as_required(["name", "weights", "workdir"])
  app.run(main)
