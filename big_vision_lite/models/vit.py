"""Vision Transformer (Dosovitskiy et al. 2021), with parameter names as in big_vision.

`Model(num_classes=10, variant="S/16").apply(variables, images)` -> (logits, aux), images
NHWC float32. The encoder pieces (`Encoder1DBlock`, `Encoder`, and `layers`'
`MultiHeadAttention`, `MlpBlock`, `MAPHead`) take an optional boolean attention mask,
broadcastable to [B, heads, Nq, Nk], or (self-attention) `segment_ids` [B, N] that keep
each token within its segment through a fused kernel (`kernels.packed_attention`), so
packed (NaViT) and memory-token models reuse them.
"""
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models import layers

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
DEFAULT_VARIANT = "B/16"  # The sizes of fields that neither the kwargs nor `variant` give.
RESAMPLE_METHODS = ("nearest", "bilinear", "bicubic", "lanczos3", "lanczos5")


def check_encoder_fields(hp: Mapping[str, Any], dropout: float, drop_path: float) -> None:
  """Checks a transformer's hparams (width, num_heads) and its dropout rates."""
  if hp["width"] % hp["num_heads"]:
    raise ValueError(f"Model field 'width' ({hp['width']}) must be divisible by "
                     f"'num_heads' ({hp['num_heads']}).")
  for field, rate in (("dropout", dropout), ("drop_path", drop_path)):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"Model field {field!r} must be in [0, 1), got {rate!r}.")


def resolve_hparams(width: int | None, depth: int | None, mlp_dim: int | None,
                    num_heads: int | None, patch_size: Any, variant: str | None,
                    default_variant: str = DEFAULT_VARIANT) -> dict[str, Any]:
  """width, depth, mlp_dim, num_heads, patch_size: each field given (not None) wins over
  `variant`'s (e.g. "S/16"), or `default_variant`'s with no variant, as big_vision's
  `{**variant, **kwargs}`. With no variant, a given width without mlp_dim gets
  mlp_dim = 4 · width (with a variant, the variant's mlp_dim, as big_vision)."""
  hp = parse_variant(default_variant if variant is None else variant)
  given = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
               patch_size=patch_size)
  hp.update({field: value for field, value in given.items() if value is not None})
  if mlp_dim is None and width is not None and variant is None:
    hp["mlp_dim"] = 4 * width
  return hp


def embed_patches(module: nn.Module, images: jax.Array, width: int, patch: tuple[int, int],
                  posemb: str, class_token: bool, dtype_mm: str = "float32"
                  ) -> tuple[jax.Array, jax.Array]:
  """Patch embedding, position embedding and optional class token, as params of `module`
  (`embedding`, `pos_embedding`, `cls`); call from its compact method. Images of another
  grid than the learned table's get the table resampled (bicubic) to their grid.

  images [B, H, W, 3] -> (tokens [B, (1+)N, D], patch grid [B, h, w, D]).
  """
  grid = nn.Conv(width, patch, strides=patch, padding="VALID", dtype=dtype_mm,
                 name="embedding")(images.astype(dtype_mm))  # [B, h, w, D]
  b, h, w, _ = grid.shape
  x = grid.reshape(b, h * w, width)  # [B, N, D]
  if posemb == "learn" and module.has_variable("params", "pos_embedding") and (
      module.get_variable("params", "pos_embedding").shape[1] != h * w):
    # Another grid than the one initialised (e.g. DINO's local crops): bicubic resampling of
    # the square table, as the official DINO code and timm's dynamic image size do.
    stored = module.get_variable("params", "pos_embedding")  # [1, n, D]
    side = _square_side(stored.shape[1], "The model's pos_embedding")
    table = resample_posemb(stored, (h, w), method="bicubic", old_hw=(side, side))
  elif posemb == "learn":
    table = module.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(width)),
                         (1, h * w, width), jnp.float32)
  else:
    table = get_posemb_sincos2d(h, w, width)
  x = x + table.astype(x.dtype)  # [B, N, D]
  if class_token:
    cls = module.param("cls", nn.initializers.zeros, (1, 1, width), jnp.float32)
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)).astype(x.dtype), x], axis=1)  # [B, 1+N, D]
  return x, grid


def parse_variant(variant: str) -> dict[str, Any]:
  """"S/16" -> dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=(16, 16))."""
  size, _, patch = str(variant).partition("/")
  if size not in SIZES or not patch.isdigit() or int(patch) not in PATCHES:
    raise ValueError(f"Model field 'variant' must be <size>/<patch> with size in "
                     f"{', '.join(SIZES)} and patch in {', '.join(map(str, PATCHES))} "
                     f"(e.g. 'S/16'); got {variant!r}.")
  width, depth, mlp_dim, num_heads = SIZES[size]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch_size=(int(patch), int(patch)))


def get_posemb_sincos2d(h: int, w: int, width: int, temperature: float = 10_000.0,
                        dtype: Any = jnp.float32) -> jax.Array:
  """Fixed 2-D sin-cos position embedding [1, h*w, width]: sin(x), cos(x), sin(y), cos(y)."""
  if width % 4:
    raise ValueError(f"posemb 'sincos2d' needs a width divisible by 4, got {width}.")
  quarter = width // 4
  y, x = jnp.mgrid[:h, :w]
  omega = 1.0 / temperature ** (jnp.arange(quarter) / max(quarter - 1, 1))  # [D/4]
  y = y.reshape(-1)[:, None] * omega[None]  # [h*w, D/4]
  x = x.reshape(-1)[:, None] * omega[None]  # [h*w, D/4]
  posemb = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return posemb[None].astype(dtype)  # [1, h*w, D]


def _square_side(num_tokens: int, what: str, hint: str = "") -> int:
  side = int(round(np.sqrt(num_tokens)))
  if side * side != num_tokens:
    raise ValueError(f"{what} has {num_tokens} tokens, not a square grid, so its (h, w) "
                     f"cannot be inferred from the token count{hint}.")
  return side


def resample_posemb(posemb: jax.Array | np.ndarray, new_hw: tuple[int, int],
                    method: str = "bilinear",
                    old_hw: tuple[int, int] | None = None) -> jax.Array:
  """Resizes a grid of position embeddings [1, N, D] to [1, new_h*new_w, D].

  The old grid is `old_hw`, or square when not given.
  """
  if method not in RESAMPLE_METHODS:
    raise ValueError(f"resample_posemb 'method' must be one of {', '.join(RESAMPLE_METHODS)}; "
                     f"got {method!r}.")
  _, n, d = posemb.shape
  if old_hw is None:
    side = _square_side(n, "The position embedding", "; pass old_hw")
    old_hw = (side, side)
  if old_hw[0] * old_hw[1] != n:
    raise ValueError(f"old_hw={tuple(old_hw)} does not match {n} position embeddings.")
  grid = jnp.asarray(posemb).reshape(*old_hw, d)  # [h, w, D]
  if tuple(old_hw) != tuple(new_hw):
    grid = jax.image.resize(grid, (*new_hw, d), method=method)  # [new_h, new_w, D]
  return grid.reshape(1, new_hw[0] * new_hw[1], d)


class Encoder1DBlock(nn.Module):
  """Pre-LN block: x + MHSA(LN(x)), then x + MLP(LN(x)); dropout and drop-path on branches."""
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  drop_path: float = 0.0
  gelu_approximate: bool = True
  layernorm_eps: float = layers.FLAX_NORM_EPS
  dtype_mm: str = "float32"
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False,
               return_attention: bool = False, segment_ids: jax.Array | None = None,
               layer_drop_path: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """x [B, N, D] -> ([B, N, D], attention [B, heads, N, N] or None).

    `layer_drop_path` (a scanned encoder's per-layer rate, may be traced) replaces the field
    `drop_path` as the rate; drop-path is on when the field is > 0.
    """
    def residual(x, y):
      y = nn.Dropout(self.dropout)(y, deterministic=not train)
      if train and self.drop_path > 0:
        rate = self.drop_path if layer_drop_path is None else layer_drop_path
        y = layers.stochastic_depth(y, rate, self.make_rng("dropout"))
      return x + y

    x = nn.with_logical_constraint(x, layers.RESIDUAL_AXES)
    y = nn.LayerNorm(epsilon=self.layernorm_eps)(x)
    y, weights = layers.MultiHeadAttention(self.num_heads, self.dtype_mm, self.attention_impl,
                                    name="MultiHeadDotProductAttention_0")(
                                        y, mask=mask, return_attention=return_attention,
                                        segment_ids=segment_ids)
    x = residual(x, y)
    y = nn.LayerNorm(epsilon=self.layernorm_eps)(x)
    y = layers.MlpBlock(self.mlp_dim, self.dropout, self.gelu_approximate, self.dtype_mm)(y, train)
    return nn.with_logical_constraint(residual(x, y), layers.RESIDUAL_AXES), weights


class Encoder(nn.Module):
  """`depth` blocks, drop-path rising linearly from 0 to `drop_path`, then LayerNorm
  `encoder_norm` unless `final_norm` is False; `remat_policy` (see `remat`) trades the
  blocks' stored activations for recomputation. Blocks are `encoderblock_{i}`, or with
  `scan_layers` one `nn.scan` over `encoderblock` whose params have a leading [depth] axis
  (one compiled block: compile time independent of depth; `stack_layers` converts)."""
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  drop_path: float = 0.0
  gelu_approximate: bool = True
  layernorm_eps: float = layers.FLAX_NORM_EPS
  dtype_mm: str = "float32"
  final_norm: bool = True
  attention_impl: str = "auto"
  remat_policy: str = "none"
  scan_layers: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False,
               return_attention: bool = False, segment_ids: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, Any]]:
    """x [B, N, D] -> ([B, N, D], aux with "block{i:02d}" and, on request, "attention")."""
    aux: dict[str, Any] = {}
    block = layers.remat(Encoder1DBlock, self.remat_policy, static_argnums=(3, 4))
    rates = layers.drop_path_rates(self.drop_path, self.depth)
    if self.scan_layers:
      def layer(module, x, rate):
        y, weights = module(x, mask, train, return_attention, segment_ids, rate)
        return y, (y, weights)
      x, (outputs, maps) = nn.scan(
          layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          length=self.depth)(
              block(self.mlp_dim, self.num_heads, self.dropout, self.drop_path,
                    self.gelu_approximate, self.layernorm_eps, self.dtype_mm,
                    self.attention_impl, name="encoderblock"),
              x, jnp.asarray(rates, jnp.float32))  # outputs [depth, B, N, D]
      maps = [None if maps is None else maps[i] for i in range(self.depth)]
    else:
      outputs, maps = [], []
      for i, rate in enumerate(rates):
        x, weights = block(
            self.mlp_dim, self.num_heads, self.dropout, rate, self.gelu_approximate,
            self.layernorm_eps, self.dtype_mm, self.attention_impl, name=f"encoderblock_{i}")(
                x, mask, train, return_attention, segment_ids)
        outputs.append(x)
        maps.append(weights)
    for i in range(self.depth):
      aux[f"block{i:02d}"] = outputs[i]
    if return_attention:
      aux["attention"] = maps
    if self.final_norm:
      x = nn.LayerNorm(epsilon=self.layernorm_eps, name="encoder_norm")(x)
    return x, aux


class Model(nn.Module):
  """ViT classifier. `variant` ("S/16", ...) gives width/depth/mlp_dim/num_heads/patch_size
  where they are None; fields neither gives are B/16's (`resolve_hparams`)."""
  num_classes: int | None = None
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  patch_size: Sequence[int] | int | None = None
  posemb: str = "learn"
  pool_type: str = "gap"
  head_zeroinit: bool = True
  dropout: float = 0.0
  drop_path: float = 0.0
  final_norm: str = "pre_pool"
  gelu_approximate: bool = True
  layernorm_eps: float = layers.FLAX_NORM_EPS
  dtype_mm: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = False

  def __post_init__(self):
    layers.check_choice("pool_type", self.pool_type, POOL_TYPES)
    layers.check_choice("remat_policy", self.remat_policy, layers.REMAT_POLICIES)
    layers.check_choice("scan_layers", self.scan_layers, (False, True))
    layers.check_choice("posemb", self.posemb, POSEMB_TYPES)
    layers.check_choice("final_norm", self.final_norm, FINAL_NORMS)
    layers.check_choice("dtype_mm", self.dtype_mm, layers.DTYPES_MM)
    hp = self.hparams()
    if len(hp["patch_size"]) != 2:
      raise ValueError(f"Model field 'patch_size' must be (h, w), got {self.patch_size!r}.")
    check_encoder_fields(hp, self.dropout, self.drop_path)
    super().__post_init__()

  def hparams(self) -> dict[str, Any]:
    """width, depth, mlp_dim, num_heads and patch_size (h, w): the given fields over
    `variant`'s."""
    hp = resolve_hparams(self.width, self.depth, self.mlp_dim, self.num_heads,
                         self.patch_size, self.variant)
    patch = hp["patch_size"]
    hp["patch_size"] = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return hp

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               return_attention: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    """images [B, H, W, 3] -> (logits [B, C] ([B, N, C] for pool "none"), aux)."""
    hp = self.hparams()
    patch, width = hp["patch_size"], hp["width"]
    layers.check_images(images, "ViT", patch)
    aux: dict[str, Any] = {}
    x, aux["stem"] = embed_patches(self, images, width, patch, self.posemb,
                                   self.pool_type == "tok", self.dtype_mm)  # [B, (1+)N, D]
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    pre_pool = self.final_norm == "pre_pool"
    x, encoder_aux = Encoder(
        hp["depth"], hp["mlp_dim"], hp["num_heads"], self.dropout, self.drop_path,
        self.gelu_approximate, self.layernorm_eps, self.dtype_mm, final_norm=pre_pool,
        remat_policy=self.remat_policy, scan_layers=self.scan_layers, name="Transformer")(
            x, train=train, return_attention=return_attention)
    aux.update(encoder_aux)
    aux["encoded"] = x
    x = layers.pool_tokens(x, self.pool_type, hp["mlp_dim"], hp["num_heads"], self.gelu_approximate,
                    self.layernorm_eps, self.dtype_mm)  # [B, D] ([B, N, D] for "none")
    if not pre_pool:
      x = nn.LayerNorm(epsilon=self.layernorm_eps, name="fc_norm")(x)
    aux["pre_logits"] = x
    if self.num_classes:
      init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
      x = nn.Dense(self.num_classes, kernel_init=init, name="head")(x)  # [B, C]
    aux["logits"] = x
    return x, aux


def load(init_params: Mapping[str, Any], loaded_params: Mapping[str, Any],
         model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """Adapts loaded params to the model of `init_params`: resamples `pos_embedding`.

  Both grids are inferred from token counts and must be square when they differ.
  """
  del model_kwargs
  params = dict(loaded_params)
  if "pos_embedding" not in params or "pos_embedding" not in init_params:
    return params
  old, new = params["pos_embedding"], init_params["pos_embedding"]
  if old.shape == new.shape:
    return params
  if old.shape[2] != new.shape[2]:
    return params  # Another width: the caller's shape check names every mismatch.
  new_side = _square_side(new.shape[1], "The model's pos_embedding")
  old_side = _square_side(old.shape[1], "The checkpoint's pos_embedding")
  params["pos_embedding"] = np.asarray(
      resample_posemb(old, (new_side, new_side), old_hw=(old_side, old_side)),
      dtype=np.asarray(old).dtype)
  return params
