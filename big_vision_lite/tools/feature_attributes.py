r"""What a run's frozen features encode on "shapes": weighted k-NN top-1 per attribute.

  python -m big_vision_lite.tools.feature_attributes --workdirs /tmp/dino,/tmp/dino_random

Each run dir's own `evals.<--eval>` (a `knn` eval, e.g. configs/dino.py's, or configs/vit.py
with feature_evals=true) gives the features: its pp, bank and query splits, k, temperature
and use_ema (DINO's teacher), computed as the `knn` evaluator does. Then, for every attribute
of a "shapes" example, DINO's weighted k-NN predicts the query's value from the bank's, and
the tool prints its top-1 beside the majority baseline (the share of the query split's most
frequent value). Attributes: `class` (the large shape's, the label), `colour` (its colour
name, from the caption), `shapes` (how many were drawn, 1-3), `x` and `y` (which third of the
image its box centre is in), `area` (its box's fifth of the image area), `brightness` (the
image's mean, in fifths of 255), `wide` (wider than high). A representation for
classification encodes `class`; the others are what a self-supervised method can match
crops by instead (README, DINO).
"""
import argparse
import io
import json
import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from big_vision_lite import checkpointing
from big_vision_lite import evaluate
from big_vision_lite import models
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite.evaluators import knn
from big_vision_lite.input import data as data_lib
from big_vision_lite.input import shapes

ATTRIBUTES = ("class", "colour", "shapes", "x", "y", "area", "brightness", "wide")


def example_attributes(example: Mapping[str, Any]) -> dict[str, int]:
  """The ATTRIBUTES of one stored "shapes" example (PNG bytes, label, caption, objects)."""
  caption = example["caption"]
  caption = caption.decode() if isinstance(caption, bytes) else str(caption)
  colour = caption.split()[2]  # "a large <colour> <class>, ..."
  if colour not in shapes.COLORS:
    raise ValueError(f"Caption {caption!r} does not name the large shape's colour; "
                     "feature_attributes needs the 'shapes' dataset.")
  ymin, xmin, ymax, xmax = np.asarray(example["objects"]["bbox"])[0]  # The large shape.
  image = np.asarray(Image.open(io.BytesIO(example["image"])))  # [H, W, 3] uint8
  return {"class": int(example["label"]),
          "colour": list(shapes.COLORS).index(colour),
          "shapes": len(example["objects"]["label"]),
          "x": min(int((xmin + xmax) / 2 * 3), 2),
          "y": min(int((ymin + ymax) / 2 * 3), 2),
          "area": min(int((ymax - ymin) * (xmax - xmin) * 5), 4),
          "brightness": min(int(image.mean() / 255 * 5), 4),
          "wide": int(image.shape[1] > image.shape[0])}


def split_attributes(data: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """ATTRIBUTES of every example of a "shapes" split, in order: name -> [N] int."""
  if not str(data.get("name", "")).startswith("shapes"):
    raise ValueError(f"feature_attributes reads attributes of the 'shapes' dataset, got "
                     f"dataset {data.get('name')!r}.")
  rows = [example_attributes(example) for example in data_lib.get_source(data)]
  return {name: np.asarray([row[name] for row in rows]) for name in ATTRIBUTES}


def attribute_top1(bank: np.ndarray, bank_attributes: Mapping[str, np.ndarray],
                   queries: np.ndarray, query_attributes: Mapping[str, np.ndarray], *,
                   k: int = 20, temperature: float = 0.07) -> dict[str, tuple[float, float]]:
  """Per attribute: (weighted k-NN top-1 of the queries [Q, D] against the bank [N, D],
  majority baseline of the queries)."""
  out = {}
  for name, train_values in bank_attributes.items():
    values = query_attributes[name]
    num_values = int(max(train_values.max(), values.max())) + 1
    scores = knn.knn_predict(bank, train_values, queries, num_classes=num_values, k=k,
                             temperature=temperature)
    top1 = float((np.argmax(np.asarray(scores), -1) == values).mean())
    out[name] = (top1, float(np.bincount(values).max() / len(values)))
  return out


def run_features(workdir: str, eval_name: str) -> tuple[ml_collections.ConfigDict,
                                                         np.ndarray, np.ndarray]:
  """(eval config, bank features [N, D], query features [Q, D]) of a run dir's eval."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if eval_name not in config.get("evals", {}):
    raise ValueError(f"Run {workdir} has no config field 'evals.{eval_name}' (has "
                     f"{sorted(config.get('evals', {}))}); train it with a knn eval, e.g. "
                     "configs/dino.py or configs/vit.py:feature_evals=true.")
  eval_config = config.evals[eval_name]
  mesh = sharding.make_mesh(config.get("mesh"))
  task = tasks.REGISTRY.get(config.task)(config, models.from_config(config), mesh)
  variables = evaluate.place_variables(
      checkpointing.load_variables(workdir, use_ema=bool(eval_config.get("use_ema", False))),
      mesh, config.get("sharding_rules"))
  extract = knn.FeatureExtractor(task, mesh, eval_config, normalize=True,
                                 field=f"evals.{eval_name}")
  features = []
  for data in (eval_config.train_data, eval_config.data):
    bank = extract(variables, data)
    rows = np.asarray(jax.device_get(bank.features))
    features.append(rows.reshape(-1, rows.shape[-1])[:bank.size])
  return eval_config, features[0], features[1]


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, tuple[float, float]]]:
  """The command line (see the module docstring); prints one row per run."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdirs", required=True, help="Comma-separated run dirs.")
  parser.add_argument("--eval", default="knn", help="The runs' eval giving the features.")
  args = parser.parse_args(argv)
  attributes: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  results = {}
  print(f"{'run':>24}  " + "  ".join(f"{name:>14}" for name in ATTRIBUTES))
  for workdir in args.workdirs.split(","):
    eval_config, bank, queries = run_features(workdir, args.eval)
    splits = []
    for data in (eval_config.train_data, eval_config.data):
      key = (data.name, data.split)
      if key not in attributes:
        attributes[key] = split_attributes(data)
      splits.append(attributes[key])
    results[workdir] = attribute_top1(bank, splits[0], queries, splits[1],
                                      k=eval_config.get("k", knn.DEFAULTS["k"]),
                                      temperature=eval_config.get("temperature",
                                                                  knn.DEFAULTS["temperature"]))
    cells = [f"{top1:6.3f} ({majority:.2f})" for top1, majority in results[workdir].values()]
    print(f"{os.path.basename(workdir.rstrip('/')):>24}  " + "  ".join(cells), flush=True)
  print("each cell: k-NN top-1 (majority baseline)")
  return results


if __name__ == "__main__":
  main()
