r"""Train-step throughput of models on synthetic batches, beside timm's, in one run.

  python -m benchmarks.model_step --cases convnext2_atto,internimage_t --batch_size 64
  python -m benchmarks.model_step --cases vit_b16_bf16 --batch_size 256 --timm_compile

Needs only jax, flax, optax (and torch + timm for the timm column): no input pipeline, so
it runs on any accelerator machine. One step = forward with train=True (BatchNorm models
update their statistics), softmax cross-entropy on random labels, backward and an AdamW
update, jitted with the state donated, on a fixed random [B, res, res, 3] float32 batch.
Each case has a precision: float32, or bfloat16 matmuls (ViT's dtype_mm; parameters and
AdamW state stay float32; timm runs under torch.autocast(bfloat16)).
Prints per case: params, compile seconds, ms/step, images/s, GFLOP/step (XLA's count of
the lowered step; for ViTs also the analytic matmul count of `timing.vit_train_flops`:
6 x params x tokens + 12 x depth x tokens² x width per image), MFU (analytic FLOPs where
there are, else XLA's) against a matmul in the case's precision measured in the same run,
and, where the case names a timm model and torch is installed, timm's images/s
(`benchmarks/timm_step.py`, in a subprocess, on the same device kind) and ours / timm;
with --timm_compile also timm under torch.compile, with its first step (compilation) time.
"""
import json
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from benchmarks import timing
from big_vision_lite import models
from big_vision_lite.models import vit

# case: (model_name, model kwargs, timm counterpart or None); bfloat16 cases end in "_bf16".
CASES: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "vit_s16": ("vit", {"variant": "S/16"}, "vit_small_patch16_224"),
    "vit_b16_bf16": ("vit", {"variant": "B/16", "dtype_mm": "bfloat16"}, "vit_base_patch16_224"),
    "deepvit_s16": ("deepvit", {"variant": "S/16"}, None),
    "efficientvit_m0": ("efficientvit", {"variant": "M0"}, "efficientvit_m0"),
    "mobilevit_xxs": ("mobilevit", {"variant": "XXS"}, "mobilevit_xxs"),
    "mobilevit2_050": ("mobilevit2", {"variant": "050"}, "mobilevitv2_050"),
    "convnext2_atto": ("convnext2", {"variant": "atto"}, "convnextv2_atto"),
    "internimage_t": ("internimage", {"variant": "T", "dcnv3_impl": "reference"}, None),
    "internimage_t_pallas": ("internimage", {"variant": "T", "dcnv3_impl": "pallas"}, None),
}

flags.DEFINE_list("cases", list(CASES), f"Cases to time: {', '.join(CASES)}.")
flags.DEFINE_integer("batch_size", 64, "Images per step.")
flags.DEFINE_integer("res", 224, "Image side.")
flags.DEFINE_integer("num_classes", 1000, "Classes of the head.")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("matmul_size", 4096, "Side of the square matmul that measures peak.")
flags.DEFINE_bool("timm", True, "Also time each case's timm counterpart (needs torch).")
flags.DEFINE_bool("timm_compile", False, "Also time the timm counterpart under torch.compile.")
flags.DEFINE_string("json_out", None, "Also write the rows as JSON lines here.")


def precision(name: str) -> str:
  """The matmul precision of case `name`."""
  return "bfloat16" if name.endswith("_bf16") else "float32"


def analytic_flops(model: Any, batch_size: int, res: int, num_classes: int) -> float:
  """`timing.vit_train_flops` x batch for a ViT, else nan."""
  if not isinstance(model, vit.Model):
    return float("nan")
  hp = model.hparams()
  return batch_size * timing.vit_train_flops(
      hp["width"], hp["depth"], hp["mlp_dim"], hp["patch_size"][0], res, num_classes,
      class_token=model.pool_type == "tok")


def time_case(name: str, batch_size: int, res: int, num_classes: int, steps: int,
              warmup: int) -> dict[str, float]:
  """Params, compile seconds, median seconds per step and XLA's and the analytic FLOPs
  per step of a case."""
  model_name, kwargs, _ = CASES[name]
  model = models.get(model_name).Model(num_classes=num_classes, **kwargs)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch_size, res, res, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, batch_size), jnp.int32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(images[:1])
  params = variables["params"]
  tx = optax.adamw(1e-3, weight_decay=0.05)
  state = (params, {k: v for k, v in variables.items() if k != "params"}, tx.init(params))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  start = time.perf_counter()
  lowered = timing.build_step(model, variables, tx).lower(state, images, labels)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup + 1):
    state, _ = compiled(state, images, labels)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, _ = compiled(state, images, labels)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  return {"params": num_params, "compile_s": compile_s, "step_s": statistics.median(times),
          "flops": timing.step_flops(lowered),
          "analytic_flops": analytic_flops(model, batch_size, res, num_classes)}


def _timm_row(name: str, timm_name: str, f: Any, device: str) -> dict[str, Any]:
  """timm's images/s (eager, and compiled with --timm_compile) for case `name`."""
  row = {"timm": timm_name}
  modes = {"timm": False} | ({"timm_compiled": True} if f.timm_compile else {})
  for key, compile_model in modes.items():
    try:
      result = timing.time_timm(timm_name, f.batch_size, f.res, f.num_classes, f.steps,
                                f.warmup, device, precision(name), compile_model)
    except RuntimeError as e:
      print(f"{name}: {key} {timm_name} failed: {str(e).splitlines()[-1][:300]}")
      continue
    row.update({f"{key}_images_per_s": result["images_per_sec"],
                f"{key}_first_step_s": result["first_step_seconds"],
                "timm_params": result["params"]})
  return row


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  unknown = [c for c in f.cases if c not in CASES]
  if unknown:
    raise app.UsageError(f"--cases: unknown {unknown}; known: {', '.join(CASES)}.")
  device = jax.devices()[0]
  peaks = {p: timing.measure_matmul_peak(f.matmul_size, jnp.dtype(p))
           for p in sorted({precision(name) for name in f.cases})}
  print(f"device: {jax.device_count()} x {device.device_kind}, jax {jax.__version__}; "
        f"batch {f.batch_size} x {f.res}px; matmul peak "
        + ", ".join(f"{p} {peak / 1e12:.1f} TFLOP/s" for p, peak in peaks.items()))
  timm_device = "cuda" if device.platform == "gpu" else "cpu"
  header = ("case", "params M", "compile s", "ms/step", "img/s", "GFLOP/step XLA",
            "GFLOP/step analytic", "MFU", "timm img/s", "ours/timm", "timm compiled img/s",
            "(its 1st step s)", "ours/compiled")
  print("  ".join(header))
  rows = []
  for name in f.cases:
    try:
      result = time_case(name, f.batch_size, f.res, f.num_classes, f.steps, f.warmup)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
      continue
    images_per_s = f.batch_size / result["step_s"]
    flops = result["analytic_flops"]
    flops = result["flops"] if np.isnan(flops) else flops
    row = dict(result, case=name, precision=precision(name), images_per_s=images_per_s,
               mfu=flops / result["step_s"] / peaks[precision(name)],
               device=device.device_kind)
    timm_name = CASES[name][2]
    if f.timm and timm_name:
      row.update(_timm_row(name, timm_name, f, timm_device))
    eager, compiled = row.get("timm_images_per_s"), row.get("timm_compiled_images_per_s")
    first = row.get("timm_compiled_first_step_s")
    cells = [f"{eager:.1f}" if eager else "-", f"{images_per_s / eager:.2f}" if eager else "-",
             f"{compiled:.1f}" if compiled else "-", f"{first:.1f}" if first else "-",
             f"{images_per_s / compiled:.2f}" if compiled else "-"]
    print(f"{name}  {result['params'] / 1e6:.2f}  {result['compile_s']:.1f}  "
          f"{result['step_s'] * 1e3:.1f}  {images_per_s:.1f}  {result['flops'] / 1e9:.1f}  "
          f"{result['analytic_flops'] / 1e9:.1f}  {row['mfu']:.1%}  " + "  ".join(cells),
          flush=True)
    rows.append(row)
  if f.json_out:
    with open(f.json_out, "w") as out:
      out.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
  app.run(main)
