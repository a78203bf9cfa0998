r"""Train-step throughput of any config: images/s, FLOP/s and MFU.

  python -m benchmarks.train_step --config configs/vit.py:variant=S/16,res=224 \
      --config.input.batch_size=32

The step is the train loop's own jitted step (`train.build_training`) on one batch from the
config's input pipeline, timed after compilation (input excluded). FLOPs per step come from
XLA's cost analysis of the compiled step; MFU divides the achieved FLOP/s by the peak of a
large matmul measured on the same machine in the same run, so the ratio holds on any host.
With `--timm NAME` the same run also times timm's model NAME (forward, backward and AdamW
in PyTorch, `benchmarks/timm_step.py`, in a subprocess) at the same batch size and
resolution, and prints our images/s over timm's.
"""
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from big_vision_lite import config_lib
from big_vision_lite import models
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite import utils
from big_vision_lite import train
from big_vision_lite.input import data as data_lib
from benchmarks import timing

# --config is the train loop's own flag (defined when big_vision_lite.train is imported).
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul that measures peak.")
flags.DEFINE_string("timm", None, "timm model to time on the same batch shape (needs torch).")


def main(argv: list[str]) -> None:
  del argv
  config = flags.FLAGS.config
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.get("mesh"))
  model = models.from_config(config)
  task = tasks.REGISTRY.get(config.task)(config, model, mesh)
  batch_size = config.input.batch_size
  train_iter = data_lib.make_train_iterator(config.input.data, config.input.pp, batch_size,
                                            seed=0, packing=config.input.get("packing"))
  batch_spec = train.peek_batch_spec(train_iter, batch_size)
  host_batch = next(train_iter)
  # Packed rows hold several images each; otherwise one image per row.
  images_per_step = float(host_batch["label_mask"].sum()) if "label_mask" in host_batch \
      else batch_size
  input_key = "patches" if "patches" in batch_spec else "image"
  batch = sharding.global_batch(host_batch, mesh)
  training = train.build_training(config, task, mesh, batch_spec)
  state = training.init(jax.random.key(0))
  compile_start = time.perf_counter()
  lowered = training.step.lower(state, batch)
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - compile_start
  flops_per_step = timing.step_flops(lowered)
  for _ in range(flags.FLAGS.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(flags.FLAGS.steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  seconds_per_step = (time.perf_counter() - start) / flags.FLAGS.steps
  dtype = jnp.dtype(config.get("compute_dtype") or "float32")
  peak_per_device = timing.measure_matmul_peak(flags.FLAGS.matmul_size, dtype)
  devices = mesh.devices.size
  achieved = flops_per_step / seconds_per_step
  num_params = utils.count_params(state["params"])
  rows = [
      ("model", f"{config.model_name} {dict(config.model)}"),
      ("params", f"{num_params / 1e6:.2f} M"),
      ("devices", f"{devices} x {jax.devices()[0].device_kind}"),
      ("global batch", f"{batch_size} x {input_key} {tuple(batch_spec[input_key].shape[1:])}"),
      ("compile", f"{compile_seconds:.1f} s"),
      ("step time", f"{seconds_per_step * 1e3:.1f} ms"),
      ("images/step", f"{images_per_step:g}"),
      ("images/s", f"{images_per_step / seconds_per_step:.1f}"),
      ("images/s/device", f"{images_per_step / seconds_per_step / devices:.1f}"),
      ("GFLOP/step (XLA)", f"{flops_per_step / 1e9:.2f}"),
      ("achieved TFLOP/s", f"{achieved / 1e12:.3f}"),
      (f"matmul peak TFLOP/s ({dtype.name}, per device)", f"{peak_per_device / 1e12:.3f}"),
      ("MFU", f"{achieved / (peak_per_device * devices):.1%}"),
  ]
  if flags.FLAGS.timm:
    if input_key != "image":
      raise app.UsageError("--timm compares plain image batches, not packed ones.")
    timm = timing.time_timm(flags.FLAGS.timm, batch_size, batch_spec["image"].shape[1],
                            config.model.get("num_classes") or 10, flags.FLAGS.steps,
                            flags.FLAGS.warmup)
    ours = images_per_step / seconds_per_step
    rows += [(f"timm {flags.FLAGS.timm} params", f"{timm['params'] / 1e6:.2f} M"),
             (f"timm {flags.FLAGS.timm} images/s (PyTorch)", f"{timm['images_per_sec']:.1f}"),
             ("ours / timm", f"{ours / timm['images_per_sec']:.2f}")]
  width = max(len(k) for k, _ in rows)
  for key, value in rows:
    print(f"{key:<{width}}  {value}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
