"""DETR (Carion et al. 2020): a CNN backbone, a transformer encoder-decoder, set prediction.

`Model(num_classes=C).apply(variables, images, train=False, pixel_mask=mask)` -> (out, aux),
images [B, S, S, 3] NHWC float32 padded (bottom/right) to a common size, `pixel_mask`
[B, S, S] bool (True on real pixels; None: no padding). As the official code:

  - backbone: any registered model (`backbone`, `backbone_kwargs`; by default a ResNet-50
    with frozen BatchNorm) built with `num_classes=0`; its feature map `aux[backbone_stage]`
    (by default its last "stage<n>") is projected to `hidden` channels by a 1x1 conv
    ("input_proj"). The backbone sees the padded images, as DETR's does;
  - the pixel mask is brought to the feature grid by nearest sampling (F.interpolate's
    `floor(i * S / h)`), and `sine_position_encoding` (PositionEmbeddingSine,
    normalize=True) is computed from it;
  - post-norm encoder layers ("encoder_layer<i>": self_attn, norm1, linear1, linear2,
    norm2), with the position encoding added to queries and keys at every layer and the
    padding's keys masked out of attention;
  - post-norm decoder layers ("decoder_layer<i>": self_attn, norm1, multihead_attn, norm2,
    linear1, linear2, norm3) on a zero target, with `num_queries` learned query position
    embeddings ("query_embed") added to the queries (and self-attention keys) at every
    layer, cross-attending to the memory plus its position encoding (padding masked);
    "decoder_norm" is applied to every layer's output;
  - heads shared by every decoder layer: "class_embed" Dense(C + 1) (index C is "no
    object") and "bbox_embed", a 3-layer ReLU MLP with a sigmoid giving (cx, cy, w, h) in
    [0, 1] relative to the unpadded image.

out = {"logits": [B, Q, C + 1], "boxes": [B, Q, 4]} from the last decoder layer; aux
"decoder_logits" [L, B, Q, C + 1] and "decoder_boxes" [L, B, Q, 4] hold every decoder
layer's (the auxiliary losses'; the last equals `out`), "features" the backbone map
[B, h, w, C_backbone] and "feature_mask" [B, h, w] (True = real). Dropout (`dropout`, on
attention weights, residual branches and the FFN hidden layer, as DETR) needs a "dropout"
rng in train mode; the backbone's BatchNorm statistics (if not frozen) need
`mutable=["batch_stats"]`.
"""
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite import models
from big_vision_lite.models import layers
from big_vision_lite.models import resnet

# Backbone kwargs when `backbone_kwargs` is None: DETR's ResNet-50 with frozen BatchNorm.
DEFAULT_BACKBONE_KWARGS: dict[str, dict[str, Any]] = {"resnet": dict(depth=50, frozen_bn=True)}
# init_from also takes a run or import (tools/import_timm.py) of a backbone: `load_backbone`.
LOADS_FROM = ("resnet", "convnext2", "internimage")
XAVIER = nn.initializers.xavier_uniform()  # DETR's transformer initialisation.
STAGE_KEY = re.compile(r"^stage(\d+)$")


def sine_position_encoding(mask: jax.Array, num_pos_feats: int, temperature: float = 10000.0,
                           scale: float = 2 * math.pi, eps: float = 1e-6) -> jax.Array:
  """DETR's PositionEmbeddingSine(normalize=True) of mask [B, H, W] (True = real pixel).

  The y and x embeddings are the cumulative counts of real positions down each column and
  along each row, divided by the column's / row's total and times `scale`; each gives
  `num_pos_feats` channels sin(e / t_0), cos(e / t_1), sin(e / t_2), ... with
  t_i = temperature ** (2 * (i // 2) / num_pos_feats). Returns [B, H, W, 2 * num_pos_feats]
  as (y channels, x channels).
  """
  not_padding = mask.astype(jnp.float32)
  y_embed = jnp.cumsum(not_padding, axis=1)  # [B, H, W]
  x_embed = jnp.cumsum(not_padding, axis=2)
  y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
  x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
  dim_t = temperature ** (2 * (jnp.arange(num_pos_feats) // 2) / num_pos_feats)  # [F]

  def encode(embed: jax.Array) -> jax.Array:
    angles = embed[..., None] / dim_t  # [B, H, W, F]
    return jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])],
                     axis=-1).reshape(angles.shape)

  return jnp.concatenate([encode(y_embed), encode(x_embed)], axis=-1)


def resize_mask_nearest(mask: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """mask [B, S_h, S_w] -> [B, h, w] by nearest sampling, F.interpolate(mode="nearest")'s
  source index floor(i * S / h)."""
  rows = np.minimum((np.arange(hw[0]) * (mask.shape[1] / hw[0])).astype(int), mask.shape[1] - 1)
  cols = np.minimum((np.arange(hw[1]) * (mask.shape[2] / hw[1])).astype(int), mask.shape[2] - 1)
  return mask[:, rows][:, :, cols]


def attention(name: str, num_heads: int, dropout: float, train: bool
              ) -> nn.MultiHeadDotProductAttention:
  """torch.nn.MultiheadAttention's computation: dropout on the attention weights."""
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads, dropout_rate=dropout, deterministic=not train,
      broadcast_dropout=False, kernel_init=XAVIER, name=name)


def feed_forward(x: jax.Array, mlp_dim: int, dropout: float, train: bool) -> jax.Array:
  """x [..., D] -> linear1 -> ReLU -> dropout -> linear2 -> [..., D], as submodules
  "linear1" and "linear2" of the calling (compact) layer; the residual's dropout is the
  caller's."""
  y = nn.relu(nn.Dense(mlp_dim, kernel_init=XAVIER, name="linear1")(x))
  y = nn.Dropout(dropout, deterministic=not train)(y)
  return nn.Dense(x.shape[-1], kernel_init=XAVIER, name="linear2")(y)


class EncoderLayer(nn.Module):
  """Post-norm encoder layer; queries and keys get the position encoding."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, src: jax.Array, pos: jax.Array, key_mask: jax.Array | None,
               train: bool = False) -> jax.Array:
    """src, pos [B, N, D], key_mask [B, 1, 1, N] (True = attend) or None -> [B, N, D]."""
    drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)
    q = src + pos
    y = attention("self_attn", self.num_heads, self.dropout, train)(q, q, src, mask=key_mask)
    src = nn.LayerNorm(epsilon=layers.TORCH_NORM_EPS, name="norm1")(src + drop(y))
    y = feed_forward(src, self.mlp_dim, self.dropout, train)
    return nn.LayerNorm(epsilon=layers.TORCH_NORM_EPS, name="norm2")(src + drop(y))


class DecoderLayer(nn.Module):
  """Post-norm decoder layer: self-attention, cross-attention to the memory, FFN."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, tgt: jax.Array, query_pos: jax.Array, memory: jax.Array, pos: jax.Array,
               memory_mask: jax.Array | None, train: bool = False) -> jax.Array:
    """tgt, query_pos [B, Q, D]; memory, pos [B, N, D]; memory_mask [B, 1, 1, N] or None
    -> [B, Q, D]."""
    drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)
    q = tgt + query_pos
    y = attention("self_attn", self.num_heads, self.dropout, train)(q, q, tgt)
    tgt = nn.LayerNorm(epsilon=layers.TORCH_NORM_EPS, name="norm1")(tgt + drop(y))
    y = attention("multihead_attn", self.num_heads, self.dropout, train)(
        tgt + query_pos, memory + pos, memory, mask=memory_mask)
    tgt = nn.LayerNorm(epsilon=layers.TORCH_NORM_EPS, name="norm2")(tgt + drop(y))
    y = feed_forward(tgt, self.mlp_dim, self.dropout, train)
    return nn.LayerNorm(epsilon=layers.TORCH_NORM_EPS, name="norm3")(tgt + drop(y))


class BoxMLP(nn.Module):
  """DETR's bbox_embed: Dense(D) -> ReLU -> Dense(D) -> ReLU -> Dense(4) ("layers_0..2")."""
  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> unnormalised boxes [..., 4] (the caller applies the sigmoid)."""
    x = nn.relu(nn.Dense(self.hidden, name="layers_0")(x))
    x = nn.relu(nn.Dense(self.hidden, name="layers_1")(x))
    return nn.Dense(4, name="layers_2")(x)


def _positive_int(field: str, value: Any, minimum: int = 1) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"Model field {field!r} must be an int >= {minimum}, got {value!r}.")


class Model(nn.Module):
  """DETR detector; see the module docstring."""
  num_classes: int = 91
  num_queries: int = 100
  hidden: int = 256
  num_heads: int = 8
  enc_layers: int = 6
  dec_layers: int = 6
  mlp_dim: int = 2048
  dropout: float = 0.1
  backbone: str = "resnet"
  # A mapping (dict or ConfigDict) of the backbone's fields; None: DEFAULT_BACKBONE_KWARGS.
  backbone_kwargs: Mapping[str, Any] | None = None
  backbone_stage: str | None = None  # aux key of the backbone's map; None: last "stage<n>".
  remat_policy: str = "none"  # Of the encoder and decoder layers: see `layers.remat`.

  def __post_init__(self):
    for field in ("num_classes", "num_queries", "hidden", "num_heads", "mlp_dim", "dec_layers"):
      _positive_int(field, getattr(self, field))
    _positive_int("enc_layers", self.enc_layers, minimum=0)
    if self.hidden % self.num_heads or self.hidden % 4:
      raise ValueError(f"Model field 'hidden' ({self.hidden}) must be a multiple of 4 (the "
                       f"sine encoding's sin/cos pairs for y and x) and of 'num_heads' "
                       f"({self.num_heads}).")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"Model field 'dropout' must be in [0, 1), got {self.dropout!r}.")
    layers.check_choice("remat_policy", self.remat_policy, layers.REMAT_POLICIES)
    layers.check_choice("backbone", self.backbone, [m for m in models.KNOWN if m != "detr"])
    if self.backbone_kwargs is not None and not hasattr(self.backbone_kwargs, "keys"):
      raise ValueError(f"Model field 'backbone_kwargs' must be a mapping of the backbone's "
                       f"Model fields or None, got {self.backbone_kwargs!r}.")
    if self.backbone_stage is not None and not isinstance(self.backbone_stage, str):
      raise ValueError(f"Model field 'backbone_stage' must be an aux key of the backbone "
                       f"(e.g. 'stage4') or None, got {self.backbone_stage!r}.")
    super().__post_init__()

  def backbone_model_kwargs(self) -> dict[str, Any]:
    """The backbone's Model kwargs (num_classes=0: no classifier head)."""
    kwargs = self.backbone_kwargs
    if kwargs is None:
      kwargs = DEFAULT_BACKBONE_KWARGS.get(self.backbone, {})
    return {**kwargs, "num_classes": 0}

  def _feature_map(self, aux: Mapping[str, Any]) -> jax.Array:
    if self.backbone_stage is not None:
      if self.backbone_stage not in aux:
        raise ValueError(f"Model field 'backbone_stage' {self.backbone_stage!r} is not an aux "
                         f"output of backbone {self.backbone!r}; it has: {', '.join(aux)}.")
      return aux[self.backbone_stage]
    stages = sorted((int(m.group(1)), k) for k in aux if (m := STAGE_KEY.match(k)))
    if not stages:
      raise ValueError(f"Backbone {self.backbone!r} has no 'stage<n>' feature map in its aux "
                       f"({', '.join(aux)}); set Model field 'backbone_stage'.")
    return aux[stages[-1][1]]

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               pixel_mask: jax.Array | None = None
               ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """images [B, S_h, S_w, 3], pixel_mask [B, S_h, S_w] bool or None -> (out, aux)."""
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"DETR expects float NHWC images [B, H, W, C], got {images.dtype} "
                       f"{images.shape}.")
    if pixel_mask is not None and pixel_mask.shape != images.shape[:3]:
      raise ValueError(f"pixel_mask must be [B, H, W] = {images.shape[:3]} like the images, "
                       f"got {pixel_mask.shape}.")
    backbone = models.get(self.backbone).Model(**self.backbone_model_kwargs(), name="backbone")
    _, backbone_aux = backbone(images, train=train)
    features = self._feature_map(backbone_aux)  # [B, h, w, C_backbone]
    batch, h, w, _ = features.shape
    if pixel_mask is None:
      mask = jnp.ones((batch, h, w), bool)
    else:
      mask = resize_mask_nearest(pixel_mask.astype(bool), (h, w))  # [B, h, w]
    pos = sine_position_encoding(mask, self.hidden // 2).reshape(batch, h * w, self.hidden)
    src = nn.Conv(self.hidden, (1, 1), name="input_proj")(features)  # [B, h, w, D]
    src = src.reshape(batch, h * w, self.hidden)
    key_mask = None if pixel_mask is None else mask.reshape(batch, 1, 1, h * w)

    encoder_layer = layers.remat(EncoderLayer, self.remat_policy, static_argnums=(4,))
    decoder_layer = layers.remat(DecoderLayer, self.remat_policy, static_argnums=(6,))
    for i in range(self.enc_layers):
      src = encoder_layer(self.num_heads, self.mlp_dim, self.dropout, name=f"encoder_layer{i}")(
          src, pos, key_mask, train)
    query_embed = self.param("query_embed", nn.initializers.normal(1.0),
                             (self.num_queries, self.hidden), jnp.float32)
    query_pos = jnp.broadcast_to(query_embed.astype(src.dtype),
                                 (batch, self.num_queries, self.hidden))
    tgt = jnp.zeros_like(query_pos)
    decoder_norm = nn.LayerNorm(epsilon=layers.TORCH_NORM_EPS, name="decoder_norm")
    hidden_states = []
    for i in range(self.dec_layers):
      tgt = decoder_layer(self.num_heads, self.mlp_dim, self.dropout, name=f"decoder_layer{i}")(
          tgt, query_pos, src, pos, key_mask, train)
      hidden_states.append(decoder_norm(tgt))
    hidden_states = jnp.stack(hidden_states)  # [L, B, Q, D]
    logits = nn.Dense(self.num_classes + 1, name="class_embed")(hidden_states)  # [L, B, Q, C+1]
    boxes = nn.sigmoid(BoxMLP(self.hidden, name="bbox_embed")(hidden_states))  # [L, B, Q, 4]
    out = {"logits": logits[-1], "boxes": boxes[-1]}
    aux = {"decoder_logits": logits, "decoder_boxes": boxes, "features": features,
           "feature_mask": mask}
    return out, aux


def load_backbone(init_variables: Mapping[str, Any], loaded_variables: Mapping[str, Any],
                  model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """The variables of a DETR (`model_kwargs`) whose backbone comes from a checkpoint of the
  backbone model alone (e.g. timm's ImageNet ResNet-50, imported): the checkpoint's
  collections without its classifier "head" go under "backbone", with the norms moved into
  "batch_stats" (`resnet.freeze_batch_norm`) when the DETR's backbone has `frozen_bn`;
  everything else keeps its `init_variables` value."""
  loaded = {collection: {k: v for k, v in values.items() if k != "head"}
            for collection, values in loaded_variables.items()}
  if Model(**model_kwargs).backbone_model_kwargs().get("frozen_bn"):
    loaded = resnet.freeze_batch_norm(loaded)
  return {collection: dict(values, backbone=loaded[collection])
          if collection in loaded and "backbone" in values else dict(values)
          for collection, values in init_variables.items()}
