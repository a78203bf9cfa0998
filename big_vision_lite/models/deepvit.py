"""DeepViT (Zhou et al. 2021): a ViT whose attention is Re-Attention.

Re-Attention mixes the H softmax attention maps of a layer with a learnable H x H matrix
Θ (initialised at the identity plus small noise) and normalises the result over the head
axis (LayerNorm, `reattention_norm="layernorm"`) before it multiplies V:

  A = softmax(Q Kᵀ / √d)  [B, H, N, N];   A' = LN_heads(Θᵀ A);   out = A' V

so that deep stacks keep distinct attention maps per layer instead of collapsing to the
same one. `aux["attention"]` holds every layer's maps A' when `return_attention=True`.
Otherwise the model is ViT: patch embedding, learned or sin-cos position embeddings,
pre-LN blocks, `tok` or `gap` pooling, zero-init head, and the same `variant` names, with
`depth` overriding the variant's for the deep models (e.g. variant="S/16", depth=32).
`remat_policy` and `scan_layers` (one `nn.scan` over `encoderblock`, params with a leading
[depth] axis; checkpoints convert both ways) are ViT's.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models import layers
from big_vision_lite.models import vit

REATTENTION_NORMS = ("layernorm", "none")
POOL_TYPES = ("tok", "gap")
DEFAULT_DEPTH = 16  # With no variant: a deep S/16, where plain ViTs saturate.


class ReAttention(nn.Module):
  """Multi-head self-attention with head-mixed, head-normalised maps (parameter names as
  `layers.MultiHeadAttention`, plus `reattention_weights` [H, H] and `reattention_norm`)."""
  num_heads: int
  norm: str = "layernorm"
  init_noise: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, N, D] -> (out [B, N, D], re-attention maps [B, H, N, N])."""
    width, heads = x.shape[-1], self.num_heads
    dense = lambda name: nn.DenseGeneral((heads, width // heads), name=name,
                                         kernel_init=nn.initializers.xavier_uniform())
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)  # [B, N, H, Dh]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    attention = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [B, H, N, N]

    def near_identity(rng, shape, dtype):
      return jnp.eye(shape[0], dtype=dtype) + self.init_noise * jax.random.normal(
          rng, shape, dtype)

    theta = self.param("reattention_weights", near_identity, (heads, heads), jnp.float32)
    mixed = jnp.einsum("hg,bhqk->bgqk", theta, attention)  # Θᵀ A over heads
    if self.norm == "layernorm":
      mixed = nn.LayerNorm(epsilon=layers.FLAX_NORM_EPS, name="reattention_norm")(
          mixed.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # LN over the head axis
    out = jnp.einsum("bhqk,bkhd->bqhd", mixed.astype(v.dtype), v)  # [B, N, H, Dh]
    out = nn.DenseGeneral(width, axis=(-2, -1), name="out",
                          kernel_init=nn.initializers.xavier_uniform())(out)  # [B, N, D]
    return out, mixed


class Block(nn.Module):
  """Pre-LN: x + ReAttention(LN(x)), then x + MLP(LN(x)), with drop-path."""
  mlp_dim: int
  num_heads: int
  norm: str = "layernorm"
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               layer_drop_path: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [B, N, D] -> ([B, N, D], re-attention maps [B, H, N, N]); `layer_drop_path` (a
    scanned stack's per-layer rate, may be traced) replaces the field `drop_path` as the
    rate; drop-path is on when the field is > 0."""
    def residual(x, y):
      if train and self.drop_path > 0:
        rate = self.drop_path if layer_drop_path is None else layer_drop_path
        y = layers.stochastic_depth(y, rate, self.make_rng("dropout"))
      return x + y

    y, maps = ReAttention(self.num_heads, self.norm, name="ReAttention_0")(
        nn.LayerNorm(epsilon=layers.FLAX_NORM_EPS)(x))
    x = residual(x, y)
    y = nn.LayerNorm(epsilon=layers.FLAX_NORM_EPS)(x)
    x = residual(x, layers.MlpBlock(self.mlp_dim)(y, train))
    return x, maps


class Model(nn.Module):
  """DeepViT classifier; `variant` ("S/16", ...) as ViT's: fields given win over it."""
  num_classes: int | None = None
  variant: str | None = None
  width: int | None = None  # The sizes left None are the variant's, or S/16's at depth 16.
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  patch_size: int | None = None
  posemb: str = "learn"
  pool_type: str = "tok"
  reattention_norm: str = "layernorm"
  drop_path: float = 0.0
  head_zeroinit: bool = True
  remat_policy: str = "none"
  scan_layers: bool = False

  def __post_init__(self):
    layers.check_choice("posemb", self.posemb, vit.POSEMB_TYPES)
    layers.check_choice("pool_type", self.pool_type, POOL_TYPES)
    layers.check_choice("reattention_norm", self.reattention_norm, REATTENTION_NORMS)
    layers.check_choice("remat_policy", self.remat_policy, layers.REMAT_POLICIES)
    layers.check_choice("scan_layers", self.scan_layers, (False, True))
    vit.check_encoder_fields(self.hparams(), 0.0, self.drop_path)
    super().__post_init__()

  def hparams(self) -> dict[str, Any]:
    """width, depth, mlp_dim, num_heads, patch_size: the given fields over `variant`'s."""
    depth = DEFAULT_DEPTH if self.depth is None and self.variant is None else self.depth
    hp = vit.resolve_hparams(self.width, depth, self.mlp_dim, self.num_heads, self.patch_size,
                             self.variant, default_variant="S/16")
    patch = hp["patch_size"]
    hp["patch_size"] = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return hp

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               return_attention: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    """images [B, H, W, 3] -> (logits [B, C], aux)."""
    hp = self.hparams()
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"DeepViT expects NHWC images [B, H, W, 3], got {images.shape}.")
    x, _ = vit.embed_patches(self, images, hp["width"], hp["patch_size"], self.posemb,
                             self.pool_type == "tok")  # [B, (1+)N, D]
    aux: dict[str, Any] = {}
    depth = hp["depth"]
    block = layers.remat(Block, self.remat_policy, static_argnums=(2,))
    rates = layers.drop_path_rates(self.drop_path, depth)
    if self.scan_layers:
      def layer(module, x, rate):
        y, layer_maps = module(x, train, rate)
        return y, layer_maps if return_attention else None
      x, maps = nn.scan(
          layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          length=depth)(
              block(hp["mlp_dim"], hp["num_heads"], self.reattention_norm, self.drop_path,
                    name="encoderblock"),
              x, jnp.asarray(rates, jnp.float32))  # maps [depth, B, H, N, N] or None
      maps = None if maps is None else [maps[i] for i in range(depth)]
    else:
      maps = []
      for i, rate in enumerate(rates):
        x, layer_maps = block(hp["mlp_dim"], hp["num_heads"], self.reattention_norm, rate,
                              name=f"encoderblock_{i}")(x, train)
        maps.append(layer_maps)
    if return_attention:
      aux["attention"] = maps
    x = nn.LayerNorm(epsilon=layers.FLAX_NORM_EPS, name="encoder_norm")(x)
    x = x[:, 0] if self.pool_type == "tok" else x.mean(axis=1)  # [B, D]
    aux["pre_logits"] = x
    if self.num_classes:
      init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
      x = nn.Dense(self.num_classes, kernel_init=init, name="head")(x)  # [B, C]
    aux["logits"] = x
    return x, aux
