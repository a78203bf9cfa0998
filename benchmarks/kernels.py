r"""Kernels against their references: time and compiled memory, as ratios from one run.

  python -m benchmarks.kernels --sizes 4096,8192,16384,32768 --time_up_to 8192

Contrastive loss (value and gradients w.r.t. both embeddings, D = --dim, chunks of
--chunk rows): the chunked loss against the naive loss on the full B x B logits, for
softmax (CLIP) and sigmoid (SigLIP). Memory is XLA's compiled temporary allocation
(`memory_analysis().temp_size_in_bytes`), read without running; time is the median of
--repeats runs after one warm-up, for batch sizes up to --time_up_to (the naive loss
at 32k needs several GiB of logits and their gradients).
"""
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import kernels
from kernels import contrastive

flags.DEFINE_list("sizes", ["4096", "8192", "16384", "32768"], "Global batch sizes B.")
flags.DEFINE_integer("dim", 256, "Embedding width D.")
flags.DEFINE_integer("chunk", 512, "Rows per chunk of the chunked loss.")
flags.DEFINE_integer("time_up_to", 8192, "Largest B that is also timed.")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement.")


def _compiled(fn, b: int, d: int):
  spec = jax.ShapeDtypeStruct((b, d), jnp.float32)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(spec, spec).compile()


def _seconds(compiled, b: int, d: int, repeats: int) -> float:
  rng = np.random.default_rng(0)
  z = [jnp.asarray(rng.normal(size=(b, d)) / np.sqrt(d), jnp.float32) for _ in range(2)]
  jax.block_until_ready(compiled(*z))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*z))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(f"contrastive loss, value + grads, D={f.dim}, chunk={f.chunk}")
  header = ("kind", "B", "naive MiB", "chunked MiB", "mem ratio", "naive ms", "chunked ms",
            "time ratio")
  rows = []
  for kind in contrastive.KINDS:
    bias = -10.0 if kind == "sigmoid" else None
    naive = lambda a, b, kind=kind, bias=bias: contrastive.reference(
        a, b, kind=kind, temperature=10.0, bias=bias)
    chunked = lambda a, b, kind=kind, bias=bias: kernels.contrastive_loss(
        a, b, kind=kind, temperature=10.0, bias=bias, chunk_size=f.chunk)
    for b in map(int, f.sizes):
      naive_c, chunked_c = _compiled(naive, b, f.dim), _compiled(chunked, b, f.dim)
      mem = [c.memory_analysis().temp_size_in_bytes / 2**20 for c in (naive_c, chunked_c)]
      row = [kind, str(b), f"{mem[0]:.1f}", f"{mem[1]:.1f}", f"{mem[0] / mem[1]:.1f}"]
      if b <= f.time_up_to:
        secs = [_seconds(c, b, f.dim, f.repeats) for c in (naive_c, chunked_c)]
        row += [f"{secs[0] * 1e3:.0f}", f"{secs[1] * 1e3:.0f}", f"{secs[1] / secs[0]:.2f}"]
      else:
        row += ["-", "-", "-"]
      rows.append(row)
  widths = [max(len(r[i]) for r in rows + [list(header)]) for i in range(len(header))]
  print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
  for row in rows:
    print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
  print("mem ratio = naive / chunked temporary memory; time ratio = chunked / naive.")


if __name__ == "__main__":
  app.run(main)
