"""Weighted k-NN classification on frozen features (the rule of DINO's knn_classifier).

Eval config fields (type "knn"): `train_data` (the bank split), `data` (the query split),
`pp` (applied to both; gives "image" and an int "label"), `batch_size`, `num_classes`,
`k` (default 20), `temperature` (default 0.07), `query_chunk` (query rows per similarity
block; divides `batch_size`, default `batch_size`), `log_steps`, optionally `use_ema`.

Features are `task.features`, L2-normalised, computed on global batches split over the
mesh's data axes. The train bank stays a global array [num_batches, batch_size, D] whose
rows are split over the data axes (row j of batch i is bank example i * batch_size + j);
it is never gathered. Each query chunk is compared on every device with its shard of the
bank (memory O(query_chunk x bank_shard)); each device keeps its top k, the k candidates
of every device are all-gathered and the top k of those are the neighbours.

Votes: neighbour i with cosine similarity s_i weighs exp(s_i / temperature); a class scores
the summed weight of the neighbours with its label, and top-1 / top-5 (of min(5, k) classes,
as in DINO) are fractions of the query split. Ties: equal similarity -> the lower bank index
is the nearer neighbour; equal class score -> the lower class id ranks first. Weights are
computed as exp((s_i - s_max) / temperature) (the same ranking, without overflow at small
temperatures) and summed in neighbour order, so equal votes give equal scores.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from big_vision_lite import sharding
from big_vision_lite.evaluators import REGISTRY
from big_vision_lite.input import data as data_lib

DEFAULTS = dict(k=20, temperature=0.07)


@dataclasses.dataclass
class FeatureBank:
  """Features of a split, rows over the data axes; pad rows carry label -1."""
  features: jax.Array  # [num_batches, batch_size, D] float32.
  labels: jax.Array  # [num_batches, batch_size] int32; -1 on pad rows.
  size: int  # Real rows.


def check_data_field(data: Any, field: str) -> None:
  """Raises a ValueError naming `field` unless it is a dataset dict with a str name/split."""
  if data is None or not hasattr(data, "get") or not isinstance(data.get("name"), str) or (
      not isinstance(data.get("split"), str)):
    raise ValueError(f"Config field {field!r} must be a dict with a str 'name' (a tfds "
                     "dataset name, e.g. 'shapes') and a str 'split' (e.g. 'train').")


def check_positive(eval_config: ml_collections.ConfigDict, field: str, key: str,
                   kind: type) -> None:
  """Raises a ValueError unless `eval_config[key]` (if set) is a positive `kind`."""
  value = eval_config.get(key)
  if value is None:
    return
  kinds = (int, float) if kind is float else (int,)
  if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
    raise ValueError(f"Config field '{field}.{key}' must be a {kind.__name__} > 0, got "
                     f"{value!r}.")


class FeatureExtractor:
  """Runs `task.features` over a split; returns a `FeatureBank` split over the data axes."""

  def __init__(self, task: Any, mesh: Mesh, eval_config: ml_collections.ConfigDict,
               normalize: bool, field: str):
    self.task = task
    self.mesh = mesh
    self.config = eval_config
    self.normalize = normalize
    self.field = field
    rows = sharding.batch_sharding(mesh)
    self.bank_sharding = NamedSharding(mesh, P(None, sharding.batch_axes(mesh)))
    self._step = jax.jit(self._features, out_shardings=(rows, rows, sharding.replicated(mesh)))
    self._put = jax.jit(lambda bank, i, rows: bank.at[i].set(rows), donate_argnums=0,
                        out_shardings=self.bank_sharding)
    self._zeros = jax.jit(
        lambda n, rows, labels: (jnp.zeros((n,) + rows, jnp.float32),
                                 jnp.zeros((n,) + labels, jnp.int32)),
        static_argnums=(0, 1, 2), out_shardings=(self.bank_sharding, self.bank_sharding))

  def _features(self, variables: dict[str, Any], batch: dict[str, jax.Array]
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    features = self.task.features(variables, batch)  # [B, D]
    if self.normalize:
      norm = jnp.linalg.norm(features, axis=-1, keepdims=True)
      features = features / jnp.maximum(norm, 1e-12)
    labels = batch["label"].astype(jnp.int32)  # [B]
    bad = batch["_mask"] & ((labels < 0) | (labels >= self.config.num_classes))
    return features, jnp.where(batch["_mask"], labels, -1), bad.sum()

  def __call__(self, variables: dict[str, Any], data: Any) -> FeatureBank:
    batch_size = self.config.batch_size
    size = data_lib.num_examples(data)
    num_batches = -(-size // batch_size)
    batches = data_lib.make_eval_iterator(
        data, self.config.pp, batch_size, process_index=jax.process_index(),
        process_count=jax.process_count())
    features = labels = None
    bad_labels = []
    for i, local_batch in enumerate(batches):
      if "label" not in local_batch:
        raise ValueError(f"The {self.field} evaluator needs an int 'label' from its pp "
                         f"(config field '{self.field}.pp'); got keys {sorted(local_batch)}.")
      rows, row_labels, bad = self._step(variables, sharding.global_batch(local_batch,
                                                                          self.mesh))
      if features is None:
        features, labels = self._zeros(num_batches, rows.shape, row_labels.shape)
      features = self._put(features, i, rows)
      labels = self._put(labels, i, row_labels)
      bad_labels.append(bad)
    num_bad = int(sum(jax.device_get(bad_labels)))
    if num_bad:
      raise ValueError(f"{num_bad} examples of {data['name']}:{data['split']} have a label "
                       f"outside [0, {self.config.num_classes}) (config field "
                       f"'{self.field}.num_classes').")
    return FeatureBank(features, labels, size)


def knn_neighbours(queries: jax.Array, bank: jax.Array, bank_labels: jax.Array, k: int,
                   axes: tuple[str, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The k nearest bank rows of each query; call inside `shard_map` over the data `axes`.

  queries [Q, D] (the same on every device); bank [nb, b, D] and bank_labels [nb, b] are
  this device's rows (global row j of batch i on device d is bank index
  i * b * num_devices + d * b + j). Returns (similarities [Q, k], bank indices [Q, k],
  labels [Q, k]), nearest first, equal similarities by lower bank index; missing
  neighbours (a bank of fewer than k rows) have similarity -inf and label -1.
  """
  num_batches, rows, dim = bank.shape
  num_devices = jax.lax.axis_size(axes)
  local_labels = bank_labels.reshape(-1)  # [nb * b]
  sims = jnp.dot(queries, bank.reshape(-1, dim).T,
                 precision=jax.lax.Precision.HIGHEST)  # [Q, nb * b]
  sims = jnp.where(local_labels >= 0, sims, -jnp.inf)
  top_sims, local = jax.lax.top_k(sims, min(k, num_batches * rows))  # [Q, k']
  index = ((local // rows) * rows * num_devices + jax.lax.axis_index(axes) * rows
           + local % rows)
  gather = lambda x: jax.lax.all_gather(x, axes, axis=1, tiled=True)  # [Q, num_devices * k']
  neg_sims, index, labels = jax.lax.sort(
      (-gather(top_sims), gather(index), gather(local_labels[local])), dimension=1, num_keys=2)
  if neg_sims.shape[1] < k:
    pad = k - neg_sims.shape[1]
    neg_sims = jnp.pad(neg_sims, ((0, 0), (0, pad)), constant_values=jnp.inf)
    index = jnp.pad(index, ((0, 0), (0, pad)), constant_values=-1)
    labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=-1)
  return -neg_sims[:, :k], index[:, :k], labels[:, :k]


def knn_class_scores(sims: jax.Array, labels: jax.Array, temperature: float,
                     num_classes: int) -> jax.Array:
  """Class scores [Q, C]: the summed exp(s / temperature) of the neighbours (sims, labels
  [Q, k], nearest first) of each class, up to a positive factor per query."""
  weights = jnp.exp((sims - sims[:, :1]) / temperature)  # [Q, k]; 0 for missing neighbours.
  weights = jnp.where(labels >= 0, weights, 0.0)

  def add(j, scores):
    return scores + weights[:, j, None] * jax.nn.one_hot(labels[:, j], num_classes)

  return jax.lax.fori_loop(0, sims.shape[1], add,
                           jnp.zeros((sims.shape[0], num_classes), jnp.float32))


def knn_predict(train_features: jax.Array, train_labels: jax.Array, test_features: jax.Array,
                *, num_classes: int, k: int = 20, temperature: float = 0.07) -> jax.Array:
  """Class scores [N_test, num_classes] of DINO's weighted k-NN on one device, for
  train_features [N_train, D], int train_labels [N_train], test_features [N_test, D]:
  features L2-normalised, cosine similarity, each of the k most similar train examples
  (equal similarities: the lower index) adds exp(similarity / temperature) to its label.
  (`KnnEvaluator` computes the same scores over a sharded bank.)"""
  normalize = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  sims = jnp.dot(normalize(jnp.asarray(test_features, jnp.float32)),
                 normalize(jnp.asarray(train_features, jnp.float32)).T,
                 precision=jax.lax.Precision.HIGHEST)  # [N_test, N_train]
  top_sims, index = jax.lax.top_k(sims, min(k, sims.shape[1]))  # [N_test, k]
  labels = jnp.asarray(train_labels, jnp.int32)[index]
  scores = knn_class_scores(top_sims, labels, temperature, num_classes)
  return scores * jnp.exp(top_sims[:, :1] / temperature)  # The factor knn_class_scores drops.


def top1_top5_hits(scores: jax.Array, labels: jax.Array, num_top5: int) -> tuple[jax.Array,
                                                                                 jax.Array]:
  """Per-row top-1 and top-`num_top5` hits [Q] of class scores [Q, C] for int labels [Q];
  equal scores rank the lower class id first."""
  ranked = jax.lax.top_k(scores, num_top5)[1]  # [Q, num_top5]
  hits = ranked == labels[:, None]
  return hits[:, 0], hits.any(-1)


def check_feature_eval_fields(eval_config: ml_collections.ConfigDict, field: str) -> None:
  """Checks the fields every feature evaluator reads: `train_data` and `num_classes`."""
  check_data_field(eval_config.get("train_data"), f"{field}.train_data")
  num_classes = eval_config.get("num_classes")
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
    raise ValueError(f"Config field '{field}.num_classes' must be an int > 0 (the number of "
                     f"label classes), got {num_classes!r}.")


def check_k(k: int, bank_size: int, field: str) -> None:
  """Raises a ValueError naming '<field>.k' if the bank has fewer than k examples."""
  if k > bank_size:
    raise ValueError(f"Config field '{field}.k' is {k}, more than the {bank_size} examples of "
                     f"the bank ('{field}.train_data').")


@REGISTRY.register("knn")
class KnnEvaluator:
  """k-NN top-1 / top-5 of `data` against the features of `train_data` (module docstring)."""

  @classmethod
  def check_fields(cls, eval_config: ml_collections.ConfigDict, field: str) -> None:
    """Raises a ValueError naming the field for a bad value (reads no data)."""
    check_feature_eval_fields(eval_config, field)
    for key in ("k", "query_chunk"):
      check_positive(eval_config, field, key, int)
    check_positive(eval_config, field, "temperature", float)
    chunk, batch_size = eval_config.get("query_chunk"), eval_config.get("batch_size")
    if chunk and isinstance(batch_size, int) and batch_size % chunk:
      raise ValueError(f"Config field '{field}.query_chunk' ({chunk}) must divide "
                       f"'{field}.batch_size' ({batch_size}).")

  @classmethod
  def validate_config(cls, eval_config: ml_collections.ConfigDict, field: str) -> None:
    cls.check_fields(eval_config, field)
    data_lib.check_split(eval_config.train_data, f"{field}.train_data")
    check_k(eval_config.get("k") or DEFAULTS["k"], data_lib.num_examples(eval_config.train_data),
            field)

  def __init__(self, task: Any, mesh: Mesh, eval_config: ml_collections.ConfigDict,
               seed: int = 0):
    del seed
    self.field = "evals.<name>"
    self.check_fields(eval_config, self.field)
    self.mesh = mesh
    self.config = eval_config
    self.k = eval_config.get("k") or DEFAULTS["k"]
    self.temperature = eval_config.get("temperature") or DEFAULTS["temperature"]
    self.query_chunk = eval_config.get("query_chunk") or eval_config.batch_size
    self.extract = FeatureExtractor(task, mesh, eval_config, normalize=True, field=self.field)
    bank_spec = P(None, sharding.batch_axes(mesh))
    counts = jax.shard_map(self._chunked_counts, mesh=mesh,
                           in_specs=(P(), P(), bank_spec, bank_spec), out_specs=P(),
                           check_vma=False)  # Equal on all devices after the all-gather.
    # Batch i of the queries, taken inside the jit: only its rows are all-gathered.
    self._counts = jax.jit(lambda features, labels, i, bank, bank_labels: counts(
        features[i], labels[i], bank, bank_labels))

  def _chunked_counts(self, queries: jax.Array, query_labels: jax.Array, bank: jax.Array,
                      bank_labels: jax.Array) -> dict[str, jax.Array]:
    """Hit counts of the queries [B, D] (labels [B], -1 on pad rows) against the bank."""
    axes = sharding.batch_axes(self.mesh)
    num_classes = self.config.num_classes
    chunks = queries.reshape(-1, self.query_chunk, queries.shape[-1])  # [B / c, c, D]

    def one_chunk(inputs):
      chunk, labels = inputs
      sims, _, neighbour_labels = knn_neighbours(chunk, bank, bank_labels, self.k, axes)
      scores = knn_class_scores(sims, neighbour_labels, self.temperature, num_classes)
      top1, top5 = top1_top5_hits(scores, labels, min(5, self.k, num_classes))
      return top1.sum(), top5.sum()

    top1, top5 = jax.lax.map(one_chunk, (chunks, query_labels.reshape(chunks.shape[:2])))
    return {"top1": top1.sum(), "top5": top5.sum()}

  def run(self, variables: dict[str, Any]) -> dict[str, float]:
    check_k(self.k, data_lib.num_examples(self.config.train_data), self.field)
    bank = self.extract(variables, self.config.train_data)
    queries = self.extract(variables, self.config.data)
    totals = {"top1": 0, "top5": 0}
    for i in range(queries.features.shape[0]):
      counts = jax.device_get(self._counts(queries.features, queries.labels, i,
                                           bank.features, bank.labels))
      for key, value in counts.items():
        totals[key] += int(value)
    return {key: value / max(queries.size, 1) for key, value in totals.items()}
