"""Vision Transformer (Dosovitskiy et al. 2021), with parameter names as in big_vision.

`Model(num_classes=10, variant="S/16")(images)` -> (logits, aux). Images are NHWC float32.
Encoder pieces (`MultiHeadAttention`, `MlpBlock`, `Encoder1DBlock`, `Encoder`) take an
optional boolean attention mask so packed (NaViT) and memory-token models reuse them.
"""
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# size: (width, depth, mlp_dim, num_heads)
SIZES = {
    "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16), "G": (1664, 48, 8192, 16),
}
PATCHES = (8, 14, 16, 32)
POOL_TYPES = ("tok", "gap", "map", "none")
POSEMB_TYPES = ("learn", "sincos2d")
FINAL_NORMS = ("pre_pool", "post_pool")


def parse_variant(variant: str) -> dict[str, Any]:
  """"S/16" -> dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=(16, 16))."""
  size, _, patch = variant.partition("/")
  if size not in SIZES or not patch.isdigit() or int(patch) not in PATCHES:
    raise ValueError(f"Model field 'variant' must be <size>/<patch> with size in "
                     f"{', '.join(SIZES)} and patch in {', '.join(map(str, PATCHES))}; got "
                     f"{variant!r}.")
  width, depth, mlp_dim, num_heads = SIZES[size]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch_size=(int(patch), int(patch)))


def get_posemb_sincos2d(h: int, w: int, width: int, temperature: float = 10_000.0,
                        dtype: Any = jnp.float32) -> jax.Array:
  """Fixed 2-D sin-cos position embedding [1, h*w, width] (y then x, sin then cos)."""
  if width % 4:
    raise ValueError(f"sincos2d position embeddings need width divisible by 4, got {width}.")
  y, x = jnp.mgrid[:h, :w]
  omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4 - 1))
  y = y.reshape(-1)[:, None] * omega[None]  # [h*w, width/4]
  x = x.reshape(-1)[:, None] * omega[None]
  posemb = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return posemb[None].astype(dtype)


def resample_posemb(posemb: jax.Array | np.ndarray, new_hw: tuple[int, int],
                    method: str = "bilinear") -> jax.Array:
  """Resizes a square grid of position embeddings [1, N, D] to [1, h*w, D]."""
  n, d = posemb.shape[1:]
  side = int(round(np.sqrt(n)))
  if side * side != n:
    raise ValueError(f"Cannot resample position embeddings of {n} tokens: not a square grid.")
  grid = jnp.asarray(posemb).reshape(side, side, d)
  grid = jax.image.resize(grid, (*new_hw, d), method=method)
  return grid.reshape(1, new_hw[0] * new_hw[1], d)


class MultiHeadAttention(nn.Module):
  """Self- or cross-attention; fused `jax.nn.dot_product_attention` unless maps are needed."""
  num_heads: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array | None = None, mask: jax.Array | None = None,
               return_attention: bool = False) -> tuple[jax.Array, jax.Array | None]:
    kv = x if kv is None else kv
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}.")
    dense = lambda name: nn.DenseGeneral((self.num_heads, width // self.num_heads),
                                         name=name, kernel_init=nn.initializers.xavier_uniform())
    q = dense("query")(x)  # [B, Nq, H, Dh]
    k = dense("key")(kv)  # [B, Nk, H, Dh]
    v = dense("value")(kv)
    if return_attention:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)  # [B, Nq, H, Dh]
    else:
      if mask is not None:
        mask = jnp.broadcast_to(mask, (q.shape[0], self.num_heads, q.shape[1], k.shape[1]))
      out = jax.nn.dot_product_attention(q, k, v, mask=mask)
      weights = None
    out = nn.DenseGeneral(width, axis=(-2, -1), name="out",
                          kernel_init=nn.initializers.xavier_uniform())(out)
    return out, weights


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense."""
  mlp_dim: int
  dropout: float = 0.0
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    init = dict(kernel_init=nn.initializers.xavier_uniform(),
                bias_init=nn.initializers.normal(stddev=1e-6))
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, **init)(x)
    x = nn.gelu(x, approximate=self.gelu_approximate)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return nn.Dense(width, **init)(x)


def _drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0)


class Encoder1DBlock(nn.Module):
  """Pre-LN block: x + MHSA(LN(x)), then x + MLP(LN(x)), with dropout and drop-path."""
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  drop_path: float = 0.0
  gelu_approximate: bool = True
  layernorm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False,
               return_attention: bool = False) -> tuple[jax.Array, jax.Array | None]:
    def residual(x, y):
      y = nn.Dropout(self.dropout)(y, deterministic=not train)
      if train and self.drop_path > 0:
        y = _drop_path(y, self.drop_path, self.make_rng("dropout"))
      return x + y

    y = nn.LayerNorm(epsilon=self.layernorm_eps)(x)
    y, weights = MultiHeadAttention(self.num_heads, name="MultiHeadDotProductAttention_0")(
        y, mask=mask, return_attention=return_attention)
    x = residual(x, y)
    y = nn.LayerNorm(epsilon=self.layernorm_eps)(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.gelu_approximate)(y, train)
    return residual(x, y), weights


class Encoder(nn.Module):
  """Stack of `depth` blocks and a final LayerNorm (`encoder_norm`, optional)."""
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  drop_path: float = 0.0
  gelu_approximate: bool = True
  layernorm_eps: float = 1e-6
  final_norm: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False,
               return_attention: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    aux: dict[str, Any] = {"attention": []} if return_attention else {}
    for i in range(self.depth):
      rate = self.drop_path * i / max(self.depth - 1, 1)
      x, weights = Encoder1DBlock(
          self.mlp_dim, self.num_heads, self.dropout, rate, self.gelu_approximate,
          self.layernorm_eps, name=f"encoderblock_{i}")(x, mask, train, return_attention)
      aux[f"block{i:02d}"] = x
      if return_attention:
        aux["attention"].append(weights)
    if self.final_norm:
      x = nn.LayerNorm(epsilon=self.layernorm_eps, name="encoder_norm")(x)
    return x, aux


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens."""
  mlp_dim: int
  num_heads: int
  gelu_approximate: bool = True
  layernorm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    width = x.shape[-1]
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width), x.dtype)
    probe = jnp.tile(probe, (x.shape[0], 1, 1))  # [B, 1, D]
    y, _ = MultiHeadAttention(self.num_heads, name="MultiHeadDotProductAttention_0")(
        probe, x, mask=mask)
    z = nn.LayerNorm(epsilon=self.layernorm_eps)(y)
    y = y + MlpBlock(self.mlp_dim, gelu_approximate=self.gelu_approximate)(z)
    return y[:, 0]  # [B, D]


class Model(nn.Module):
  """ViT classifier; see the module docstring and SPEC "ViT"."""
  num_classes: int | None = None
  variant: str | None = None
  width: int = 768
  depth: int = 12
  mlp_dim: int | None = None
  num_heads: int = 12
  patch_size: Sequence[int] = (16, 16)
  posemb: str = "learn"
  pool_type: str = "gap"
  head_zeroinit: bool = True
  dropout: float = 0.0
  drop_path: float = 0.0
  final_norm: str = "pre_pool"
  gelu_approximate: bool = True
  layernorm_eps: float = 1e-6

  def __post_init__(self):
    for field, value, accepted in (("pool_type", self.pool_type, POOL_TYPES),
                                   ("posemb", self.posemb, POSEMB_TYPES),
                                   ("final_norm", self.final_norm, FINAL_NORMS)):
      if value not in accepted:
        raise ValueError(f"Model field {field!r} must be one of {', '.join(accepted)}, "
                         f"got {value!r}.")
    if self.variant is not None:
      parse_variant(self.variant)
    super().__post_init__()

  def hparams(self) -> dict[str, Any]:
    """width, depth, mlp_dim, num_heads and patch_size after applying `variant`."""
    h = dict(width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
             num_heads=self.num_heads, patch_size=tuple(self.patch_size))
    if self.variant is not None:
      h.update(parse_variant(self.variant))
    h["mlp_dim"] = h["mlp_dim"] or 4 * h["width"]
    return h

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               return_attention: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"ViT expects NHWC images [B, H, W, 3], got shape {images.shape}.")
    hp = self.hparams()
    width = hp["width"]
    aux: dict[str, Any] = {}
    x = nn.Conv(width, hp["patch_size"], strides=hp["patch_size"], padding="VALID",
                name="embedding")(images)  # [B, h, w, D]
    aux["stem"] = x
    b, h, w, _ = x.shape
    x = x.reshape(b, h * w, width)  # [B, N, D]
    if self.posemb == "learn":
      x = x + self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(width)),
                         (1, h * w, width), x.dtype)
    else:
      x = x + get_posemb_sincos2d(h, w, width, dtype=x.dtype)
    if self.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, width), x.dtype)
      x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)), x], axis=1)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    pre_pool_norm = self.final_norm == "pre_pool"
    x, encoder_aux = Encoder(
        hp["depth"], hp["mlp_dim"], hp["num_heads"], self.dropout, self.drop_path,
        self.gelu_approximate, self.layernorm_eps, final_norm=pre_pool_norm,
        name="Transformer")(x, train=train, return_attention=return_attention)
    aux.update(encoder_aux)
    aux["encoded"] = x
    if self.pool_type == "tok":
      x = x[:, 0]
    elif self.pool_type == "gap":
      x = x.mean(axis=1)
    elif self.pool_type == "map":
      x = MAPHead(hp["mlp_dim"], hp["num_heads"], self.gelu_approximate,
                  self.layernorm_eps)(x)
    if not pre_pool_norm:
      x = nn.LayerNorm(epsilon=self.layernorm_eps, name="fc_norm")(x)
    aux["pre_logits"] = x
    if self.num_classes:
      init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
      x = nn.Dense(self.num_classes, kernel_init=init, name="head")(x)
    aux["logits"] = x
    return x, aux


def load(init_params: Mapping[str, Any], loaded_params: Mapping[str, Any],
         model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """Adapts loaded params to the configured model: resamples `pos_embedding` if needed."""
  del model_kwargs
  params = dict(loaded_params)
  if "pos_embedding" in params and "pos_embedding" in init_params:
    old, new = params["pos_embedding"], init_params["pos_embedding"]
    if old.shape != new.shape:
      side = int(round(np.sqrt(new.shape[1])))
      if side * side != new.shape[1]:
        raise ValueError(f"Cannot resample position embeddings to {new.shape[1]} tokens: "
                         "not a square grid.")
      params["pos_embedding"] = np.asarray(resample_posemb(old, (side, side)))
  return params
