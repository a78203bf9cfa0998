r"""Converts timm checkpoints to big_vision_lite parameters (no torch needed).

    python -m big_vision_lite.tools.import_timm --name vit_small_patch16_224 \
        --weights model.safetensors --workdir DIR

writes `DIR/params` (orbax, `{"params": ...}` plus `batch_stats` for BatchNorm models) and
`DIR/model.json` (`{"model_name": ..., "model": kwargs}`) through
`checkpointing.write_import`, beside the reader of the layout `--config.init_from=DIR` uses.
`convert(timm_name, state_dict)` does the same in memory. State-dict values are numpy
arrays named as in timm. `convert` dispatches on the name prefix through `CONVERTERS`;
each family's converter takes every key it understands and raises a ValueError naming any
key left over (a timm feature with no equivalent here).
"""
import os
import re
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import safetensors.numpy
from absl import app, flags

from big_vision_lite import checkpointing


class ViTDefinition(NamedTuple):
  """What a timm ViT's name fixes but its state dict does not show."""
  num_heads: int
  class_token: bool  # Class token and global_pool="token", or neither and "avg".
  gelu_approximate: bool  # act_layer="gelu_tanh", or the exact GELU.
  layernorm_eps: float


# The timm ViTs this converter reproduces, from timm 1.0.31's registrations in
# timm/models/vision_transformer.py (VisionTransformer with plain blocks, LayerNorm, GELU,
# a biased patch embedding and learned position embeddings added to the class token too;
# no register tokens, layer scale, qk-norm, pre-norm, fc_norm or attention pooling).
# tests/test_import_timm.py::test_vit_definitions_match_timm rebuilds it from installed timm.
VIT_DEFINITIONS: dict[str, ViTDefinition] = {
    "vit_base_patch8_224": ViTDefinition(12, True, False, 1e-6),
    "vit_base_patch16_224": ViTDefinition(12, True, False, 1e-6),
    "vit_base_patch16_224_miil": ViTDefinition(12, True, False, 1e-6),
    "vit_base_patch16_384": ViTDefinition(12, True, False, 1e-6),
    "vit_base_patch16_gap_224": ViTDefinition(16, False, False, 1e-6),
    "vit_base_patch16_siglip_gap_224": ViTDefinition(12, False, False, 1e-6),
    "vit_base_patch16_siglip_gap_256": ViTDefinition(12, False, False, 1e-6),
    "vit_base_patch16_siglip_gap_384": ViTDefinition(12, False, False, 1e-6),
    "vit_base_patch16_siglip_gap_512": ViTDefinition(12, False, False, 1e-6),
    "vit_base_patch32_224": ViTDefinition(12, True, False, 1e-6),
    "vit_base_patch32_384": ViTDefinition(12, True, False, 1e-6),
    "vit_base_patch32_siglip_gap_256": ViTDefinition(12, False, True, 1e-6),
    "vit_giant_patch14_224": ViTDefinition(16, True, False, 1e-6),
    "vit_giant_patch16_gap_224": ViTDefinition(16, False, False, 1e-6),
    "vit_giantopt_patch16_siglip_gap_256": ViTDefinition(16, False, True, 1e-6),
    "vit_giantopt_patch16_siglip_gap_384": ViTDefinition(16, False, True, 1e-6),
    "vit_gigantic_patch14_224": ViTDefinition(16, True, False, 1e-6),
    "vit_huge_patch14_224": ViTDefinition(16, True, False, 1e-6),
    "vit_huge_patch14_gap_224": ViTDefinition(16, False, False, 1e-6),
    "vit_huge_patch16_gap_448": ViTDefinition(16, False, False, 1e-6),
    "vit_large_patch14_224": ViTDefinition(16, True, False, 1e-6),
    "vit_large_patch16_224": ViTDefinition(16, True, False, 1e-6),
    "vit_large_patch16_384": ViTDefinition(16, True, False, 1e-6),
    "vit_large_patch16_siglip_gap_256": ViTDefinition(16, False, False, 1e-6),
    "vit_large_patch16_siglip_gap_384": ViTDefinition(16, False, False, 1e-6),
    "vit_large_patch16_siglip_gap_512": ViTDefinition(16, False, True, 1e-6),
    "vit_large_patch32_224": ViTDefinition(16, True, False, 1e-6),
    "vit_large_patch32_384": ViTDefinition(16, True, False, 1e-6),
    "vit_small_patch8_224": ViTDefinition(6, True, False, 1e-6),
    "vit_small_patch16_224": ViTDefinition(6, True, False, 1e-6),
    "vit_small_patch16_384": ViTDefinition(6, True, False, 1e-6),
    "vit_small_patch32_224": ViTDefinition(6, True, False, 1e-6),
    "vit_small_patch32_384": ViTDefinition(6, True, False, 1e-6),
    "vit_so400m_patch14_siglip_gap_224": ViTDefinition(16, False, False, 1e-6),
    "vit_so400m_patch14_siglip_gap_378": ViTDefinition(16, False, False, 1e-6),
    "vit_so400m_patch14_siglip_gap_384": ViTDefinition(16, False, False, 1e-6),
    "vit_so400m_patch14_siglip_gap_448": ViTDefinition(16, False, False, 1e-6),
    "vit_so400m_patch14_siglip_gap_896": ViTDefinition(16, False, False, 1e-6),
    "vit_so400m_patch16_siglip_gap_256": ViTDefinition(16, False, True, 1e-6),
    "vit_so400m_patch16_siglip_gap_384": ViTDefinition(16, False, True, 1e-6),
    "vit_so400m_patch16_siglip_gap_512": ViTDefinition(16, False, True, 1e-6),
    "vit_tiny_patch16_224": ViTDefinition(3, True, False, 1e-6),
    "vit_tiny_patch16_384": ViTDefinition(3, True, False, 1e-6),
}
VIT_PATCH = re.compile(r"_patch(\d+)_")
VIT_FAMILY = ("the timm ViTs named in import_timm.VIT_DEFINITIONS (class token or average "
              "pooling; width, depth, MLP width, classes and qkv bias read from the weights)")


class StateDict:
  """A state dict whose arrays are taken (as float32 numpy) by a converter; errors name
  `source` (e.g. "timm state dict of 'vit_tiny_patch16_224'") and the supported `family`."""

  def __init__(self, state_dict: Mapping[str, Any], source: str, family: str):
    self._arrays = {k: np.asarray(v) for k, v in state_dict.items()}
    self._taken: set[str] = set()
    self.source = source
    self.family = family

  def __contains__(self, key: str) -> bool:
    return key in self._arrays

  def take(self, key: str) -> np.ndarray:
    """Returns the array `key` as float32 and marks it converted."""
    if key not in self._arrays:
      raise ValueError(f"{self.source} lacks {key!r}; supported: {self.family}.")
    self._taken.add(key)
    return self._arrays[key].astype(np.float32)

  def check_all_taken(self) -> None:
    """Raises a ValueError naming the keys no converter took."""
    left = [k for k in self._arrays if k not in self._taken]
    if left:
      raise ValueError(f"Unsupported parameter {left[0]!r} in {self.source} (all "
                       f"unconverted: {', '.join(left)}); supported: {self.family}.")


def linear_params(sd: StateDict, prefix: str) -> dict[str, np.ndarray]:
  """torch Linear weight [out, in] -> flax Dense {kernel [in, out], bias [out]}."""
  return {"kernel": sd.take(f"{prefix}.weight").T, "bias": sd.take(f"{prefix}.bias")}


def layernorm_params(sd: StateDict, prefix: str) -> dict[str, np.ndarray]:
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
  proj = linear_params(sd, f"{prefix}.proj")
  attn["out"] = {"kernel": proj["kernel"].reshape(num_heads, head_dim, width),
                 "bias": proj["bias"]}
  return attn


def vit_definition(timm_name: str) -> ViTDefinition:
  """The VIT_DEFINITIONS entry of `timm_name` (tag after "." ignored); ValueError naming
  the known names for any other."""
  definition = VIT_DEFINITIONS.get(timm_name.split(".")[0])
  if definition is None:
    raise ValueError(
        f"Unknown timm ViT name {timm_name!r}: its heads, pooling and activation are not in "
        "the state dict, so only names in import_timm.VIT_DEFINITIONS convert: "
        f"{', '.join(VIT_DEFINITIONS)}.")
  return definition


def convert_vit(timm_name: str, sd: StateDict) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """timm VisionTransformer -> `vit`.

  Heads, pooling, GELU form and norm epsilon come from `vit_definition(timm_name)`; the
  weights must have the class token the definition has. timm adds `pos_embed[:, :1]` to
  the class token, which is folded into `cls`.
  """
  definition = vit_definition(timm_name)
  patch = int(VIT_PATCH.search(timm_name).group(1))
  num_heads = definition.num_heads
  conv = sd.take("patch_embed.proj.weight")  # [D, 3, p, p]
  width = conv.shape[0]
  if conv.shape[2:] != (patch, patch):
    raise ValueError(f"{timm_name!r} names patch {patch} but patch_embed.proj.weight has "
                     f"shape {conv.shape}.")
  if width % num_heads:
    raise ValueError(f"{timm_name!r} has width {width}, not divisible by the {num_heads} "
                     "heads of its timm definition.")
  if ("cls_token" in sd) != definition.class_token:
    raise ValueError(
        f"timm state dict of {timm_name!r} {'lacks' if definition.class_token else 'has'} "
        f"'cls_token', but timm's {timm_name.split('.')[0]} "
        f"{'has a' if definition.class_token else 'has no'} class token: weights made with "
        "other class_token/global_pool kwargs cannot be told apart by name; supported: "
        f"{VIT_FAMILY}.")
  params: dict[str, Any] = {"embedding": {"kernel": conv.transpose(2, 3, 1, 0),  # HWIO
                                          "bias": sd.take("patch_embed.proj.bias")}}
  posemb = sd.take("pos_embed")  # [1, (1 +) N, D]
  if definition.class_token:
    params["cls"] = sd.take("cls_token") + posemb[:, :1]  # [1, 1, D]
    posemb = posemb[:, 1:]  # [1, N, D]
  params["pos_embedding"] = posemb
  blocks: dict[str, Any] = {}
  depth = 0
  while f"blocks.{depth}.norm1.weight" in sd:
    p = f"blocks.{depth}"
    blocks[f"encoderblock_{depth}"] = {
        "LayerNorm_0": layernorm_params(sd, f"{p}.norm1"),
        "MultiHeadDotProductAttention_0": _vit_attention(sd, f"{p}.attn", num_heads, width),
        "LayerNorm_1": layernorm_params(sd, f"{p}.norm2"),
        "MlpBlock_0": {"Dense_0": linear_params(sd, f"{p}.mlp.fc1"),
                       "Dense_1": linear_params(sd, f"{p}.mlp.fc2")},
    }
    depth += 1
  if not depth:
    raise ValueError(f"timm state dict of {timm_name!r} has no blocks.0.* parameters.")
  if "fc_norm.weight" in sd:
    raise ValueError(f"Unsupported parameter 'fc_norm.weight' in timm state dict of "
                     f"{timm_name!r}: timm's {timm_name.split('.')[0]} normalises before "
                     f"pooling (no fc_norm); supported: {VIT_FAMILY}.")
  blocks["encoder_norm"] = layernorm_params(sd, "norm")
  params["Transformer"] = blocks
  num_classes = 0
  if "head.weight" in sd:
    params["head"] = linear_params(sd, "head")
    num_classes = params["head"]["kernel"].shape[1]
  sd.check_all_taken()
  kwargs = dict(
      num_classes=num_classes, variant=None, width=width, depth=depth,
      mlp_dim=blocks["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"].shape[1],
      num_heads=num_heads, patch_size=[patch, patch], posemb="learn",
      pool_type="tok" if definition.class_token else "gap", final_norm="pre_pool",
      gelu_approximate=definition.gelu_approximate,
      layernorm_eps=definition.layernorm_eps)
  return "vit", kwargs, {"params": params}


CONVNEXTV2_SIZES = ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "huge")
CONVNEXTV2_PATTERN = re.compile(rf"^convnextv2_({'|'.join(CONVNEXTV2_SIZES)})(?:[_.]|$)")
CONVNEXTV2_NAMES = f"convnextv2_{{{','.join(CONVNEXTV2_SIZES)}}}*"
CONVNEXTV2_FAMILY = (f"{CONVNEXTV2_NAMES} with the 4x4 patch stem, 7x7 depth-wise convs, GRN "
                     "(or none) and the pool-norm-fc head (no layer scale, overlapping stem, "
                     "head MLP or norm_pre)")


def convert_convnextv2(timm_name: str,
                       sd: StateDict) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """timm ConvNeXt (`use_grn=True`, `ls_init_value=None`) -> `convnext2`.

  Depths and widths come from the weights; the MLP may be Linear or 1x1 conv
  (`conv_mlp=True`, atto..nano). Without `head.norm` (FCMAE weights) the head norm is the
  identity, as timm leaves it.
  """
  if not CONVNEXTV2_PATTERN.match(timm_name):
    raise ValueError(f"Unsupported timm ConvNeXt V2 name {timm_name!r}; supported: "
                     f"{CONVNEXTV2_NAMES}.")

  def conv(prefix: str, kernel_size: int) -> dict[str, np.ndarray]:
    weight = sd.take(f"{prefix}.weight")  # [O, I/g, kh, kw]
    if weight.shape[2:] != (kernel_size, kernel_size):
      raise ValueError(f"{timm_name!r}: {prefix}.weight has shape {weight.shape}, expected a "
                       f"{kernel_size}x{kernel_size} kernel; supported: {CONVNEXTV2_FAMILY}.")
    return {"kernel": weight.transpose(2, 3, 1, 0), "bias": sd.take(f"{prefix}.bias")}

  def pointwise(prefix: str) -> dict[str, np.ndarray]:
    weight = sd.take(f"{prefix}.weight")  # Linear [out, in] or 1x1 conv [out, in, 1, 1].
    return {"kernel": weight.reshape(weight.shape[:2]).T, "bias": sd.take(f"{prefix}.bias")}

  params: dict[str, Any] = {"stem_conv": conv("stem.0", 4),
                            "stem_norm": layernorm_params(sd, "stem.1")}
  use_grn = "stages.0.blocks.0.mlp.grn.weight" in sd
  depths, dims = [], []
  for stage in range(4):
    if stage > 0:
      params[f"downsample{stage}_norm"] = layernorm_params(sd, f"stages.{stage}.downsample.0")
      params[f"downsample{stage}_conv"] = conv(f"stages.{stage}.downsample.1", 2)
    depth = 0
    while f"stages.{stage}.blocks.{depth}.conv_dw.weight" in sd:
      prefix = f"stages.{stage}.blocks.{depth}"
      block = {"dwconv": conv(f"{prefix}.conv_dw", 7),
               "norm": layernorm_params(sd, f"{prefix}.norm"),
               "pwconv1": pointwise(f"{prefix}.mlp.fc1"),
               "pwconv2": pointwise(f"{prefix}.mlp.fc2")}
      if use_grn:
        block["grn"] = {"gamma": sd.take(f"{prefix}.mlp.grn.weight").reshape(-1),
                        "beta": sd.take(f"{prefix}.mlp.grn.bias").reshape(-1)}
      params[f"stage{stage}_block{depth}"] = block
      depth += 1
    if not depth:
      raise ValueError(f"timm state dict of {timm_name!r} has no stages.{stage}.blocks.0.* "
                       "parameters.")
    depths.append(depth)
    dims.append(int(params[f"stage{stage}_block0"]["dwconv"]["kernel"].shape[-1]))
  if "head.norm.weight" in sd:
    params["head_norm"] = layernorm_params(sd, "head.norm")
  else:
    params["head_norm"] = {"scale": np.ones(dims[-1], np.float32),
                           "bias": np.zeros(dims[-1], np.float32)}
  num_classes = 0
  if "head.fc.weight" in sd:
    params["head"] = linear_params(sd, "head.fc")
    num_classes = int(params["head"]["kernel"].shape[1])
  sd.check_all_taken()
  kwargs = dict(num_classes=num_classes, depths=depths, dims=dims, grn=use_grn)
  return "convnext2", kwargs, {"params": params}


MOBILEVIT_PATTERN = re.compile(r"^mobilevit_(xxs|xs|s)(?:[_.]|$)")
MOBILEVIT2_PATTERN = re.compile(r"^mobilevitv2_(050|075|100|125|150|175|200)(?:[_.]|$)")
# Heads are not in the weights: MobileVitBlock's default, kept by every timm mobilevit_*.
MOBILEVIT_HEADS = 4
MOBILEVIT_FAMILY = ("mobilevit_{xxs,xs,s}* and mobilevitv2_{050,075,100,125,150,175,200}* "
                    "(timm byobnet, any width_factor; no SE blocks, no_fusion or extra heads)")


def _conv_bn(sd: StateDict, prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """timm ConvNormAct (bias-free conv, BatchNorm) -> `layers.ConvBN` params, batch_stats."""
  if f"{prefix}.bn.num_batches_tracked" in sd:
    sd.take(f"{prefix}.bn.num_batches_tracked")  # A counter with no use in eval mode.
  kernel = sd.take(f"{prefix}.conv.weight").transpose(2, 3, 1, 0)  # [O, I/g, k, k] -> HWIO
  return ({"conv": {"kernel": kernel}, "bn": layernorm_params(sd, f"{prefix}.bn")},
          {"bn": {"mean": sd.take(f"{prefix}.bn.running_mean"),
                  "var": sd.take(f"{prefix}.bn.running_var")}})


def _pointwise_conv(sd: StateDict, prefix: str) -> dict[str, np.ndarray]:
  """torch 1x1 Conv2d [out, in, 1, 1] with bias -> flax Dense {kernel [in, out], bias}."""
  return {"kernel": sd.take(f"{prefix}.weight")[:, :, 0, 0].T,
          "bias": sd.take(f"{prefix}.bias")}


def _mobilevit_block(sd: StateDict, prefix: str, version: int
                     ) -> tuple[dict[str, Any], dict[str, Any], int, list[int]]:
  """timm MobileVitBlock / MobileVitV2Block -> (params, batch_stats, transformer width,
  MLP hidden width of each transformer layer)."""
  params, stats = {}, {}
  params["local_conv"], stats["local_conv"] = _conv_bn(sd, f"{prefix}.conv_kxk")
  params["local_proj"] = {
      "kernel": sd.take(f"{prefix}.conv_1x1.weight").transpose(2, 3, 1, 0)}
  width = params["local_proj"]["kernel"].shape[-1]
  hidden = []
  while f"{prefix}.transformer.{len(hidden)}.norm1.weight" in sd:
    layer = f"{prefix}.transformer.{len(hidden)}"
    if version == 2:
      qkv = _pointwise_conv(sd, f"{layer}.attn.qkv_proj")  # [D, 1 + 2D]: score, key, value
      parts = np.split(np.arange(1 + 2 * width), [1, 1 + width])
      attention = {name: {"kernel": qkv["kernel"][:, part], "bias": qkv["bias"][part]}
                   for name, part in zip(("score", "key", "value"), parts)}
      attention["out"] = _pointwise_conv(sd, f"{layer}.attn.out_proj")
      mlp = {"Dense_0": _pointwise_conv(sd, f"{layer}.mlp.fc1"),
             "Dense_1": _pointwise_conv(sd, f"{layer}.mlp.fc2")}
    else:
      attention = _vit_attention(sd, f"{layer}.attn", MOBILEVIT_HEADS, width)
      mlp = {"Dense_0": linear_params(sd, f"{layer}.mlp.fc1"),
             "Dense_1": linear_params(sd, f"{layer}.mlp.fc2")}
    params[f"transformer_{len(hidden)}"] = {
        "norm1": layernorm_params(sd, f"{layer}.norm1"), "attention": attention,
        "norm2": layernorm_params(sd, f"{layer}.norm2"), "mlp": mlp}
    hidden.append(mlp["Dense_0"]["kernel"].shape[1])
  if not hidden:
    raise ValueError(f"{sd.source} has no {prefix}.transformer.0.* "
                     f"parameters; supported: {MOBILEVIT_FAMILY}.")
  params["transformer_norm"] = layernorm_params(sd, f"{prefix}.norm")
  params["proj"], stats["proj"] = _conv_bn(sd, f"{prefix}.conv_proj")
  if version == 1:
    params["fusion"], stats["fusion"] = _conv_bn(sd, f"{prefix}.conv_fusion")
  return params, stats, width, hidden


def convert_mobilevit(timm_name: str,
                      sd: StateDict) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """timm byobnet MobileViT v1 / v2 -> `mobilevit` / `mobilevit2`, params and batch_stats.

  Widths, depths, MV2 expansion and MLP ratio come from the weights (so models made with a
  timm `width_factor` convert too); the kwargs name the variant of `timm_name` and override
  only the architecture fields that differ from it.
  """
  # pylint: disable=g-import-not-at-top
  from big_vision_lite.models import layers, mobilevit, mobilevit2
  version = 2 if timm_name.startswith("mobilevitv2_") else 1
  match = (MOBILEVIT2_PATTERN if version == 2 else MOBILEVIT_PATTERN).match(timm_name)
  if not match:
    raise ValueError(f"Unsupported timm MobileViT name {timm_name!r}; supported: "
                     f"{MOBILEVIT_FAMILY}.")
  if version == 2:
    model_name, variant = "mobilevit2", match.group(1)
    base = mobilevit2.architecture(mobilevit2.VARIANTS[variant])
  else:
    model_name, variant = "mobilevit", match.group(1).upper()
    base = mobilevit.VARIANTS[variant]
  params, stats = {}, {}
  params["stem"], stats["stem"] = _conv_bn(sd, "stem")
  arch: dict[str, Any] = dict(stem_width=params["stem"]["conv"]["kernel"].shape[-1], widths=[],
                              mv2_depths=[], transformer_widths=[], transformer_depths=[])
  in_width, expanded, vit_stages, mlp_hidden = arch["stem_width"], [], [], []
  for stage in range(len(mobilevit.STRIDES)):
    depth = 0
    while f"stages.{stage}.{depth}.conv1_1x1.conv.weight" in sd:
      block, block_stats = {}, {}
      for ours, theirs in (("expand", "conv1_1x1"), ("depthwise", "conv2_kxk"),
                           ("project", "conv3_1x1")):
        block[ours], block_stats[ours] = _conv_bn(sd, f"stages.{stage}.{depth}.{theirs}")
      expanded.append((in_width, block["expand"]["conv"]["kernel"].shape[-1]))
      in_width = block["project"]["conv"]["kernel"].shape[-1]
      params[f"stage{stage}_mv2_{depth}"], stats[f"stage{stage}_mv2_{depth}"] = block, block_stats
      depth += 1
    if not depth:
      raise ValueError(f"timm state dict of {timm_name!r} has no stages.{stage}.0.conv1_1x1.* "
                       f"parameters (an MV2 block); supported: {MOBILEVIT_FAMILY}.")
    arch["widths"].append(in_width)
    arch["mv2_depths"].append(depth)
    if f"stages.{stage}.{depth}.conv_kxk.conv.weight" in sd:
      name = f"stage{stage}_mobilevit"
      params[name], stats[name], width, hidden = _mobilevit_block(
          sd, f"stages.{stage}.{depth}", version)
      arch["transformer_widths"].append(width)
      arch["transformer_depths"].append(len(hidden))
      mlp_hidden += [(width, h) for h in hidden]
      vit_stages.append(stage)
  first_vit = len(mobilevit.STRIDES) - len(vit_stages)
  if not vit_stages or vit_stages != list(range(first_vit, len(mobilevit.STRIDES))):
    raise ValueError(f"{timm_name!r} has MobileViT blocks in stages {vit_stages}; supported: "
                     f"the last stages only ({MOBILEVIT_FAMILY}).")
  expansions = [ratio for ratio in sorted({h / w for w, h in expanded})
                if all(layers.make_divisible(w * ratio) == h for w, h in expanded)]
  mlp_ratios = [ratio for ratio in sorted({h / w for w, h in mlp_hidden})
                if all(int(w * ratio) == h for w, h in mlp_hidden)]
  if not expansions or not mlp_ratios:
    raise ValueError(f"{timm_name!r} mixes MV2 expansions {expanded} or MLP ratios "
                     f"{mlp_hidden} (as (in, hidden) widths); supported: one of each.")
  arch["expansion"] = base["expansion"] if base["expansion"] in expansions else expansions[0]
  mlp_ratio = 2.0 if 2.0 in mlp_ratios else mlp_ratios[0]  # The models' default.
  if version == 1:
    arch["final_width"] = 0
    if "final_conv.conv.weight" in sd:
      params["final_conv"], stats["final_conv"] = _conv_bn(sd, "final_conv")
      arch["final_width"] = params["final_conv"]["conv"]["kernel"].shape[-1]
  num_classes = 0
  if "head.fc.weight" in sd:
    params["head"] = linear_params(sd, "head.fc")
    num_classes = int(params["head"]["kernel"].shape[1])
  sd.check_all_taken()
  kwargs: dict[str, Any] = dict(num_classes=num_classes, variant=variant)
  for field, value in arch.items():
    if value != (list(base[field]) if isinstance(base[field], tuple) else base[field]):
      kwargs[field] = value
  if mlp_ratio != 2.0:
    kwargs["mlp_ratio"] = mlp_ratio
  return model_name, kwargs, {"params": params, "batch_stats": stats}


EFFICIENTVIT_PATTERN = re.compile(r"^efficientvit_m[0-5](?:[_.]|$)")
EFFICIENTVIT_NAMES = "efficientvit_m{0,1,2,3,4,5}"
EFFICIENTVIT_FAMILY = (f"{EFFICIENTVIT_NAMES} (timm's efficientvit_msra: BN + linear head or "
                       "none; widths, depths, heads, key dims, Q kernels and windows are read "
                       "from the weights)")


def convert_efficientvit(timm_name: str,
                         sd: StateDict) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """timm EfficientViTMSRA -> `efficientvit`, with BatchNorm statistics in `batch_stats`.

  Each stage's window is the side r of its attention-bias table (r·r offsets), which is
  timm's min(window_size, stage resolution); the index buffers `attention_bias_idxs` are
  checked against |dy|·r + |dx| and the tables reshaped to [heads, r, r].
  """
  from big_vision_lite.models import efficientvit  # pylint: disable=import-outside-toplevel
  if not EFFICIENTVIT_PATTERN.match(timm_name):
    raise ValueError(f"Unsupported timm EfficientViT name {timm_name!r}; supported: "
                     f"{EFFICIENTVIT_NAMES}.")
  params: dict[str, np.ndarray] = {}  # "/"-joined path -> array, nested at the end.
  stats: dict[str, np.ndarray] = {}

  def batch_norm(ours: str, theirs: str) -> None:
    params[f"{ours}/scale"] = sd.take(f"{theirs}.weight")
    params[f"{ours}/bias"] = sd.take(f"{theirs}.bias")
    stats[f"{ours}/mean"] = sd.take(f"{theirs}.running_mean")
    stats[f"{ours}/var"] = sd.take(f"{theirs}.running_var")
    if f"{theirs}.num_batches_tracked" in sd:
      sd.take(f"{theirs}.num_batches_tracked")

  def conv_bn(ours: str, theirs: str) -> np.ndarray:
    weight = sd.take(f"{theirs}.conv.weight")  # [O, I/g, kh, kw]
    params[f"{ours}/conv/kernel"] = weight.transpose(2, 3, 1, 0)  # HWIO
    batch_norm(f"{ours}/bn", f"{theirs}.bn")
    return weight

  def ffn(ours: str, theirs: str) -> None:
    conv_bn(f"{ours}/pw1", f"{theirs}.pw1")
    conv_bn(f"{ours}/pw2", f"{theirs}.pw2")

  def attention(ours: str, theirs: str) -> tuple[int, int, int, list[int]]:
    """Converts one cascaded group attention; returns (heads, key_dim, window, kernels)."""
    kernels = []
    while f"{theirs}.qkvs.{len(kernels)}.conv.weight" in sd:
      head = len(kernels)
      conv_bn(f"{ours}/qkv_{head}", f"{theirs}.qkvs.{head}")
      kernels.append(int(conv_bn(f"{ours}/dw_{head}", f"{theirs}.dws.{head}").shape[-1]))
    if not kernels:
      raise ValueError(f"timm state dict of {timm_name!r} has no {theirs}.qkvs.0.* parameters.")
    key_dim = int(params[f"{ours}/dw_0/conv/kernel"].shape[-1])
    biases = sd.take(f"{theirs}.attention_biases")  # [heads, r·r]
    window = int(round(np.sqrt(biases.shape[1])))
    if biases.shape != (len(kernels), window * window):
      raise ValueError(f"{timm_name!r}: {theirs}.attention_biases has shape {biases.shape}, "
                       f"not [{len(kernels)} heads, r·r offsets].")
    expected = efficientvit.offset_index(window, window)
    if f"{theirs}.attention_bias_idxs" in sd:
      idxs = sd.take(f"{theirs}.attention_bias_idxs")
      if idxs.shape != expected.shape or not np.array_equal(idxs, expected):
        raise ValueError(f"{timm_name!r}: {theirs}.attention_bias_idxs is not timm's "
                         f"|dy|·{window} + |dx| layout of a {window}x{window} window.")
    params[f"{ours}/attention_biases"] = biases.reshape(len(kernels), window, window)
    conv_bn(f"{ours}/proj", f"{theirs}.proj.1")
    return len(kernels), key_dim, window, kernels

  for i in range(1, 5):
    conv_bn(f"stem/conv{i}", f"patch_embed.conv{i}")
  hp: dict[str, list[int]] = {k: [] for k in ("embed_dim", "depth", "num_heads", "key_dim",
                                               "window_size")}
  kernels: list[int] = []
  stage = 0
  while f"stages.{stage}.blocks.0.dw0.m.conv.weight" in sd:
    ours, theirs = f"stage{stage}", f"stages.{stage}"
    if stage:
      down, tdown = f"{ours}/downsample", f"{theirs}.downsample"
      conv_bn(f"{down}/res1_dw", f"{tdown}.res1.0.m")
      ffn(f"{down}/res1_ffn", f"{tdown}.res1.1.m")
      for i in range(1, 4):
        conv_bn(f"{down}/patch_merge/conv{i}", f"{tdown}.patchmerge.conv{i}")
      for fc in ("fc1", "fc2"):
        weight = sd.take(f"{tdown}.patchmerge.se.{fc}.weight")  # [O, I, 1, 1]
        params[f"{down}/patch_merge/se/{fc}/kernel"] = weight.transpose(2, 3, 1, 0)
        params[f"{down}/patch_merge/se/{fc}/bias"] = sd.take(f"{tdown}.patchmerge.se.{fc}.bias")
      conv_bn(f"{down}/res2_dw", f"{tdown}.res2.0.m")
      ffn(f"{down}/res2_ffn", f"{tdown}.res2.1.m")
    depth = 0
    while f"{theirs}.blocks.{depth}.dw0.m.conv.weight" in sd:
      block, tblock = f"{ours}/block{depth}", f"{theirs}.blocks.{depth}"
      width = conv_bn(f"{block}/dw0", f"{tblock}.dw0.m").shape[0]
      ffn(f"{block}/ffn0", f"{tblock}.ffn0.m")
      heads, key_dim, window, head_kernels = attention(f"{block}/mixer/attn",
                                                       f"{tblock}.mixer.m.attn")
      conv_bn(f"{block}/dw1", f"{tblock}.dw1.m")
      ffn(f"{block}/ffn1", f"{tblock}.ffn1.m")
      shared = min(len(kernels), len(head_kernels))
      if kernels[:shared] != head_kernels[:shared]:
        raise ValueError(f"{timm_name!r}: Q kernel sizes {head_kernels} of {tblock} differ from "
                         f"{kernels} elsewhere; the model shares one list across stages.")
      kernels = kernels + head_kernels[len(kernels):]
      depth += 1
    hp["embed_dim"].append(int(width))
    hp["depth"].append(depth)
    hp["num_heads"].append(heads)
    hp["key_dim"].append(key_dim)
    hp["window_size"].append(window)
    stage += 1
  if not stage:
    raise ValueError(f"timm state dict of {timm_name!r} has no stages.0.blocks.0.* "
                     "parameters.")
  num_classes = 0
  if "head.linear.weight" in sd:
    batch_norm("head_norm", "head.bn")
    head = linear_params(sd, "head.linear")
    params["head/kernel"], params["head/bias"] = head["kernel"], head["bias"]
    num_classes = int(head["kernel"].shape[1])
  sd.check_all_taken()

  def nest(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
      *parents, leaf = path.split("/")
      node = tree
      for name in parents:
        node = node.setdefault(name, {})
      node[leaf] = value
    return tree

  kwargs = dict(num_classes=num_classes, **hp, kernels=kernels)
  return "efficientvit", kwargs, {"params": nest(params), "batch_stats": nest(stats)}


RESNET_PATTERN = re.compile(r"^resnet(18|34|50|101|152)(?:[_.]|$)")
RESNET_NAMES = "resnet{18,34,50,101,152}"
RESNET_FAMILY = (f"{RESNET_NAMES}* (timm's torchvision-style ResNets: 7x7 stem, conv1/bn1, "
                 "layer1..4, fc; stem width, stage widths width * 2**i and block counts read "
                 "from the weights; no deep stem, average-pool shortcut, groups or SE)")


def convert_resnet(timm_name: str,
                   sd: StateDict) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """timm ResNet (torchvision layout) -> `resnet`, params and batch_stats (`frozen_bn=False`;
  `models.resnet.freeze_batch_norm` turns them into frozen-norm variables).

  The depth (basic or bottleneck blocks) comes from the name and must agree with the
  weights; the width and the block counts come from the weights, so models made with timm's
  `channels`/`stem_width`/`layers` convert too.
  """
  from big_vision_lite.models import resnet  # pylint: disable=g-import-not-at-top
  match = RESNET_PATTERN.match(timm_name)
  if not match:
    raise ValueError(f"Unsupported timm ResNet name {timm_name!r}; supported: {RESNET_FAMILY}.")
  depth = int(match.group(1))
  bottleneck = resnet.DEPTHS[depth][0]

  def conv(prefix: str) -> dict[str, np.ndarray]:
    return {"kernel": sd.take(f"{prefix}.weight").transpose(2, 3, 1, 0)}  # OIHW -> HWIO

  def norm(prefix: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    if f"{prefix}.num_batches_tracked" in sd:
      sd.take(f"{prefix}.num_batches_tracked")  # A counter with no use in eval mode.
    return (layernorm_params(sd, prefix), {"mean": sd.take(f"{prefix}.running_mean"),
                                           "var": sd.take(f"{prefix}.running_var")})

  params: dict[str, Any] = {"conv1": conv("conv1")}
  stats: dict[str, Any] = {}
  params["bn1"], stats["bn1"] = norm("bn1")
  kh, kw, _, stem_width = params["conv1"]["kernel"].shape
  if (kh, kw) != (7, 7):
    raise ValueError(f"{timm_name!r}: conv1 has a {kh}x{kw} kernel, expected the 7x7 stem; "
                     f"supported: {RESNET_FAMILY}.")
  if ("layer1.0.conv3.weight" in sd) != bottleneck:
    raise ValueError(f"{timm_name!r} has {'basic' if bottleneck else 'bottleneck'} blocks in "
                     f"its weights, but the name says {'bottleneck' if bottleneck else 'basic'} "
                     f"ones; supported: {RESNET_FAMILY}.")
  convs = ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2")
  width = int(sd.take("layer1.0.conv1.weight").shape[0]) if "layer1.0.conv1.weight" in sd else 0
  stage_sizes = []
  for stage in range(1, 5):
    blocks = 0
    while f"layer{stage}.{blocks}.conv1.weight" in sd:
      prefix, name = f"layer{stage}.{blocks}", f"layer{stage}_block{blocks}"
      block, block_stats = {}, {}
      for i, conv_name in enumerate(convs, start=1):
        block[conv_name] = conv(f"{prefix}.{conv_name}")
        block[f"bn{i}"], block_stats[f"bn{i}"] = norm(f"{prefix}.bn{i}")
      if f"{prefix}.downsample.0.weight" in sd:
        block["downsample_conv"] = conv(f"{prefix}.downsample.0")
        block["downsample_bn"], block_stats["downsample_bn"] = norm(f"{prefix}.downsample.1")
      expected = width * 2**(stage - 1)
      if block["conv1"]["kernel"].shape[-1] != expected:
        raise ValueError(f"{timm_name!r}: {prefix}.conv1 has {block['conv1']['kernel'].shape[-1]} "
                         f"channels, expected {expected} (layer1's {width} x 2**{stage - 1}); "
                         f"supported: {RESNET_FAMILY}.")
      params[name], stats[name] = block, block_stats
      blocks += 1
    if not blocks:
      raise ValueError(f"timm state dict of {timm_name!r} has no layer{stage}.0.* parameters; "
                       f"supported: {RESNET_FAMILY}.")
    stage_sizes.append(blocks)
  num_classes = 0
  if "fc.weight" in sd:
    params["head"] = linear_params(sd, "fc")
    num_classes = int(params["head"]["kernel"].shape[1])
  sd.check_all_taken()
  kwargs: dict[str, Any] = dict(num_classes=num_classes, depth=depth, width=width)
  if stem_width != width:
    kwargs["stem_width"] = int(stem_width)
  if tuple(stage_sizes) != resnet.DEPTHS[depth][1]:
    kwargs["stage_sizes"] = stage_sizes
  return "resnet", kwargs, {"params": params, "batch_stats": stats}


Converter = Callable[[str, StateDict], tuple[str, dict[str, Any], dict[str, Any]]]

# timm name prefix -> (converter, description of what it accepts); longest prefix wins.
CONVERTERS: dict[str, tuple[Converter, str]] = {
    "vit_": (convert_vit, VIT_FAMILY),
    "efficientvit_m": (convert_efficientvit, EFFICIENTVIT_FAMILY),
    "convnextv2_": (convert_convnextv2, CONVNEXTV2_FAMILY),
    "mobilevit_": (convert_mobilevit, MOBILEVIT_FAMILY),
    "mobilevitv2_": (convert_mobilevit, MOBILEVIT_FAMILY),
    "resnet": (convert_resnet, RESNET_FAMILY),
}


def find_converter(timm_name: str) -> tuple[str, Converter, str]:
  """(name without a hub prefix, converter, family description); ValueError if unsupported."""
  name = timm_name.removeprefix("hf-hub:").removeprefix("timm/")
  prefixes = sorted((p for p in CONVERTERS if name.startswith(p)), key=len, reverse=True)
  if not prefixes:
    supported = "; ".join(f"{p}* ({family})" for p, (_, family) in CONVERTERS.items())
    raise ValueError(f"Unsupported timm model name {timm_name!r}; supported: {supported}.")
  converter, family = CONVERTERS[prefixes[0]]
  if converter is convert_vit:
    vit_definition(name)  # An unknown ViT fails here, before any weights are read.
  return name, converter, family


def convert(timm_name: str, state_dict: Mapping[str, np.ndarray]
            ) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """timm name + state dict -> (model_name, model_kwargs, {"params": numpy tree})."""
  name, converter, family = find_converter(timm_name)
  return converter(name, StateDict(state_dict, f"timm state dict of {name!r}", family))


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` or `.npz` state dict as numpy arrays."""
  if path.endswith(".safetensors"):
    return safetensors.numpy.load_file(path)
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  raise ValueError(f"Flag 'weights' must be a .safetensors or .npz file, got {path!r}.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  find_converter(args.name)  # An unsupported name fails before the weights are read.
  model_name, kwargs, variables = convert(args.name, read_state_dict(args.weights))
  checkpointing.write_import(args.workdir, model_name, kwargs, variables)
  print(f"Wrote {model_name} {kwargs} to {os.path.abspath(args.workdir)}")


if __name__ == "__main__":
  flags.DEFINE_string("name", None, "timm model name, e.g. vit_small_patch16_224.")
  flags.DEFINE_string("weights", None, "State dict as .safetensors or .npz.")
  flags.DEFINE_string("workdir", None, "Output checkpoint directory (for init_from).")
  flags.mark_flags_as_required(["name", "weights", "workdir"])
  app.run(main)
