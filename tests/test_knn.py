"""k-NN and linear-probe evaluators on fixed features (a stub task whose features are its
input vectors) against brute-force numpy: exact similarity ties, k larger than a class,
banks that do not fill the last batch or split evenly over the devices, query chunks
smaller than a batch, the same answer on 1 and 8 devices and in 2 processes."""
import json
import os
import socket
import subprocess
import sys

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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 8
BATCH_SIZE = 8


class FeatureTask:
  """A task whose features are its images (vectors [B, D]) times a `scale` param."""

  def features(self, variables, batch):
    return batch["image"] * variables["params"]["scale"]


VARIABLES = {"params": {"scale": np.float32(1.0)}}


def quantized_features(rng: np.random.Generator, count: int, dim: int = 8) -> np.ndarray:
  """Vectors with 4 entries of +-1 and the rest 0: norm 2, so cosine similarities are exact
  multiples of 1/4 in float32 and many are exactly equal."""
  out = np.zeros((count, dim), np.float32)
  for row in out:
    row[rng.choice(dim, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
  return out


def fixed_split(seed: int, kind: str, num_train: int = 37, num_test: int = 21):
  """(train features, train labels, test features, test labels). The last class has 3 bank
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


@pytest.mark.parametrize("kind,k", [("quantized", 20), ("quantized", 1), ("normal", 40)])
def test_knn_predict_matches_brute_force(kind, k):
  train, train_labels, test, _ = fixed_split(3, kind)
  _, expected = numpy_knn(train, train_labels, test, min(k, len(train)), 0.07)
  got = knn.knn_predict(train * 3.0, train_labels, test, num_classes=NUM_CLASSES, k=k,
                        temperature=0.07)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


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
    pairs = np.maximum(row[:, None], row[None, :])
    gaps = np.abs(row[:, None] - row[None, :]) / np.where(pairs > 0, pairs, 1.0)
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
  assert_unambiguous(want_scores)
  sims = test @ train.T / np.outer(np.linalg.norm(test, axis=-1), np.linalg.norm(train, axis=-1))
  nearest_sims = np.take_along_axis(sims, want_neighbours[:, :1], -1)  # [Q, 1]
  if kind == "quantized":  # Ties decide some k-th neighbours: the lower index must win them.
    kth = np.take_along_axis(sims, want_neighbours[:, -1:], -1)
    assert np.sum((sims == kth).sum(-1) > 1) >= 5
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

    queries = jnp.asarray(test / np.linalg.norm(test, axis=-1, keepdims=True))
    index, labels, scores = jax.jit(jax.shard_map(
        neighbours, mesh=mesh, in_specs=(P(), P(None, "data"), P(None, "data")),
        out_specs=P(), check_vma=False))(queries, bank.features, bank.labels)
    np.testing.assert_array_equal(index, want_neighbours, err_msg=f"{devices} devices")
    np.testing.assert_array_equal(labels, train_labels[want_neighbours])
    # Scores up to the per-query factor exp(-s_max / T); their ranking exactly.
    np.testing.assert_allclose(scores, want_scores * np.exp(-nearest_sims / temperature),
                               rtol=1e-4)
    np.testing.assert_array_equal(rank_classes(np.asarray(scores)), rank_classes(want_scores))


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


def test_k_larger_than_the_bank_is_an_error_before_compute(monkeypatch):
  use_sources(monkeypatch, *fixed_split(0, "gaussian"))
  evaluator = knn.KnnEvaluator(FeatureTask(), sharding.make_mesh([("data", 1)]),
                               eval_config(k=38))
  monkeypatch.setattr(evaluator, "extract", None)  # Computing features would fail.
  with pytest.raises(ValueError, match=r"'evals.<name>.k' is 38, more than the 37 examples"):
    evaluator.run(VARIABLES)


def probe_split(seed: int, separable: bool, num_train: int = 120, num_test: int = 200):
  """Features [N, 8] with labels: around 5 well separated class centres (at an offset and
  scale far from standardised), or Gaussian with labels drawn independently."""
  rng = np.random.default_rng(seed)
  train_labels = rng.integers(0, NUM_CLASSES, num_train)
  test_labels = rng.integers(0, NUM_CLASSES, num_test)
  if not separable:
    return (rng.normal(size=(num_train, 8)).astype(np.float32), train_labels,
            rng.normal(size=(num_test, 8)).astype(np.float32), test_labels)
  centres = 3.0 * rng.normal(size=(NUM_CLASSES, 8))
  make = lambda labels: (50.0 + 20.0 * (centres[labels] + 0.3 * rng.normal(
      size=(len(labels), 8)))).astype(np.float32)
  return make(train_labels), train_labels, make(test_labels), test_labels


def test_linear_probe_separates_separable_classes_on_1_and_8_devices(monkeypatch):
  use_sources(monkeypatch, *probe_split(0, separable=True))
  results = [linear_probe.LinearProbeEvaluator(
      FeatureTask(), sharding.make_mesh([("data", devices)]), eval_config(steps=100, lr=0.05),
      seed=3).run(VARIABLES) for devices in (1, 8)]
  assert results[0]["top1"] == results[0]["train_top1"] == results[0]["top5"] == 1.0
  assert results[0]["train_loss"] < 0.05
  assert results[1] == pytest.approx(results[0], rel=1e-4)


def test_linear_probe_of_random_labels_is_near_chance_on_held_out(monkeypatch):
  use_sources(monkeypatch, *probe_split(1, separable=False, num_train=32))
  results = linear_probe.LinearProbeEvaluator(
      FeatureTask(), sharding.make_mesh([("data", 8)]), eval_config(steps=200, lr=0.05)
  ).run(VARIABLES)
  # Chance 0.125 (200 test examples: sd 0.023); its 32 train examples it partly memorises.
  assert abs(results["top1"] - 0.125) < 0.08
  assert results["train_top1"] > 0.45


def test_linear_probe_ignores_the_offset_and_scale_of_features(monkeypatch):
  """Standardised with the train features' statistics: x and 1000 x - 300 train the same
  probe (the same seed), up to float rounding."""
  train, train_labels, test, test_labels = probe_split(2, separable=False, num_train=60)
  results = []
  for scale, offset in ((1.0, 0.0), (1000.0, -300.0)):
    use_sources(monkeypatch, scale * train + offset, train_labels, scale * test + offset,
                test_labels)
    results.append(linear_probe.LinearProbeEvaluator(
        FeatureTask(), sharding.make_mesh([("data", 8)]), eval_config(steps=50, lr=0.05)
    ).run(VARIABLES))
  assert results[1] == pytest.approx(results[0], rel=1e-3, abs=1e-6)


def test_probe_statistics_and_loss_skip_pad_rows_as_numpy():
  rng = np.random.default_rng(4)
  features = rng.normal(size=(3, 8, 6)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, (3, 8))
  labels[2, 5:] = -1  # Pad rows, whose features must not count.
  features[2, 5:] = 1e6
  real = labels >= 0
  mean, std = linear_probe.standardize_stats(jnp.asarray(features), jnp.asarray(labels))
  np.testing.assert_allclose(mean, features[real].mean(0), rtol=1e-5)
  np.testing.assert_allclose(std, features[real].std(0), rtol=1e-4)
  params = {"kernel": rng.normal(size=(6, NUM_CLASSES)).astype(np.float32),
            "bias": rng.normal(size=NUM_CLASSES).astype(np.float32)}
  logits = features[real].astype(np.float64) @ params["kernel"] + params["bias"]
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -log_softmax[np.arange(len(logits)), labels[real]].mean()
  np.testing.assert_allclose(linear_probe.mean_xent(params, jnp.asarray(features),
                                                    jnp.asarray(labels)), want, rtol=1e-5)


def two_process_worker(process_id: int, port: int, output: str) -> None:
  """One of 2 processes (4 CPU devices each): the k-NN and linear-probe evaluators on the
  8-device mesh over both; process 0 writes their results as JSON to `output`."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
  train, train_labels, test, test_labels = fixed_split(1, "quantized")
  records = lambda x, y: [{"image": f, "label": np.int64(l)} for f, l in zip(x, y)]
  sources = {"train": records(train, train_labels), "test": records(test, test_labels)}
  data_lib.get_source = lambda data: sources[data["split"]]
  mesh = sharding.make_mesh()
  results = {
      "knn": knn.KnnEvaluator(FeatureTask(), mesh, eval_config(
          k=10, temperature=0.5, query_chunk=2)).run(VARIABLES),
      "probe": linear_probe.LinearProbeEvaluator(FeatureTask(), mesh, eval_config(
          steps=20, lr=0.05)).run(VARIABLES)}
  if process_id == 0:
    with open(output, "w") as f:
      json.dump(results, f)


@pytest.mark.slow  # ~30 s: two processes import jax and compile.
def test_two_processes_give_the_one_process_results(monkeypatch, tmp_path):
  """Features computed by 2 processes, the bank split over both (4 + 4 devices)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  output = tmp_path / "results.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  code = ("import sys; sys.path.insert(0, 'tests'); import test_knn; "
          "test_knn.two_process_worker({}, %d, %r)" % (port, str(output)))
  procs = [subprocess.Popen([sys.executable, "-c", code.format(i)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = [p.communicate(timeout=300)[0].decode()[-3000:] for p in procs]
  assert all(p.returncode == 0 for p in procs), logs
  with open(output) as f:
    two = json.load(f)

  train, train_labels, test, test_labels = fixed_split(1, "quantized")
  _, scores = numpy_knn(train, train_labels, test, 10, 0.5)
  top1, top5 = numpy_top1_top5(scores, test_labels, 10)
  assert two["knn"] == pytest.approx({"top1": top1, "top5": top5}, abs=1e-9)
  use_sources(monkeypatch, train, train_labels, test, test_labels)
  one = linear_probe.LinearProbeEvaluator(FeatureTask(), sharding.make_mesh(), eval_config(
      steps=20, lr=0.05)).run(VARIABLES)
  assert two["probe"] == pytest.approx(one, rel=1e-5)
