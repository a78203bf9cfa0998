"""EfficientViT (Liu et al. CVPR 2023): memory-efficient ViT with cascaded group attention.

Layout as timm's `efficientvit_msra.py` (NHWC here), every conv followed by BatchNorm
(`layers.ConvBN`):

  stem: 4 x (3x3 conv stride 2 + BN), ReLU between them        [B, H/16, W/16, C0]
  stage 0: `depth[0]` sandwich blocks
  stage i > 0: subsample (DW conv + FFN, inverted-residual patch merging at stride 2 with
      squeeze-excite, DW conv + FFN), then `depth[i]` sandwich blocks
  head: global average pool, BatchNorm, Dense

A sandwich block is x += DWConv(x); x += FFN(x); x += Attention(x); x += DWConv(x);
x += FFN(x), with FFN = 1x1 conv (2x) -> ReLU -> 1x1 conv. The attention is cascaded group
attention: the channels are split into one group per head; head j attends on its split plus
the output of head j-1, with Q and K of `key_dim` channels (a depth-wise conv on Q), V as
wide as the split, and a learned bias per head for every |dy|, |dx| offset inside the
window. Maps larger than `window_size` attend within zero-padded local windows.
BatchNorm follows the house convention: batch statistics in training (updating the
"batch_stats" collection, momentum 0.9), running averages in eval.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models import layers

# variant: (embed_dim, depth, num_heads, kernels of the Q convs by head index)
VARIANTS = {
    "M0": ((64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5)),
    "M1": ((128, 144, 192), (1, 2, 3), (2, 3, 3), (7, 5, 3, 3)),
    "M2": ((128, 192, 224), (1, 2, 3), (4, 3, 2), (7, 5, 3, 3)),
    "M3": ((128, 240, 320), (1, 2, 3), (4, 3, 4), (5, 5, 5, 5)),
    "M4": ((128, 256, 384), (1, 2, 3), (4, 4, 4), (7, 5, 3, 3)),
    "M5": ((192, 288, 384), (1, 3, 4), (3, 3, 4), (7, 5, 3, 3)),
}
KEY_DIM = 16
WINDOW_SIZE = 7


def offset_index(window_h: int, window_w: int) -> np.ndarray:
  """[N, N] index |dy| * window_w + |dx| of every pair of the window's N = h*w tokens
  (row-major), i.e. the flat position of their offset in a [h, w] bias table."""
  ys, xs = np.meshgrid(np.arange(window_h), np.arange(window_w), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  return np.abs(ys[:, None] - ys[None]) * window_w + np.abs(xs[:, None] - xs[None])


class FFN(nn.Module):
  """1x1 ConvBN to `hidden` -> ReLU -> 1x1 ConvBN back (zero-initialised scale)."""
  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = nn.relu(layers.ConvBN(self.hidden, name="pw1")(x, train))
    return layers.ConvBN(x.shape[-1], zero_scale=True, name="pw2")(y, train)


class SqueezeExcite(nn.Module):
  """x * sigmoid(fc2(relu(fc1(mean over space)))), 1x1 convs with bias."""
  reduced: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = x.mean(axis=(1, 2), keepdims=True)  # [B, 1, 1, C]
    s = nn.relu(nn.Conv(self.reduced, (1, 1), name="fc1")(s))
    s = nn.Conv(x.shape[-1], (1, 1), name="fc2")(s)
    return x * jax.nn.sigmoid(s)


class PatchMerging(nn.Module):
  """Inverted residual at stride 2: 1x1 (4x) -> ReLU -> 3x3 DW stride 2 -> ReLU -> SE -> 1x1."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), features]."""
    hidden = 4 * x.shape[-1]
    x = nn.relu(layers.ConvBN(hidden, name="conv1")(x, train))
    x = nn.relu(layers.ConvBN(hidden, 3, strides=2, groups=hidden, name="conv2")(x, train))
    x = SqueezeExcite(layers.make_divisible(hidden * 0.25, round_limit=0.0), name="se")(x)
    return layers.ConvBN(self.features, name="conv3")(x, train)


class CascadedGroupAttention(nn.Module):
  """Cascaded group attention over all tokens of its input (one window per example).

  `cascade=False` is plain group attention (each head sees only its own split), for
  ablations. Each head's output is sown as intermediates "head{j}" [B, h, w, C/heads].
  Parameters: `qkv_{j}` (1x1 ConvBN to 2·key_dim + C/heads), `dw_{j}` (depth-wise ConvBN
  on Q), `attention_biases` [heads, h, w] indexed by (|dy|, |dx|), `proj` (ConvBN).
  """
  num_heads: int
  key_dim: int
  kernels: Sequence[int]
  cascade: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, h, w, C] -> [B, h, w, C]."""
    b, h, w, c = x.shape
    split = c // self.num_heads
    biases = self.param("attention_biases", nn.initializers.zeros, (self.num_heads, h, w))
    bias = biases.reshape(self.num_heads, h * w)[:, offset_index(h, w)]  # [heads, N, N]
    outputs = []
    for j in range(self.num_heads):
      feat = x[..., j * split:(j + 1) * split]  # [B, h, w, C/heads]
      if j and self.cascade:
        feat = feat + outputs[-1]
      qkv = layers.ConvBN(2 * self.key_dim + split, name=f"qkv_{j}")(feat, train)
      q, k, v = jnp.split(qkv, [self.key_dim, 2 * self.key_dim], axis=-1)
      q = layers.ConvBN(self.key_dim, self.kernels[j], groups=self.key_dim,
                        name=f"dw_{j}")(q, train)
      logits = jnp.einsum("bnd,bmd->bnm", q.reshape(b, h * w, -1), k.reshape(b, h * w, -1))
      attention = jax.nn.softmax(logits * self.key_dim ** -0.5 + bias[j], axis=-1)  # [B, N, N]
      out = jnp.einsum("bnm,bmd->bnd", attention, v.reshape(b, h * w, split))
      outputs.append(out.reshape(b, h, w, split))
      self.sow("intermediates", f"head{j}", outputs[-1])
    y = nn.relu(jnp.concatenate(outputs, axis=-1))  # [B, h, w, C]
    return layers.ConvBN(c, zero_scale=True, name="proj")(y, train)


class LocalWindowAttention(nn.Module):
  """Cascaded group attention within windows of min(window_size, side) tokens a side:
  the map is zero-padded at the bottom/right to whole windows and cropped after."""
  num_heads: int
  key_dim: int
  kernels: Sequence[int]
  window_size: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, H, W, C] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    wh, ww = min(self.window_size, h), min(self.window_size, w)
    attention = CascadedGroupAttention(self.num_heads, self.key_dim, self.kernels, name="attn")
    if (wh, ww) == (h, w):
      return attention(x, train)
    pad_h, pad_w = -h % wh, -w % ww
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    nh, nw = (h + pad_h) // wh, (w + pad_w) // ww
    x = x.reshape(b, nh, wh, nw, ww, c).transpose(0, 1, 3, 2, 4, 5)  # [B, nh, nw, wh, ww, C]
    x = attention(x.reshape(b * nh * nw, wh, ww, c), train)
    x = x.reshape(b, nh, nw, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)  # [B, nh, wh, nw, ww, C]
    return x.reshape(b, nh * wh, nw * ww, c)[:, :h, :w]


class SandwichBlock(nn.Module):
  """x += DW(x); x += FFN(x); x += windowed cascaded attention(x); x += DW(x); x += FFN(x)."""
  num_heads: int
  key_dim: int
  kernels: Sequence[int]
  window_size: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, H, W, C] -> [B, H, W, C]."""
    c = x.shape[-1]
    x = x + layers.ConvBN(c, 3, groups=c, zero_scale=True, name="dw0")(x, train)
    x = x + FFN(2 * c, name="ffn0")(x, train)
    x = x + LocalWindowAttention(self.num_heads, self.key_dim, self.kernels, self.window_size,
                                 name="mixer")(x, train)
    x = x + layers.ConvBN(c, 3, groups=c, zero_scale=True, name="dw1")(x, train)
    return x + FFN(2 * c, name="ffn1")(x, train)


class Subsample(nn.Module):
  """x += DW(x); x += FFN(x); patch merging (stride 2); x += DW(x); x += FFN(x)."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, H, W, Cin] -> [B, ceil(H/2), ceil(W/2), features]."""
    c = x.shape[-1]
    x = x + layers.ConvBN(c, 3, groups=c, name="res1_dw")(x, train)
    x = x + FFN(2 * c, name="res1_ffn")(x, train)
    x = PatchMerging(self.features, name="patch_merge")(x, train)
    x = x + layers.ConvBN(self.features, 3, groups=self.features, name="res2_dw")(x, train)
    return x + FFN(2 * self.features, name="res2_ffn")(x, train)


class Stem(nn.Module):
  """Overlapping patch embedding: `conv1`..`conv4`, 3x3 ConvBN stride 2 to width/8, /4, /2,
  width, with ReLU between them."""
  width: int

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images [B, H, W, 3] -> [B, H/16, W/16, width] (sides rounded up at each stride)."""
    x = images
    for i, features in enumerate((self.width // 8, self.width // 4, self.width // 2,
                                  self.width)):
      if i:
        x = nn.relu(x)
      x = layers.ConvBN(features, 3, strides=2, name=f"conv{i + 1}")(x, train)
    return x


class Stage(nn.Module):
  """Optional `downsample` (Subsample to `width`), then `block{j}` sandwich blocks."""
  width: int
  depth: int
  num_heads: int
  key_dim: int
  kernels: Sequence[int]
  window_size: int
  subsample: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, H, W, Cin] -> [B, H', W', width], H' = ceil(H/2) when subsampling."""
    if self.subsample:
      x = Subsample(self.width, name="downsample")(x, train)
    for j in range(self.depth):
      x = SandwichBlock(self.num_heads, self.key_dim, self.kernels, self.window_size,
                        name=f"block{j}")(x, train)
    return x


class Model(nn.Module):
  """EfficientViT classifier. `variant` (M0..M5) gives the per-stage fields; any field set
  explicitly (per-stage sequences of equal length) overrides the variant's."""
  num_classes: int | None = None
  variant: str = "M0"
  embed_dim: Sequence[int] | None = None
  depth: Sequence[int] | None = None
  num_heads: Sequence[int] | None = None
  key_dim: Sequence[int] | None = None  # Default 16 per stage.
  window_size: Sequence[int] | None = None  # Default 7 per stage.
  kernels: Sequence[int] | None = None  # Q conv kernel size of head j (all stages).

  def __post_init__(self):
    layers.check_choice("variant", self.variant, tuple(VARIANTS))
    hp = self.hparams()
    stages = len(hp["embed_dim"])
    for field in ("embed_dim", "depth", "num_heads", "key_dim", "window_size", "kernels"):
      if not hp[field] or any(not isinstance(v, int) or v < 1 for v in hp[field]):
        raise ValueError(f"Model field {field!r} must hold positive ints, got {hp[field]!r}.")
      if field != "kernels" and len(hp[field]) != stages:
        raise ValueError(f"Model field {field!r} must have one entry per stage ({stages}, as "
                         f"embed_dim), got {hp[field]!r}.")
    for width, heads in zip(hp["embed_dim"], hp["num_heads"]):
      if width % heads:
        raise ValueError(f"Model field 'embed_dim' ({width}) must be divisible by "
                         f"'num_heads' ({heads}) in every stage.")
    if hp["embed_dim"][0] < 8:
      raise ValueError(f"Model field 'embed_dim' must start at 8 or more (the stem widens "
                       f"by 8ths), got {hp['embed_dim']!r}.")
    if len(hp["kernels"]) < max(hp["num_heads"]):
      raise ValueError(f"Model field 'kernels' needs one size per head ({max(hp['num_heads'])})"
                       f", got {hp['kernels']!r}.")
    if any(k % 2 == 0 for k in hp["kernels"]):
      raise ValueError(f"Model field 'kernels' must hold odd sizes, got {hp['kernels']!r}.")
    super().__post_init__()

  def hparams(self) -> dict[str, tuple[int, ...]]:
    """Per-stage embed_dim, depth, num_heads, key_dim, window_size and kernels."""
    embed_dim, depth, num_heads, kernels = VARIANTS[self.variant]
    stages = len(self.embed_dim or embed_dim)
    hp = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads,
              key_dim=(KEY_DIM,) * stages, window_size=(WINDOW_SIZE,) * stages,
              kernels=kernels)
    for field in hp:
      value = getattr(self, field)
      if value is not None and not isinstance(value, Sequence):
        raise ValueError(f"Model field {field!r} must be a sequence (one entry per stage, or "
                         f"per head for 'kernels'), got {value!r}.")
      if value is not None:
        hp[field] = value
    return {field: tuple(value) for field, value in hp.items()}

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, Any]]:
    """images [B, H, W, 3] -> (logits [B, C] (pre-logits [B, D] if num_classes=0), aux with
    "stem" and "stage{i}" feature maps and "pre_logits")."""
    layers.check_images(images, "EfficientViT")
    hp = self.hparams()
    aux: dict[str, Any] = {}
    x = aux["stem"] = Stem(hp["embed_dim"][0], name="stem")(images, train)
    for i, width in enumerate(hp["embed_dim"]):
      x = Stage(width, hp["depth"][i], hp["num_heads"][i], hp["key_dim"][i], hp["kernels"],
                hp["window_size"][i], subsample=i > 0, name=f"stage{i}")(x, train)
      aux[f"stage{i}"] = x  # [B, H/2^(4+i), W/2^(4+i), C_i]
    x = x.mean(axis=(1, 2))  # [B, D]
    aux["pre_logits"] = x
    if self.num_classes:
      x = layers.batch_norm(train, name="head_norm")(x)
      x = nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(0.02),
                   name="head")(x)  # [B, C]
    aux["logits"] = x
    return x, aux
