"""NaViT (Dehghani et al. 2023): a ViT over packed sequences of images at native size.

Packed input (from `big_vision_lite.input.packing`):

  logits, aux = Model(num_classes=10, variant="S/16").apply(
      variables, patches, segment_ids=segment_ids, positions=positions,
      image_sizes=image_sizes)          # -> logits [B, S, C], one row per image slot

with patches [B, L, p·p·3], segment_ids [B, L] (0 = padding), positions [B, L, 2] (y, x)
and image_sizes [B, S, 2] (h, w in patches; S = number of image slots). A token attends
only to tokens of its own image (`kernels.packed_attention`, no dense per-head mask), and
pooling (MAP or mean) sees only the image's own tokens, so an image's logits do not
depend on what it is packed with. Plain NHWC images also work, one image per row:
`Model(...).apply(variables, images)` -> logits [B, C], at any resolution.

Position embeddings are factorized: one embedding of y and one of x, summed or
concatenated, of the absolute patch index or of the fractional coordinate (index / side),
learned (a table of `max_grid` rows per axis; larger indices share the last row),
sin-cos, or learned Fourier features.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models import layers
from big_vision_lite.models import vit
from kernels import packed_attention

POSEMB_TYPES = ("learn", "sincos", "fourier")
POSEMB_COORDS = ("index", "fractional")
POSEMB_COMBINE = ("sum", "concat")
POOL_TYPES = ("map", "gap")


def image_inputs(images: jax.Array, patch: int) -> dict[str, jax.Array]:
  """One image per row: the packed inputs (patches, segment_ids, positions, image_sizes)."""
  b, height, width, _ = images.shape
  h, w = height // patch, width // patch
  ys, xs = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
  positions = jnp.stack([ys.ravel(), xs.ravel()], -1)  # [h·w, 2]
  return {"patches": layers.patchify(images, patch).reshape(b, h * w, -1),  # [B, h·w, p·p·3]
          "segment_ids": jnp.ones((b, h * w), jnp.int32),
          "positions": jnp.broadcast_to(positions, (b, h * w, 2)).astype(jnp.int32),
          "image_sizes": jnp.broadcast_to(jnp.asarray([[h, w]], jnp.int32), (b, 1, 2))}


def sincos_1d(coords: jax.Array, dim: int, temperature: float = 10_000.0) -> jax.Array:
  """coords [...] float -> [..., dim] sin-cos features (dim even)."""
  omega = 1.0 / temperature ** (jnp.arange(dim // 2, dtype=jnp.float32) / (dim // 2))
  angles = coords[..., None].astype(jnp.float32) * omega  # [..., dim / 2]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)


class FactorizedPosemb(nn.Module):
  """Separate y and x position embeddings, summed or concatenated -> [B, L, width]."""
  width: int
  kind: str = "learn"
  coords: str = "index"
  combine: str = "sum"
  max_grid: int = 64

  @nn.compact
  def __call__(self, positions: jax.Array, sizes: jax.Array) -> jax.Array:
    """positions [B, L, 2] int (y, x), sizes [B, L, 2] (h, w of each token's image)."""
    dim = self.width if self.combine == "sum" else self.width // 2
    parts = []
    for axis, name in enumerate("yx"):
      index = positions[..., axis].astype(jnp.float32)  # [B, L]
      if self.coords == "fractional":
        unit = index / jnp.maximum(sizes[..., axis], 1).astype(jnp.float32)  # [0, 1)
      else:
        unit = index / self.max_grid
      if self.kind == "learn":
        table = self.param(f"pos_embedding_{name}",
                           nn.initializers.normal(stddev=1 / np.sqrt(self.width)),
                           (self.max_grid, dim), jnp.float32)
        rows = jnp.clip(jnp.floor(unit * self.max_grid), 0, self.max_grid - 1)
        parts.append(table[rows.astype(jnp.int32)])  # [B, L, dim]
      elif self.kind == "sincos":
        parts.append(sincos_1d(unit * self.max_grid, dim))
      else:
        # Frequencies in cycles per unit, initially resolving about two patches.
        freqs = self.param(f"fourier_{name}", nn.initializers.normal(self.max_grid / 4),
                           (dim // 2,), jnp.float32)
        angles = 2 * np.pi * unit[..., None] * freqs  # [B, L, dim / 2]
        parts.append(jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], -1))
    return parts[0] + parts[1] if self.combine == "sum" else jnp.concatenate(parts, -1)


class Model(nn.Module):
  """NaViT classifier. `variant` ("S/16", ...) sets width/depth/mlp_dim/num_heads/patch."""
  num_classes: int | None = None
  variant: str | None = None  # Gives the sizes left None (B/16's without it).
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  patch_size: int | None = None
  posemb: str = "learn"
  posemb_coords: str = "fractional"
  posemb_combine: str = "sum"
  max_grid: int = 64
  pool_type: str = "map"
  head_zeroinit: bool = True
  dropout: float = 0.0
  drop_path: float = 0.0
  gelu_approximate: bool = True
  layernorm_eps: float = layers.FLAX_NORM_EPS
  dtype_mm: str = "float32"
  attention_impl: str = "auto"
  remat_policy: str = "none"
  scan_layers: bool = False

  def __post_init__(self):
    for field, accepted in (("posemb", POSEMB_TYPES), ("posemb_coords", POSEMB_COORDS),
                            ("posemb_combine", POSEMB_COMBINE), ("pool_type", POOL_TYPES),
                            ("dtype_mm", layers.DTYPES_MM),
                            ("attention_impl", packed_attention.IMPLS),
                            ("remat_policy", layers.REMAT_POLICIES),
                            ("scan_layers", (False, True))):
      layers.check_choice(field, getattr(self, field), accepted)
    hp = self.hparams()
    vit.check_encoder_fields(hp, self.dropout, self.drop_path)
    if hp["width"] % (4 if self.posemb_combine == "concat" else 2):
      raise ValueError(f"Model field 'width' ({hp['width']}) must be divisible by 4 with "
                       "posemb_combine='concat' (by 2 otherwise).")
    if not isinstance(self.max_grid, int) or self.max_grid < 1:
      raise ValueError(f"Model field 'max_grid' must be an int >= 1, got {self.max_grid!r}.")
    super().__post_init__()

  def hparams(self) -> dict[str, Any]:
    """width, depth, mlp_dim, num_heads and patch_size (an int): the given fields over
    `variant`'s."""
    hp = vit.resolve_hparams(self.width, self.depth, self.mlp_dim, self.num_heads,
                             self.patch_size, self.variant)
    patch = hp["patch_size"]
    if not isinstance(patch, int):
      if len(set(patch)) != 1:
        raise ValueError(f"Model field 'patch_size' must be square for NaViT, got {patch!r}.")
      hp["patch_size"] = int(patch[0])
    return hp

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, image_sizes: jax.Array | None = None,
               train: bool = False, return_attention: bool = False
               ) -> tuple[jax.Array, dict[str, Any]]:
    """Packed patches [B, L, p·p·3] -> logits [B, S, C]; images [B, H, W, 3] -> [B, C]."""
    hp = self.hparams()
    patch, width = hp["patch_size"], hp["width"]
    images_in = x.ndim == 4
    if images_in:
      if x.shape[-1] != 3 or x.shape[1] < patch or x.shape[2] < patch:
        raise ValueError(f"NaViT expects NHWC images [B, H, W, 3] of at least one {patch}px "
                         f"patch, got {x.shape}.")
      inputs = image_inputs(x, patch)
      x, segment_ids = inputs["patches"], inputs["segment_ids"]
      positions, image_sizes = inputs["positions"], inputs["image_sizes"]
    if x.ndim != 3 or x.shape[-1] != patch * patch * 3:
      raise ValueError(f"NaViT expects packed patches [B, L, {patch * patch * 3}] (patch "
                       f"{patch}) or images [B, H, W, 3]; got {x.shape}.")
    if segment_ids is None or positions is None or image_sizes is None:
      raise ValueError("Packed NaViT input needs segment_ids, positions and image_sizes "
                       "(see big_vision_lite.input.packing).")
    num_slots = image_sizes.shape[1]
    segment_ids = segment_ids.astype(jnp.int32)  # [B, L]
    slot = jnp.clip(segment_ids - 1, 0, num_slots - 1)  # [B, L]
    token_sizes = jnp.take_along_axis(image_sizes, slot[..., None], axis=1)  # [B, L, 2]
    aux: dict[str, Any] = {}

    x = nn.Dense(width, dtype=self.dtype_mm, name="embedding")(x.astype(self.dtype_mm))
    posemb = FactorizedPosemb(width, self.posemb, self.posemb_coords, self.posemb_combine,
                              self.max_grid, name="posemb")(positions, token_sizes)
    aux["posemb"] = posemb  # [B, L, D]
    x = x + posemb.astype(x.dtype)  # [B, L, D]
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x, encoder_aux = vit.Encoder(
        hp["depth"], hp["mlp_dim"], hp["num_heads"], self.dropout, self.drop_path,
        self.gelu_approximate, self.layernorm_eps, self.dtype_mm,
        attention_impl=self.attention_impl, remat_policy=self.remat_policy,
        scan_layers=self.scan_layers, name="Transformer")(
            x, train=train, return_attention=return_attention, segment_ids=segment_ids)
    aux.update(encoder_aux)
    aux["encoded"] = x

    members = segment_ids[:, None, :] == jnp.arange(1, num_slots + 1)[None, :, None]  # [B, S, L]
    if self.pool_type == "map":
      x = layers.MAPHead(hp["mlp_dim"], hp["num_heads"], self.gelu_approximate,
                      self.layernorm_eps, self.dtype_mm)(x, members[:, None], num_slots)
    else:
      counts = jnp.maximum(members.sum(-1, keepdims=True), 1).astype(x.dtype)  # [B, S, 1]
      x = jnp.einsum("bsl,bld->bsd", members.astype(x.dtype), x) / counts  # [B, S, D]
    aux["pre_logits"] = x  # [B, S, D]
    if self.num_classes:
      init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
      x = nn.Dense(self.num_classes, kernel_init=init, name="head")(x)  # [B, S, C]
    aux["logits"] = x
    return (x[:, 0] if images_in else x), aux
