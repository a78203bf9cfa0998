"""NaViT: packing, packed attention/pooling invariances, position embeddings, training."""
import collections
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import checkpointing
from big_vision_lite import config_lib
from big_vision_lite import train
from big_vision_lite.input import data as data_lib
from big_vision_lite.input import packing
from big_vision_lite.models import navit
from kernels import packed_attention

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import navit as navit_config  # pylint: disable=g-import-not-at-top,wrong-import-position

PATCH = 4
INPUTS = ("segment_ids", "positions", "image_sizes")


def random_images(n, seed=0, low=4, high=30):
  rng = np.random.default_rng(seed)
  return [{"image": rng.normal(size=(rng.integers(low, high), rng.integers(low, high), 3))
           .astype(np.float32), "label": i} for i in range(n)]


def packed(examples, seq_len=96, max_images=6, buffer_size=4):
  return packing.stack(list(packing.pack(examples, seq_len=seq_len, patch_size=PATCH,
                                         max_images=max_images, buffer_size=buffer_size)))


def small_model(**kwargs):
  fields = dict(num_classes=7, width=32, depth=2, num_heads=2, patch_size=PATCH,
                head_zeroinit=False)
  return navit.Model(**{**fields, **kwargs})


def apply(model, variables, batch, **kwargs):
  return model.apply(variables, batch["patches"], **{k: batch[k] for k in INPUTS}, **kwargs)


def init(model, batch):
  return model.init(jax.random.key(0), batch["patches"], **{k: batch[k] for k in INPUTS})


def slot_of(batch, label):
  """(row, slot) of the image with `label` in a packed batch."""
  rows, slots = np.nonzero((batch["labels"] == label) & batch["label_mask"])
  assert len(rows) == 1
  return rows[0], slots[0]


def test_pack_keeps_every_token_once_with_its_position():
  examples = random_images(20)
  batch = packed(examples)
  assert batch["patches"].shape[1:] == (96, PATCH * PATCH * 3)
  assert batch["segment_ids"].dtype == np.int32 and batch["positions"].shape[2] == 2
  assert sorted(batch["labels"][batch["label_mask"]]) == list(range(20))
  for example in examples:
    row, slot = slot_of(batch, example["label"])
    tokens = batch["segment_ids"][row] == slot + 1
    h, w = batch["image_sizes"][row, slot]
    assert tokens.sum() == h * w
    assert np.array_equal(np.nonzero(tokens)[0], np.arange(np.argmax(tokens),
                                                           np.argmax(tokens) + h * w))
    patches, positions = packing.patchify(example["image"], PATCH, (h, w))
    np.testing.assert_array_equal(batch["patches"][row][tokens], patches)
    np.testing.assert_array_equal(batch["positions"][row][tokens], positions)
  padding = batch["segment_ids"] == 0
  assert not batch["patches"][padding].any() and not batch["positions"][padding].any()
  assert (batch["label_mask"].sum(1) <= 6).all()


def test_patchify_matches_model_patchify_and_reassembles_image():
  image = np.random.default_rng(1).normal(size=(12, 20, 3)).astype(np.float32)
  patches, positions = packing.patchify(image, PATCH)
  assert positions.tolist()[:6] == [[0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [1, 0]]
  rebuilt = np.zeros_like(image)
  for patch, (y, x) in zip(patches, positions):
    rebuilt[y * PATCH:(y + 1) * PATCH, x * PATCH:(x + 1) * PATCH] = patch.reshape(PATCH, PATCH, 3)
  np.testing.assert_array_equal(rebuilt, image)
  np.testing.assert_array_equal(navit.patchify(jnp.asarray(image[None]), PATCH)[0], patches)


def test_padding_is_below_two_percent_on_a_realistic_mix():
  """Sides 24..96 px and aspect ratios 1:2..2:1 (the shapes dataset's mix), 16 px patches
  resampled to 64..256 px: the paper's < 2% padding, not counting the final flush rows."""
  rng = np.random.default_rng(0)
  sizes = []
  for _ in range(3000):
    side, aspect = rng.uniform(64, 256), np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    sizes.append(packing.grid_size(round(side / np.sqrt(aspect)), round(side * np.sqrt(aspect)),
                                   16, max_tokens=256))
  packer = packing.Packer(seq_len=256, max_images=16, buffer_size=64)
  rows = []
  for i, (h, w) in enumerate(sizes):
    packer.add(i, {"patches": np.zeros((h * w, 1), np.float32),
                   "positions": np.zeros((h * w, 2), np.int32),
                   "image_size": np.asarray((h, w)), "label": np.int32(0)})
    while packer.full:
      rows.append(packer.emit()["segment_ids"])
  padding = np.mean(np.stack(rows) == 0)
  assert padding < 0.02, padding


def test_grid_size_keeps_aspect_ratio_and_area():
  h, w = packing.grid_size(60, 120, 8, side=80)
  assert abs(w / h - 2.0) < 0.2 and abs(h * w * 64 - 80**2) / 80**2 < 0.15
  assert packing.grid_size(60, 120, 8) == (8, 15)  # Native: 7.5 x 15 rounded.
  assert np.prod(packing.grid_size(500, 500, 8, max_tokens=50)) <= 50


def test_token_drop_removes_the_sampled_fraction():
  image = np.ones((40, 40, 3), np.float32)
  rng = np.random.default_rng(0)
  out = packing.tokenize({"image": image, "label": 3}, PATCH, max_tokens=1000,
                         token_drop=dict(dist="fixed", value=0.25), rng=rng)
  assert len(out["patches"]) == 75 and out["image_size"].tolist() == [10, 10]
  assert len({tuple(p) for p in out["positions"]}) == 75
  assert (np.diff(out["positions"][:, 0] * 10 + out["positions"][:, 1]) > 0).all()


@pytest.mark.parametrize("spec", [
    dict(dist="uniform", low=0.0, high=0.5), dict(dist="beta", a=2.0, b=5.0, high=0.6),
    dict(dist="choice", values=(0.1, 0.3)), dict(dist="fixed", value=0.2)])
def test_distributions_stay_in_their_support(spec):
  rng = np.random.default_rng(0)
  draws = np.array([packing.sample(spec, rng) for _ in range(2000)])
  low, high = packing.support(spec)
  assert draws.min() >= low and draws.max() <= high
  if spec["dist"] == "beta":  # Mean of a scaled Beta(a, b): high * a / (a + b).
    assert abs(draws.mean() - 0.6 * 2 / 7) < 0.01


@pytest.mark.parametrize("packing_config,message", [
    (dict(seq_len=16, patch_size=8, max_images=4, resolution=dict(dist="fixed", value=64)),
     "too short for one image"),
    (dict(seq_len=64, patch_size=8, max_images=4, token_drop=dict(dist="gauss")),
     "'dist' one of"),
    (dict(seq_len=64, patch_size=8, max_images=4, token_drop=dict(dist="uniform", low=0.5)),
     "needs keys"),
    (dict(seq_len=64, patch_size=8, max_images=4,
          token_drop=dict(dist="uniform", low=0.5, high=0.2)), "must not exceed"),
    (dict(seq_len=64, patch_size=8, max_images=4, token_drop=dict(dist="fixed", value=1.0)),
     "must lie in"),
    (dict(seq_len=64, patch_size=8, max_images=4, token_drop=dict(dist="beta", a=0, b=1)),
     "a > 0"),
    (dict(seq_len=64, patch_size=8, max_images=0), "max_images"),
    (dict(seq_len=64, max_images=2), "patch_size"),
])
def test_bad_packing_config_errors_name_the_field(packing_config, message):
  with pytest.raises(ValueError, match=message):
    packing.validate(packing_config)


def test_image_longer_than_the_sequence_is_an_error():
  with pytest.raises(ValueError, match="more than seq_len=16"):
    list(packing.pack([{"image": np.zeros((40, 40, 3)), "label": 0}], seq_len=16,
                      patch_size=PATCH, max_images=2))


def test_config_with_mismatched_patch_size_is_rejected():
  config = navit_config.get_config()
  config.input.packing.patch_size = 16
  with pytest.raises(ValueError, match="'input.packing.patch_size'"):
    config_lib.validate(config)


@pytest.mark.parametrize("kwargs", [
    dict(), dict(pool_type="gap", posemb="sincos", posemb_coords="index"),
    dict(posemb="fourier", posemb_combine="concat"),
    dict(posemb="learn", posemb_coords="index", posemb_combine="concat")])
def test_logits_equal_alone_and_packed(kwargs):
  examples = random_images(14, seed=2)
  batch = packed(examples)
  model = small_model(**kwargs)
  variables = init(model, batch)
  logits, _ = apply(model, variables, batch)  # [B, S, C]
  for example in examples:
    alone = packed([example], max_images=1)
    single, _ = apply(model, variables, alone)
    row, slot = slot_of(batch, example["label"])
    np.testing.assert_allclose(single[0, 0], logits[row, slot], atol=1e-5, rtol=1e-5)


def test_padding_tokens_and_slots_change_nothing():
  batch = packed(random_images(10, seed=3), max_images=4)
  model = small_model()
  variables = init(model, batch)
  logits, _ = apply(model, variables, batch)
  noisy = dict(batch)
  padding = batch["segment_ids"] == 0
  assert padding.any()
  rng = np.random.default_rng(0)
  noisy["patches"] = np.where(padding[..., None], rng.normal(size=batch["patches"].shape),
                              batch["patches"]).astype(np.float32)
  noisy["positions"] = np.where(padding[..., None], 5, batch["positions"])
  wider = {k: noisy[k] for k in noisy}  # Two more (empty) image slots.
  for key in ("image_sizes", "labels", "label_mask"):
    pad = np.zeros((batch[key].shape[0], 2) + batch[key].shape[2:], batch[key].dtype)
    wider[key] = np.concatenate([batch[key], pad], 1)
  wider_logits, _ = apply(model, variables, wider)
  real = batch["label_mask"]
  np.testing.assert_allclose(wider_logits[:, :4][real], logits[real], atol=1e-5, rtol=1e-5)

  from big_vision_lite.tasks import packed_classification  # pylint: disable=g-import-not-at-top
  config = navit_config.get_config()
  task = packed_classification.PackedClassification(config, model)
  params = variables["params"]
  loss = lambda b: task.loss(params, {}, b, jax.random.key(0))[0]
  changed = dict(wider, labels=np.where(wider["label_mask"], wider["labels"], 5))
  np.testing.assert_allclose(loss(wider), loss(changed), rtol=1e-6)
  np.testing.assert_allclose(loss(wider), loss(batch), rtol=1e-5)


def test_position_embeddings_do_not_depend_on_where_the_image_lands():
  example = random_images(1, seed=4, low=12, high=13)[0]
  fillers = random_images(5, seed=5)
  model = small_model(posemb="sincos")
  first = packed([example], max_images=4)
  later = packing.stack([packing.Packer(96, 4, 1)._assemble(
      [packing.tokenize(f, PATCH, max_tokens=96) for f in fillers[:2]]
      + [packing.tokenize(example, PATCH, max_tokens=96)])])
  variables = init(model, first)
  _, aux_first = apply(model, variables, first)
  _, aux_later = apply(model, variables, later)
  tokens_first = first["segment_ids"][0] == 1
  tokens_later = later["segment_ids"][0] == 3
  assert np.argmax(tokens_later) > 0
  np.testing.assert_array_equal(aux_first["posemb"][0][tokens_first],
                                aux_later["posemb"][0][tokens_later])


def test_image_input_equals_packed_input():
  images = np.random.default_rng(6).normal(size=(3, 16, 24, 3)).astype(np.float32)
  model = small_model(posemb="fourier")
  batch = packed([{"image": im, "label": i} for i, im in enumerate(images)], max_images=1,
                 buffer_size=1)
  variables = init(model, batch)
  from_images, _ = model.apply(variables, jnp.asarray(images))  # [B, C]
  from_packed, _ = apply(model, variables, batch)  # [B, 1, C]
  np.testing.assert_allclose(from_images, from_packed[:, 0], atol=1e-5, rtol=1e-5)


def test_pallas_segment_attention_matches_reference_in_interpret_mode():
  rng = np.random.default_rng(7)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 128, 2, 16)), jnp.float32) for _ in range(3))
  segments = jnp.asarray(np.sort(rng.integers(0, 5, (2, 128)), axis=1))
  ref = lambda q, k, v: packed_attention.segment_attention(q, k, v, segments, impl="reference")
  kernel = lambda q, k, v: packed_attention.segment_attention(q, k, v, segments,
                                                              impl="interpret")
  np.testing.assert_allclose(kernel(q, k, v), ref(q, k, v), atol=1e-5)
  loss = lambda f: lambda *a: (f(*a) ** 2).sum()
  grads_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
  grads_kernel = jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(grads_kernel, grads_ref):
    np.testing.assert_allclose(a, b, atol=1e-4)
  # The reference against a naive per-segment softmax.
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
  same = segments[:, None, :, None] == segments[:, None, None, :]
  naive = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(same, logits, -1e30)), v)
  np.testing.assert_allclose(ref(q, k, v), naive, atol=1e-5)
  with pytest.raises(ValueError, match="impl must be one of"):
    packed_attention.segment_attention(q, k, v, segments, impl="cuda")


def test_packed_eval_iterator_counts_every_image_once():
  data = dict(name="shapes/tiny", split="test")
  pp = 'decode|value_range(-1, 1)|keep("image", "label")'
  config = dict(seq_len=256, patch_size=8, max_images=8)
  labels = collections.Counter()
  for process in range(2):
    for batch in data_lib.make_packed_eval_iterator(data, pp, 4, config, process_index=process,
                                                    process_count=2):
      labels.update(batch["labels"][batch["label_mask"]].tolist())
  source = data_lib.get_source(data)
  assert labels == collections.Counter(int(source[i]["label"]) for i in range(len(source)))


def tiny_config(**overrides):
  config = navit_config.get_config("batch_size=8,total_steps=6,seq_len=128,max_images=8,"
                                   "res_min=24,res_max=64")
  config.input.data.name = "shapes/tiny"
  config.model.update(width=32, depth=2, mlp_dim=64, num_heads=2)
  config.log_training_steps = 1
  config.ckpt_steps = 3
  config.mesh = [("data", 1)]
  for ev in config.evals.values():
    ev.data.name = "shapes/tiny"
    ev.log_steps = 1000
  config.schedule.warmup_percent = 0.0
  for key, value in overrides.items():
    config[key] = value
  return config


def test_packed_train_iterator_resumes_exactly():
  config = tiny_config()
  make = lambda: data_lib.make_train_iterator(config.input.data, config.input.pp, 8, seed=3,
                                              packing=config.input.packing)
  it = make()
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(2)]
  resumed = make()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert expected[0]["label_mask"].sum() > 8  # Several images per row.


def test_packed_training_resumes_exactly_and_evaluates(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  config = tiny_config()
  config.model.dropout = 0.1
  final = train.train_and_evaluate(config, straight)
  train.train_and_evaluate(config, resumed, stop_after_steps=3)
  train.train_and_evaluate(config, resumed)
  jax.tree.map(np.testing.assert_array_equal, checkpointing.load_params(straight),
               checkpointing.load_params(resumed))
  read = lambda d: [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
  loss = lambda d: {l["step"]: l["train/loss"] for l in read(d) if "train/loss" in l}
  assert loss(straight) == loss(resumed)
  for name in ("val", "val_64"):
    assert 0.0 <= final[f"{name}/top1"] <= final[f"{name}/top5"] <= 1.0


@pytest.mark.slow
def test_packed_training_loss_falls(tmp_path):
  config = tiny_config(total_steps=80, lr=2e-3)
  config.input.data.name = "shapes"
  config.input.batch_size = 16
  config.model.update(width=64, mlp_dim=256)
  config.log_training_steps = 10
  train.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  losses = [l["train/loss"] for l in lines if "train/loss" in l]
  assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses
  assert all(l["train/token_fill"] > 0.9 for l in lines if "train/token_fill" in l)


@pytest.mark.slow
def test_default_config_learns(tmp_path):
  """The README's main command."""
  final = train.train_and_evaluate(navit_config.get_config(), str(tmp_path))
  assert final["val/top1"] > 0.3, final


def test_per_process_data_positions_need_the_same_process_count():
  one = {"next_index": 5, "pool": [1, 3]}
  assert data_lib.gather_iterator_states(one) == {"train_iterator": one}
  assert data_lib.select_iterator_state({"train_iterator": one}) == one
  saved_by_two = {"train_iterator_per_process": [one, {"next_index": 4, "pool": [2]}]}
  with pytest.raises(ValueError, match="saved by 2 processes"):
    data_lib.select_iterator_state(saved_by_two)
