r"""Kernels against their references: time and compiled memory, as ratios from one run.

  python -m benchmarks.kernels --sizes 4096,8192,16384,32768 --time_up_to 8192

Contrastive loss (value and gradients w.r.t. both embeddings, D = --dim, chunks of
--chunk rows): the chunked loss against the naive loss on the full B x B logits, for
softmax (CLIP) and sigmoid (SigLIP). Memory is XLA's compiled temporary allocation
(`memory_analysis().temp_size_in_bytes`), read without running; time is the median of
--repeats runs after one warm-up, for batch sizes up to --time_up_to (the naive loss
at 32k needs several GiB of logits and their gradients).

DCNv3 at InternImage-T's four stage sizes for a 224 px input (56², 28², 14², 7² pixels;
64..512 channels in groups of 16), batch --dcn_batch, forward and forward + value / offset /
mask gradients: the jnp reference and, on GPU, the Pallas (Triton) kernel at its default
block size and at --dcn_block_sweep, with the kernel's largest gradient error relative to
the reference (on CPU only its interpret mode exists, which is for tests, not timing).
"""
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import kernels
from benchmarks import timing
from kernels import contrastive, dcnv3_core

flags.DEFINE_list("sizes", ["4096", "8192", "16384", "32768"], "Global batch sizes B.")
flags.DEFINE_integer("dim", 256, "Embedding width D.")
flags.DEFINE_integer("chunk", 512, "Rows per chunk of the chunked loss.")
flags.DEFINE_integer("time_up_to", 8192, "Largest B that is also timed.")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement.")
flags.DEFINE_list("contrastive_block_sweep", [], "Other chunk_size (block) values timed for "
                  "the Pallas contrastive loss (GPU/TPU).")
flags.DEFINE_integer("dcn_batch", 8, "Batch size of the DCNv3 measurements.")
flags.DEFINE_list("dcn_block_sweep", ["8", "32"], "Other block_pixels timed for the Pallas "
                  "DCNv3 fwd+bwd (GPU), beside its default.")

# InternImage-T stages at 224 px: (side, channels); groups = channels / 16.
INTERNIMAGE_T_STAGES = ((56, 64), (28, 128), (14, 256), (7, 512))


def _dcnv3_fn(impl: str, group: int, block_pixels: int | None):
  if impl == "reference" or block_pixels is None:
    return lambda v, o, m: kernels.dcnv3(v, o, m, group=group, impl=impl)
  return lambda v, o, m: dcnv3_core.pallas_dcnv3(
      v, o, m, kernel_size=(3, 3), stride=(1, 1), pad=(1, 1), dilation=(1, 1), group=group,
      offset_scale=1.0, block_pixels=block_pixels)


def _dcnv3_step(impl: str, group: int, backward: bool, block_pixels: int | None = None):
  fn = _dcnv3_fn(impl, group, block_pixels)
  if not backward:
    return jax.jit(fn)
  loss = lambda *a: (fn(*a).astype(jnp.float32) ** 2).mean()
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _median_seconds(cases: dict[str, tuple], repeats: int) -> dict[str, float]:
  return timing.time_interleaved(cases, warmup=0, steps=repeats)[1]


def _max_relative_error(got, want) -> float:
  """Largest |got − want| over the leaves, relative to each leaf's largest |want|."""
  pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want))
  return max(float(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)).max()
                   / jnp.abs(w.astype(jnp.float32)).max()) for g, w in pairs)


def benchmark_dcnv3(batch: int, repeats: int, block_sweep: list[int]) -> None:
  """Prints reference and (on GPU) Pallas times per InternImage-T stage, forward and fwd+bwd,
  the Pallas fwd+bwd time at other block sizes, and the Pallas error against the reference.
  A variant that fails to compile is reported with its error and left out."""
  compiled = jax.default_backend() == "gpu"
  print(f"\nDCNv3, InternImage-T stages at 224 px, batch {batch}, 3x3 points, float32"
        + ("" if compiled else "; Pallas not timed: it compiles for GPU only"))
  variants = {"ref fwd": ("reference", False, None), "ref f+b": ("reference", True, None)}
  if compiled:
    variants |= {"pallas fwd": ("pallas", False, None), "pallas f+b": ("pallas", True, None)}
    variants |= {f"f+b bp{b}": ("pallas", True, b) for b in block_sweep}
  header = ["stage", "H=W", "C", "G"] + [f"{name} ms" for name in variants]
  if compiled:
    header += ["ref/pallas fwd", "ref/pallas f+b", "pallas f+b rel err"]
  rows, compile_rows = [], []
  rng = np.random.default_rng(0)
  for stage, (side, channels) in enumerate(INTERNIMAGE_T_STAGES, 1):
    group = channels // 16
    value = jnp.asarray(rng.normal(size=(batch, side, side, channels)), jnp.float32)
    offset = jnp.asarray(rng.normal(size=(batch, side, side, group * 18)), jnp.float32)
    mask = jax.nn.softmax(jnp.asarray(rng.normal(size=(batch, side, side, group, 9)),
                                      jnp.float32), -1).reshape(batch, side, side, group * 9)
    inputs = (value, offset, mask)
    steps, compile_s = {}, {}
    for name, (impl, backward, block_pixels) in variants.items():
      try:
        start = time.perf_counter()
        steps[name] = _dcnv3_step(impl, group, backward, block_pixels).lower(*inputs).compile()
        compile_s[name] = time.perf_counter() - start
      except Exception as e:  # One failing variant must not end the benchmark.
        first_line = (str(e).strip().splitlines() or [""])[0]
        print(f"stage {stage}: {name} failed to compile: {type(e).__name__}: {first_line}")
    try:
      seconds = _median_seconds({name: (step, inputs) for name, step in steps.items()}, repeats)
    except Exception as e:  # A kernel that compiles but fails to run: report, next stage.
      print(f"stage {stage}: failed to run: {type(e).__name__}: {str(e).strip()[:300]}")
      continue
    row = [str(stage), str(side), str(channels), str(group)]
    compile_rows.append(row + [f"{compile_s[name]:.1f}" if name in compile_s else "-"
                               for name in variants])
    row += [f"{seconds[name] * 1e3:.2f}" if name in seconds else "-" for name in variants]
    if compiled:
      for kind in ("fwd", "f+b"):
        ref, pallas = seconds.get(f"ref {kind}"), seconds.get(f"pallas {kind}")
        row.append(f"{ref / pallas:.2f}" if ref and pallas else "-")
      if "ref f+b" in steps and "pallas f+b" in steps:
        error = _max_relative_error(steps["pallas f+b"](*inputs), steps["ref f+b"](*inputs))
        row.append(f"{error:.1e}")
      else:
        row.append("-")
    rows.append(row)
  _print_table(header, rows)
  print("compile seconds:")
  _print_table(header[:4] + [name for name in variants], compile_rows)
  if compiled:
    print("f+b bpN = Pallas fwd+bwd at block_pixels=N; rel err = largest |pallas − reference| / "
          "max |reference| over the loss and the 3 gradients (the reference at XLA's default "
          "matmul precision, TF32 on recent GPUs).")


def _print_table(header: list[str], rows: list[list[str]]) -> None:
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
  print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
  for row in rows:
    print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def _compiled(fn, b: int, d: int) -> tuple[Any, float]:
  """fn's value and gradients compiled for [b, d] embeddings, and the compile seconds."""
  spec = jax.ShapeDtypeStruct((b, d), jnp.float32)
  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(spec, spec).compile()
  return compiled, time.perf_counter() - start


def _contrastive_row(kind: str, losses: dict[str, Any], b: int, dim: int, time_up_to: int,
                     repeats: int) -> list[str]:
  """One table row: per loss (the first is the naive one), compiled temporary memory,
  compile seconds and, up to time_up_to, its time relative to the naive loss's."""
  compiled = {name: _compiled(fn, b, dim) for name, fn in losses.items()}
  mem = {name: c.memory_analysis().temp_size_in_bytes / 2**20
         for name, (c, _) in compiled.items()}
  row = [kind, str(b)] + [f"{mem[name]:.1f}" for name in losses]
  row += [f"{seconds:.1f}" for _, seconds in compiled.values()]
  if b > time_up_to:
    return row + ["-"] * (2 * len(losses) - 1)
  rng = np.random.default_rng(0)
  z = tuple(jnp.asarray(rng.normal(size=(b, dim)) / np.sqrt(dim), jnp.float32)
            for _ in range(2))
  secs = _median_seconds({name: (c, z) for name, (c, _) in compiled.items()}, repeats)
  naive = secs[next(iter(losses))]
  row += [f"{secs[name] * 1e3:.1f}" for name in losses]
  return row + [f"{secs[name] / naive:.2f}" for name in list(losses)[1:]]


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  accelerator = jax.default_backend() in ("gpu", "tpu")
  print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(f"contrastive loss, value + grads, D={f.dim}, chunk={f.chunk}"
        + ("" if accelerator else "; Pallas not timed: it compiles for GPU and TPU only"))
  impls = {"chunked": ("chunked", f.chunk)}
  if accelerator:
    impls |= {"pallas": ("pallas", None)}
    impls |= {f"pallas c{c}": ("pallas", int(c)) for c in f.contrastive_block_sweep}
  names = ["naive"] + list(impls)
  header = (["kind", "B"] + [f"{n} MiB" for n in names] + [f"{n} compile s" for n in names]
            + [f"{n} ms" for n in names] + [f"{n}/naive time" for n in names[1:]])
  rows = []
  for kind in contrastive.KINDS:
    bias = -10.0 if kind == "sigmoid" else None
    losses = {"naive": lambda a, b, kind=kind, bias=bias: contrastive.reference(
        a, b, kind=kind, temperature=10.0, bias=bias)}
    for name, (impl, chunk) in impls.items():
      losses[name] = lambda a, b, kind=kind, bias=bias, impl=impl, chunk=chunk: (
          kernels.contrastive_loss(a, b, kind=kind, temperature=10.0, bias=bias,
                                   chunk_size=chunk, impl=impl))
    for b in map(int, f.sizes):
      try:
        rows.append(_contrastive_row(kind, losses, b, f.dim, f.time_up_to, f.repeats))
      except Exception as e:  # E.g. out of memory: report and go on to the DCNv3 part.
        print(f"{kind} B={b} failed: {type(e).__name__}: {str(e).strip()[:300]}")
  _print_table(header, rows)
  print("MiB = compiled temporary memory; 'pallas cN' = impl pallas at chunk_size N (its "
        "block); times are medians of interleaved runs.")
  benchmark_dcnv3(f.dcn_batch, f.repeats, [int(b) for b in f.dcn_block_sweep])


if __name__ == "__main__":
  app.run(main)
