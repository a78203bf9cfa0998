r"""Per-device memory of a training run at pod scale, on paper: no accelerator needed.

  python -m big_vision_lite.tools.shard_plan --devices 256 --batch_size 4096

For ViT-g/14 and a ViT-22B-like model (width 6144, depth 48, 48 heads, MLP 24576) it
prints, under data parallel, FSDP and FSDP + tensor parallel, the bytes per device of
  - params, optimiser state (AdamW, as the configs use) and EMA if asked: the train loop's
    own state from `jax.eval_shape` (`train.build_training`'s init), laid out by the real
    sharding rules (`sharding.infer_shardings`) on an abstract mesh of `--devices` chips;
  - activations kept for the backward pass: the residuals of `jax.vjp` of the model's
    training forward, from `jax.eval_shape` at batch 1 and 2 (their difference is one
    example's share, so weights captured as residuals do not count), times the examples
    per data-parallel shard; with tensor parallelism, residuals with an MLP-hidden or a
    heads axis (Megatron's split) are divided by the model-axis size, the rest (residual
    stream, norms) is replicated, unless activation rules (`TP_ACTIVATION_RULES`, the
    "+ act" rows) shard the embed axis too: then every residual is divided. Residuals are what `jax.vjp` keeps before XLA fuses, so
    these are upper bounds of what a compiled step holds.
The model runs in `--compute_dtype` as the train loop's `compute_dtype` casts it.

With `--compiled`, it also compiles the train loop's own step (`train.build_training`:
classification loss, AdamW, the layout's param and activation rules) for each layout on
the host's devices, which must number `--devices` (fake CPU devices:
XLA_FLAGS=--xla_force_host_platform_device_count=N), at 1 and 2 examples per data shard,
with `--remat_policy` and `--scan_layers`, and prints XLA's `memory_analysis()` per device:
arguments (params, optimiser state, batch) and temporaries at 1 example per shard, the
temporaries each further example adds, and the largest examples per shard that fit
`--hbm_gib` (temporaries are linear in the batch; tests/test_shard_plan.py checks the
extrapolation against a third compile).
"""
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import AbstractMesh

from big_vision_lite import models
from big_vision_lite import optimizer as optimizer_lib
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite import train
from big_vision_lite import utils
from big_vision_lite.tasks.base import cast_floating

GIB = 2**30
# name -> vit model kwargs.
MODELS = {
    "ViT-g/14": dict(variant="g/14", num_classes=1000, pool_type="map"),
    "ViT-22B-like": dict(width=6144, depth=48, mlp_dim=24576, num_heads=48, patch_size=(14, 14),
                         num_classes=1000, pool_type="map"),
}
# Models --compiled can compile in minutes on CPU.
COMPILED_MODELS = {
    "ViT-L/16": dict(variant="L/16", num_classes=1000),
    "ViT-g/14": MODELS["ViT-g/14"],
}
# Megatron-style tensor parallel over "model" with FSDP over "data" for the rest.
TP_RULES = (
    (r".*MlpBlock_0/Dense_0/kernel", ("data", "model")),
    (r".*MlpBlock_0/Dense_0/bias", ("model",)),
    (r".*MlpBlock_0/Dense_1/kernel", ("model", "data")),
    (r".*(query|key|value)/kernel", ("data", "model", None)),
    (r".*(query|key|value)/bias", ("model", None)),
    (r".*out/kernel", ("model", None, "data")),
    (r".*", "fsdp"),
)


# Activation sharding for it (config field 'activation_rules'): the residual stream's embed
# axis over "model" as well, so no activation stays replicated across the model axis.
TP_ACTIVATION_RULES = (("batch", "data"), ("embed", "model"), ("mlp", "model"),
                       ("heads", "model"))


@dataclasses.dataclass
class Layout:
  name: str
  mesh_axes: tuple[tuple[str, int], ...]
  rules: tuple[tuple[str, Any], ...]
  activation_rules: tuple[tuple[str, Any], ...] = ()


def layouts(devices: int, model_parallel: int) -> list[Layout]:
  """Data parallel, FSDP and FSDP + tensor parallel (without and with activation rules) on
  `devices` chips."""
  return [
      Layout("data parallel", (("data", devices),), ((".*", "replicate"),)),
      Layout("FSDP", (("data", devices),), ((".*", "fsdp"),)),
      Layout(f"FSDP + TP{model_parallel}",
             (("data", devices // model_parallel), ("model", model_parallel)), TP_RULES),
      Layout(f"FSDP + TP{model_parallel} + act",
             (("data", devices // model_parallel), ("model", model_parallel)), TP_RULES,
             TP_ACTIVATION_RULES),
  ]


def per_device_bytes(tree: Any, mesh: AbstractMesh, rules: Sequence[tuple[str, Any]]) -> int:
  """Bytes of the largest shard of every leaf of `tree` (ShapeDtypeStructs) on one device."""
  shardings = sharding.infer_shardings(tree, mesh, rules)
  sizes = jax.tree.map(
      lambda leaf, s: int(np.prod(s.shard_shape(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize,
      tree, shardings)
  return sum(jax.tree.leaves(sizes))


def activation_bytes_per_example(model: Any, params: Any, res: int, dtype: jnp.dtype
                                 ) -> tuple[int, int]:
  """Bytes of the backward-pass residuals of one example (batch 2 minus batch 1): (all,
  the part tensor parallelism splits, i.e. tensors with an MLP-hidden or a heads axis)."""
  def residuals(batch: int) -> list[jax.ShapeDtypeStruct]:
    images = jax.ShapeDtypeStruct((batch, res, res, 3), dtype)

    def forward_vjp(p, x):
      fn = lambda p: model.apply({"params": cast_floating(p, dtype)}, x, train=True,
                                 rngs={"dropout": jax.random.key(0)})[0]
      return jax.vjp(fn, p)[1]
    return jax.tree.leaves(jax.eval_shape(forward_vjp, params, images))

  nbytes = lambda leaf: int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  hp = model.hparams()
  heads, head_dim = hp["num_heads"], hp["width"] // hp["num_heads"]
  total = split = 0
  for one, two in zip(residuals(1), residuals(2)):
    extra = nbytes(two) - nbytes(one)
    total += extra
    dims = two.shape[1:]
    if hp["mlp_dim"] in dims or (heads in dims and (
        head_dim in dims or len(dims) >= 3 and dims[-1] == dims[-2])):  # [.., H, T, T]
      split += extra
  return total, split


@dataclasses.dataclass
class ModelState:
  """Abstract shapes of one model's training state and its activations per example."""
  params: Any
  opt_state: Any
  activation_bytes_per_example: int
  tensor_parallel_bytes_per_example: int  # The part of the above that TP splits.


def model_state(model_kwargs: dict[str, Any], res: int, compute_dtype: str) -> ModelState:
  """`jax.eval_shape` of a `vit` model's params, AdamW state and backward residuals, with
  matmuls in `compute_dtype`."""
  model = models.get("vit").Model(**model_kwargs, dtype_mm=compute_dtype)
  images = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x)["params"], images)
  config = ml_collections.ConfigDict(dict(total_steps=1000, lr=1e-3, wd=1e-4,
                                          optax_name="adamw"))
  tx, _ = optimizer_lib.make_optimizer(config, params)
  return ModelState(params, jax.eval_shape(tx.init, params), *activation_bytes_per_example(
      model, params, res, jnp.dtype(compute_dtype)))


def plan(state: ModelState, layout: Layout, batch_size: int) -> dict[str, float]:
  """GiB per device of params, optimiser state and activations under `layout`."""
  mesh = AbstractMesh(tuple(size for _, size in layout.mesh_axes),
                      tuple(name for name, _ in layout.mesh_axes))
  data_shards = int(np.prod([mesh.shape[a] for a in sharding.batch_axes(mesh)]))
  if batch_size % data_shards:
    raise ValueError(f"Flag 'batch_size' ({batch_size}) must be divisible by the "
                     f"{data_shards} data-parallel shards of {layout.name}.")
  model_shards = mesh.shape.get("model", 1)
  if ("embed", "model") in layout.activation_rules:  # Every residual is split.
    per_example = state.activation_bytes_per_example / model_shards
  else:
    per_example = (state.activation_bytes_per_example - state.tensor_parallel_bytes_per_example
                   + state.tensor_parallel_bytes_per_example / model_shards)
  return {
      "params": per_device_bytes(state.params, mesh, layout.rules) / GIB,
      "optimizer": per_device_bytes(state.opt_state, mesh, layout.rules) / GIB,
      "activations": per_example * (batch_size // data_shards) / GIB,
      "num_params": utils.count_params(state.params),
  }


def compiled_step_bytes(model_kwargs: dict[str, Any], res: int, layout: Layout,
                        examples_per_shard: int, compute_dtype: str, remat_policy: str = "none",
                        scan_layers: bool = False) -> dict[str, float]:
  """XLA's bytes per device (arguments, temporaries) of the train loop's classification
  step of a `vit` with `model_kwargs` under `layout`, compiled on the host's devices."""
  config = ml_collections.ConfigDict(dict(
      model_name="vit", task="classification", total_steps=1000, lr=1e-3, wd=1e-4,
      optax_name="adamw", compute_dtype=compute_dtype, mesh=list(layout.mesh_axes),
      sharding_rules=list(layout.rules), activation_rules=list(layout.activation_rules),
      model=dict(model_kwargs, remat_policy=remat_policy, scan_layers=scan_layers)))
  mesh = sharding.make_mesh(config.mesh)
  batch_size = examples_per_shard * sharding.batch_divisor(mesh)
  task = tasks.REGISTRY.get(config.task)(config, models.from_config(config), mesh)
  spec = {"image": jax.ShapeDtypeStruct((batch_size, res, res, 3), jnp.float32),
          "labels": jax.ShapeDtypeStruct((batch_size, model_kwargs["num_classes"]),
                                         jnp.float32)}
  training = train.build_training(config, task, mesh, spec)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
           for k, v in spec.items()}
  memory = training.step.lower(training.abstract_state, batch).compile().memory_analysis()
  return {"arguments": memory.argument_size_in_bytes, "temporaries": memory.temp_size_in_bytes}


def compiled_plan(model_kwargs: dict[str, Any], res: int, layout: Layout, compute_dtype: str,
                  hbm_gib: float, remat_policy: str = "none", scan_layers: bool = False
                  ) -> dict[str, float]:
  """GiB per device from two compiles (1 and 2 examples per data shard): arguments and
  temporaries at 1, temporaries per further example, and the most examples per shard
  that fit `hbm_gib` (0 if not even one)."""
  one, two = (compiled_step_bytes(model_kwargs, res, layout, n, compute_dtype, remat_policy,
                                  scan_layers) for n in (1, 2))
  per_example = max(two["temporaries"] - one["temporaries"], 1)
  fixed = one["arguments"] + one["temporaries"] - per_example  # The batch-free part.
  fits = int((hbm_gib * GIB - fixed) // per_example)
  return {"arguments": one["arguments"] / GIB, "temporaries": one["temporaries"] / GIB,
          "per_example": per_example / GIB, "max_examples_per_shard": max(fits, 0)}


def main(argv: list[str]) -> None:
  del argv
  args = flags.FLAGS
  if args.devices % args.model_parallel:
    raise app.UsageError(f"--devices ({args.devices}) must be divisible by --model_parallel "
                         f"({args.model_parallel}).")
  print(f"{args.devices} chips, global batch {args.batch_size} at {args.res}px, AdamW "
        f"(f32 params and moments), activations in {args.compute_dtype}; GiB per device.")
  header = (f"{'model':<14} {'layout':<16} {'params':>8} {'optim':>8} {'activ':>8} "
            f"{'total':>8}  fits {args.hbm_gib:g} GiB")
  print(header)
  print("-" * len(header))
  for name, kwargs in MODELS.items():
    state = model_state(kwargs, args.res, args.compute_dtype)
    for layout in layouts(args.devices, args.model_parallel):
      row = plan(state, layout, args.batch_size)
      total = row["params"] + row["optimizer"] + row["activations"]
      print(f"{name:<14} {layout.name:<16} {row['params']:8.2f} {row['optimizer']:8.2f} "
            f"{row['activations']:8.2f} {total:8.2f}  {'yes' if total <= args.hbm_gib else 'no'}"
            f"  ({row['num_params'] / 1e9:.2f}B params)", flush=True)
  if not args.compiled:
    return
  if jax.device_count() != args.devices:
    raise app.UsageError(f"--compiled needs {args.devices} devices, this host has "
                         f"{jax.device_count()}: set XLA_FLAGS=--xla_force_host_platform_"
                         f"device_count={args.devices} (CPU).")
  print(f"\nCompiled by XLA on {args.devices} {jax.devices()[0].platform} devices "
        f"(remat_policy={args.remat_policy}, scan_layers={args.scan_layers}); GiB per device; "
        f"examples per data shard that fit {args.hbm_gib:g} GiB:")
  for name in args.compiled_models:
    for layout in layouts(args.devices, args.model_parallel):
      row = compiled_plan(COMPILED_MODELS[name], args.res, layout, args.compute_dtype,
                          args.hbm_gib, args.remat_policy, args.scan_layers)
      print(f"{name:<14} {layout.name:<22} arguments {row['arguments']:8.2f}  temporaries "
            f"(1 example/shard) {row['temporaries']:8.2f}  per example "
            f"{row['per_example']:7.3f}  fits {row['max_examples_per_shard']}", flush=True)


if __name__ == "__main__":
  flags.DEFINE_integer("devices", 256, "Chips in the mesh.")
  flags.DEFINE_integer("model_parallel", 8, "Size of the tensor-parallel axis.")
  flags.DEFINE_integer("batch_size", 4096, "Global batch size.")
  flags.DEFINE_integer("res", 224, "Image side.")
  flags.DEFINE_string("compute_dtype", "bfloat16", "Activation dtype.")
  flags.DEFINE_float("hbm_gib", 32.0, "Memory per chip (TPU v4: 32, v5e: 16, v5p: 95).")
  flags.DEFINE_bool("compiled", False, "Also compile the step on the host's devices.")
  flags.DEFINE_list("compiled_models", ["ViT-L/16"], f"Of {', '.join(COMPILED_MODELS)}.")
  flags.DEFINE_string("remat_policy", "none", "For --compiled.")
  flags.DEFINE_bool("scan_layers", False, "For --compiled.")
  app.run(main)
