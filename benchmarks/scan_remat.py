r"""Compile time and compiled memory of the train loop's ViT step, scanned or not, with and
without remat: XLA's own figures, measured in one run on this machine.

  python -m benchmarks.scan_remat --variant H/14 --res 224 --batch_size 8

For each (scan_layers, remat_policy) it builds `configs/vit.py`'s step for the variant
(`train.build_training`: the real loss, AdamW and EMA-free state on the run's mesh), lowers
it on abstract inputs (nothing is allocated or run), compiles it, and prints the lowering and
compile seconds and `compiled.memory_analysis()`: arguments (params + optimiser state +
batch), temporaries (activations kept for the backward pass and scratch), per device.
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from big_vision_lite import models
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite import train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
import vit as vit_config  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string("variant", "H/14", "ViT variant, e.g. S/16, B/16, H/14.")
flags.DEFINE_integer("res", 224, "Image side.")
flags.DEFINE_integer("batch_size", 8, "Global batch.")
flags.DEFINE_list("cases", ["false:none", "true:none", "false:full", "true:full"],
                  "scan_layers:remat_policy pairs.")
MIB = 2**20


def compile_case(variant: str, res: int, batch_size: int, scan_layers: bool,
                 remat_policy: str) -> dict[str, float]:
  """Lowering and compile seconds and compiled bytes per device of one step."""
  config = vit_config.get_config(f"variant={variant},res={res},batch_size={batch_size}")
  config.model.scan_layers = scan_layers
  config.model.remat_policy = remat_policy
  mesh = sharding.make_mesh(config.get("mesh"))
  task = tasks.REGISTRY.get(config.task)(config, models.from_config(config), mesh)
  batch_spec = {"image": jax.ShapeDtypeStruct((batch_size, res, res, 3), jnp.float32),
                "labels": jax.ShapeDtypeStruct((batch_size, config.model.num_classes),
                                               jnp.float32)}
  training = train.build_training(config, task, mesh, batch_spec)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
           for k, v in batch_spec.items()}
  start = time.perf_counter()
  lowered = training.step.lower(training.abstract_state, batch)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  memory = compiled.memory_analysis()
  return {"lower_s": lowered_at - start, "compile_s": compiled_at - lowered_at,
          "argument_mib": memory.argument_size_in_bytes / MIB,
          "temp_mib": memory.temp_size_in_bytes / MIB,
          "output_mib": memory.output_size_in_bytes / MIB}


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  print(f"ViT-{f.variant}, {f.res} px, global batch {f.batch_size}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s); per device:")
  print("| scan_layers | remat_policy | lower (s) | compile (s) | arguments (MiB) | "
        "temporaries (MiB) |")
  print("| --- | --- | --- | --- | --- | --- |")
  for case in f.cases:
    scan, remat_policy = case.split(":")
    r = compile_case(f.variant, f.res, f.batch_size, scan == "true", remat_policy)
    print(f"| {scan} | {remat_policy} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
          f"{r['argument_mib']:.1f} | {r['temp_mib']:.1f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
