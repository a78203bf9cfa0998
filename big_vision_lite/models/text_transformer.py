"""Text transformer: the text tower of image-text models (CLIP, SigLIP, LiT).

`Model(vocab_size=..., width=..., depth=..., num_heads=..., max_len=...).apply(variables,
tokens)` -> (out, aux) with tokens [B, L] int32 (0 = padding, L <= max_len), out [B, D]
(D = num_classes when > 0, a linear "head"; else width) and aux["pre_logits"] [B, width].

Token embedding plus a learned position embedding, then the pre-LN encoder of `vit`
(blocks `Transformer/encoderblock_{i}`, final LayerNorm `Transformer/encoder_norm`).
Padding tokens are masked out of attention as keys; `causal=True` also hides later tokens
(CLIP). Pooling: "last" the last non-padding token (CLIP's EOS), "first" the first token,
"gap" the mean over non-padding tokens, "map" attention pooling (`layers.MAPHead`) over them.
So appending padding never changes the output. `variant` ("S", "B", ... of `vit.SIZES`)
fills width, depth, mlp_dim and num_heads where they are left None.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models import layers
from big_vision_lite.models import vit

POOL_TYPES = ("last", "first", "gap", "map")
PAD_ID = 0
DEFAULT_SIZE = "B"  # Sizes left None without a variant.


def pool_index(valid: jax.Array) -> jax.Array:
  """valid [B, L] bool -> [B] int32 index of each row's last valid token (0 if none)."""
  positions = jnp.arange(valid.shape[1], dtype=jnp.int32)
  return jnp.max(jnp.where(valid, positions, 0), axis=1)


class Model(nn.Module):
  """Text encoder of int32 tokens [B, L] -> (out [B, D], aux); see the module docstring."""
  vocab_size: int = 32_000
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  max_len: int = 64
  pool_type: str = "last"
  causal: bool = False
  num_classes: int | None = 0
  head_zeroinit: bool = False
  dropout: float = 0.0
  gelu_approximate: bool = True
  layernorm_eps: float = layers.FLAX_NORM_EPS
  dtype_mm: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = False

  def __post_init__(self):
    layers.check_choice("pool_type", self.pool_type, POOL_TYPES)
    layers.check_choice("dtype_mm", self.dtype_mm, layers.DTYPES_MM)
    layers.check_choice("causal", self.causal, (False, True))
    layers.check_choice("remat_policy", self.remat_policy, layers.REMAT_POLICIES)
    layers.check_choice("scan_layers", self.scan_layers, (False, True))
    for field in ("vocab_size", "max_len"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Model field {field!r} must be an int >= 1, got {value!r}.")
    if self.num_classes is not None and (isinstance(self.num_classes, bool) or not isinstance(
        self.num_classes, int) or self.num_classes < 0):
      raise ValueError(f"Model field 'num_classes' must be an int >= 0 (0 or None: no head), "
                       f"got {self.num_classes!r}.")
    vit.check_encoder_fields(self.hparams(), self.dropout, 0.0)
    super().__post_init__()

  def hparams(self) -> dict[str, int]:
    """width, depth, mlp_dim and num_heads: the explicit fields, else the `variant`'s sizes
    (default "B"); mlp_dim defaults to 4 · width."""
    size = DEFAULT_SIZE if self.variant is None else self.variant
    if size not in vit.SIZES:
      raise ValueError(f"Model field 'variant' must be one of {', '.join(vit.SIZES)} or None; "
                       f"got {self.variant!r}.")
    width, depth, mlp_dim, num_heads = vit.SIZES[size]
    hp = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
    explicit = dict(width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
                    num_heads=self.num_heads)
    hp.update({k: v for k, v in explicit.items() if v is not None})
    if self.mlp_dim is None and self.width is not None:
      hp["mlp_dim"] = 4 * hp["width"]
    return hp

  def check_tokens(self, tokens: jax.Array) -> None:
    """Raises a ValueError unless `tokens` are integer [B, L] with L <= max_len."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"The text transformer expects integer tokens [B, L], got "
                       f"{tokens.dtype} {tokens.shape}.")
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"Tokens of length {tokens.shape[1]} exceed Model field 'max_len' "
                       f"({self.max_len}).")

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False,
               return_attention: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    """tokens [B, L] int -> (out [B, D], aux with "pre_logits" [B, width], "encoded", ...)."""
    self.check_tokens(tokens)
    hp = self.hparams()
    width, length = hp["width"], tokens.shape[1]
    valid = tokens != PAD_ID  # [B, L]
    x = nn.Embed(self.vocab_size, width, name="embedding")(tokens)  # [B, L, D]
    posemb = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(width)),
                        (1, self.max_len, width), jnp.float32)
    x = x + posemb[:, :length]  # [B, L, D]
    x = nn.Dropout(self.dropout)(x, deterministic=not train)

    mask = valid[:, None, None, :]  # [B, 1, 1, L]: padding is never a key.
    if self.causal:
      mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]  # [B, 1, L, L]
    x, aux = vit.Encoder(hp["depth"], hp["mlp_dim"], hp["num_heads"], self.dropout,
                         gelu_approximate=self.gelu_approximate,
                         layernorm_eps=self.layernorm_eps, dtype_mm=self.dtype_mm,
                         remat_policy=self.remat_policy, scan_layers=self.scan_layers,
                         name="Transformer")(
                             x, mask, train, return_attention)
    aux["encoded"] = x  # [B, L, D]

    if self.pool_type == "last":
      x = jnp.take_along_axis(x, pool_index(valid)[:, None, None], axis=1)[:, 0]  # [B, D]
    elif self.pool_type == "first":
      x = x[:, 0]
    elif self.pool_type == "gap":
      weights = valid.astype(x.dtype)  # [B, L]
      x = jnp.einsum("bl,bld->bd", weights, x) / jnp.maximum(weights.sum(1, keepdims=True), 1)
    else:
      x = layers.MAPHead(hp["mlp_dim"], hp["num_heads"], self.gelu_approximate,
                      self.layernorm_eps, self.dtype_mm)(x, mask=valid[:, None, None, :])
    aux["pre_logits"] = x  # [B, width]
    if self.num_classes:
      init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
      x = nn.Dense(self.num_classes, kernel_init=init, dtype=self.dtype_mm, name="head")(x)
    aux["logits"] = x
    return x, aux

