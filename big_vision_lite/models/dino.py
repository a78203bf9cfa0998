"""DINO (Caron et al. 2021): a backbone with the self-distillation projection head.

`Model(backbone_name="vit", backbone=dict(variant="S/16", pool_type="tok"), out_dim=65536)
.apply(variables, images)` -> (out [B, K], aux). The backbone is any registered model whose
aux holds a pooled feature "pre_logits" (ViT, NaViT, ConvNeXt V2, ...), built headless;
packed NaViT inputs pass through (`segment_ids`, `positions`, `image_sizes` keywords) and
give out [B, S, K], one row per image slot. The head (`DINOHead`): an MLP of `head_layers`
Dense layers (hidden `hidden_dim`, GELU) down to `bottleneck_dim`, L2 normalisation, then a
weight-normalised Dense without bias to `out_dim`, whose per-output norm is frozen to 1
(`norm_last_layer`, the paper's default) or learned (param `last_layer_scale`).

aux: the backbone's aux (for a ViT: "attention" on request, "encoded", ...), with
"pre_logits" = the backbone's pooled feature [B, D] (what k-NN and linear probes read).
Params: {"backbone": <the backbone model's params>, "head": {...}}, so a classifier of the
backbone's model fine-tunes from a DINO run (`init_from`; see `backbone`): it takes
`backbone/` of the run's teacher.
"""
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite import models

BACKBONE_KEY = "backbone"  # Params of the backbone model.
BACKBONE_FROM_EMA = True  # init_from a DINO run takes the teacher (the EMA params).
TRUNC_NORMAL = nn.initializers.truncated_normal(0.02)


def backbone(model_kwargs: Mapping[str, Any]) -> str:
  """The registered model name of the backbone of a DINO model with `model_kwargs`."""
  return model_kwargs.get("backbone_name", "vit")


class DINOHead(nn.Module):
  """features [..., D] -> [..., out_dim]: MLP, L2 normalisation, weight-normalised Dense."""
  out_dim: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  head_layers: int = 3
  norm_last_layer: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    widths = [self.hidden_dim] * (self.head_layers - 1) + [self.bottleneck_dim]
    for i, width in enumerate(widths):
      x = nn.Dense(width, kernel_init=TRUNC_NORMAL, name=f"mlp_{i}")(x)
      if i < len(widths) - 1:
        x = nn.gelu(x, approximate=False)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # [..., bottleneck]
    direction = self.param("last_layer_direction", nn.initializers.lecun_normal(),
                           (self.bottleneck_dim, self.out_dim), jnp.float32)
    kernel = direction / jnp.linalg.norm(direction, axis=0, keepdims=True)  # unit columns
    if not self.norm_last_layer:
      kernel = kernel * self.param("last_layer_scale", nn.initializers.ones, (self.out_dim,))
    return x @ kernel.astype(x.dtype)  # [..., out_dim]


class Model(nn.Module):
  """A registered backbone (headless) + `DINOHead`."""
  out_dim: int = 65536
  backbone_name: str = "vit"
  backbone: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  head_layers: int = 3
  norm_last_layer: bool = True

  def __post_init__(self):
    for field in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Model field {field!r} must be an int >= 1, got {value!r}.")
    if self.backbone_name == "dino":
      raise ValueError("Model field 'backbone_name' must name another model than 'dino'.")
    models.get(self.backbone_name)  # Unknown names list the known ones.
    if self.backbone.get("num_classes"):
      raise ValueError(f"Model field 'backbone.num_classes' must be unset or 0 (the backbone "
                       f"is headless; its pooled feature feeds the DINO head), got "
                       f"{self.backbone['num_classes']!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, **kwargs: Any
               ) -> tuple[jax.Array, dict[str, Any]]:
    """images [B, H, W, 3] (or a backbone's packed inputs) -> (out [B(, S), K], aux)."""
    model = models.get(self.backbone_name).Model(**dict(self.backbone, num_classes=0),
                                                 name=BACKBONE_KEY)
    _, aux = model(images, train=train, **kwargs)
    features = aux["pre_logits"]  # [B(, S), D]
    if images.ndim == 4 and features.ndim == 3:  # A packed model on plain images.
      features = features[:, 0]  # [B, D]
    out = DINOHead(self.out_dim, self.hidden_dim, self.bottleneck_dim, self.head_layers,
                   self.norm_last_layer, name="head")(features)
    return out, dict(aux, pre_logits=features)
