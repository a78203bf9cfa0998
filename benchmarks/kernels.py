r"""Kernels against their references: time and compiled memory, as ratios from one run.

  python -m benchmarks.kernels --sizes 4096,8192,16384,32768 --time_up_to 8192

Contrastive loss (value and gradients w.r.t. both embeddings, D = --dim, chunks of
--chunk rows): the chunked loss against the naive loss on the full B x B logits, for
softmax (CLIP) and sigmoid (SigLIP). Memory is XLA's compiled temporary allocation
(`memory_analysis().temp_size_in_bytes`), read without running; time is the median of
--repeats runs after one warm-up, for batch sizes up to --time_up_to (the naive loss
at 32k needs several GiB of logits and their gradients).

DCNv3 (value, offset and mask gradients included) at InternImage-T's four stage sizes for
a 224 px input (56², 28², 14², 7² pixels; 64..512 channels in groups of 16), batch
--dcn_batch: the jnp reference, and the Pallas kernel where the backend compiles it
(GPU / TPU; on CPU only its interpret mode exists, which is for tests, not timing).
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import kernels
from benchmarks import timing
from kernels import contrastive

flags.DEFINE_list("sizes", ["4096", "8192", "16384", "32768"], "Global batch sizes B.")
flags.DEFINE_integer("dim", 256, "Embedding width D.")
flags.DEFINE_integer("chunk", 512, "Rows per chunk of the chunked loss.")
flags.DEFINE_integer("time_up_to", 8192, "Largest B that is also timed.")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement.")
flags.DEFINE_integer("dcn_batch", 8, "Batch size of the DCNv3 measurements.")

# InternImage-T stages at 224 px: (side, channels); groups = channels / 16.
INTERNIMAGE_T_STAGES = ((56, 64), (28, 128), (14, 256), (7, 512))


def _dcnv3_step(impl: str, group: int):
  def loss(value, offset, mask):
    out = kernels.dcnv3(value, offset, mask, group=group, impl=impl)
    return (out.astype(jnp.float32) ** 2).mean()
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _median_seconds(cases: dict[str, tuple], repeats: int) -> dict[str, float]:
  return timing.time_interleaved(cases, warmup=0, steps=repeats)[1]


def benchmark_dcnv3(batch: int, repeats: int) -> None:
  """Prints reference (and, where it compiles, Pallas) fwd+bwd time per InternImage-T stage."""
  compiled = jax.default_backend() in ("gpu", "tpu")
  print(f"\nDCNv3 fwd+bwd, InternImage-T stages at 224 px, batch {batch}, 3x3 points"
        + ("" if compiled else "; Pallas not timed: no GPU/TPU backend"))
  print(f"{'stage':>5}  {'H=W':>4}  {'C':>4}  {'G':>3}  {'reference ms':>12}  "
        f"{'pallas ms':>9}  {'reference / pallas':>18}")
  rng = np.random.default_rng(0)
  for stage, (side, channels) in enumerate(INTERNIMAGE_T_STAGES, 1):
    group = channels // 16
    value = jnp.asarray(rng.normal(size=(batch, side, side, channels)), jnp.float32)
    offset = jnp.asarray(rng.normal(size=(batch, side, side, group * 18)), jnp.float32)
    mask = jax.nn.softmax(jnp.asarray(rng.normal(size=(batch, side, side, group, 9)),
                                      jnp.float32), -1).reshape(batch, side, side, group * 9)
    inputs = (value, offset, mask)
    impls = ("reference", "pallas") if compiled else ("reference",)
    seconds = _median_seconds({i: (_dcnv3_step(i, group), inputs) for i in impls}, repeats)
    ref, pallas = seconds["reference"], seconds.get("pallas")
    cells = (f"{pallas * 1e3:9.1f}", f"{ref / pallas:18.2f}") if pallas else ("-".rjust(9),
                                                                           "-".rjust(18))
    print(f"{stage:>5}  {side:>4}  {channels:>4}  {group:>3}  {ref * 1e3:12.1f}  "
          f"{cells[0]}  {cells[1]}")


def _compiled(fn, b: int, d: int):
  spec = jax.ShapeDtypeStruct((b, d), jnp.float32)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(spec, spec).compile()


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
        rng = np.random.default_rng(0)
        z = tuple(jnp.asarray(rng.normal(size=(b, f.dim)) / np.sqrt(f.dim), jnp.float32)
                  for _ in range(2))
        by_name = _median_seconds({"naive": (naive_c, z), "chunked": (chunked_c, z)}, f.repeats)
        secs = [by_name["naive"], by_name["chunked"]]
        row += [f"{secs[0] * 1e3:.0f}", f"{secs[1] * 1e3:.0f}", f"{secs[1] / secs[0]:.2f}"]
      else:
        row += ["-", "-", "-"]
      rows.append(row)
  widths = [max(len(r[i]) for r in rows + [list(header)]) for i in range(len(header))]
  print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
  for row in rows:
    print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
  print("mem ratio = naive / chunked temporary memory; time ratio = chunked / naive.")
  benchmark_dcnv3(f.dcn_batch, f.repeats)


if __name__ == "__main__":
  app.run(main)
