r"""NaViT benchmark: packing padding, packed train-step speed, masking cost, token dropping.

  python -m benchmarks.navit --width 192 --depth 4 --heads 3 --seq_len 512 --patch 16 \
      --rows 4 --images 3000 --steps 20

Image sizes only (no pixels are needed to pack): the side of the equal-area square is
uniform in [min_side, max_side] px, the aspect ratio log-uniform in
[1 / --max_aspect, --max_aspect], and an image of more than seq_len tokens is resized down
to fit, as `packing.grid_size(..., max_tokens=seq_len)` does.

  (a) For each `seq_len:min_side:max_side` of --padding (by default rows of 256 tokens
      with sides of 64..256 px, the NaViT paper's setting, and rows of 512 and 1024 tokens
      with sides of 64..384 px), packs --images images with `packing.Packer` as training
      does (its default best-fit decreasing; the same images with first-fit decreasing
      from the oldest image, the packer before; and the default with token dropping).
      Rows still packed once the stream runs out, which are emptier, are left out. Reports
      the padding fraction of the tokens and the images per row, against the baseline of
      one image per row padded to seq_len.
  (b) At --seq_len with sides of --min_side..--max_side px, times a training step,
      jit(value_and_grad) of a softmax cross-entropy w.r.t. the params, forward and
      backward, of --rows rows with random pixels, for: NaViT on packed rows; the same
      NaViT and shapes with every token in one segment; a plain `vit.Model` (no mask) on
      square images of seq_len tokens with the same pooling; and the segment-masked
      attention op alone against unmasked attention. "Padded" is one image per row padded
      to seq_len: the plain ViT's step time, with only that image's real tokens counted.
      Image and token counts per row come from (a) at the same setting.
  (c) The same NaViT on packed rows whose images drop a beta-distributed fraction of their
      tokens (`packing.tokenize(..., token_drop=...)`) against no dropping.

The steps of all variants are interleaved, after compilation and --warmup untimed steps,
and each variant's median over --steps is reported, so all ratios come from one run.
"""
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from benchmarks import timing
from big_vision_lite import utils
from big_vision_lite.input import packing
from big_vision_lite.models import navit, vit
from kernels import packed_attention

flags.DEFINE_integer("width", 192, "Model width.")
flags.DEFINE_integer("depth", 4, "Number of encoder blocks.")
flags.DEFINE_integer("heads", 3, "Attention heads.")
flags.DEFINE_integer("mlp_dim", 0, "MLP hidden size (0: 4 x width).")
flags.DEFINE_integer("classes", 1000, "Number of classes of the head.")
flags.DEFINE_enum("pool", "gap", navit.POOL_TYPES, "NaViT pooling (the plain ViT uses gap "
                  "or map to match).")
flags.DEFINE_enum("attention_impl", "auto", packed_attention.IMPLS, "NaViT attention.")
flags.DEFINE_integer("seq_len", 512, "Tokens per packed row.")
flags.DEFINE_integer("patch", 16, "Patch size in pixels.")
flags.DEFINE_integer("max_images", 16, "Image slots per packed row.")
flags.DEFINE_integer("buffer", packing.DEFAULT_BUFFER_SIZE, "Packer pool size.")
flags.DEFINE_integer("rows", 4, "Rows per timed batch.")
flags.DEFINE_integer("images", 3000, "Images packed for the statistics of (a) and (c).")
flags.DEFINE_float("min_side", 64, "Smallest side of the equal-area square, in px (b, c).")
flags.DEFINE_float("max_side", 384, "Largest side of the equal-area square, in px (b, c).")
flags.DEFINE_list("padding", ["256:64:256", "512:64:384", "1024:64:384"],
                  "seq_len:min_side:max_side of each padding measurement of (a).")
flags.DEFINE_float("max_aspect", 2.0, "Aspect ratios are log-uniform in [1/this, this].")
flags.DEFINE_float("drop_a", 1.0, "Token drop rate ~ beta(drop_a, drop_b) ...")
flags.DEFINE_float("drop_b", 3.0, "... scaled to [0, drop_max].")
flags.DEFINE_float("drop_max", 0.5, "Largest token drop rate.")
flags.DEFINE_integer("steps", 20, "Timed steps per variant.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per variant after compilation.")
flags.DEFINE_integer("seed", 0, "Seed of sizes, pixels, drops and parameters.")

FLAGS = flags.FLAGS
PACKED_INPUTS = ("segment_ids", "positions", "image_sizes")


Setting = tuple[int, float, float]  # seq_len, min_side, max_side


def sample_sizes(num: int, rng: np.random.Generator, setting: Setting) -> list[tuple[int, int]]:
  """Grids (h, w) in patches of `num` random images, each at most seq_len tokens."""
  seq_len, min_side, max_side = setting
  sides = rng.uniform(min_side, max_side, num)
  log_aspects = rng.uniform(-math.log(FLAGS.max_aspect), math.log(FLAGS.max_aspect), num)
  return [packing.grid_size(max(1, round(side * math.exp(-a / 2))),
                            max(1, round(side * math.exp(a / 2))), FLAGS.patch,
                            max_tokens=seq_len)
          for side, a in zip(sides, log_aspects)]


def tokenized(sizes: Iterable[tuple[int, int]], rng: np.random.Generator, seq_len: int, *,
              pixels: bool, token_drop: Mapping[str, Any] | None) -> Iterator[dict[str, Any]]:
  """Tokens of images of the given grids: random pixels in [-1, 1], or zeros."""
  for index, (h, w) in enumerate(sizes):
    shape = (h * FLAGS.patch, w * FLAGS.patch, 3)
    image = rng.uniform(-1, 1, shape).astype(np.float32) if pixels else np.zeros(shape, np.uint8)
    example = {"image": image, "label": index % FLAGS.classes}
    yield packing.tokenize(example, FLAGS.patch, max_tokens=seq_len, token_drop=token_drop,
                           rng=rng)


def packed_rows(images: Iterable[dict[str, Any]], seq_len: int, limit: int | None = None,
                **packer_options: Any) -> list[dict[str, np.ndarray]]:
  """Rows packed while the Packer's pool is full (the final flush is left out)."""
  packer = packing.Packer(seq_len, FLAGS.max_images, FLAGS.buffer, **packer_options)
  rows = []
  for index, image in enumerate(images):
    packer.add(index, image)
    while packer.full and (limit is None or len(rows) < limit):
      rows.append(packer.emit())
    if limit is not None and len(rows) == limit:
      break
  return rows


def packing_stats(rows: list[dict[str, np.ndarray]], seq_len: int) -> dict[str, float]:
  """Padding fraction, images and real tokens per row, and the one-image-per-row baseline."""
  real = float(sum((row["segment_ids"] > 0).sum() for row in rows))
  images = float(sum(row["label_mask"].sum() for row in rows))
  return {"rows": len(rows), "images": images,
          "padding": 1.0 - real / (len(rows) * seq_len),
          "images_per_row": images / len(rows), "tokens_per_row": real / len(rows),
          "tokens_per_image": real / images,
          "baseline_padding": 1.0 - real / (images * seq_len)}


# Packer options by name; first-fit decreasing from the oldest image is the packer before.
PACKERS = {"best-fit decreasing (default)": lambda seq_len: {},
           "first-fit decreasing, oldest first": lambda seq_len: dict(fill_slack=seq_len,
                                                                      max_wait=0)}
DEFAULT_PACKER = "best-fit decreasing (default)"


def padding_of(setting: Setting, packer: str, drop: Mapping[str, Any] | None
               ) -> dict[str, float]:
  """`packing_stats` of --images images of `setting` (the same sizes for every packer)."""
  rng = np.random.default_rng([FLAGS.seed, *map(int, setting)])
  sizes = sample_sizes(FLAGS.images, rng, setting)
  options = PACKERS[packer](setting[0])
  images = tokenized(sizes, rng, setting[0], pixels=False, token_drop=drop)
  return packing_stats(packed_rows(images, setting[0], **options), setting[0])


def xent(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the entries where `mask` is True."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1)


def train_step(loss: Callable[..., jax.Array]) -> Callable[..., Any]:
  """jit of (params, batch) -> (loss, grads)."""
  return jax.jit(jax.value_and_grad(loss))


def square_grid(tokens: int) -> tuple[int, int]:
  """(h, w) with h * w == tokens and h the largest divisor <= sqrt(tokens)."""
  h = max(d for d in range(1, math.isqrt(tokens) + 1) if tokens % d == 0)
  return h, tokens // h


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int = 1) -> None:
  """Columns aligned: the first `left` to the left, the others to the right."""
  widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
  line = lambda r: "  ".join(c.ljust(w) if i < left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
  print(line(header))
  print("  ".join("-" * w for w in widths))
  for row in rows:
    print(line(row))


def main(argv: list[str]) -> None:
  del argv
  rng = np.random.default_rng(FLAGS.seed)
  drop = {"dist": "beta", "a": FLAGS.drop_a, "b": FLAGS.drop_b, "low": 0.0,
          "high": FLAGS.drop_max}
  seq_len, batch_rows = FLAGS.seq_len, FLAGS.rows
  device = jax.devices()[0]
  print(f"device: {len(jax.devices())} x {device.device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__}")
  print(f"images: aspect log-U(1:{FLAGS.max_aspect:g}, {FLAGS.max_aspect:g}:1), {FLAGS.patch} px "
        f"patches, <= seq_len tokens; token drop beta(a={FLAGS.drop_a:g}, b={FLAGS.drop_b:g}) "
        f"x {FLAGS.drop_max:g}")
  print(f"packing: max_images {FLAGS.max_images}, buffer {FLAGS.buffer}; best-fit decreasing "
        f"with fill slack {packing.FILL_SLACK} and max wait 4 x buffer")

  # (a) Padding of each setting: both packers on one stream of sizes, and token dropping.
  settings = [tuple(kind(value) for kind, value in zip((int, float, float), item.split(":")))
              for item in FLAGS.padding]
  measured = {}  # (setting, packer, token drop) -> packing_stats
  table = []
  for setting in settings:
    for name, token_drop in [(name, None) for name in PACKERS] + [(DEFAULT_PACKER, drop)]:
      stats = measured[setting, name, bool(token_drop)] = padding_of(setting, name, token_drop)
      label = name.replace(" (default)", "") + (", token drop" if token_drop else "")
      table.append((f"{setting[0]}", f"{setting[1]:g}..{setting[2]:g}", label,
                    f"{stats['rows']}", f"{stats['images_per_row']:.2f}",
                    f"{stats['tokens_per_image']:.1f}", f"{stats['padding']:.2%}",
                    f"{stats['baseline_padding']:.1%}"))
  print(f"\n(a) padding, {FLAGS.images} images per setting, equal-area side uniform in "
        "'sides' (final flush rows excluded)")
  print_table(("seq_len", "sides px", "packer", "rows", "images/row", "tokens/image",
               "padding", "padded alone"), table, left=3)
  timed = (seq_len, FLAGS.min_side, FLAGS.max_side)
  stats = {name: measured.get((timed, DEFAULT_PACKER, dropped))
           or padding_of(timed, DEFAULT_PACKER, drop if dropped else None)
           for name, dropped in (("no drop", False), ("token drop", True))}
  print(f"\n(b, c) at seq_len {seq_len}, sides {FLAGS.min_side:g}..{FLAGS.max_side:g} px: "
        f"padding {stats['no drop']['padding']:.2%}, images/row "
        f"{stats['no drop']['images_per_row']:.2f} ({stats['token drop']['images_per_row']:.2f} "
        "with token drop)")

  # (b), (c) Timed batches of random pixels.
  def batch_of(token_drop: Mapping[str, Any] | None) -> dict[str, jax.Array]:
    sizes = sample_sizes(10 * (FLAGS.buffer + batch_rows), rng, timed)
    images = tokenized(sizes, rng, seq_len, pixels=True, token_drop=token_drop)
    return jax.device_put(packing.stack(packed_rows(images, seq_len, batch_rows)))

  packed, dropped = batch_of(None), batch_of(drop)
  one_segment = dict(packed, segment_ids=jnp.ones_like(packed["segment_ids"]))
  grid = square_grid(seq_len)
  images = jax.device_put(rng.uniform(-1, 1, (batch_rows, grid[0] * FLAGS.patch,
                                              grid[1] * FLAGS.patch, 3)).astype(np.float32))
  labels = jax.device_put(np.arange(batch_rows) % FLAGS.classes)

  hparams = {"num_classes": FLAGS.classes, "width": FLAGS.width, "depth": FLAGS.depth,
             "mlp_dim": FLAGS.mlp_dim or 4 * FLAGS.width, "num_heads": FLAGS.heads}
  navit_model = navit.Model(**hparams, patch_size=FLAGS.patch, pool_type=FLAGS.pool,
                            attention_impl=FLAGS.attention_impl, head_zeroinit=False)
  vit_model = vit.Model(**hparams, patch_size=(FLAGS.patch, FLAGS.patch),
                        pool_type=FLAGS.pool, head_zeroinit=False)
  key = jax.random.key(FLAGS.seed)
  navit_params = navit_model.init(key, packed["patches"],
                                  **{k: packed[k] for k in PACKED_INPUTS})["params"]
  vit_params = vit_model.init(key, images)["params"]

  def navit_loss(params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    logits, _ = navit_model.apply({"params": params}, batch["patches"],
                                  **{k: batch[k] for k in PACKED_INPUTS})  # [B, S, C]
    return xent(logits, batch["labels"], batch["label_mask"])

  def vit_loss(params: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
    logits, _ = vit_model.apply({"params": params}, images)  # [B, C]
    return xent(logits, labels, jnp.ones_like(labels, bool))

  head_dim = FLAGS.width // FLAGS.heads
  qkv = [jax.random.normal(k, (batch_rows, seq_len, FLAGS.heads, head_dim))
         for k in jax.random.split(key, 3)]  # [B, L, H, Dh] each
  masked_attn = lambda q, k, v, ids: packed_attention.segment_attention(
      q, k, v, ids, impl=FLAGS.attention_impl).sum()
  plain_attn = lambda q, k, v: packed_attention.dot_product_attention(q, k, v)[0].sum()
  navit_step, vit_step = train_step(navit_loss), train_step(vit_loss)
  cases = {
      "packed": (navit_step, (navit_params, packed)),
      "one segment": (navit_step, (navit_params, one_segment)),
      "vit": (vit_step, (vit_params, images, labels)),
      "dropped": (navit_step, (navit_params, dropped)),
      "attn masked": (jax.jit(jax.grad(masked_attn, (0, 1, 2))),
                      (*qkv, packed["segment_ids"])),
      "attn plain": (jax.jit(jax.grad(plain_attn, (0, 1, 2))), tuple(qkv)),
  }
  compile_s, step_s = timing.time_interleaved(cases, warmup=FLAGS.warmup, steps=FLAGS.steps)

  print(f"\nmodel: width {FLAGS.width}, depth {FLAGS.depth}, heads {FLAGS.heads}, mlp "
        f"{hparams['mlp_dim']}, {FLAGS.classes} classes, pool {FLAGS.pool}, attention "
        f"{FLAGS.attention_impl}; NaViT {utils.count_params(navit_params) / 1e6:.2f} M params, "
        f"ViT {utils.count_params(vit_params) / 1e6:.2f} M")
  print(f"step: jit(value_and_grad(xent)), {batch_rows} rows x {seq_len} tokens; median of "
        f"{FLAGS.steps} interleaved steps after {FLAGS.warmup} warm-up; counts per row from (a)")
  no_drop, with_drop = stats["no drop"], stats["token drop"]
  t_vit = step_s["vit"]

  def throughput(name: str, seconds: float, tokens_per_row: float, images_per_row: float
                 ) -> tuple[str, ...]:
    return (name, f"{seconds * 1e3:.1f}", f"{seconds / t_vit:.3f}",
            f"{batch_rows * tokens_per_row / seconds:,.0f}",
            f"{batch_rows * images_per_row / seconds:,.1f}")

  print("\n(b, c) train step")
  print_table(
      ("variant", "step ms", "/ ViT", "real tokens/s", "images/s"),
      [throughput("NaViT packed", step_s["packed"], no_drop["tokens_per_row"],
                  no_drop["images_per_row"]),
       (("NaViT, all tokens one segment", f"{step_s['one segment'] * 1e3:.1f}",
         f"{step_s['one segment'] / t_vit:.3f}", "-", "-")),
       throughput(f"plain ViT ({grid[0]}x{grid[1]} tokens, no mask)", t_vit, seq_len, 1.0),
       throughput("padded: 1 image/row (ViT time)", t_vit, no_drop["tokens_per_image"], 1.0),
       throughput("NaViT packed, token drop", step_s["dropped"], with_drop["tokens_per_row"],
                  with_drop["images_per_row"])])
  overhead = step_s["packed"] / t_vit
  packed_ips = no_drop["images_per_row"] / step_s["packed"]
  print(f"\nmasking overhead (packed NaViT / plain ViT step): {overhead:.3f} "
        f"(goal <= 1.10: {'met' if overhead <= 1.10 else 'NOT met'})")
  print(f"  packed / one segment: {step_s['packed'] / step_s['one segment']:.3f};  "
        f"attention op (one layer) alone, fwd+bwd, masked / unmasked: "
        f"{step_s['attn masked'] / step_s['attn plain']:.3f} "
        f"({step_s['attn masked'] * 1e3:.1f} / {step_s['attn plain'] * 1e3:.1f} ms)")
  tokens_ratio = (no_drop["tokens_per_row"] / step_s["packed"]
                  / (no_drop["tokens_per_image"] / t_vit))
  print(f"packed vs padded: images/s x{packed_ips * t_vit:.2f}, real tokens/s x{tokens_ratio:.2f}")
  print(f"token drop vs none: images/s x"
        f"{with_drop['images_per_row'] / step_s['dropped'] / packed_ips:.2f} "
        f"(images/row {with_drop['images_per_row']:.2f} vs {no_drop['images_per_row']:.2f})")
  print("compile s: " + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items()))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
