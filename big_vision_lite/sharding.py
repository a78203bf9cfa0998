"""Device mesh and partitioning rules: the one place where sharding is decided.

`mesh` in the config is a list of (axis_name, size) pairs, -1 taking the remaining
devices: `[("data", -1)]` (default, data parallel) or `[("data", -1), ("model", 2)]`.
`sharding_rules` is a list of (regex, spec) matched in order against parameter names such
as "params/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"; the first match wins and
unmatched leaves are replicated. A spec is:
  - "replicate";
  - "fsdp" or "fsdp:<axis>": shard the largest dimension divisible by the axis size over
    that axis (default "data"), i.e. parameters and optimiser state are split across the
    data-parallel devices and gathered by XLA where needed;
  - a tuple/list of axis names or None per dimension, as in `PartitionSpec`.
The batch is split over every mesh axis named "data" (or the first axis).

`activation_rules` shard activations as well, as MaxText and t5x do: a list of
(logical_axis, mesh axes) pairs, logical axes from ACTIVATION_AXES ("batch", "length",
"embed", "mlp", "heads"), mesh axes an axis name, a tuple of them or None. Transformer
blocks name their activations' axes (`nn.with_logical_constraint`, e.g. the residual
stream [B, N, D] is ("batch", "length", "embed")) and the train step applies the rules
while it traces (`activation_sharding`); unnamed logical axes stay unsharded. E.g. FSDP +
tensor parallel: (("batch", "data"), ("mlp", "model"), ("heads", "model"),
("embed", "model")).
"""
import contextlib
import re
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from big_vision_lite import utils


def make_mesh(axes: Sequence[tuple[str, int]] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a Mesh from (name, size) pairs; -1 takes all remaining devices.

  A ValueError names config field 'mesh', the sizes given and the devices available.
  """
  devices = list(devices if devices is not None else jax.devices())
  axes = list(axes or [("data", -1)])
  sizes = [size for _, size in axes]
  if any(size != -1 and size < 1 for size in sizes):
    raise ValueError(f"Config field 'mesh' {axes}: every axis size must be >= 1, or -1 for "
                     f"all remaining devices ({len(devices)} available).")
  if sizes.count(-1) > 1:
    raise ValueError(f"Config field 'mesh' may have at most one -1 size, got {axes}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"Config field 'mesh' {axes}: {len(devices)} devices are not "
                       f"divisible by the fixed axis sizes ({known}).")
    sizes[sizes.index(-1)] = len(devices) // known
  total = int(np.prod(sizes))
  if total > len(devices):
    raise ValueError(f"Config field 'mesh' {axes} needs {total} devices; "
                     f"{len(devices)} are available. Use axis sizes whose product is at most "
                     f"{len(devices)}, or -1 for all remaining devices, e.g. (('data', -1),).")
  device_grid = np.asarray(devices[:total]).reshape(sizes)
  return Mesh(device_grid, tuple(name for name, _ in axes))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over."""
  data = tuple(a for a in mesh.axis_names if a.startswith("data"))
  return data or mesh.axis_names[:1]


def batch_divisor(mesh: Mesh) -> int:
  """What a global batch size must be a multiple of: the data-axis devices and processes."""
  data_devices = int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))
  return int(np.lcm(data_devices, jax.process_count()))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh, axis: str) -> P:
  size = mesh.shape[axis]
  for dim in np.argsort(shape)[::-1]:
    if shape[dim] % size == 0 and shape[dim] >= size:
      spec = [None] * len(shape)
      spec[dim] = axis
      return P(*spec)
  return P()


def _spec_for(rule_spec: Any, shape: tuple[int, ...], mesh: Mesh, name: str) -> P:
  check_rule_spec(rule_spec, mesh)
  if rule_spec == "replicate":
    return P()
  if isinstance(rule_spec, str):
    return _fsdp_spec(shape, mesh, rule_spec.split(":")[1] if ":" in rule_spec else "data")
  if len(rule_spec) > len(shape):
    raise ValueError(f"Config field 'sharding_rules': spec {rule_spec} has more entries "
                     f"than {name} has dimensions {shape}.")
  return P(*rule_spec)


def check_rule_spec(rule_spec: Any, mesh: Mesh) -> None:
  """Raises a ValueError unless `rule_spec` is a spec (see the module docstring) whose axis
  names are axes of `mesh`."""
  axes = ", ".join(map(repr, mesh.axis_names))
  if rule_spec == "replicate":
    return
  if isinstance(rule_spec, str) and rule_spec.split(":")[0] == "fsdp":
    axis = rule_spec.split(":")[1] if ":" in rule_spec else "data"
    if axis not in mesh.axis_names:
      raise ValueError(f"Config field 'sharding_rules': {rule_spec!r} names axis {axis!r}; "
                       f"the mesh axes are {axes}.")
    return
  if isinstance(rule_spec, (tuple, list)):
    for entry in rule_spec:
      names = entry if isinstance(entry, (tuple, list)) else (entry,)
      unknown = [a for a in names if a is not None and a not in mesh.axis_names]
      if unknown:
        raise ValueError(f"Config field 'sharding_rules': spec {tuple(rule_spec)} names axis "
                         f"{unknown[0]!r}; entries must be None or mesh axes ({axes}).")
    return
  raise ValueError(f"Config field 'sharding_rules': unknown spec {rule_spec!r}; use "
                   "'replicate', 'fsdp', 'fsdp:<axis>' or a tuple of axis names.")


def infer_shardings(tree: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] | None = None) -> Any:
  """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs) by the rules.

  Explicit specs are per layer: in a scanned stack (`utils.STACKABLE_LAYERS`, params with a
  leading [depth] axis) they apply to the dimensions after it.

  A rule whose regex matches no leaf name raises a ValueError listing some names.
  """
  compiled = [(re.compile(pattern), spec) for pattern, spec in (rules or ())]
  names = list(utils.flatten_names(tree))
  stacked = lambda name: any(part in utils.STACKABLE_LAYERS for part in name.split("/"))
  for (regex, spec), (pattern, _) in zip(compiled, rules or ()):
    if not any(regex.fullmatch(name) for name in names):
      params = [n for n in names if n.startswith("params/")] or names
      raise ValueError(
          f"Config field 'sharding_rules': rule ({pattern!r}, {spec!r}) matches no name (the "
          f"regex must match a whole name); {len(names)} names such as "
          f"{', '.join(params[:4])}.")

  def one(name: str, leaf: Any) -> NamedSharding:
    shape = tuple(getattr(leaf, "shape", ()))
    for regex, spec in compiled:
      if regex.fullmatch(name):
        if isinstance(spec, (tuple, list)) and stacked(name):
          spec = (None, *spec)  # A per-layer spec; the scanned layer axis stays whole.
        return NamedSharding(mesh, _spec_for(spec, shape, mesh, name))
    return NamedSharding(mesh, P())

  return utils.tree_map_with_names(one, tree)


ACTIVATION_AXES = ("batch", "length", "embed", "mlp", "heads")


def check_activation_rules(rules: Sequence[Any] | None, mesh: Mesh) -> None:
  """Raises a ValueError naming config field 'activation_rules' unless every rule is a
  (logical axis of ACTIVATION_AXES, mesh axis / tuple of mesh axes / None) pair."""
  axes = ", ".join(map(repr, mesh.axis_names))
  for rule in rules or ():
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2
            and rule[0] in ACTIVATION_AXES):
      raise ValueError(f"Config field 'activation_rules' must be (logical_axis, mesh_axes) "
                       f"pairs with logical_axis one of {', '.join(ACTIVATION_AXES)}; got "
                       f"{rule!r}.")
    names = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    unknown = [a for a in names if a is not None and a not in mesh.axis_names]
    if unknown:
      raise ValueError(f"Config field 'activation_rules': rule {tuple(rule)} names mesh axis "
                       f"{unknown[0]!r}; the mesh axes are {axes} (or None).")


@contextlib.contextmanager
def activation_sharding(rules: Sequence[Any] | None, mesh: Mesh) -> Iterator[None]:
  """While tracing inside it, models' logical activation constraints shard by `rules` on
  `mesh`; without rules it changes nothing."""
  if not rules:
    yield
    return
  check_activation_rules(rules, mesh)
  rules = tuple((logical, tuple(m) if isinstance(m, list) else m) for logical, m in rules)
  with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    yield


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global arrays split over the data axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
