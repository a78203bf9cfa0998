"""Zero-shot classification of an image-text model: images against class-name prompts.

Eval config fields (type "zeroshot"): `data`, `pp` (gives "image" and an int "label"),
`batch_size` (images, and prompts, per step), `log_steps`, `max_len` (tokens per prompt;
the text model's length), optionally `class_names` (default: the names of the dataset's
ClassLabel feature "label", from its tfds info), `templates` (format strings with one "{}";
default TEMPLATES), `tokenizer` (a `tokenizers.get` spec, default "bytes") and `use_ema`.

The embedding of class c is the mean over the templates of the L2-normalised
`task.embed_texts` of template.format(class_names[c]), L2-normalised again. Each image's
`task.embed_images` is compared with every class embedding by cosine similarity; top-1 and
top-5 (of min(5, C) classes) are fractions of the split, and equal similarities rank the
lower class id first. Prompts are embedded batch_size at a time, split over the mesh's
data axes, and only the per-class sums [C, D] are kept; image batches are split the same
way and only hit counts leave the devices.
"""
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from big_vision_lite import sharding
from big_vision_lite.evaluators import REGISTRY
from big_vision_lite.evaluators import knn
from big_vision_lite.input import data as data_lib
from big_vision_lite.input import tokenizers

TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the large {}.",
             "a photo of the small {}.", "a drawing of a {}.")
DEFAULTS = dict(tokenizer="bytes", templates=TEMPLATES)


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / |x| over the last axis (0 stays 0)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _check_str_list(value: Any, field: str, what: str) -> None:
  if value is None:
    return
  if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value or any(
      not isinstance(v, str) for v in value):
    raise ValueError(f"Config field '{field}' must be a non-empty list of str ({what}), got "
                     f"{value!r}.")


def check_templates(templates: Any, field: str) -> None:
  """Raises a ValueError naming `field` unless each template has one "{}" and formats."""
  _check_str_list(templates, field, 'format strings with one "{}", e.g. "a photo of a {}."')
  for template in templates or ():
    try:
      ok = template.count("{}") == 1 and template.format("x") is not None
    except (IndexError, KeyError, ValueError):
      ok = False
    if not ok:
      raise ValueError(f"Config field '{field}': template {template!r} must hold exactly one "
                       "'{}' for the class name (and no other braces; write '{{' for '{').")


def dataset_class_names(data: Any, field: str) -> list[str]:
  """The names of the ClassLabel feature "label" of `data`'s dataset (tfds info)."""
  features = data_lib.get_source(data).dataset_info.features
  label = features["label"] if "label" in features else None
  if not isinstance(label, tfds.features.ClassLabel) or not label.names:
    raise ValueError(f"Config field '{field}.class_names' is not set and dataset "
                     f"{data['name']!r} has no named ClassLabel feature 'label'; set it to "
                     "the list of class names, in label order.")
  return list(label.names)


@REGISTRY.register("zeroshot")
class ZeroShotEvaluator:
  """Zero-shot top-1 / top-5 of `data` from class-name prompts (module docstring)."""

  @classmethod
  def check_fields(cls, eval_config: ml_collections.ConfigDict, field: str) -> None:
    """Raises a ValueError naming the field for a bad value (reads no data)."""
    knn.check_data_field(eval_config.get("data"), f"{field}.data")
    for key in ("batch_size", "max_len"):
      value = eval_config.get(key)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Config field '{field}.{key}' must be an int > 0, got {value!r}"
                         + (" (the text model's token length)." if key == "max_len" else "."))
    _check_str_list(eval_config.get("class_names"), f"{field}.class_names",
                    "one name per label, in label order")
    check_templates(eval_config.get("templates"), f"{field}.templates")
    try:
      tokenizers.get(eval_config.get("tokenizer", DEFAULTS["tokenizer"]))
    except ValueError as e:
      raise ValueError(f"Config field '{field}.tokenizer': {e}") from None

  @classmethod
  def validate_config(cls, eval_config: ml_collections.ConfigDict, field: str) -> None:
    cls.check_fields(eval_config, field)
    if eval_config.get("class_names") is None:
      data_lib.check_split(eval_config.data, f"{field}.data")
      dataset_class_names(eval_config.data, field)

  def __init__(self, task: Any, mesh: Mesh, eval_config: ml_collections.ConfigDict,
               seed: int = 0):
    del seed
    self.field = "evals.<name>"
    self.check_fields(eval_config, self.field)
    self.task = task
    self.mesh = mesh
    self.config = eval_config
    self.class_names = list(eval_config.get("class_names") or dataset_class_names(
        eval_config.data, self.field))
    self.templates = list(eval_config.get("templates") or DEFAULTS["templates"])
    tokenizer = tokenizers.get(eval_config.get("tokenizer", DEFAULTS["tokenizer"]))
    self.prompt_tokens, self.prompt_classes = self.prompts(
        self.class_names, self.templates, tokenizer, eval_config.max_len, eval_config.batch_size)
    self._add_prompts = jax.jit(self._prompt_sums, donate_argnums=1,
                                out_shardings=sharding.replicated(mesh))
    self._count = jax.jit(self._counts, out_shardings=sharding.replicated(mesh))
    self._zeros = jax.jit(lambda *shape: jnp.zeros(shape, jnp.float32), static_argnums=(0, 1),
                          out_shardings=sharding.replicated(mesh))
    self._normalize = jax.jit(l2_normalize, out_shardings=sharding.replicated(mesh))
    self._dim = None  # The text embeddings' width, found at the first run.

  @staticmethod
  def prompts(class_names: Sequence[str], templates: Sequence[str],
              tokenizer: Any, max_len: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [n, batch_size, max_len] of every (class, template) prompt, class-major, and
    their class ids [n, batch_size]; the rows that fill the last batch have class id C."""
    texts = [template.format(name) for name in class_names for template in templates]
    tokens = tokenizer.encode(texts, max_len)  # [C * T, L]
    classes = np.repeat(np.arange(len(class_names), dtype=np.int32), len(templates))
    pad = -len(texts) % batch_size
    tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, 0)])
    classes = np.concatenate([classes, np.full(pad, len(class_names), np.int32)])
    return (tokens.reshape(-1, batch_size, max_len), classes.reshape(-1, batch_size))

  def _prompt_sums(self, variables: dict[str, Any], sums: jax.Array, tokens: jax.Array,
                   classes: jax.Array) -> jax.Array:
    """sums [C, D] plus the normalised embeddings of the prompts tokens [B, L] of classes
    [B] (rows of class C are left out)."""
    num_classes = len(self.class_names)
    embeddings = l2_normalize(self.task.embed_texts(variables, tokens))  # [B, D]
    embeddings = jnp.where((classes < num_classes)[:, None], embeddings, 0.0)
    return sums + jax.ops.segment_sum(embeddings, jnp.minimum(classes, num_classes - 1),
                                      num_classes)

  def class_embeddings(self, variables: dict[str, Any]) -> jax.Array:
    """[C, D]: per class, the normalised mean of its prompts' normalised embeddings."""
    rows = sharding.batch_sharding(self.mesh)
    put = lambda x: jax.make_array_from_callback(x.shape, rows, lambda index: x[index])
    sums = None
    for tokens, classes in zip(self.prompt_tokens, self.prompt_classes):
      tokens, classes = put(tokens), put(classes)
      if sums is None:
        self._dim = self._dim or jax.eval_shape(self.task.embed_texts, variables,
                                                tokens).shape[-1]
        sums = self._zeros(len(self.class_names), self._dim)
      sums = self._add_prompts(variables, sums, tokens, classes)
    return self._normalize(sums)  # Normalising the sum = normalising the mean.

  def _counts(self, variables: dict[str, Any], classes: jax.Array,
              batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Top-1 / top-5 hits and out-of-range labels among the real rows of an image batch."""
    num_classes = classes.shape[0]
    images = self.task.embed_images(variables, batch)  # [B, D]
    logits = jnp.dot(images, classes.T, precision=jax.lax.Precision.HIGHEST)  # [B, C]
    labels = batch["label"].astype(jnp.int32)  # [B]
    top1, top5 = knn.top1_top5_hits(logits, labels, min(5, num_classes))
    real = batch["_mask"]
    return {"top1": (top1 & real).sum(), "top5": (top5 & real).sum(),
            "bad_labels": (real & ((labels < 0) | (labels >= num_classes))).sum()}

  def run(self, variables: dict[str, Any]) -> dict[str, float]:
    classes = self.class_embeddings(variables)
    totals = {"top1": 0, "top5": 0, "bad_labels": 0}
    batches = data_lib.make_eval_iterator(
        self.config.data, self.config.pp, self.config.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    for local_batch in batches:
      if "label" not in local_batch:
        raise ValueError(f"The zeroshot evaluator needs an int 'label' from its pp (config "
                         f"field '{self.field}.pp'); got keys {sorted(local_batch)}.")
      counts = jax.device_get(self._count(variables, classes,
                                          sharding.global_batch(local_batch, self.mesh)))
      for key, value in counts.items():
        totals[key] += int(value)
    if totals["bad_labels"]:
      raise ValueError(f"{totals['bad_labels']} examples of {self.config.data['name']}:"
                       f"{self.config.data['split']} have a label outside [0, "
                       f"{len(self.class_names)}) (config field "
                       f"'{self.field}.class_names' has {len(self.class_names)} names).")
    size = data_lib.num_examples(self.config.data)
    return {"top1": totals["top1"] / max(size, 1), "top5": totals["top5"] / max(size, 1)}
