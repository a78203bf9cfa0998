r"""Our ViT's train step beside big_vision's own ViT, in one process under the same XLA.

  python -m benchmarks.big_vision_vit --big_vision BIG_VISION_CHECKOUT --variant S/16

BIG_VISION_CHECKOUT is a clone of google-research/big_vision. Its `big_vision/models/vit.py`
is loaded from that file; the two modules it imports only for checkpoint loading
(`big_vision.utils`, which imports TensorFlow, and `big_vision.models.common`) are empty
stand-ins, so nothing of big_vision but the model code runs. Both models get the same
hyper-parameters (pool "gap", learned posemb, zero-init head, no dropout), the same batch,
and the same step (`timing.build_step`: forward with train=True, softmax cross-entropy,
backward, AdamW, state donated); their timed steps are interleaved (`timing`), so the ratio
comes from one run on one machine. Prints per model: params, compile seconds, the compiled
program's instruction count and XLA's bytes accessed, ms/step, images/s; whether the two
compiled programs hold the same instructions (else the op counts only one of them has);
and ours / big_vision in images/s.
"""
import collections
import importlib.util
import os
import re
import sys
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from benchmarks import timing
from big_vision_lite import models

flags.DEFINE_string("big_vision", None, "Path of a google-research/big_vision checkout.",
                    required=True)
flags.DEFINE_string("variant", "S/16", "ViT variant of both models, e.g. Ti/16, S/16, B/16.")
flags.DEFINE_integer("batch_size", 32, "Images per step.")
flags.DEFINE_integer("res", 224, "Image side.")
flags.DEFINE_integer("num_classes", 1000, "Classes of the head.")
flags.DEFINE_integer("steps", 10, "Timed steps of each model (interleaved).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_list("ours_kwargs", [], "Extra fields of our model as key=value, e.g. "
                  "dtype_mm=bfloat16 (applied to big_vision's where it has the field).")


def load_big_vision_vit(checkout: str) -> types.ModuleType:
  """big_vision.models.vit from `checkout`, with stand-ins for its checkpoint-only imports."""
  path = os.path.join(checkout, "big_vision", "models", "vit.py")
  if not os.path.isfile(path):
    raise app.UsageError(f"--big_vision: {path} does not exist; pass a checkout of "
                         "google-research/big_vision.")
  for name in ("big_vision", "big_vision.models", "big_vision.utils",
               "big_vision.models.common"):
    sys.modules.setdefault(name, types.ModuleType(name))
  spec = importlib.util.spec_from_file_location("big_vision.models.vit", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_kwargs(pairs: list[str]) -> dict[str, Any]:
  """["dtype_mm=bfloat16", "scan_layers=True"] -> {"dtype_mm": "bfloat16", "scan_layers": True}."""
  kwargs = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
      raise app.UsageError(f"--ours_kwargs: {pair!r} is not key=value.")
    kwargs[key] = {"True": True, "False": False}.get(value, value)
  return kwargs


def prepare(model: Any, images: jax.Array, labels: jax.Array):
  """(compiled step, its first state, params count, compile seconds) of `model` on this
  batch."""
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(images[:1])
  tx = optax.adamw(1e-3, weight_decay=0.05)
  params = variables["params"]
  state = (params, {}, tx.init(params))
  start = time.perf_counter()
  step = timing.build_step(model, variables, tx).lower(state, images, labels).compile()
  return step, state, sum(x.size for x in jax.tree.leaves(params)), time.perf_counter() - start


def hlo_instructions(compiled: jax.stages.Compiled) -> collections.Counter:
  """The compiled program's instructions, without their names and source metadata."""
  counts = collections.Counter()
  for line in compiled.as_text().splitlines():
    if " = " not in line or line.startswith("HloModule"):
      continue
    line = re.sub(r", metadata=\{[^}]*\}", "", line)
    line = re.sub(r"%[\w.\-]+", "%", line)
    counts[re.sub(r"^\s*(ROOT )?[\w.\-]+ = ", "", line).strip()] += 1
  return counts


def op_name(instruction: str) -> str:
  """"f32[8,197]{1,0} transpose(%), dimensions={1,0}" -> "transpose"."""
  match = re.search(r"\s([\w-]+)\(", instruction)
  return match.group(1) if match else "?"


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  big_vision_vit = load_big_vision_vit(f.big_vision)
  extra = parse_kwargs(f.ours_kwargs)
  common = dict(pool_type="gap", posemb="learn", head_zeroinit=True, dropout=0.0)
  theirs_extra = {k: v for k, v in extra.items() if k in ("dtype_mm",)}
  built = {
      "ours": models.get("vit").Model(num_classes=f.num_classes, variant=f.variant,
                                      **common, **extra),
      "big_vision": big_vision_vit.Model(num_classes=f.num_classes, variant=f.variant,
                                         **common, **theirs_extra),
  }
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(f.batch_size, f.res, f.res, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, f.num_classes, f.batch_size), jnp.int32)
  states, steps, counts, compile_s = {}, {}, {}, {}
  for name, model in built.items():
    steps[name], states[name], counts[name], compile_s[name] = prepare(model, images, labels)
  if counts["ours"] != counts["big_vision"]:
    raise RuntimeError(f"The two models differ in size: {counts}.")
  programs = {name: hlo_instructions(step) for name, step in steps.items()}
  ours_only = programs["ours"] - programs["big_vision"]
  theirs_only = programs["big_vision"] - programs["ours"]

  def runner(name):
    def run():
      states[name], loss = steps[name](states[name], images, labels)
      return loss
    return run, ()

  _, step_s = timing.time_interleaved({name: runner(name) for name in built},
                                     warmup=f.warmup, steps=f.steps)
  device = jax.devices()[0]
  print(f"device: {jax.device_count()} x {device.device_kind}, jax {jax.__version__}; "
        f"ViT-{f.variant}, batch {f.batch_size} x {f.res}px, ours {extra or 'default'}")
  print("model  params M  compile s  instructions  GB accessed  ms/step  img/s")
  for name in built:
    analysis = steps[name].cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    print(f"{name}  {counts[name] / 1e6:.2f}  {compile_s[name]:.1f}  "
          f"{sum(programs[name].values())}  {analysis.get('bytes accessed', 0) / 1e9:.2f}  "
          f"{step_s[name] * 1e3:.1f}  {f.batch_size / step_s[name]:.1f}")
  if ours_only or theirs_only:
    diff = lambda c: dict(collections.Counter(op_name(i) for i in c.elements()))
    print(f"compiled programs differ: only ours {diff(ours_only)}, only big_vision's "
          f"{diff(theirs_only)}")
  else:
    print("compiled programs: the same instructions (names and source metadata aside)")
  print(f"ours / big_vision (img/s): {step_s['big_vision'] / step_s['ours']:.3f}")


if __name__ == "__main__":
  app.run(main)
