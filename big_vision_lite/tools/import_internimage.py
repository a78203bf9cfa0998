r"""Converts an official InternImage checkpoint (OpenGVLab/InternImage) to `internimage` params.

    python -m big_vision_lite.tools.import_internimage --weights internimage_t.safetensors \
        --variant T --workdir DIR

writes `DIR/params` (orbax: `params` and the head's BatchNorm `batch_stats`) and
`DIR/model.json`, the layout `--config.init_from=DIR` reads. The weights are the official
state dict (the `model` entry of the released .pth, parameter names as in
`classification/models/intern_image.py`) saved as .safetensors or .npz outside this
library, which does not depend on torch. The architecture (C1, depths, groups, MLP ratio,
layer scale, post-norm, head width, classes) is read from the weights; `variant` (T, S, B,
L, XL) checks it against the variant and supplies the offset scale, which the weights do
not hold; without a variant the model is described by explicit fields and `offset_scale`
(default 1, as T/S/B; L and XL use 2). Every key must be converted: H/G parts (CLIP
projector, center feature scale, residual post-norms) raise a ValueError naming them.
"""
import os
from typing import Any, Mapping

import numpy as np
from absl import app, flags

from big_vision_lite import checkpointing
from big_vision_lite.models import internimage
from big_vision_lite.tools import import_timm

FAMILY = ("the official InternImage classification model T/S/B/L/XL (any size under the "
          "stacking rules: 3x3 DCNv3, LN, conv_head + BatchNorm head)")
POINTS = 9  # 3x3 sampling points per group.


def _conv(weights: import_timm.StateDict, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
  """torch Conv2d weight [O, I/g, kh, kw] -> flax HWIO kernel [kh, kw, I/g, O] (+ bias)."""
  out = {"kernel": weights.take(f"{prefix}.weight").transpose(2, 3, 1, 0)}
  if bias:
    out["bias"] = weights.take(f"{prefix}.bias")
  return out


def _block(weights: import_timm.StateDict, prefix: str) -> dict[str, Any]:
  """levels.i.blocks.j.* -> `internimage.Block` params."""
  dcn = f"{prefix}.dcn"
  block = {
      "norm1": import_timm.layernorm_params(weights, f"{prefix}.norm1.0"),
      "dcn": {"input_proj": import_timm.linear_params(weights, f"{dcn}.input_proj"),
              "dw_conv": _conv(weights, f"{dcn}.dw_conv.0"),
              "dw_norm": import_timm.layernorm_params(weights, f"{dcn}.dw_conv.1.1"),
              "offset": import_timm.linear_params(weights, f"{dcn}.offset"),
              "mask": import_timm.linear_params(weights, f"{dcn}.mask"),
              "output_proj": import_timm.linear_params(weights, f"{dcn}.output_proj")},
      "norm2": import_timm.layernorm_params(weights, f"{prefix}.norm2.0"),
      "mlp": {"fc1": import_timm.linear_params(weights, f"{prefix}.mlp.fc1"),
              "fc2": import_timm.linear_params(weights, f"{prefix}.mlp.fc2")},
  }
  if f"{prefix}.gamma1" in weights:
    block["gamma1"] = weights.take(f"{prefix}.gamma1")
    block["gamma2"] = weights.take(f"{prefix}.gamma2")
  kernel = block["dcn"]["dw_conv"]["kernel"]
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f"Unsupported InternImage parameter {dcn}.dw_conv.0.weight: a "
                     f"{kernel.shape[0]}x{kernel.shape[1]} depth-wise conv (InternImage-H/G); "
                     f"supported: {FAMILY}.")
  return block


def _architecture(params: dict[str, Any], depths: list[int]) -> dict[str, Any]:
  """C1, C', depths, MLP ratio, layer scale, post-norm and cls_scale read off the params."""
  blocks = [params[f"level{i}_block0"] for i in range(4)]
  widths = [b["norm1"]["scale"].shape[0] for b in blocks]
  groups = [b["dcn"]["mask"]["kernel"].shape[1] // POINTS for b in blocks]
  ratios = {b["mlp"]["fc1"]["kernel"].shape[1] / w for b, w in zip(blocks, widths)}
  group_channels = {w // g for w, g in zip(widths, groups)}
  if (widths != [widths[0] * 2 ** i for i in range(4)] or len(group_channels) != 1
      or len(ratios) != 1):
    raise ValueError(f"InternImage state dict with widths {widths}, groups {groups} and MLP "
                     f"ratios {sorted(ratios)} is not under the stacking rules (C_i = "
                     f"2^(i-1)·C1, C_i / G_i and the MLP ratio the same in every stage).")
  return dict(channels=widths[0], depths=depths, group_channels=group_channels.pop(),
              mlp_ratio=ratios.pop(), layer_scale="gamma1" in blocks[0],
              post_norm="level0_norm" not in params,
              cls_scale=params["conv_head"]["kernel"].shape[1] / widths[-1])


def convert(state_dict: Mapping[str, np.ndarray], variant: str | None = None,
            offset_scale: float | None = None
            ) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """Official InternImage state dict -> ("internimage", Model kwargs, {"params",
  "batch_stats"}); `variant` checks the architecture, `offset_scale` overrides its own."""
  if variant is not None:
    internimage.Model(variant=variant)  # A ValueError naming the accepted variants.
  weights = import_timm.StateDict(state_dict, "InternImage state dict", FAMILY)
  params: dict[str, Any] = {
      "stem_conv1": _conv(weights, "patch_embed.conv1"),
      "stem_norm1": import_timm.layernorm_params(weights, "patch_embed.norm1.1"),
      "stem_conv2": _conv(weights, "patch_embed.conv2"),
      "stem_norm2": import_timm.layernorm_params(weights, "patch_embed.norm2.1"),
  }
  depths = []
  for level in range(4):
    depth = 0
    while f"levels.{level}.blocks.{depth}.norm1.0.weight" in weights:
      params[f"level{level}_block{depth}"] = _block(weights, f"levels.{level}.blocks.{depth}")
      depth += 1
    if not depth:
      raise ValueError(f"InternImage state dict has no levels.{level}.blocks.0.* parameters; "
                       f"supported: {FAMILY}.")
    depths.append(depth)
    if f"levels.{level}.norm.0.weight" in weights:
      params[f"level{level}_norm"] = import_timm.layernorm_params(weights, f"levels.{level}.norm.0")
    if level < 3:
      params[f"level{level}_downsample_conv"] = _conv(
          weights, f"levels.{level}.downsample.conv", bias=False)
      params[f"level{level}_downsample_norm"] = import_timm.layernorm_params(
          weights, f"levels.{level}.downsample.norm.1")
  head_conv = weights.take("conv_head.0.weight")  # [D, C4, 1, 1]
  params["conv_head"] = {"kernel": head_conv[:, :, 0, 0].T}
  params["conv_head_bn"] = import_timm.layernorm_params(weights, "conv_head.1.0")
  batch_stats = {"conv_head_bn": {"mean": weights.take("conv_head.1.0.running_mean"),
                                  "var": weights.take("conv_head.1.0.running_var")}}
  if "conv_head.1.0.num_batches_tracked" in weights:
    weights.take("conv_head.1.0.num_batches_tracked")  # A counter with no use in eval mode.
  num_classes = 0
  if "head.weight" in weights:
    params["head"] = import_timm.linear_params(weights, "head")
    num_classes = int(params["head"]["kernel"].shape[1])
  weights.check_all_taken()

  found = _architecture(params, depths)
  cls_scale = found.pop("cls_scale")
  found["layer_scale"] = 1e-5 if found["layer_scale"] else 0.0  # Its init, not in the weights.
  if variant is None:
    kwargs: dict[str, Any] = dict(found, num_classes=num_classes,
                                  offset_scale=float(offset_scale or 1.0))
  else:
    want = internimage.Model(variant=variant).hparams()
    got = internimage.Model(**found).hparams()
    for field in ("widths", "depths", "groups", "mlp_ratio", "post_norm"):
      if got[field] != want[field]:
        raise ValueError(f"InternImage state dict has {field} {got[field]}, but variant "
                         f"{variant!r} has {want[field]}.")
    if bool(got["layer_scale"]) != bool(want["layer_scale"]):
      raise ValueError(f"InternImage state dict {'has' if got['layer_scale'] else 'lacks'} "
                       f"layer scale (gamma1/gamma2), unlike variant {variant!r}.")
    kwargs = dict(variant=variant, num_classes=num_classes)
    if offset_scale is not None:
      kwargs["offset_scale"] = float(offset_scale)
  if cls_scale != 1.5:
    kwargs["cls_scale"] = cls_scale
  return "internimage", kwargs, {"params": params, "batch_stats": batch_stats}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  model_name, kwargs, variables = convert(import_timm.read_state_dict(args.weights),
                                          args.variant, args.offset_scale)
  checkpointing.write_import(args.workdir, model_name, kwargs, variables)
  print(f"Wrote {model_name} {kwargs} to {os.path.abspath(args.workdir)}")


if __name__ == "__main__":
  flags.DEFINE_string("weights", None, "Official state dict as .safetensors or .npz.")
  flags.DEFINE_string("variant", None, "T, S, B, L or XL (checked against the weights); "
                      "omit for another size under the stacking rules.")
  flags.DEFINE_float("offset_scale", None, "DCNv3 offset scale, not held by the weights "
                     "(default: the variant's, else 1).")
  flags.DEFINE_string("workdir", None, "Output checkpoint directory (for init_from).")
  flags.mark_flags_as_required(["weights", "workdir"])
  app.run(main)
