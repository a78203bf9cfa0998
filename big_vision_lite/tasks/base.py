"""Shared pieces of tasks: applying a model in train/eval mode, with an optional dtype."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh


def cast_floating(tree: Any, dtype: jnp.dtype) -> Any:
  """Casts every floating-point leaf of `tree` to `dtype`."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def require_model_name(config: ml_collections.ConfigDict, name: str) -> None:
  """Raises unless config field 'model_name' is `name`, the model the `name` task trains."""
  if config.get("model_name") != name:
    raise ValueError(f"Config field 'model_name' must be {name!r} for the {name} task, got "
                     f"{config.get('model_name')!r}.")


def task_fields(config: ml_collections.ConfigDict, field: str,
                defaults: dict[str, Any]) -> dict[str, Any]:
  """The config's `field` dict over `defaults`; a key not in `defaults` raises, naming them."""
  fields = dict(config.get(field) or {})
  unknown = set(fields) - set(defaults)
  if unknown:
    raise ValueError(f"Config field {field!r} takes {', '.join(defaults)}; got unknown "
                     f"{sorted(unknown)}.")
  return dict(defaults, **fields)


class Task:
  """Base class: holds the model and applies it; subclasses define `loss` and `predict`.

  `loss_inputs` names the train-state entries (besides params and extra) the loop passes to
  `loss` as keyword arguments: "step" (the step count before this update) and
  "ema_params" (the EMA of the params, e.g. a teacher; needs config field 'ema_decay').
  `mesh` is the run's device mesh, for a loss that runs a collective of its own
  (`shard_map`); None (e.g. in a unit test) means one device.
  """
  loss_inputs: tuple[str, ...] = ()

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module,
               mesh: Mesh | None = None):
    self.config = config
    self.model = model
    self.mesh = mesh
    self.compute_dtype = jnp.dtype(config.get("compute_dtype") or "float32")

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    del config

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    params_rng, dropout_rng = jax.random.split(rng)
    variables = self.model.init({"params": params_rng, "dropout": dropout_rng},
                                batch["image"], train=False)
    return dict(variables)

  def apply(self, params: Any, extra: dict[str, Any], images: jax.Array,
            rng: jax.Array | None, train: bool, **kwargs: Any) -> tuple[Any, Any, dict]:
    """Runs the model; returns (out, aux, updated extra collections)."""
    variables = {"params": params, **extra}
    if self.compute_dtype != jnp.float32:
      variables = cast_floating(variables, self.compute_dtype)
      images = None if images is None else images.astype(self.compute_dtype)
    rngs = {"dropout": rng} if rng is not None else {}
    if train and extra:
      (out, aux), new_extra = self.model.apply(variables, images, train=True, rngs=rngs,
                                               mutable=list(extra), **kwargs)
      new_extra = cast_floating(dict(new_extra), jnp.float32)
    else:
      out, aux = self.model.apply(variables, images, train=train, rngs=rngs, **kwargs)
      new_extra = extra
    return out, aux, new_extra

  def apply_eval(self, variables: dict[str, Any], images: jax.Array, **kwargs: Any
                 ) -> tuple[Any, Any]:
    """Runs the model in eval mode on a whole variables dict; returns (out, aux)."""
    extra = {k: v for k, v in variables.items() if k != "params"}
    out, aux, _ = self.apply(variables["params"], extra, images, None, False, **kwargs)
    return out, aux

  def features(self, variables: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
    """Pooled features [B, D] of batch["image"] (the model's "pre_logits"), float32: what
    k-NN and linear-probe evaluators read."""
    _, aux = self.apply_eval(variables, batch["image"])
    feats = aux["pre_logits"]
    if feats.ndim == 3:  # A packed model on plain images: one image slot per row.
      feats = feats[:, 0]
    return feats.astype(jnp.float32)  # [B, D]
