"""tools/feature_attributes.py: attributes against the pixels, k-NN per attribute, the CLI."""
import json
import os

import numpy as np
import pytest

from big_vision_lite import train
from big_vision_lite.input import data as data_lib
from big_vision_lite.input import pp
from big_vision_lite.input import shapes
from big_vision_lite.tools import feature_attributes
from test_dino import tiny_config

SOLID_AT_CENTRE = ("circle", "square", "triangle", "diamond", "plus", "star", "hexagon",
                   "xcross")  # Classes whose box centre lies inside the shape.


def test_attributes_agree_with_the_pixels():
  data = dict(name="shapes", split="train[:64]")
  attributes = feature_attributes.split_attributes(data)
  assert set(attributes) == set(feature_attributes.ATTRIBUTES)
  palette = np.asarray(list(shapes.COLORS.values()), np.float32)  # [10, 3]
  checked = agree = 0
  for i, example in enumerate(data_lib.get_source(data)):
    image = pp.get_preprocess_fn("decode")(dict(example), None)["image"]  # [H, W, 3]
    h, w, _ = image.shape
    assert attributes["class"][i] == example["label"]
    assert attributes["wide"][i] == (w > h)
    assert attributes["shapes"][i] == 1 + str(example["caption"]).count(" small ")
    assert attributes["brightness"][i] == min(int(image.mean() * 5 / 255), 4)
    if shapes.CLASSES[example["label"]] in SOLID_AT_CENTRE:
      ymin, xmin, ymax, xmax = example["objects"]["bbox"][0]
      centre = image[int((ymin + ymax) / 2 * h), int((xmin + xmax) / 2 * w)].astype(np.float32)
      nearest = np.argmin(((palette - centre) ** 2).sum(-1))
      checked += 1
      agree += nearest == attributes["colour"][i]
  assert checked >= 40 and agree >= 0.9 * checked, (agree, checked)  # Distractors may cover.


def test_attribute_top1_finds_the_encoded_attribute_and_the_majority():
  rng = np.random.default_rng(0)
  colour = rng.integers(0, 4, 300)
  other = rng.integers(0, 3, 300)
  features = np.eye(4)[colour] + 0.05 * rng.normal(size=(300, 4))  # Encodes colour only.
  bank = {"colour": colour[:200], "other": other[:200]}
  query = {"colour": colour[200:], "other": other[200:]}
  result = feature_attributes.attribute_top1(features[:200], bank, features[200:], query)
  assert result["colour"][0] == 1.0
  assert result["other"][0] < 0.55  # Chance is about 1/3; the features carry nothing of it.
  for name in bank:
    assert result[name][1] == np.bincount(query[name]).max() / 100


def test_cli_class_column_is_the_knn_evaluators_top1(tmp_path, capsys):
  config = tiny_config(total_steps=1)
  config.evals = {"knn": dict(
      type="knn", use_ema=True, log_steps=100, batch_size=16, num_classes=10, k=5,
      pp='decode|resize(32)|value_range(-1, 1)|keep("image", "label")',
      train_data=dict(name="shapes", split="train[:48]"),
      data=dict(name="shapes", split="test[:32]"))}
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evaluator_top1 = [json.loads(line) for line in f if "knn/top1" in line][-1]["knn/top1"]
  results = feature_attributes.main(["--workdirs", workdir])
  assert list(results[workdir]) == list(feature_attributes.ATTRIBUTES)
  assert results[workdir]["class"][0] == pytest.approx(evaluator_top1)
  assert "each cell: k-NN top-1 (majority baseline)" in capsys.readouterr().out


def test_a_run_without_the_eval_is_refused_by_name(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"task": "dino", "evals": {}}))
  with pytest.raises(ValueError, match=r"no config field 'evals.knn'"):
    feature_attributes.main(["--workdirs", str(workdir)])
