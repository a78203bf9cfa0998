"""DINO (Caron et al. 2021): self-distillation with no labels, on multi-crop batches.

Batch (pp op `multicrop`): `global_crops` [B, 2, g, g, 3] and `local_crops` [B, N, l, l, 3]
(N may be 0). The student (`params`) sees every crop; the teacher is the EMA of the
student (the train state's `ema_params`: config fields `ema_decay` 0.996 and
`ema_decay_end` 1.0 give the paper's cosine momentum) and sees the global crops only,
without gradient. `losses.dino.dino_loss`: for every (teacher global crop i, student
crop v != i), the cross-entropy between softmax((teacher - center) / t_teacher) and
softmax(student / t_student), averaged over pairs and over the batch. The center is an
EMA (`center_momentum`) of the teacher's mean output over the global batch (all devices
and processes), kept in the extra collection "dino" and so in the checkpoint.

Config `dino` fields: `student_temp` (0.1), `teacher_temp` (0.07), `warmup_teacher_temp`
(0.04) and `warmup_teacher_temp_steps` (linear warm-up from step 0, `teacher_temperature`),
`center_momentum` (0.9), `packed` (False; True with a NaViT backbone runs ONE student
forward over sequences that pack each image's global and local crops, each crop a segment
at its own resolution, instead of one forward per crop resolution; same loss).
DINOv2's (Oquab et al. 2023) additions: `centering` ("ema", the paper's, or
"sinkhorn_knopp": the teacher's targets over the global batch's global crops balanced
across prototypes, `sinkhorn_iterations` 3; the EMA center is still kept as a metric) and
`koleo_weight` (0: off; DINOv2 uses 0.1) x the KoLeo loss of the student's backbone
features of each global crop over the global batch, summed over the global crops.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from big_vision_lite.losses import dino as dino_losses
from big_vision_lite.models import dino as dino_model
from big_vision_lite.models import navit
from big_vision_lite.tasks import REGISTRY
from big_vision_lite.tasks import base
from big_vision_lite.tasks.base import Task

DEFAULTS = dict(student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04,
                warmup_teacher_temp_steps=0, center_momentum=0.9, packed=False,
                centering="ema", sinkhorn_iterations=3, koleo_weight=0.0)
CENTERINGS = ("ema", "sinkhorn_knopp")
CENTER = "dino"  # The extra collection holding {"center": [K]}.


def options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's `dino` fields with their defaults, checked."""
  opts = base.task_fields(config, "dino", DEFAULTS)
  for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
    if isinstance(opts[name], bool) or not isinstance(opts[name], (int, float)) or (
        opts[name] <= 0):
      raise ValueError(f"Config field 'dino.{name}' must be a number > 0, got {opts[name]!r}.")
  steps = opts["warmup_teacher_temp_steps"]
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise ValueError(f"Config field 'dino.warmup_teacher_temp_steps' must be an int >= 0, got "
                     f"{steps!r}.")
  momentum = opts["center_momentum"]
  if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (
      0 <= momentum <= 1):
    raise ValueError(f"Config field 'dino.center_momentum' must be in [0, 1], got {momentum!r}.")
  if not isinstance(opts["packed"], bool):
    raise ValueError(f"Config field 'dino.packed' must be true or false, got {opts['packed']!r}.")
  if opts["centering"] not in CENTERINGS:
    raise ValueError(f"Config field 'dino.centering' must be one of {', '.join(CENTERINGS)}; "
                     f"got {opts['centering']!r}.")
  iterations = opts["sinkhorn_iterations"]
  if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
    raise ValueError(f"Config field 'dino.sinkhorn_iterations' must be an int >= 1, got "
                     f"{iterations!r}.")
  weight = opts["koleo_weight"]
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
    raise ValueError(f"Config field 'dino.koleo_weight' must be a number >= 0, got {weight!r}.")
  return opts


def teacher_temperature(step: jax.Array, warmup: float, final: float,
                        warmup_steps: int) -> jax.Array:
  """warmup + (final - warmup) * step / warmup_steps for step < warmup_steps, then final."""
  if not warmup_steps:
    return jnp.asarray(final, jnp.float32)
  progress = jnp.minimum(step, warmup_steps) / warmup_steps
  return warmup + (final - warmup) * progress


def packed_crops(global_crops: jax.Array, local_crops: jax.Array, patch: int
                 ) -> dict[str, jax.Array]:
  """Each image's crops as one packed NaViT sequence: crop c is segment c + 1.

  global_crops [B, T, g, g, 3], local_crops [B, N, l, l, 3] -> patches [B, L, p·p·3],
  segment_ids [B, L], positions [B, L, 2], image_sizes [B, T + N, 2] with L = T·(g/p)² +
  N·(l/p)²: no padding, every row holds exactly one image's crops.
  """
  parts = []
  first_segment = 1
  for crops in (global_crops, local_crops):
    b, num = crops.shape[:2]
    if not num:
      continue
    inputs = navit.image_inputs(crops.reshape(b * num, *crops.shape[2:]), patch)
    tokens = inputs["patches"].shape[1]
    segment = first_segment + jnp.repeat(jnp.arange(num, dtype=jnp.int32), tokens)  # [num·n]
    parts.append({
        "patches": inputs["patches"].reshape(b, num * tokens, -1),
        "segment_ids": jnp.broadcast_to(segment, (b, num * tokens)),
        "positions": inputs["positions"].reshape(b, num * tokens, 2),
        "image_sizes": inputs["image_sizes"].reshape(b, num, 2)})
    first_segment += num
  return {k: jnp.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}


@REGISTRY.register("dino")
class DINO(Task):
  """Student = params, teacher = ema_params; multi-crop self-distillation."""
  loss_inputs = ("step", "ema_params")

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    base.require_model_name(config, "dino")
    opts = options(config)
    backbone_name = dino_model.backbone(config.get("model") or {})
    if opts["packed"] and backbone_name != "navit":
      raise ValueError(f"Config field 'dino.packed' needs model.backbone_name='navit' (packed "
                       f"sequences with segment-masked attention), got {backbone_name!r}.")

  def __init__(self, config: ml_collections.ConfigDict, model: Any, mesh: Any = None):
    super().__init__(config, model, mesh)
    self.options = options(config)

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    params_rng, dropout_rng = jax.random.split(rng)
    variables = dict(self.model.init({"params": params_rng, "dropout": dropout_rng},
                                     self._crops(batch, "global_crops")[:, 0], train=False))
    variables[CENTER] = {"center": jnp.zeros((self.model.out_dim,), jnp.float32)}
    return variables

  def _crops(self, batch: dict[str, jax.Array], key: str) -> jax.Array:
    if key not in batch:
      raise ValueError(f"The dino task needs batch key {key!r}; the batch has {sorted(batch)}. "
                       "Use the `multicrop(...)` pp op in config field 'input.pp'.")
    return batch[key]

  def _student(self, params: Any, extra: dict[str, Any], global_crops: jax.Array,
               local_crops: jax.Array, rng: jax.Array
               ) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
    """Student outputs [B, T + N, K] for every crop (globals first), the backbone's pooled
    features [B, T, D] of the T global crops, and updated extra."""
    b, num_global = global_crops.shape[:2]
    if self.options["packed"]:
      inputs = packed_crops(global_crops, local_crops, self._patch_size())
      patches = inputs.pop("patches")
      out, aux, extra = self.apply(params, extra, patches, rng, True, **inputs)
      return out, aux["pre_logits"][:, :num_global], extra  # [B, T + N, K], [B, T, D]
    outs, global_features = [], None
    for index, crops in enumerate((global_crops, local_crops)):
      if crops.shape[1]:
        flat = crops.reshape(b * crops.shape[1], *crops.shape[2:])
        out, aux, extra = self.apply(params, extra, flat, jax.random.fold_in(rng, index), True)
        outs.append(out.reshape(b, crops.shape[1], -1))
        if index == 0:
          global_features = aux["pre_logits"].reshape(b, num_global, -1)
    return jnp.concatenate(outs, axis=1), global_features, extra

  def _patch_size(self) -> int:
    """The NaViT backbone's patch side."""
    return navit.Model(**dict(self.model.backbone, num_classes=0)).hparams()["patch_size"]

  def loss(self, params: Any, extra: dict[str, Any], batch: dict[str, jax.Array],
           rng: jax.Array, *, step: jax.Array, ema_params: Any
           ) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, Any]]]:
    opts = self.options
    global_crops = self._crops(batch, "global_crops")  # [B, T, g, g, 3]
    local_crops = batch.get("local_crops")  # [B, N, l, l, 3]
    if local_crops is None:
      local_crops = global_crops[:, :0]
    b, num_global = global_crops.shape[:2]
    center = extra[CENTER]["center"]  # [K]

    teacher_out, _, _ = self.apply(
        jax.lax.stop_gradient(ema_params), extra,
        global_crops.reshape(b * num_global, *global_crops.shape[2:]), None, False)
    teacher_out = jax.lax.stop_gradient(teacher_out.astype(jnp.float32)).reshape(
        b, num_global, -1)  # [B, T, K]
    student_out, student_features, new_extra = self._student(params, extra, global_crops,
                                                             local_crops, rng)
    student_out = student_out.astype(jnp.float32)  # [B, T + N, K]
    temperature = teacher_temperature(step, opts["warmup_teacher_temp"], opts["teacher_temp"],
                                      opts["warmup_teacher_temp_steps"])
    # Sums and means over the batch axis of a batch-sharded array are global: every
    # device's and process's rows count.
    if opts["centering"] == "sinkhorn_knopp":
      targets = dino_losses.sinkhorn_knopp_targets(
          teacher_out.reshape(b * num_global, -1), temperature,
          opts["sinkhorn_iterations"]).reshape(teacher_out.shape)  # [B, T, K]
    else:
      targets = dino_losses.centered_targets(teacher_out, center, temperature)  # [B, T, K]
    loss = dino_losses.dino_cross_entropy(
        jnp.swapaxes(student_out, 0, 1), jnp.swapaxes(targets, 0, 1),
        student_temp=opts["student_temp"])  # Crop-major.
    metrics = {}
    if opts["koleo_weight"]:
      koleo = dino_losses.koleo_loss(
          jnp.swapaxes(student_features.astype(jnp.float32), 0, 1)) * num_global
      metrics["koleo"] = koleo
      loss = loss + opts["koleo_weight"] * koleo
    batch_center = teacher_out.mean(axis=(0, 1))  # [K]
    momentum = opts["center_momentum"]
    new_center = center * momentum + batch_center * (1 - momentum)
    entropy = -(targets * jnp.log(targets + 1e-12)).sum(-1).mean()
    metrics.update(loss=loss, teacher_temp=temperature, teacher_entropy=entropy,
                   center_norm=jnp.linalg.norm(new_center))
    return loss, (metrics, dict(new_extra, **{CENTER: {"center": new_center}}))

  def apply(self, params: Any, extra: dict[str, Any], images: jax.Array,
            rng: jax.Array | None, train: bool, **kwargs: Any) -> tuple[Any, Any, dict]:
    """As `Task.apply`, without the task's own "dino" collection (the center)."""
    model_extra = {k: v for k, v in extra.items() if k != CENTER}
    out, aux, new_extra = super().apply(params, model_extra, images, rng, train, **kwargs)
    if CENTER in extra:
      new_extra = dict(new_extra, **{CENTER: extra[CENTER]})
    return out, aux, new_extra

  def predict(self, variables: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
    """The DINO head's outputs [B, K] of batch["image"]."""
    out, _ = self.apply_eval(variables, batch["image"])
    return out.astype(jnp.float32)
