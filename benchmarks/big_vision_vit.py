r"""Our ViT's train step beside big_vision's own ViT, in one process under the same XLA.

  python -m benchmarks.big_vision_vit --big_vision BIG_VISION_CHECKOUT --variant S/16

BIG_VISION_CHECKOUT is a clone of google-research/big_vision. Its `big_vision/models/vit.py`
is loaded from that file; the two modules it imports only for checkpoint loading
(`big_vision.utils`, which imports TensorFlow, and `big_vision.models.common`) are empty
stand-ins, so nothing of big_vision but the model code runs. Both models get the same
hyper-parameters (pool "gap", learned posemb, zero-init head, no dropout), the same batch,
and the same step (`timing.build_step`: forward with train=True, softmax cross-entropy,
backward, AdamW, state donated); their timed steps are interleaved (`timing`), so the ratio
comes from one run on one machine. Prints per model: params, compile seconds, ms/step,
images/s, and ours / big_vision in images/s.
"""
import importlib.util
import os
import sys
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
  """(jitted step, its first state, params count) of `model` on this batch."""
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(images[:1])
  tx = optax.adamw(1e-3, weight_decay=0.05)
  params = variables["params"]
  state = (params, {}, tx.init(params))
  step = timing.build_step(model, variables, tx)
  return step, state, sum(x.size for x in jax.tree.leaves(params))


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
  states, steps, counts = {}, {}, {}
  for name, model in built.items():
    steps[name], states[name], counts[name] = prepare(model, images, labels)
  if counts["ours"] != counts["big_vision"]:
    raise RuntimeError(f"The two models differ in size: {counts}.")

  def runner(name):
    def run():
      states[name], loss = steps[name](states[name], images, labels)
      return loss
    return run, ()

  first_s, step_s = timing.time_interleaved({name: runner(name) for name in built},
                                            warmup=f.warmup, steps=f.steps)
  device = jax.devices()[0]
  print(f"device: {jax.device_count()} x {device.device_kind}, jax {jax.__version__}; "
        f"ViT-{f.variant}, batch {f.batch_size} x {f.res}px, ours {extra or 'default'}")
  print("model  params M  first call s  ms/step  img/s")
  for name in built:
    print(f"{name}  {counts[name] / 1e6:.2f}  {first_s[name]:.1f}  "
          f"{step_s[name] * 1e3:.1f}  {f.batch_size / step_s[name]:.1f}")
  print(f"ours / big_vision (img/s): {step_s['big_vision'] / step_s['ours']:.3f}")


if __name__ == "__main__":
  app.run(main)
