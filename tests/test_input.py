"""The shapes dataset and the grain pipeline: content, determinism, resume, sharding."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from big_vision_lite.input import data
from big_vision_lite.input import shapes

TRAIN_PP = ('decode|inception_crop(32, area_min=60)|flip_lr|value_range(-1, 1)|'
            'onehot(10, key="label", key_result="labels")|keep("image", "labels")')
EVAL_PP = 'decode|resize(32)|value_range(-1, 1)|keep("image", "label")'
SHAPES = dict(name="shapes", split="train")


def test_shapes_content():
  source = data.get_source(dict(name="shapes", split="test"))
  assert len(source) == shapes.SPLITS["test"][0]
  labels = []
  for i in range(0, 1000, 50):
    ex = data.pp_lib.get_preprocess_fn("decode")(source[i], np.random.default_rng(0))
    h, w, _ = ex["image"].shape
    assert 24 <= h <= 96 and 24 <= w <= 96
    boxes = np.asarray(ex["objects"]["bbox"]).reshape(-1, 4)
    assert (boxes[:, :2] < boxes[:, 2:]).all() and (boxes >= 0).all() and (boxes <= 1).all()
    assert ex["objects"]["label"][0] == ex["label"]
    assert shapes.CLASSES[ex["label"]].encode() in ex["caption"]
    labels.append(ex["label"])
  assert len(set(labels)) >= 8


def test_drawing_is_deterministic():
  a = shapes.draw_example(np.random.default_rng(5))
  b = shapes.draw_example(np.random.default_rng(5))
  assert a["image"] == b["image"] and a["caption"] == b["caption"]


def test_train_iterator_is_deterministic_and_resumes_exactly():
  first = data.make_train_iterator(SHAPES, TRAIN_PP, 8, seed=1)
  again = data.make_train_iterator(SHAPES, TRAIN_PP, 8, seed=1)
  other = data.make_train_iterator(SHAPES, TRAIN_PP, 8, seed=2)
  a, b, c = next(first), next(again), next(other)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])
  for _ in range(2):
    next(first)
  state = first.get_state()
  expected = [next(first) for _ in range(3)]
  resumed = data.make_train_iterator(SHAPES, TRAIN_PP, 8, seed=1)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_processes_split_each_global_batch():
  whole = data.make_train_iterator(SHAPES, TRAIN_PP, 8, seed=0)
  parts = [data.make_train_iterator(SHAPES, TRAIN_PP, 8, seed=0, process_index=p,
                                    process_count=2) for p in range(2)]
  for _ in range(2):
    full = next(whole)
    halves = [next(part) for part in parts]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), full["image"])


def test_epochs_are_permutations():
  split = dict(name="shapes", split="test[:20]")
  it = data.make_train_iterator(split, 'decode|keep("label")|copy("label", "l")', 10, seed=0)
  source = tfds.data_source("shapes", split="test[:20]", data_dir=shapes.ensure_built())
  expected = sorted(source[i]["label"] for i in range(20))
  epoch = np.concatenate([next(it)["label"] for _ in range(2)])
  assert sorted(epoch.tolist()) == expected


def test_eval_iterator_covers_each_example_once():
  split = dict(name="shapes", split="test[:50]")
  seen = []
  for p in range(2):
    for batch in data.make_eval_iterator(split, EVAL_PP, 16, process_index=p, process_count=2):
      assert batch["image"].shape == (8, 32, 32, 3)
      seen.extend(batch["label"][batch["_mask"]].tolist())
  assert len(seen) == 50
  source = tfds.data_source("shapes", split="test[:50]", data_dir=shapes.ensure_built())
  assert sorted(seen) == sorted(source[i]["label"] for i in range(50))


def test_errors():
  with pytest.raises(ValueError, match=r"'data' \(name='no_such_dataset'.*cannot be read"):
    data.get_source(dict(name="no_such_dataset", split="train"))
  with pytest.raises(ValueError, match=r"'input.batch_size' \(9\) must be divisible"):
    data.make_train_iterator(SHAPES, TRAIN_PP, 9, seed=0, process_count=2)
  it = data.make_train_iterator(SHAPES, "decode|resize(8)", 4, seed=0)
  with pytest.raises(ValueError, match="key 'caption' is not a numeric array"):
    next(it)
