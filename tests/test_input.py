"""The shapes dataset and the grain pipeline: content, determinism, resume, sharding, errors."""
import json
import os
import shutil

import numpy as np
import pytest

from big_vision_lite.input import data
from big_vision_lite.input import pp as pp_lib
from big_vision_lite.input import shapes

TRAIN_PP = ('decode|inception_crop(32, area_min=60)|flip_lr|value_range(-1, 1)|'
            'onehot(10, key="label", key_result="labels")|keep("image", "labels")')
EVAL_PP = 'decode|resize(32)|value_range(-1, 1)|keep("image", "label")'


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A tfds data_dir holding shapes/tiny (train 256, test 64), built once per module."""
  return shapes.ensure_built(str(tmp_path_factory.mktemp("tfds")), "tiny")


def tiny(data_dir, split="train"):
  return dict(name="shapes/tiny", split=split, data_dir=data_dir)


def test_default_config_is_the_full_dataset():
  configs = {c.name: c.num_examples for c in shapes.Shapes.BUILDER_CONFIGS}
  assert shapes.Shapes.DEFAULT_CONFIG_NAME == "full"
  assert configs["full"] == {"train": 8000, "test": 1000}


def test_shapes_content(data_dir):
  assert data.num_examples(tiny(data_dir)) == 256
  assert data.num_examples(tiny(data_dir, "test")) == 64
  assert data.num_examples(tiny(data_dir, "train[:25%]")) == 64
  source = data.get_source(tiny(data_dir, "test"))
  decode = pp_lib.get_preprocess_fn("decode")
  labels = []
  for i in range(len(source)):
    ex = decode(source[i], np.random.default_rng(0))
    h, w, _ = ex["image"].shape
    assert ex["image"].dtype == np.uint8 and 24 <= h <= 96 and 24 <= w <= 96
    assert 0.5 <= w / h <= 2.0 + 0.1
    boxes = np.asarray(ex["objects"]["bbox"]).reshape(-1, 4)
    objects = np.asarray(ex["objects"]["label"])
    assert 1 <= len(boxes) == len(objects) <= 3
    assert (boxes[:, :2] < boxes[:, 2:]).all() and (boxes >= 0).all() and (boxes <= 1).all()
    assert objects[0] == ex["label"] and len(set(objects.tolist())) == len(objects)
    assert 0 <= ex["label"] < len(shapes.CLASSES)
    assert ex["caption"].startswith(b"a large ")
    assert shapes.CLASSES[ex["label"]].encode() in ex["caption"]
    labels.append(ex["label"])
  assert len(set(labels)) >= 8


def test_tiny_is_a_prefix_of_full_and_drawing_is_deterministic(data_dir):
  source = data.get_source(tiny(data_dir))
  for index in (0, 255):
    drawn = shapes.draw_example(shapes.example_rng("train", index))
    assert drawn["image"] == source[index]["image"]
    assert drawn["caption"].encode() == source[index]["caption"]


def test_builds_and_reads_without_tensorflow(tmp_path, run_without_tensorflow):
  run_without_tensorflow(
      "from big_vision_lite.input import data\n"
      f"spec = dict(name='shapes/tiny', split='test', data_dir={str(tmp_path)!r})\n"
      "batch = next(data.make_eval_iterator(spec, 'decode|resize(8)|keep(\"image\")', 4))\n"
      "assert batch['image'].shape == (4, 8, 8, 3), batch['image'].shape\n")


def test_train_iterator_is_deterministic_and_resumes_exactly(data_dir):
  spec = tiny(data_dir)
  first = data.make_train_iterator(spec, TRAIN_PP, 8, seed=1)
  again = data.make_train_iterator(spec, TRAIN_PP, 8, seed=1)
  other = data.make_train_iterator(spec, TRAIN_PP, 8, seed=2)
  a, b, c = next(first), next(again), next(other)
  assert a["image"].shape == (8, 32, 32, 3) and a["labels"].shape == (8, 10)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])
  for _ in range(2):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # What the checkpoint stores.
  expected = [next(first) for _ in range(3)]
  resumed = data.make_train_iterator(spec, TRAIN_PP, 8, seed=1)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_processes_split_each_global_batch(data_dir):
  spec = tiny(data_dir)
  whole = data.make_train_iterator(spec, TRAIN_PP, 8, seed=0)
  parts = [data.make_train_iterator(spec, TRAIN_PP, 8, seed=0, process_index=p,
                                    process_count=2) for p in range(2)]
  for _ in range(2):
    full = next(whole)
    halves = [next(part) for part in parts]
    assert halves[0]["image"].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), full["image"])


def test_epochs_are_reshuffled_permutations(data_dir):
  spec = tiny(data_dir, "test[:20]")
  source = data.get_source(spec)
  it = data.make_train_iterator(spec, 'copy("caption", "c")|keep("label")', 10, seed=0)
  labels = [next(it)["label"].tolist() for _ in range(4)]  # Two epochs of 20.
  expected = sorted(source[i]["label"] for i in range(20))
  assert sorted(labels[0] + labels[1]) == expected == sorted(labels[2] + labels[3])
  assert labels[:2] != labels[2:]


def test_eval_iterator_covers_each_example_once(data_dir):
  spec = tiny(data_dir, "test[:50]")
  seen = []
  for p in range(2):
    batches = list(data.make_eval_iterator(spec, EVAL_PP, 16, process_index=p,
                                           process_count=2))
    assert len(batches) == 4  # ceil(50 / 16) on every process.
    for batch in batches:
      assert batch["image"].shape == (8, 32, 32, 3) and batch["_mask"].dtype == bool
      seen.extend(batch["label"][batch["_mask"]].tolist())
  source = data.get_source(spec)
  assert sorted(seen) == sorted(source[i]["label"] for i in range(50))
  ordered = np.concatenate([b["label"][b["_mask"]] for b in data.make_eval_iterator(
      spec, EVAL_PP, 16)])
  np.testing.assert_array_equal(ordered, [source[i]["label"] for i in range(50)])


def test_dataset_errors(data_dir, tmp_path):
  with pytest.raises(ValueError, match=r"Unknown dataset name 'no_such_dataset' \(config "
                     r"field 'input.data'"):
    data.get_source(dict(name="no_such_dataset", split="train"))
  with pytest.raises(ValueError, match=r"'cifar10' .* is not prepared .*download_and_prepare"
                     r"\(file_format='array_record'\)"):
    data.get_source(dict(name="cifar10", split="train", data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match=r"Bad split 'validation' .*'train', 'test'"):
    data.get_source(tiny(data_dir, "validation"))
  with pytest.raises(ValueError, match=r"Unknown shapes config 'huge'; known: full, tiny"):
    data.get_source(dict(name="shapes/huge", split="train", data_dir=str(tmp_path)))
  # A dataset prepared as tfrecord (here: its metadata says so) cannot be read by grain.
  copy = tmp_path / "tfrecord"
  shutil.copytree(os.path.join(data_dir, "shapes"), copy / "shapes")
  info = copy / "shapes" / "tiny" / shapes.VERSION / "dataset_info.json"
  info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
  with pytest.raises(ValueError, match=r"prepared .* as tfrecord, .* grain needs array_record"):
    data.get_source(dict(name="shapes/tiny", split="train", data_dir=str(copy)))


def test_pipeline_errors(data_dir):
  spec = tiny(data_dir)
  with pytest.raises(ValueError, match=r"'input.batch_size' \(9\) must be divisible by the "
                     r"number of processes \(2\)"):
    data.make_train_iterator(spec, TRAIN_PP, 9, seed=0, process_count=2)
  with pytest.raises(ValueError, match="key 'caption' is not a numeric array"):
    next(data.make_train_iterator(spec, "decode|resize(8)", 4, seed=0))
  with pytest.raises(ValueError, match=r"key 'image' has shape .* different shapes cannot be "
                     "batched"):
    next(data.make_train_iterator(spec, 'decode|keep("image")', 4, seed=0))


def test_nested_features_must_be_flattened_before_batching(data_dir):
  """tfds's nested "objects" reach the pp ops; a batch takes them once flat and padded."""
  message = (r"key 'objects' is a nested dict \(keys \['bbox', 'label'\]\); batches hold "
             r"flat numeric arrays only\. .*to_cxcywh\|pad_boxes\(max_boxes\)")
  nested = 'decode|resize(8)|keep("image", "objects")'
  with pytest.raises(ValueError, match=message):
    next(data.make_train_iterator(tiny(data_dir), nested, 4, seed=0))
  with pytest.raises(ValueError, match=message):
    next(data.make_eval_iterator(tiny(data_dir, "test"), nested, 4))
  flat = next(data.make_eval_iterator(tiny(data_dir, "test[:4]"),
                                      nested + "|to_cxcywh|pad_boxes(3)", 4))
  source = data.get_source(tiny(data_dir, "test[:4]"))
  assert flat["boxes"].shape == (4, 3, 4) and flat["labels"].shape == (4, 3)
  np.testing.assert_array_equal(flat["box_mask"].sum(1),
                                [len(source[i]["objects"]["label"]) for i in range(4)])
