r"""DETR's Hungarian matching on the device vs on the host, and the DETR train step with each.

  python -m benchmarks.detr                       # Q = 100, T in 10, 25, 50, batch 64
  python -m benchmarks.detr --out detr_cpu.json

Matching (`losses.detr.batched_hungarian_match` on the official matching cost of random
detections; each image has a random number of real targets up to T, the rest padding):
  optax         the exact Hungarian algorithm of optax vmapped over the batch, jitted, on
                the device (config field `detr.matcher="optax"`, the default);
  scipy (jit)   scipy's linear_sum_assignment on the host through one `pure_callback` per
                batch, inside the same jitted function (`detr.matcher="scipy"`);
  scipy (host)  the official code's way: the cost copied to the host (`.cpu()`), then one
                linear_sum_assignment per image on its real targets, in a Python loop.
All three give assignments of the same total cost (checked here on every batch size).

Train step: the loop's own jitted step (`train.build_training`: forward, set loss with
auxiliary losses on every decoder layer, backward, AdamW) of configs/detr.py's CPU default
model on one synthetic batch, with `detr.matcher` optax vs scipy; --batch_size and
--num_targets set its size. Steps and matchers are timed interleaved after compilation
and --warmup untimed calls (medians of --steps), so each ratio comes from one run.
"""
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from absl import app, flags

from benchmarks import timing
from big_vision_lite import config_lib
from big_vision_lite import models
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite import train
from big_vision_lite.losses import detr as detr_losses
from configs import detr as detr_config

flags.DEFINE_integer("batch_size", 64, "Images per matching batch and per train step.")
flags.DEFINE_integer("num_queries", 100, "Queries Q of the matching benchmark.")
flags.DEFINE_list("num_targets", ["10", "25", "50"], "Target slots T of the matching.")
flags.DEFINE_integer("num_classes", 91, "Classes of the matching cost's logits.")
flags.DEFINE_integer("step_targets", 4, "Target slots of the train step (the CPU config's).")
flags.DEFINE_bool("train_step", True, "Also time the train step with each matcher.")
flags.DEFINE_integer("steps", 10, "Timed calls per case.")
flags.DEFINE_integer("warmup", 2, "Untimed calls per case after compilation.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic detections and batch.")
flags.DEFINE_string("out", None, "Where to write the results as JSON.")
FLAGS = flags.FLAGS


def random_problem(rng: np.random.Generator, batch: int, num_queries: int, num_targets: int,
                   num_classes: int) -> dict[str, np.ndarray]:
  """Random logits and boxes, targets with 1..T real slots per image."""
  def boxes(n):
    return np.concatenate([rng.uniform(0.2, 0.8, (batch, n, 2)),
                           rng.uniform(0.05, 0.4, (batch, n, 2))], -1).astype(np.float32)
  counts = rng.integers(1, num_targets + 1, batch)
  return {"logits": rng.normal(size=(batch, num_queries, num_classes + 1)).astype(np.float32),
          "boxes": boxes(num_queries), "target_boxes": boxes(num_targets),
          "labels": rng.integers(0, num_classes, (batch, num_targets)).astype(np.int32),
          "mask": np.arange(num_targets)[None] < counts[:, None]}


def host_loop_match(cost: jax.Array, mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
  """The official matcher's host part: the cost to numpy, scipy per image."""
  cost = np.asarray(cost)
  return [scipy.optimize.linear_sum_assignment(c[:, m]) for c, m in zip(cost, mask)]


def total_costs(cost: np.ndarray, mask: np.ndarray, query_idx: np.ndarray,
                valid: np.ndarray) -> np.ndarray:
  """Per-image total cost of target-major assignments (query_idx [B, T], valid [B, T])."""
  rows = np.arange(cost.shape[0])[:, None]
  cols = np.arange(cost.shape[2])[None]
  picked = cost[rows, np.minimum(query_idx, cost.shape[1] - 1), cols]
  return np.where(valid & mask, picked, 0.0).sum(1)


def matching(rng: np.random.Generator) -> list[dict[str, Any]]:
  results = []
  for num_targets in map(int, FLAGS.num_targets):
    p = random_problem(rng, FLAGS.batch_size, FLAGS.num_queries, num_targets,
                       FLAGS.num_classes)
    cost = jax.jit(detr_losses.matching_cost)(p["logits"], p["boxes"], p["labels"],
                                              p["target_boxes"])  # [B, Q, T]
    mask = jnp.asarray(p["mask"])
    optax_fn = jax.jit(lambda c, m: detr_losses.batched_hungarian_match(c, m, method="optax"))
    scipy_fn = jax.jit(lambda c, m: detr_losses.batched_hungarian_match(c, m, method="scipy"))
    cases = {"optax": (optax_fn, (cost, mask)), "scipy (jit)": (scipy_fn, (cost, mask)),
             "scipy (host)": (lambda c, m: host_loop_match(c, m), (cost, p["mask"]))}
    first_s, step_s = timing.time_interleaved(cases, warmup=FLAGS.warmup, steps=FLAGS.steps)
    host_cost = np.asarray(cost, np.float64)
    reference = np.array([host_cost[b][:, p["mask"][b]][r, c].sum() for b, (r, c) in
                          enumerate(host_loop_match(cost, p["mask"]))])
    agree = {}
    for name, fn in (("optax", optax_fn), ("scipy (jit)", scipy_fn)):
      query_idx, _, valid = jax.device_get(fn(cost, mask))
      agree[name] = bool(np.allclose(total_costs(host_cost, p["mask"], query_idx, valid),
                                     reference, rtol=1e-5, atol=1e-4))
    results.append({"num_targets": num_targets, "first_s": first_s, "median_s": step_s,
                    "same_total_cost": agree})
  return results


def train_steps(rng: np.random.Generator) -> dict[str, Any]:
  """Median step seconds of configs/detr.py's CPU model with each matcher."""
  b, t = FLAGS.batch_size, FLAGS.step_targets
  counts = rng.integers(1, t + 1, b)
  box_mask = np.arange(t)[None] < counts[:, None]
  host_batch = {
      "image": rng.normal(size=(b, 64, 64, 3)).astype(np.float32),
      "pixel_mask": np.ones((b, 64, 64), bool),
      "boxes": np.concatenate([rng.uniform(0.3, 0.7, (b, t, 2)),
                               rng.uniform(0.1, 0.4, (b, t, 2))], -1).astype(np.float32),
      "labels": rng.integers(0, 10, (b, t)).astype(np.int32), "box_mask": box_mask}
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host_batch.items()}
  cases = {}
  for matcher in detr_losses.MATCH_METHODS:
    config = detr_config.get_config(f"batch_size={b}")
    config.detr.matcher = matcher
    config.evals = {}
    config_lib.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    task = tasks.REGISTRY.get("detr")(config, models.from_config(config))
    training = train.build_training(config, task, mesh, spec)
    state = {"state": training.init(jax.random.key(FLAGS.seed))}
    batch = sharding.global_batch(host_batch, mesh)

    def step(state=state, training=training, batch=batch):
      state["state"], metrics = training.step(state["state"], batch)
      return metrics
    cases[f"step, matcher {matcher}"] = (step, ())
  first_s, step_s = timing.time_interleaved(cases, warmup=FLAGS.warmup, steps=FLAGS.steps)
  return {"batch_size": b, "num_targets": t, "first_s": first_s, "median_s": step_s}


def main(argv: list[str]) -> None:
  del argv
  rng = np.random.default_rng(FLAGS.seed)
  device = jax.devices()[0]
  print(f"device: {len(jax.devices())} x {device.device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__}")
  print(f"matching: batch {FLAGS.batch_size}, Q = {FLAGS.num_queries}, {FLAGS.num_classes} "
        f"classes; median ms of {FLAGS.steps} interleaved calls after {FLAGS.warmup} warm-up")
  results = {"matching": matching(rng)}
  for row in results["matching"]:
    ms = {k: v * 1e3 for k, v in row["median_s"].items()}
    print(f"  T = {row['num_targets']:3d}: optax {ms['optax']:8.1f}  scipy (jit) "
          f"{ms['scipy (jit)']:8.1f}  scipy (host) {ms['scipy (host)']:8.1f}   optax / scipy "
          f"(jit) = {ms['optax'] / ms['scipy (jit)']:.2f}, optax / scipy (host) = "
          f"{ms['optax'] / ms['scipy (host)']:.2f}; same total cost: {row['same_total_cost']}")
  if FLAGS.train_step:
    results["train_step"] = steps = train_steps(rng)
    ms = {k: v * 1e3 for k, v in steps["median_s"].items()}
    print(f"train step (configs/detr.py CPU model, batch {steps['batch_size']}, T = "
          f"{steps['num_targets']}): " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
          + f"; optax / scipy = {ms['step, matcher optax'] / ms['step, matcher scipy']:.2f}")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  sys.exit(app.run(main))
