r"""DINO multi-crop train step: packed (one NaViT forward over every crop) vs per resolution.

  python -m benchmarks.dino                       # CPU default: configs/dino.py's sizes
  python -m benchmarks.dino --preset paper --batch_size 64 --out dino_gpu.json

Both variants are the train loop's own jitted step (`train.build_training`, the step
`python -m big_vision_lite.train` runs: teacher forward on the global crops, student
forward and backward, AdamW, teacher EMA, center update) of the `dino` task of
configs/dino.py with `packed=true` (a NaViT backbone), on one synthetic batch of random
pixels: `global_crops` [B, 2, g, g, 3] and `local_crops` [B, N, l, l, 3]. They differ
only in config field `dino.packed`:

  packed          one student forward over sequences that pack each image's 2 + N crops,
                  each crop a segment (2·(g/p)² + N·(l/p)² tokens per image, no padding).
  per-resolution  one student forward per crop resolution (the official code's loop):
                  2·B images of g px, then N·B images of l px.

Same params (one init), same batch; the steps of the two are interleaved after
compilation and --warmup untimed steps, and each one's median over --steps is reported, so
the ratio comes from one run on one machine. images/s counts the batch's images (B per
step), crops/s its crops ((2 + N)·B). GFLOP/step is XLA's cost analysis of each step: the
packed step's attention spans the whole sequence under a segment mask, so it costs more
FLOPs than the per-resolution attention over each crop alone. The NaViT attention
implementation that runs (config field `model.backbone.attention_impl`, "auto" by default)
is printed for each attention length: "auto" takes the Pallas kernel only on GPU/TPU with
a head dim a multiple of 16 and a length a multiple of 128 (kernels/packed_attention.py),
the segment-masked reference otherwise (always on CPU).

Presets (each size also has its own flag, which overrides the preset):
  cpu    configs/dino.py's default: mini/4 ViT (width 96, depth 4), global 32 px, local
         16 px, 4 local crops, batch 64, head 512 -> 128 -> 4096.
  paper  the paper's ViT-S/16: global 224 px, local 96 px, 10 local crops, head
         2048 -> 256 -> 65536; batch 64 (the paper's is 1024 over 16 GPUs).
"""
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from benchmarks import timing
from big_vision_lite import config_lib
from big_vision_lite import models
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite import train
from big_vision_lite import utils
from configs import dino as dino_config
from kernels import packed_attention

PRESETS = {
    "cpu": dict(variant="mini/4", global_size=32, local_size=16, num_local=4, batch_size=64,
                out_dim=4096, hidden_dim=512, bottleneck_dim=128),
    "paper": dict(variant="S/16", global_size=224, local_size=96, num_local=10, batch_size=64,
                  out_dim=65536, hidden_dim=2048, bottleneck_dim=256),
}

flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Sizes: configs/dino.py's CPU default or "
                  "the paper's ViT-S/16 multi-crop.")
flags.DEFINE_string("variant", None, "Backbone variant (mini/<patch> or a ViT variant).")
flags.DEFINE_integer("global_size", None, "Global crop side in px.")
flags.DEFINE_integer("local_size", None, "Local crop side in px.")
flags.DEFINE_integer("num_local", None, "Local crops per image.")
flags.DEFINE_integer("batch_size", None, "Images per step.")
flags.DEFINE_integer("out_dim", None, "DINO head outputs K.")
flags.DEFINE_integer("hidden_dim", None, "DINO head MLP width.")
flags.DEFINE_integer("bottleneck_dim", None, "DINO head bottleneck.")
flags.DEFINE_enum("attention_impl", "auto", packed_attention.IMPLS, "NaViT attention.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Config compute_dtype.")
flags.DEFINE_integer("steps", 10, "Timed steps per variant.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per variant after compilation.")
flags.DEFINE_integer("seed", 0, "Seed of the pixels and the parameters.")
flags.DEFINE_string("out", None, "Where to write the results as JSON.")

FLAGS = flags.FLAGS
VARIANTS = {"packed": True, "per-resolution": False}


def sizes() -> dict[str, Any]:
  """The preset's sizes with the flags that are set."""
  chosen = dict(PRESETS[FLAGS.preset])
  for name in chosen:
    if FLAGS[name].value is not None:
      chosen[name] = FLAGS[name].value
  return chosen


def make_config(size: dict[str, Any], packed: bool) -> ml_collections.ConfigDict:
  """configs/dino.py with a NaViT backbone at `size`; `dino.packed` as given."""
  arg = ",".join(f"{k}={v}" for k, v in size.items())
  config = dino_config.get_config(f"{arg},packed=true")
  config.dino.packed = packed
  config.model.backbone.attention_impl = FLAGS.attention_impl
  config.compute_dtype = FLAGS.compute_dtype
  config.evals = {}
  config_lib.validate(config)
  return config


def attention_impl(length: int, head_dim: int) -> str:
  """The implementation `segment_attention(..., impl=--attention_impl)` runs at `length`."""
  if FLAGS.attention_impl != "auto":
    return FLAGS.attention_impl
  backend = jax.default_backend()
  q = jax.ShapeDtypeStruct((1, length, 1, head_dim), jnp.float32)
  ok = backend in ("gpu", "tpu") and packed_attention.pallas_shapes_ok(q, backend)
  return f"pallas ({backend})" if ok else "reference (segment-masked)"


class Stepper:
  """Calls a donating train step on its own state and a fixed batch."""

  def __init__(self, training: train.Training, batch: dict[str, jax.Array], seed: int):
    self.step = training.step
    self.batch = batch
    self.state = training.init(jax.random.key(seed))
    self.lowered = self.step.lower(self.state, batch)

  def __call__(self) -> Any:
    self.state, metrics = self.step(self.state, self.batch)
    return self.state, metrics


def main(argv: list[str]) -> None:
  del argv
  size = sizes()
  b, num_local = size["batch_size"], size["num_local"]
  g, l = size["global_size"], size["local_size"]
  rng = np.random.default_rng(FLAGS.seed)
  host_batch = {
      "global_crops": rng.uniform(-1, 1, (b, 2, g, g, 3)).astype(np.float32),
      "local_crops": rng.uniform(-1, 1, (b, num_local, l, l, 3)).astype(np.float32)}
  batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host_batch.items()}

  steppers, first_loss, flops, configs = {}, {}, {}, {}
  for name, packed in VARIANTS.items():
    config = configs[name] = make_config(size, packed)
    mesh = sharding.make_mesh(config.get("mesh"))
    task = tasks.REGISTRY.get(config.task)(config, models.from_config(config))
    training = train.build_training(config, task, mesh, batch_spec)
    steppers[name] = Stepper(training, sharding.global_batch(host_batch, mesh), FLAGS.seed)
    flops[name] = timing.step_flops(steppers[name].lowered)
  num_params = utils.count_params(steppers["packed"].state["params"])
  same_init = all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(steppers["packed"].state["params"]),
      jax.tree.leaves(steppers["per-resolution"].state["params"])))

  cases = {name: (stepper, ()) for name, stepper in steppers.items()}
  # The first call compiles and steps from the shared init: its loss is each path's loss
  # of the same params on the same batch.
  compile_s = {}
  for name, stepper in steppers.items():
    start = time.perf_counter()
    _, metrics = jax.block_until_ready(stepper())
    compile_s[name] = time.perf_counter() - start
    first_loss[name] = float(metrics["loss"])
  _, step_s = timing.time_interleaved(cases, warmup=FLAGS.warmup, steps=FLAGS.steps)

  hp = configs["packed"].model.backbone
  navit_hp = models.get("navit").Model(**dict(hp, num_classes=0)).hparams()
  patch, head_dim = navit_hp["patch_size"], navit_hp["width"] // navit_hp["num_heads"]
  global_tokens, local_tokens = (g // patch) ** 2, (l // patch) ** 2
  packed_len = 2 * global_tokens + num_local * local_tokens
  crops = (2 + num_local) * b
  device = jax.devices()[0]
  print(f"device: {len(jax.devices())} x {device.device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__}")
  print(f"model: dino, NaViT backbone {size['variant']} (width {navit_hp['width']}, depth "
        f"{navit_hp['depth']}, heads {navit_hp['num_heads']}, patch {patch}), head "
        f"{size['hidden_dim']} -> {size['bottleneck_dim']} -> {size['out_dim']}; "
        f"{num_params / 1e6:.2f} M params (same init in both: {same_init}); compute "
        f"{FLAGS.compute_dtype}")
  print(f"batch: {b} images x (2 global {g} px + {num_local} local {l} px) = {crops} crops; "
        f"tokens per image {packed_len} ({2} x {global_tokens} + {num_local} x {local_tokens})")
  impls = {"packed": {packed_len: attention_impl(packed_len, head_dim)},
           "per-resolution": {n: attention_impl(n, head_dim)
                              for n in sorted({global_tokens, local_tokens}, reverse=True)}}
  for name, by_length in impls.items():
    print(f"attention ({name}, --attention_impl {FLAGS.attention_impl}): " + "; ".join(
        f"L={n}: {impl}" for n, impl in by_length.items()))
  print(f"step: train.build_training's step; median of {FLAGS.steps} interleaved steps after "
        f"{FLAGS.warmup} warm-up\n")
  rows = []
  for name in VARIANTS:
    rows.append((name, f"{step_s[name] * 1e3:.1f}", f"{b / step_s[name]:,.1f}",
                 f"{crops / step_s[name]:,.1f}", f"{flops[name] / 1e9:.2f}",
                 f"{compile_s[name]:.1f}", f"{first_loss[name]:.6f}"))
  header = ("variant", "step ms", "images/s", "crops/s", "GFLOP/step", "compile s",
            "first loss")
  widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
  line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
  print(line(header))
  print("  ".join("-" * w for w in widths))
  for row in rows:
    print(line(row))
  ratio = step_s["packed"] / step_s["per-resolution"]
  print(f"\npacked / per-resolution step time: {ratio:.3f} (images/s x{1 / ratio:.2f}); "
        f"FLOPs x{flops['packed'] / flops['per-resolution']:.2f}; first-loss difference "
        f"{abs(first_loss['packed'] - first_loss['per-resolution']):.2e}")
  sys.stdout.flush()

  if FLAGS.out:
    record = {
        "command": " ".join(["python -m benchmarks.dino", *sys.argv[1:]]),
        "device": device.device_kind,
        "backend": jax.default_backend(), "num_devices": len(jax.devices()),
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "sizes": size,
        "params": num_params, "compute_dtype": FLAGS.compute_dtype, "steps": FLAGS.steps,
        "warmup": FLAGS.warmup, "tokens_per_image": packed_len,
        "attention": {name: {str(n): impl for n, impl in by_length.items()}
                      for name, by_length in impls.items()},
        "variants": {name: {"step_s": step_s[name], "images_per_s": b / step_s[name],
                            "crops_per_s": crops / step_s[name], "flops": flops[name],
                            "compile_s": compile_s[name], "first_loss": first_loss[name]}
                     for name in VARIANTS},
        "packed_over_per_resolution": ratio}
    with open(FLAGS.out, "w") as f:
      json.dump(record, f, indent=2)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
