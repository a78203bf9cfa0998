"""Timing shared by the benchmarks: interleaved steps, so ratios come from one run, and the
plain classification train step they time."""
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax


def time_interleaved(cases: Mapping[str, tuple[Callable[..., Any], tuple[Any, ...]]], *,
                     warmup: int, steps: int) -> tuple[dict[str, float], dict[str, float]]:
  """Seconds of the first call (compilation) and median seconds per call of each case.

  After the first call and `warmup` untimed calls of every case, the `steps` timed calls of
  all cases are interleaved, in alternating order, so that drifting machine load and the
  order of the cases affect them alike.
  """
  first_s = {}
  for name, (fn, args) in cases.items():
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first_s[name] = time.perf_counter() - start
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times: dict[str, list[float]] = {name: [] for name in cases}
  for i in range(steps):
    order = list(cases) if i % 2 == 0 else list(reversed(cases))
    for name in order:
      fn, args = cases[name]
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return first_s, {name: statistics.median(t) for name, t in times.items()}


def step_flops(lowered: jax.stages.Lowered) -> float:
  """FLOPs of one call, from XLA's cost analysis of the lowered (unoptimised) HLO (nan if it
  has none). Not the compiled module's: on GPU its matmuls are library calls it does not
  count."""
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float((analysis or {}).get("flops", float("nan")))


def vit_train_flops(width: int, depth: int, mlp_dim: int, patch: int, res: int,
                    num_classes: int, class_token: bool) -> float:
  """Matmul FLOPs per image of a ViT train step, analytically (a multiply-add is 2 FLOPs).

  With P = (res / patch)² patches, N = P (+1 for a class token) tokens, width D, MLP width M,
  depth L and C classes, the forward pass is
    L · (8·N·D² + 4·N·D·M + 4·N²·D) + 2·D·C  +  2·P·(3·patch²)·D
  (the q, k, v and output projections; the two MLP matmuls; q·kᵀ and attention·v; the head;
  the patch embedding), and the train step 3x the first part (the backward pass computes two
  matmuls per forward one) plus 2x the patch embedding (the images need no gradient): for
  M = 4D about 6 x params x tokens + 12·L·N²·D. Norms, GELU, softmax and the optimizer update
  are not counted, as in the usual MFU.
  """
  patches = (res // patch) ** 2
  tokens = patches + int(class_token)
  layer = 8 * tokens * width**2 + 4 * tokens * width * mlp_dim + 4 * tokens**2 * width
  embedding = 2 * patches * 3 * patch**2 * width
  return 3.0 * (depth * layer + 2 * width * num_classes) + 2.0 * embedding


def measure_matmul_peak(size: int, dtype: jnp.dtype, repeats: int = 10) -> float:
  """FLOP/s of a jitted [size, size] @ [size, size] matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = matmul(a, a)
  out.block_until_ready()
  return 2 * size**3 * repeats / (time.perf_counter() - start)


def time_timm(name: str, batch_size: int, res: int, num_classes: int, steps: int,
              warmup: int, device: str = "cpu", precision: str = "float32",
              compile_model: bool = False) -> dict[str, float]:
  """images/s of timm's `name` from `benchmarks/timm_step.py`, run in a subprocess (torch
  never shares a process with JAX or TensorFlow here); `compile_model`: torch.compile."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.timm_step", "--name", name, "--batch_size",
       str(batch_size), "--res", str(res), "--num_classes", str(num_classes), "--steps",
       str(steps), "--warmup", str(warmup), "--device", device, "--precision", precision]
      + (["--compile"] if compile_model else []),
      capture_output=True, text=True, cwd=repo, check=False)
  if result.returncode:
    raise RuntimeError(f"timm timing of {name!r} failed:\n{result.stderr[-2000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def build_step(model: Any, variables: dict[str, Any], tx: optax.GradientTransformation):
  """Jitted step(state, images, labels) -> (state, loss), the state donated.

  A plain-JAX copy of the train loop's step (`train.make_train_step`) without its config
  and mesh: accelerator images often lack ml_collections/tfds, which `train` imports.
  """
  collections = [k for k in variables if k != "params"]

  def loss_fn(params, extra, images, labels):
    rngs = {"dropout": jax.random.key(0)}
    if collections:
      (logits, _), extra = model.apply({"params": params, **extra}, images, train=True,
                                       rngs=rngs, mutable=collections)
    else:
      logits, _ = model.apply({"params": params}, images, train=True, rngs=rngs)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels).mean()
    return loss, extra

  def step(state, images, labels):
    params, extra, opt_state = state
    (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, extra, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), extra, opt_state), loss

  return jax.jit(step, donate_argnums=0)
