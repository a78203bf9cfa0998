r"""Image-text train step with the chunked ring loss vs the naive loss: the largest global
batch whose step fits a per-device memory budget, and the step time of both where both fit.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.contrastive
  python -m benchmarks.contrastive --config configs/siglip.py:loss=softmax --budget_mib 256

(--config defaults to configs/siglip.py.) The README's figures use one-layer width-32
towers on 8 px images and 8-token captions (`--config.model.image.width=32 ...`), so that
the loss's [B, B] terms, not the activations, decide the largest batch.
The step is the loop's own (`train.build_training` of the config's `contrastive` task:
forward of both towers, the loss, backward, AdamW) on synthetic images and captions, over
all devices of the mesh. Only `contrastive.impl` differs between the two cases:
  chunked    `kernels.contrastive_loss` chunked, inside `shard_map`: each device holds its
             own rows against one text block of the ring (memory O(B_local · chunk));
  naive      impl "reference": the embeddings all-gathered and every device forms the
             [B, B] logits and their gradient, as big_vision's SigLIP trainer does
             (its [B_local, B] slice).
Memory is XLA's compiled memory of the step per device (arguments + outputs - donated
aliases + temporaries: `memory_analysis` of the compiled executable; nothing runs for it).
The global batch doubles from --start_batch while it fits --budget_mib, up to --max_batch;
then both cases are timed, interleaved, at the largest batch where both fit.
"""
import json
import sys
from typing import Any

import jax
import numpy as np
from absl import app, flags

from big_vision_lite import config_lib
from big_vision_lite import models
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite import train
from benchmarks import timing
from configs import siglip as siglip_config

# --config is the train loop's flag (defined when big_vision_lite.train is imported).
flags.DEFINE_float("budget_mib", 512.0, "Per-device memory budget of the step, MiB.")
flags.DEFINE_integer("start_batch", 64, "First global batch of the search.")
flags.DEFINE_integer("max_batch", 65536, "Largest global batch tried.")
flags.DEFINE_integer("steps", 5, "Timed steps per case.")
flags.DEFINE_integer("warmup", 1, "Untimed steps per case after compilation.")
flags.DEFINE_string("out", None, "Where to write the results as JSON.")
FLAGS = flags.FLAGS
IMPLS = {"chunked": "chunked", "naive": "reference"}


def synthetic_batch(config: Any, batch_size: int) -> dict[str, np.ndarray]:
  """Random images at the config's eval resolution and random full-length captions."""
  rng = np.random.default_rng(0)
  if "resize(" not in config.input.pp:
    raise app.UsageError("benchmarks.contrastive times plain image batches (a config whose "
                         "input.pp has resize(res)), not packed ones.")
  res = int(config.input.pp.split("resize(")[1].split(")")[0])
  max_len, vocab = config.model.text.max_len, config.model.text.vocab_size
  return {"image": rng.normal(size=(batch_size, res, res, 3)).astype(np.float32),
          "text": rng.integers(2, vocab, (batch_size, max_len)).astype(np.int32)}


def build(config: Any, impl: str, batch_size: int, mesh: Any) -> tuple[Any, Any]:
  """(training, batch spec) of the config's step with `contrastive.impl = impl`."""
  config = config.copy_and_resolve_references()
  config.contrastive.impl = impl
  config.input.batch_size = batch_size
  config_lib.validate(config)
  task = tasks.REGISTRY.get("contrastive")(config, models.from_config(config), mesh)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
          for k, v in synthetic_batch(config, batch_size).items()}
  return train.build_training(config, task, mesh, spec), spec


def step_mib(config: Any, impl: str, batch_size: int, mesh: Any) -> float:
  """Per-device MiB of the compiled step (arguments + outputs - aliases + temporaries)."""
  training, spec = build(config, impl, batch_size, mesh)
  batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding.batch_sharding(mesh))
           for k, s in spec.items()}
  memory = training.step.lower(training.abstract_state, batch).compile().memory_analysis()
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return total / 2**20


def largest_fitting(config: Any, name: str, mesh: Any) -> tuple[int, list[dict[str, Any]]]:
  """The largest doubling of --start_batch whose step fits the budget (0: none), and the
  memory of every batch tried."""
  tried, best, batch = [], 0, FLAGS.start_batch
  while batch <= FLAGS.max_batch:
    mib = step_mib(config, IMPLS[name], batch, mesh)
    tried.append({"batch": batch, "mib": mib})
    print(f"  {name:9s} batch {batch:6d}: {mib:9.1f} MiB per device", flush=True)
    if mib > FLAGS.budget_mib:
      break
    best, batch = batch, batch * 2
  return best, tried


def main(argv: list[str]) -> None:
  del argv
  config = FLAGS.config or siglip_config.get_config()
  config.evals = {}
  mesh = sharding.make_mesh(config.get("mesh"))
  print(f"devices: {mesh.devices.size} x {jax.devices()[0].device_kind}; loss "
        f"{config.contrastive.loss}; budget {FLAGS.budget_mib:g} MiB per device")
  results: dict[str, Any] = {"devices": int(mesh.devices.size), "budget_mib": FLAGS.budget_mib}
  for name in IMPLS:
    best, tried = largest_fitting(config, name, mesh)
    results[name] = {"largest_batch": best, "tried": tried}
  both = min(results[name]["largest_batch"] for name in IMPLS)
  if both:
    cases = {}
    for name, impl in IMPLS.items():
      training, spec = build(config, impl, both, mesh)
      state = {"state": training.init(jax.random.key(0))}
      batch = sharding.global_batch(synthetic_batch(config, both), mesh)

      def step(state=state, training=training, batch=batch):
        state["state"], metrics = training.step(state["state"], batch)
        return metrics["loss"]
      cases[name] = (step, ())
    _, seconds = timing.time_interleaved(cases, warmup=FLAGS.warmup, steps=FLAGS.steps)
    results["timed_batch"] = both
    results["step_ms"] = {name: s * 1e3 for name, s in seconds.items()}
  print(f"largest global batch within {FLAGS.budget_mib:g} MiB per device: chunked "
        f"{results['chunked']['largest_batch']}, naive {results['naive']['largest_batch']}")
  if both:
    ms = results["step_ms"]
    print(f"step at batch {both}: chunked {ms['chunked']:.1f} ms, naive {ms['naive']:.1f} ms; "
          f"chunked / naive = {ms['chunked'] / ms['naive']:.2f}")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  sys.exit(app.run(main))
