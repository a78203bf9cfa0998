"""k-NN and linear-probe evaluators on fixed features (a stub task whose features are its
input vectors) against brute-force numpy: exact similarity ties, k larger than a class,
banks that do not fill the last batch or split evenly over the devices, query chunks
smaller than a batch, the same answer on 1 and 8 devices."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from big_vision_lite import sharding
from big_vision_lite.evaluators import knn
from big_vision_lite.evaluators import linear_probe
from big_vision_lite.input import data as data_lib

NUM_CLASSES = 5
BATCH_SIZE = 8


class FeatureTask:
  """A task whose features are its images (vectors [B, D]) times a `scale` param."""

  def features(self, variables, batch):
    return batch["image"] * variables["params"]["scale"]


VARIABLES = {"params": {"scale": jnp.float32(1.0)}}


def quantized_features(rng: np.random.Generator, count: int, dim: int = 8) -> np.ndarray:
  """Vectors with 4 entries of +-1 and the rest 0: norm 2, so cosine similarities are exact
  multiples of 1/4 in float32 and many are exactly equal."""
  out = np.zeros((count, dim), np.float32)
  for row in out:
    row[rng.choice(dim, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
  return out


def fixed_split(seed: int, kind: str, num_train: int = 37, num_test: int = 21):
  """(train features, train labels, test features, test labels). Class 4 has 3 bank
  examples, fewer than k; the bank holds exact duplicates with other labels."""
  rng = np.random.default_rng(seed)
  if kind == "quantized":
    train, test = quantized_features(rng, num_train), quantized_features(rng, num_test)
    train[30:34] = train[2]  # Four copies of bank example 2, with other labels below.
  else:
    train = rng.normal(size=(num_train, 8)).astype(np.float32)
    test = rng.normal(size=(num_test, 8)).astype(np.float32)
  train_labels = rng.integers(0, NUM_CLASSES - 1, num_train)
  train_labels[[5, 17, 33]] = NUM_CLASSES - 1
  train_labels[30:33] = [0, 1, 2]
  test_labels = rng.integers(0, NUM_CLASSES, num_test)
  return train, train_labels, test, test_labels


def numpy_knn(train, train_labels, test, k, temperature):
  """Brute force in float64: (neighbour indices [Q, k], class scores [Q, C]); equal
  similarities take the lower bank index first; scores sum exp(s/T) in neighbour order."""
  normalize = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  sims = normalize(test.astype(np.float64)) @ normalize(train.astype(np.float64)).T
  index = np.broadcast_to(np.arange(len(train)), sims.shape)
  neighbours = np.lexsort((index, -sims), axis=-1)[:, :k]  # Last key is the primary one.
  scores = np.zeros((len(test), NUM_CLASSES))
  for j in range(k):
    rows = np.arange(len(test))
    scores[rows, train_labels[neighbours[:, j]]] += np.exp(sims[rows, neighbours[:, j]]
                                                           / temperature)
  return neighbours, scores


def rank_classes(scores: np.ndarray) -> np.ndarray:
  """Classes [Q, C] by descending score, equal scores by lower class id."""
  classes = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
  return np.lexsort((classes, -scores), axis=-1)


def numpy_top1_top5(scores, labels, k):
  ranked = rank_classes(scores)
  hits = ranked[:, :min(5, k, NUM_CLASSES)] == labels[:, None]
  return hits[:, 0].mean(), hits.any(-1).mean()


def assert_unambiguous(scores: np.ndarray) -> None:
  """Test precondition: class scores that differ, differ well beyond float32 rounding, so
  the only ties are exact ones (equal votes)."""
  for row in scores:
    gaps = np.abs(row[:, None] - row[None, :]) / row.max()
    assert np.all((gaps == 0) | (gaps > 1e-4)), row


def use_sources(monkeypatch, train, train_labels, test, test_labels):
  records = lambda x, y: [{"image": f, "label": np.int64(l)} for f, l in zip(x, y)]
  sources = {"train": records(train, train_labels), "test": records(test, test_labels)}
  monkeypatch.setattr(data_lib, "get_source", lambda data: sources[data["split"]])


def eval_config(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(dict(
      train_data=dict(name="fixed", split="train"), data=dict(name="fixed", split="test"),
      pp='keep("image", "label")', batch_size=BATCH_SIZE, num_classes=NUM_CLASSES,
      log_steps=1), **fields))


@pytest.mark.parametrize("kind,k,temperature", [("quantized", 10, 0.5), ("gaussian", 20, 0.07),
                                                ("quantized", 1, 0.5)])
def test_neighbours_and_scores_match_numpy_on_1_and_8_devices(monkeypatch, kind, k,
                                                              temperature):
  train, train_labels, test, test_labels = fixed_split(0, kind)
  use_sources(monkeypatch, train, train_labels, test, test_labels)
  want_neighbours, want_scores = numpy_knn(train, train_labels, test, k, temperature)
  if kind == "quantized":  # Ties decide some neighbours: the lower index must win them.
    sims = test @ train.T
    kth = np.sort(sims, axis=-1)[:, ::-1][:, k - 1]
    assert np.any((sims == kth[:, None]).sum(-1) > 1)
  for devices in (1, 8):
    mesh = sharding.make_mesh([("data", devices)])
    config = eval_config(k=k, temperature=temperature)
    extract = knn.FeatureExtractor(FeatureTask(), mesh, config, normalize=True, field="knn")
    bank = extract(VARIABLES, config.train_data)
    assert bank.size == len(train) and bank.features.shape == (5, BATCH_SIZE, 8)
    assert bank.features.sharding.spec == P(None, ("data",))

    def neighbours(queries, features, labels):
      sims, index, neighbour_labels = knn.knn_neighbours(queries, features, labels, k,
                                                         ("data",))
      return index, neighbour_labels, knn.knn_class_scores(sims, neighbour_labels,
                                                           temperature, NUM_CLASSES)

    index, labels, scores = jax.jit(jax.shard_map(
        neighbours, mesh=mesh, in_specs=(P(), P(None, "data"), P(None, "data")),
        out_specs=P(), check_vma=False))(jnp.asarray(test / np.linalg.norm(test, axis=-1, keepdims=True)),
                        bank.features, bank.labels)
    np.testing.assert_array_equal(index, want_neighbours, err_msg=f"{devices} devices")
    np.testing.assert_array_equal(labels, train_labels[want_neighbours])
    # Scores up to the per-query factor exp(-s_max / T); their ranking exactly.
    top_sims = np.take_along_axis(test @ train.T / 4, want_neighbours[:, :1], -1)
    if kind == "quantized":
      np.testing.assert_allclose(scores, want_scores * np.exp(-top_sims / temperature),
                                 rtol=1e-5)
      assert_unambiguous(want_scores)
      np.testing.assert_array_equal(rank_classes(np.asarray(scores)),
                                    rank_classes(want_scores))


@pytest.mark.parametrize("kind,k,temperature,query_chunk", [
    ("quantized", 10, 0.5, 2), ("gaussian", 20, 0.07, 4), ("quantized", 3, 0.5, 8)])
def test_evaluator_matches_numpy_on_1_and_8_devices(monkeypatch, kind, k, temperature,
                                                    query_chunk):
  train, train_labels, test, test_labels = fixed_split(1, kind)
  use_sources(monkeypatch, train, train_labels, test, test_labels)
  _, scores = numpy_knn(train, train_labels, test, k, temperature)
  if kind == "quantized":
    assert_unambiguous(scores)
  top1, top5 = numpy_top1_top5(scores, test_labels, k)
  assert top1 < top5
  results = []
  for devices in (1, 8):
    evaluator = knn.KnnEvaluator(FeatureTask(), sharding.make_mesh([("data", devices)]),
                                 eval_config(k=k, temperature=temperature,
                                             query_chunk=query_chunk))
    results.append(evaluator.run(VARIABLES))
    assert results[-1] == pytest.approx({"top1": top1, "top5": top5}, abs=1e-9), devices
  assert results[0] == results[1]


@pytest.mark.parametrize("fields,error", [
    (dict(query_chunk=3), r"'evals.<name>.query_chunk' \(3\) must divide 'evals.<name>.batch"),
    (dict(num_classes=0), r"'evals.<name>.num_classes' must be an int > 0"),
    (dict(k=0), r"'evals.<name>.k' must be a int > 0"),
    (dict(temperature=-1.0), r"'evals.<name>.temperature' must be a float > 0"),
    (dict(train_data=None), r"'evals.<name>.train_data' must be a dict")])
def test_config_errors_name_the_field(fields, error):
  with pytest.raises(ValueError, match=error):
    knn.KnnEvaluator(FeatureTask(), sharding.make_mesh([("data", 1)]), eval_config(**fields))
