"""Image-text contrastive training: SigLIP (sigmoid) or CLIP (softmax) on the chunked loss.

Model `two_towers` (an image tower from the registry, a text tower, learned temperature
and bias). Batch: `image` [B, H, W, 3] and `text` [B, L] int32 tokens (pp `tokenize`), or,
with config field 'input.packing' and a NaViT image tower, packed rows: `patches`
[B, N, p·p·3], `segment_ids`, `positions`, `image_sizes` [B, S, 2], `text` [B, S, L] (one
caption per image slot) and `label_mask` [B, S] (False: an empty slot).

The loss is `kernels.contrastive_loss` over the GLOBAL batch: inside `shard_map` over the
mesh's batch axes each device keeps its own rows and the text blocks travel around a ring,
so no device ever holds the B x B logits (nor all B embeddings). Empty packed slots are
left out exactly (`valid`): the loss and its gradients equal the naive loss over the real
pairs. `grad_accum_steps > 1` is refused: summing micro-batch losses would silently shrink
every image's set of negatives to its micro-batch.

Config `contrastive` fields: `loss` ("sigmoid" = SigLIP, default; "softmax" = CLIP),
`chunk_size` (image rows per block on a device; 0 = min(256, per-device rows)) and `impl`
(the kernel's: "auto", "chunked", "pallas" run the ring; "reference" is the naive loss on
the global [B, B] logits, without shard_map: the baseline of benchmarks/contrastive.py).
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from big_vision_lite import sharding
from big_vision_lite.tasks import REGISTRY
from big_vision_lite.tasks import base
from big_vision_lite.tasks.base import Task
from kernels import contrastive as contrastive_kernel

DEFAULTS = dict(loss="sigmoid", chunk_size=0, impl="auto")
PACKED_INPUTS = ("segment_ids", "positions", "image_sizes")


def options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's `contrastive` fields with their defaults, checked."""
  opts = base.task_fields(config, "contrastive", DEFAULTS)
  if opts["loss"] not in contrastive_kernel.KINDS:
    raise ValueError(f"Config field 'contrastive.loss' must be one of "
                     f"{', '.join(contrastive_kernel.KINDS)}, got {opts['loss']!r}.")
  if opts["impl"] not in contrastive_kernel.IMPLS:
    raise ValueError(f"Config field 'contrastive.impl' must be one of "
                     f"{', '.join(contrastive_kernel.IMPLS)}, got {opts['impl']!r}.")
  chunk = opts["chunk_size"]
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
    raise ValueError(f"Config field 'contrastive.chunk_size' must be an int >= 0 (0: the "
                     f"kernel's default), got {chunk!r}.")
  return opts


@REGISTRY.register("contrastive")
class Contrastive(Task):
  """Images and captions -> normalised embeddings, trained to match each image's caption."""

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    base.require_model_name(config, "two_towers")
    options(config)
    if (config.get("grad_accum_steps") or 1) > 1:
      raise ValueError("Config field 'grad_accum_steps' must be 1 for the contrastive task: "
                       "each micro-batch's loss would only see its own negatives (a smaller "
                       "contrastive batch than 'input.batch_size'). Lower 'input.batch_size' "
                       "or shard it over more devices instead.")
    image_model = (config.get("model") or {}).get("image_model")
    if config.input.get("packing") and image_model != "navit":
      raise ValueError(f"Config field 'input.packing' needs model.image_model='navit' (a "
                       f"packed image tower), got {image_model!r}.")

  def __init__(self, config: ml_collections.ConfigDict, model: Any, mesh: Any = None):
    super().__init__(config, model, mesh)
    self.options = options(config)

  @staticmethod
  def _inputs(batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(image input, image-tower keyword inputs) of a plain or packed batch."""
    if "patches" in batch:
      return batch["patches"], {k: batch[k] for k in PACKED_INPUTS}
    if "image" not in batch or "text" not in batch:
      raise ValueError(f"The contrastive task needs batch keys 'image' and 'text' (or packed "
                       f"'patches' with 'text'); the batch has {sorted(batch)}. Add "
                       "`tokenize(...)` to config field 'input.pp' (see configs/siglip.py).")
    return batch["image"], {}

  @staticmethod
  def _text(batch: dict[str, jax.Array]) -> jax.Array:
    text = batch["text"]  # [B, L] or packed [B, S, L]
    return text.reshape(-1, text.shape[-1])  # [B·S, L]

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    params_rng, dropout_rng = jax.random.split(rng)
    images, image_kwargs = self._inputs(batch)
    return dict(self.model.init({"params": params_rng, "dropout": dropout_rng}, images,
                                text=self._text(batch), train=False, **image_kwargs))

  def global_loss(self, zimg: jax.Array, ztxt: jax.Array, temperature: jax.Array,
                  bias: jax.Array | None, valid: jax.Array | None) -> jax.Array:
    """The kernel's loss over the global batch; zimg, ztxt [B, D] split over the batch axes,
    `bias` None for "softmax", `valid` [B] (None: every row is a real pair)."""
    opts = self.options
    if valid is None:
      valid = jnp.ones(zimg.shape[:1], bool)

    def loss_fn(zimg, ztxt, temperature, bias, valid, axis_name=None):
      return contrastive_kernel.contrastive_loss(
          zimg, ztxt, kind=opts["loss"], temperature=temperature, bias=bias,
          chunk_size=opts["chunk_size"] or None, axis_name=axis_name, impl=opts["impl"],
          valid=valid)
    if self.mesh is None or opts["impl"] == "reference":
      # The naive loss on the global [B, B] logits, laid out by the compiler (each device
      # its rows against all B texts, as big_vision's all-gather trainer).
      return loss_fn(zimg, ztxt, temperature, bias, valid)
    axes = sharding.batch_axes(self.mesh)
    rows = P(axes)
    return jax.shard_map(functools.partial(loss_fn, axis_name=axes), mesh=self.mesh,
                         in_specs=(rows, rows, P(), P(), rows), out_specs=P()
                         )(zimg, ztxt, temperature, bias, valid)

  def loss(self, params: Any, extra: dict[str, Any], batch: dict[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, Any]]]:
    images, image_kwargs = self._inputs(batch)
    out, _, new_extra = self.apply(params, extra, images, rng, True, text=self._text(batch),
                                   **image_kwargs)
    zimg = out["zimg"].reshape(-1, out["zimg"].shape[-1])  # [B·S, D]
    valid = batch["label_mask"].reshape(-1) if "patches" in batch else None  # [B·S]
    bias = out["bias"] if self.options["loss"] == "sigmoid" else None
    loss = self.global_loss(zimg, out["ztxt"], out["temperature"], bias, valid)
    metrics = {"loss": loss, "temperature": out["temperature"]}
    if out["bias"] is not None:
      metrics["bias"] = out["bias"]
    if valid is not None:
      metrics["images_per_row"] = batch["label_mask"].sum(-1).mean()
    return loss, (metrics, new_extra)

  def embed_images(self, variables: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
    """L2-normalised image embeddings [B, D] of batch["image"] (plain images)."""
    out, _ = self.apply_eval(variables, batch["image"], text=None)
    zimg = out["zimg"]
    if zimg.ndim == 3:  # A packed tower on plain images: one image slot per row.
      zimg = zimg[:, 0]
    return zimg.astype(jnp.float32)  # [B, D]

  def embed_texts(self, variables: dict[str, Any], tokens: jax.Array) -> jax.Array:
    """L2-normalised text embeddings [N, D] of int32 tokens [N, L]."""
    out, _ = self.apply_eval(variables, None, text=tokens)
    return out["ztxt"].astype(jnp.float32)  # [N, D]

  def predict(self, variables: dict[str, Any], batch: dict[str, jax.Array]
              ) -> dict[str, jax.Array]:
    """{"zimg": [B, D], "ztxt": [B, D]} of a plain batch."""
    return {"zimg": self.embed_images(variables, batch),
            "ztxt": self.embed_texts(variables, batch["text"])}
