"""Image-text retrieval: recall@1/5/10 from images to texts and from texts to images.

Eval config fields (type "retrieval"): `data`, `pp` (gives "image" and "text": int32 tokens
[L] per image (one caption) or [K, L] (K captions, e.g. `choose(5)|tokenize(64)`)),
`batch_size`, `log_steps`, optionally `query_chunk` (images per similarity block; divides
`batch_size`, default `batch_size`) and `use_ema`.

The split's `task.embed_images` [N, D] and `task.embed_texts` of its N * K captions, both
L2-normalised, are kept as banks [num_batches, batch_size, D] and [num_batches,
batch_size, K, D] whose rows are split over the mesh's data axes (as in knn.py; never
gathered). Caption k of image i is text i * K + k; all K captions of an image are its
matches. Candidates are ordered by cosine similarity, descending, equal similarities by
the lower index (image or text).
  i2t_r{1,5,10}: the fraction of images whose best-placed matching caption is among the
                 first 1 / 5 / 10 of all N * K captions.
  t2i_r{1,5,10}: the fraction of captions whose image is among the first 1 / 5 / 10 of all
                 N images.
Places are counted, not sorted: for each chunk of query images (batch i of the bank,
all-gathered), every device counts the candidates of its bank rows that come before the
match (memory O(query_chunk x K x bank rows per device)) and the counts are summed over
the devices. The match's similarity is taken from the same product as the other
candidates', so an exactly equal similarity is a tie, decided by the index.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from big_vision_lite import sharding
from big_vision_lite.evaluators import REGISTRY
from big_vision_lite.evaluators import knn
from big_vision_lite.evaluators import zeroshot
from big_vision_lite.input import data as data_lib

RECALL_AT = (1, 5, 10)
METRICS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_AT)


def place_counts(images: jax.Array, texts: jax.Array, index: jax.Array,
                 bank_images: jax.Array, bank_texts: jax.Array, bank_index: jax.Array,
                 bank_valid: jax.Array, axes: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
  """0-based places of the matches of query images [c, D] (with their captions [c, K, D],
  global image indices [c]) among the bank rows of all devices; call inside `shard_map`
  over `axes`. bank_images [n, D], bank_texts [n, K, D], bank_index [n], bank_valid [n] are
  this device's rows. Returns (image -> text places [c], text -> image places [c, K])."""
  own = (bank_index[None, :] == index[:, None]) & bank_valid  # [c, n]
  before = bank_index[None, :] < index[:, None]  # [c, n]; caption order follows image order.
  highest = jax.lax.Precision.HIGHEST
  sims = jnp.einsum("cd,nkd->cnk", images, bank_texts, precision=highest)  # [c, n, K]
  best = jax.lax.pmax(jnp.where(own[..., None], sims, -jnp.inf).max((1, 2)), axes)  # [c]
  ahead = (sims > best[:, None, None]) | ((sims == best[:, None, None]) & before[..., None])
  i2t = jax.lax.psum((ahead & bank_valid[None, :, None]).sum((1, 2)), axes)  # [c]
  sims = jnp.einsum("ckd,nd->ckn", texts, bank_images, precision=highest)  # [c, K, n]
  match = jax.lax.pmax(jnp.where(own[:, None], sims, -jnp.inf).max(-1), axes)  # [c, K]
  ahead = (sims > match[..., None]) | ((sims == match[..., None]) & before[:, None])
  t2i = jax.lax.psum((ahead & bank_valid).sum(-1), axes)  # [c, K]
  return i2t, t2i


@REGISTRY.register("retrieval")
class RetrievalEvaluator:
  """Image <-> text recall@1/5/10 over a whole split (module docstring)."""

  @classmethod
  def check_fields(cls, eval_config: ml_collections.ConfigDict, field: str) -> None:
    """Raises a ValueError naming the field for a bad value (reads no data)."""
    knn.check_data_field(eval_config.get("data"), f"{field}.data")
    batch_size = eval_config.get("batch_size")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
      raise ValueError(f"Config field '{field}.batch_size' must be an int > 0, got "
                       f"{batch_size!r}.")
    knn.check_positive(eval_config, field, "query_chunk", int)
    chunk = eval_config.get("query_chunk")
    if chunk and batch_size % chunk:
      raise ValueError(f"Config field '{field}.query_chunk' ({chunk}) must divide "
                       f"'{field}.batch_size' ({batch_size}).")

  @classmethod
  def validate_config(cls, eval_config: ml_collections.ConfigDict, field: str) -> None:
    cls.check_fields(eval_config, field)

  def __init__(self, task: Any, mesh: Mesh, eval_config: ml_collections.ConfigDict,
               seed: int = 0):
    del seed
    self.field = "evals.<name>"
    self.check_fields(eval_config, self.field)
    self.task = task
    self.mesh = mesh
    self.config = eval_config
    self.query_chunk = eval_config.get("query_chunk") or eval_config.batch_size
    rows = sharding.batch_sharding(mesh)
    bank_spec = P(None, sharding.batch_axes(mesh))
    bank_sharding = NamedSharding(mesh, bank_spec)
    self._embed = jax.jit(self._embeddings, out_shardings=(rows, rows, rows))
    self._put = jax.jit(lambda bank, i, rows: bank.at[i].set(rows), donate_argnums=0,
                        out_shardings=bank_sharding)
    self._zeros = jax.jit(lambda n, shape, dtype: jnp.zeros((n,) + shape, dtype),
                          static_argnums=(0, 1, 2), out_shardings=bank_sharding)
    counts = jax.shard_map(self._chunked_counts, mesh=mesh,
                           in_specs=(P(), P(), P(), P(), bank_spec, bank_spec, bank_spec),
                           out_specs=P(), check_vma=False)  # Equal on all devices (psum).
    # Batch i of the banks are the queries, taken inside the jit: only its rows are gathered.
    self._counts = jax.jit(lambda images, texts, valid, i: counts(
        images[i], texts[i], valid[i], i, images, texts, valid))

  def _embeddings(self, variables: dict[str, Any], batch: dict[str, jax.Array]
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normalised image [B, D] and caption [B, K, D] embeddings, and the real rows [B]."""
    text = batch["text"]  # [B, L] or [B, K, L]
    images = zeroshot.l2_normalize(self.task.embed_images(variables, batch))  # [B, D]
    texts = zeroshot.l2_normalize(self.task.embed_texts(
        variables, text.reshape(-1, text.shape[-1])))  # [B * K, D]
    return images, texts.reshape(text.shape[0], -1, texts.shape[-1]), batch["_mask"]

  def _chunked_counts(self, images: jax.Array, texts: jax.Array, valid: jax.Array,
                      batch_index: jax.Array, bank_images: jax.Array, bank_texts: jax.Array,
                      bank_valid: jax.Array) -> dict[str, jax.Array]:
    """Recall hit counts of query batch `batch_index` (images [B, D], texts [B, K, D], real
    rows [B]) against this device's banks [nb, b, ...]."""
    axes = sharding.batch_axes(self.mesh)
    num_batches, rows = bank_valid.shape
    bank_index = (jnp.arange(num_batches)[:, None] * rows * jax.lax.axis_size(axes)
                  + jax.lax.axis_index(axes) * rows + jnp.arange(rows)).reshape(-1)  # [nb * b]
    dim = bank_images.shape[-1]
    flat = (bank_images.reshape(-1, dim), bank_texts.reshape(-1, bank_texts.shape[2], dim),
            bank_index, bank_valid.reshape(-1))
    index = batch_index * images.shape[0] + jnp.arange(images.shape[0])  # [B]
    chunked = lambda x: x.reshape((-1, self.query_chunk) + x.shape[1:])

    def one_chunk(inputs):
      chunk_images, chunk_texts, chunk_index, real = inputs
      i2t, t2i = place_counts(chunk_images, chunk_texts, chunk_index, *flat, axes)
      return {**{f"i2t_r{k}": ((i2t < k) & real).sum() for k in RECALL_AT},
              **{f"t2i_r{k}": ((t2i < k) & real[:, None]).sum() for k in RECALL_AT}}

    hits = jax.lax.map(one_chunk, tuple(map(chunked, (images, texts, index, valid))))
    return {key: value.sum() for key, value in hits.items()}

  def _check_batch(self, batch: dict[str, np.ndarray]) -> None:
    text = batch.get("text")
    if text is None or text.ndim not in (2, 3) or not np.issubdtype(text.dtype, np.integer):
      got = "no 'text'" if text is None else f"'text' {text.dtype} of shape {text.shape}"
      raise ValueError(f"The retrieval evaluator needs int tokens 'text' [B, L] or [B, K, L] "
                       f"from its pp (config field '{self.field}.pp', e.g. ending in "
                       f"tokenize(...)|keep(\"image\", \"text\")); got {got}.")

  def run(self, variables: dict[str, Any]) -> dict[str, float]:
    size = data_lib.num_examples(self.config.data)
    num_batches = -(-size // self.config.batch_size)
    batches = data_lib.make_eval_iterator(
        self.config.data, self.config.pp, self.config.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    banks = None
    for i, local_batch in enumerate(batches):
      self._check_batch(local_batch)
      rows = self._embed(variables, sharding.global_batch(local_batch, self.mesh))
      if banks is None:
        banks = [self._zeros(num_batches, x.shape, x.dtype) for x in rows]
      banks = [self._put(bank, i, x) for bank, x in zip(banks, rows)]
    captions_per_image = banks[1].shape[2]  # [nb, B, K, D]
    totals = dict.fromkeys(METRICS, 0)
    for i in range(num_batches):
      for key, value in jax.device_get(self._counts(*banks, i)).items():
        totals[key] += int(value)
    return {key: value / max(size * (captions_per_image if key.startswith("t2i") else 1), 1)
            for key, value in totals.items()}
