"""Zero-shot and retrieval evaluators on fixed embeddings (a stub task: images are their
embedding vectors, a text's embedding is its bag of byte tokens times a fixed matrix)
against brute-force numpy (float64, full sorts): exact similarity ties, duplicate class
names, K captions per image, splits that do not fill the last batch, 1 and 8 devices."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_vision_lite import sharding
from big_vision_lite.evaluators import retrieval
from big_vision_lite.evaluators import zeroshot
from big_vision_lite.input import data as data_lib
from big_vision_lite.input import shapes

VOCAB = 258  # The byte tokenizer's: byte b is id b + 2, 0 = padding, 1 = EOS.
BATCH_SIZE = 8


class EmbeddingTask:
  """embed_images: batch["image"] [B, D] as is; embed_texts: the normalised sum over a
  text's tokens of variables["params"]["words"][token] (row 0, padding, is zero)."""

  def embed_images(self, variables, batch):
    del variables
    return batch["image"]

  def embed_texts(self, variables, tokens):
    bag = jax.nn.one_hot(tokens, VOCAB).sum(1)  # [N, VOCAB]
    z = jnp.dot(bag, variables["params"]["words"], precision=jax.lax.Precision.HIGHEST)
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_text_embeddings(texts, words):
  """float64 [N, D]: per text, the normalised sum of the word rows of its UTF-8 bytes (each
  shifted by 2) and of one EOS (row 1)."""
  bags = np.zeros((len(texts), VOCAB))
  for bag, text in zip(bags, texts):
    np.add.at(bag, np.frombuffer(text.encode(), np.uint8).astype(int) + 2, 1)
    bag[1] += 1
  return normalize(bags @ words.astype(np.float64))


def use_source(monkeypatch, records):
  monkeypatch.setattr(data_lib, "get_source", lambda data: records)


def eval_config(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(dict(data=dict(name="fixed", split="test"),
                                             batch_size=BATCH_SIZE, log_steps=1), **fields))


# Zero-shot. Classes 0 and 3 have the same name, hence the same embedding: an exact tie
# that class 0 must win, so images of class 3 are never top-1 (but top-5) hits.
CLASS_NAMES = ["circle", "square", "star", "circle", "ring", "plus"]
TEMPLATES = ["a {}", "a large {} on a blotchy background", "{}!"]


def zeroshot_case(seed: int, num_images: int = 37, dim: int = 16):
  """(word matrix [VOCAB, D], images [N, D] near their class embedding, labels [N])."""
  rng = np.random.default_rng(seed)
  words = rng.normal(size=(VOCAB, dim)).astype(np.float32)
  words[0] = 0  # Padding adds nothing.
  prompts = [t.format(name) for name in CLASS_NAMES for t in TEMPLATES]
  classes = normalize(numpy_text_embeddings(prompts, words).reshape(
      len(CLASS_NAMES), len(TEMPLATES), dim).mean(1))
  labels = rng.integers(0, len(CLASS_NAMES), num_images)
  labels[:2] = 3
  images = (classes[labels] + 0.6 * rng.normal(size=(num_images, dim))).astype(np.float32)
  return words, images, labels, classes


def numpy_zeroshot(images, labels, classes):
  scores = images.astype(np.float64) @ classes.T  # [N, C]
  ids = np.broadcast_to(np.arange(len(classes)), scores.shape)
  ranked = np.lexsort((ids, -scores), axis=-1)  # Equal scores: the lower class id first.
  hits = ranked[:, :min(5, len(classes))] == labels[:, None]
  return scores, hits[:, 0].mean(), hits.any(-1).mean()


def assert_unambiguous(scores):
  """Test precondition: scores that differ, differ well beyond float32 rounding."""
  gaps = np.abs(scores[:, :, None] - scores[:, None, :])
  assert np.all((gaps == 0) | (gaps > 1e-5))


def test_zeroshot_matches_numpy_on_1_and_8_devices(monkeypatch):
  words, images, labels, classes = zeroshot_case(0)
  use_source(monkeypatch, [{"image": x, "label": np.int64(y)} for x, y in zip(images, labels)])
  scores, top1, top5 = numpy_zeroshot(images, labels, classes)
  assert_unambiguous(scores)
  assert 0 < top1 < top5 < 1  # Not trivial; the class-3 images miss top-1 by the tie alone.
  assert not np.any(np.argmax(scores, -1) == 3)
  variables = {"params": {"words": words}}
  config = eval_config(pp='keep("image", "label")', class_names=CLASS_NAMES,
                       templates=TEMPLATES, max_len=40)
  for devices in (1, 8):
    evaluator = zeroshot.ZeroShotEvaluator(EmbeddingTask(), sharding.make_mesh(
        [("data", devices)]), config)
    # 18 prompts in batches of 8: the last batch has 6 filler rows that must not count.
    assert evaluator.prompt_tokens.shape == (3, BATCH_SIZE, 40)
    np.testing.assert_allclose(evaluator.class_embeddings(variables), classes, atol=1e-6)
    assert evaluator.run(variables) == pytest.approx({"top1": top1, "top5": top5}, abs=1e-12)


def test_zeroshot_default_class_names_come_from_the_dataset():
  config = eval_config(data=dict(name="shapes/tiny", split="test"), pp='keep("label")',
                       max_len=16)
  zeroshot.ZeroShotEvaluator.validate_config(config, "evals.zs")
  evaluator = zeroshot.ZeroShotEvaluator(EmbeddingTask(), sharding.make_mesh([("data", 1)]),
                                         config)
  assert evaluator.class_names == list(shapes.CLASSES)
  assert evaluator.templates == list(zeroshot.TEMPLATES)


def test_zeroshot_label_outside_the_class_names_names_the_field(monkeypatch):
  words, images, _, _ = zeroshot_case(1, num_images=9)
  use_source(monkeypatch, [{"image": x, "label": np.int64(6 if i == 4 else 0)}
                           for i, x in enumerate(images)])
  evaluator = zeroshot.ZeroShotEvaluator(
      EmbeddingTask(), sharding.make_mesh([("data", 8)]),
      eval_config(pp='keep("image", "label")', class_names=CLASS_NAMES, max_len=40))
  with pytest.raises(ValueError, match=r"1 examples of fixed:test have a label outside "
                     r"\[0, 6\) \(config field 'evals.<name>.class_names' has 6 names\)"):
    evaluator.run({"params": {"words": words}})


# Retrieval on quantized embeddings: 4 entries of +-1/2, so every cosine similarity is an
# exact multiple of 1/4 and many are equal.


def quantized(rng, count, dim=8):
  out = np.zeros((count, dim), np.float32)
  for row in out:
    row[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
  return out


def retrieval_case(seed: int, captions_per_image: int, num_images: int = 37):
  """(word matrix, images [N, D], captions: N lists of K one-letter texts). Letters 'a'..'p'
  embed to 16 pool vectors (EOS and padding to zero); images are pool vectors too, and a
  caption names its image's vector with probability 1/2, else a random one."""
  rng = np.random.default_rng(seed)
  pool = quantized(rng, 16)
  letters = [chr(ord("a") + j) for j in range(16)]
  words = np.zeros((VOCAB, 8), np.float32)
  words[[ord(c) + 2 for c in letters]] = pool
  image_ids = rng.integers(0, 16, num_images)
  images = pool[image_ids]
  caption_ids = np.where(rng.random((num_images, captions_per_image)) < 0.5,
                         image_ids[:, None], rng.integers(0, 16, (num_images,
                                                                  captions_per_image)))
  captions = [[letters[j] for j in row] for row in caption_ids]
  return words, images, captions


def numpy_recalls(images, texts, captions_per_image):
  """Recall@1/5/10 by full sorts (equal similarities: the lower index first)."""
  sims = images.astype(np.float64) @ texts.astype(np.float64).T  # [N, N * K]
  num_images, num_texts = sims.shape
  owner = np.arange(num_texts) // captions_per_image
  text_order = np.lexsort((np.broadcast_to(np.arange(num_texts), sims.shape), -sims), axis=-1)
  i2t = np.array([np.flatnonzero(owner[order] == i)[0] for i, order in enumerate(text_order)])
  image_order = np.lexsort((np.broadcast_to(np.arange(num_images), sims.T.shape), -sims.T),
                           axis=-1)
  t2i = np.array([np.flatnonzero(order == owner[t])[0] for t, order in enumerate(image_order)])
  return {**{f"i2t_r{k}": np.mean(i2t < k) for k in (1, 5, 10)},
          **{f"t2i_r{k}": np.mean(t2i < k) for k in (1, 5, 10)}}, sims


@pytest.mark.parametrize("captions_per_image,query_chunk,mesh_sizes", [
    (1, 8, (8,)), (3, 4, (1, 8))], ids=["1_caption", "3_captions"])
def test_retrieval_matches_numpy_with_ties_on_1_and_8_devices(monkeypatch, captions_per_image,
                                                              query_chunk, mesh_sizes):
  words, images, captions = retrieval_case(2, captions_per_image)
  texts = [c for row in captions for c in row]
  want, sims = numpy_recalls(images, numpy_text_embeddings(texts, words), captions_per_image)
  for direction in ("i2t", "t2i"):
    assert 0 < want[f"{direction}_r1"] < want[f"{direction}_r5"] < want[
        f"{direction}_r10"] < 1, want
  # Ties decide places: many matches share their similarity with a candidate of lower index.
  owner = np.arange(sims.shape[1]) // captions_per_image
  own = owner[None, :] == np.arange(len(images))[:, None]  # [N, N * K]
  best = np.where(own, sims, -np.inf).max(-1, keepdims=True)  # [N, 1]
  assert np.sum(((sims == best) & (owner < np.arange(len(images))[:, None])).any(-1)) >= 5
  match = sims[owner, np.arange(sims.shape[1])]  # [N * K]: each caption with its image.
  assert np.sum(((sims == match) & (np.arange(len(images))[:, None] < owner)).any(0)) >= 5
  one_caption = captions_per_image == 1
  use_source(monkeypatch, [{"image": x, "caption": c[0] if one_caption else c}
                           for x, c in zip(images, captions)])
  variables = {"params": {"words": words}}
  config = eval_config(pp='tokenize(4, inkey="caption")|keep("image", "text")',
                       query_chunk=query_chunk)
  for devices in mesh_sizes:
    evaluator = retrieval.RetrievalEvaluator(EmbeddingTask(), sharding.make_mesh(
        [("data", devices)]), config)
    assert evaluator.run(variables) == pytest.approx(want, abs=1e-12), devices


def test_retrieval_of_a_split_smaller_than_the_batch(monkeypatch):
  """3 images in a batch of 8 on 8 devices: 5 pad rows (copies of image 2), which are
  neither candidates nor queries. With 3 images every real caption's image is within
  the first 5 (a pad query, if counted, would be too), and image 2's caption is ahead of
  image 0's own (so would its pad copies be)."""
  words, images, captions = retrieval_case(0, 2, num_images=3)
  texts = numpy_text_embeddings([c for row in captions for c in row], words)
  want, sims = numpy_recalls(images, texts, 2)
  assert np.any(sims[0, 4:] > sims[0, :2].max())
  assert want["i2t_r1"] < 1 and want["t2i_r1"] < 1 and want["t2i_r5"] == 1
  use_source(monkeypatch, [{"image": x, "caption": c} for x, c in zip(images, captions)])
  evaluator = retrieval.RetrievalEvaluator(EmbeddingTask(), sharding.make_mesh(
      [("data", 8)]), eval_config(pp='tokenize(4, inkey="caption")|keep("image", "text")'))
  assert evaluator.run({"params": {"words": words}}) == pytest.approx(want, abs=1e-12)


def test_retrieval_on_gaussian_embeddings_matches_numpy(monkeypatch):
  rng = np.random.default_rng(3)
  words = rng.normal(size=(VOCAB, 8)).astype(np.float32)
  words[0] = 0
  captions = [["".join(rng.choice(list("abcdefgh"), 3)) for _ in range(2)] for _ in range(29)]
  texts = numpy_text_embeddings([c for row in captions for c in row], words)
  images = (normalize(texts[::2] + texts[1::2]) + 0.8 * rng.normal(size=(29, 8))).astype(
      np.float32)
  want, sims = numpy_recalls(normalize(images.astype(np.float64)), texts, 2)
  gaps = np.abs(np.sort(sims, -1)[:, 1:] - np.sort(sims, -1)[:, :-1])
  assert np.all((gaps == 0) | (gaps > 1e-5))  # Unambiguous in float32 (0: equal bags).
  assert 0 < want["i2t_r1"] < 1 and 0 < want["t2i_r1"] < 1
  use_source(monkeypatch, [{"image": x, "caption": c} for x, c in zip(images, captions)])
  evaluator = retrieval.RetrievalEvaluator(EmbeddingTask(), sharding.make_mesh(
      [("data", 8)]), eval_config(pp='tokenize(8, inkey="caption")|keep("image", "text")'))
  assert evaluator.run({"params": {"words": words}}) == pytest.approx(want, abs=1e-12)


def test_retrieval_without_tokens_names_the_pp_field(monkeypatch):
  use_source(monkeypatch, [{"image": np.zeros(8, np.float32), "caption": "a"}] * 3)
  evaluator = retrieval.RetrievalEvaluator(EmbeddingTask(), sharding.make_mesh([("data", 1)]),
                                           eval_config(pp='keep("image")'))
  with pytest.raises(ValueError, match=r"needs int tokens 'text' \[B, L\] or \[B, K, L\] from "
                     r"its pp \(config field 'evals.<name>.pp'"):
    evaluator.run({"params": {"words": np.zeros((VOCAB, 8), np.float32)}})


@pytest.mark.parametrize("fields,error", [
    (dict(max_len=None), r"'evals.<name>.max_len' must be an int > 0, got None \(the text "),
    (dict(batch_size=0), r"'evals.<name>.batch_size' must be an int > 0, got 0"),
    (dict(data=None), r"'evals.<name>.data' must be a dict with a str 'name'"),
    (dict(class_names="circle"), r"'evals.<name>.class_names' must be a non-empty list of "
     r"str \(one name per label"),
    (dict(class_names=[]), r"'evals.<name>.class_names' must be a non-empty list"),
    (dict(templates=["a photo"]), r"'evals.<name>.templates': template 'a photo' must hold "
     r"exactly one '\{\}'"),
    (dict(templates=["{} {x}"]), r"template '\{\} \{x\}' must hold exactly one"),
    (dict(templates=[3]), r"'evals.<name>.templates' must be a non-empty list of str"),
    (dict(tokenizer="spm"), r"'evals.<name>.tokenizer': Unknown tokenizer spec 'spm'; "
     r"accepted: 'bytes' or 'sentencepiece:")])
def test_zeroshot_config_errors_name_the_field(fields, error):
  config = eval_config(**dict(dict(pp='keep("image", "label")', class_names=CLASS_NAMES,
                                   max_len=16), **fields))
  with pytest.raises(ValueError, match=error):
    zeroshot.ZeroShotEvaluator(EmbeddingTask(), sharding.make_mesh([("data", 1)]), config)


@pytest.mark.parametrize("fields,error", [
    (dict(query_chunk=3), r"'evals.<name>.query_chunk' \(3\) must divide "
     r"'evals.<name>.batch_size' \(8\)"),
    (dict(query_chunk=0), r"'evals.<name>.query_chunk' must be a int > 0"),
    (dict(batch_size=None), r"'evals.<name>.batch_size' must be an int > 0, got None"),
    (dict(data=dict(name="x")), r"'evals.<name>.data' must be a dict with a str 'name'")])
def test_retrieval_config_errors_name_the_field(fields, error):
  with pytest.raises(ValueError, match=error):
    retrieval.RetrievalEvaluator(EmbeddingTask(), sharding.make_mesh([("data", 1)]),
                                 eval_config(pp='keep("image", "text")', **fields))


def test_dataset_without_class_labels_asks_for_class_names(monkeypatch):
  class Info:  # A dataset whose "label" is a plain int, not a ClassLabel.
    features = {"label": "int64"}

  class Source(list):
    dataset_info = Info()

  use_source(monkeypatch, Source())
  with pytest.raises(ValueError, match=r"'evals.zs.class_names' is not set and dataset 'fixed' "
                     r"has no named ClassLabel feature 'label'"):
    zeroshot.dataset_class_names(dict(name="fixed", split="test"), "evals.zs")
