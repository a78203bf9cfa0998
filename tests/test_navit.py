"""NaViT: packing, packed attention/pooling invariances, position embeddings, training."""
import collections
import functools
import itertools
import json
import os
import sys

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_vision_lite import checkpointing
from big_vision_lite import config_lib
from big_vision_lite import sharding
from big_vision_lite import train
from big_vision_lite.evaluators import classification as evaluators
from big_vision_lite.input import data as data_lib
from big_vision_lite.input import packing
from big_vision_lite.input import pp as pp_lib
from big_vision_lite.models import layers
from big_vision_lite.models import navit
from big_vision_lite.tasks import classification
from big_vision_lite.tasks import packed_classification
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


@functools.cache
def jitted(model):
  """(init, apply) of `model`, jitted once per model: eager flax compiles op by op."""
  return jax.jit(model.init), jax.jit(model.apply)


def apply(model, variables, batch):
  return jitted(model)[1](variables, batch["patches"], **{k: batch[k] for k in INPUTS})


def init(model, batch):
  return jitted(model)[0](jax.random.key(0), batch["patches"], **{k: batch[k] for k in INPUTS})


def compile_unoptimised(fn, *args, **kwargs):
  """`fn` compiled for `args` as one program without XLA's optimisations: for a few calls,
  cheaper than optimising it or than eager flax compiling op by op."""
  return jax.jit(fn).lower(*args, **kwargs).compile({"xla_backend_optimization_level": 0})


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
  model_patches = layers.patchify(jnp.asarray(image[None]), PATCH)[0]  # [h, w, p·p·3]
  np.testing.assert_array_equal(model_patches.reshape(len(patches), -1), patches)


def test_padding_is_below_two_percent_on_a_realistic_mix():
  """The NaViT paper's setting through the training iterator, default pool and heuristic:
  rows of 256 tokens, 16 px patches, each image resized to an equal-area side uniform in
  64..256 px with its aspect ratio (log-uniform in 1:2..2:1) kept. The paper reports < 2%
  padding; the bound of 1.5% leaves room for sampling noise and fails first-fit decreasing
  from the oldest image, which pads 2.0% of these 800 rows (2.6% over a pool of 32)."""
  config = dict(seq_len=256, patch_size=16, max_images=16,
                resolution=dict(dist="uniform", low=64, high=256))
  packing.validate(config)
  tokens = packing.tokenizer(config)

  def image(index):  # As the training stream makes them: one generator per image.
    rng = np.random.default_rng(index)
    width = round(40 * np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    return tokens({"image": np.zeros((40, width, 3), np.uint8), "label": 0}, rng)

  images = grain.MapDataset.range(0, 10**6).map(image)
  rows = packing.PackedTrainIterator(images, 25, config, grain.ReadOptions(num_threads=1))
  padding = np.mean([np.mean(next(rows)["segment_ids"] == 0) for _ in range(32)])
  assert padding <= 0.015, padding  # 0.8% by default.


def first_fit_decreasing(sizes, capacity, slots):
  chosen = []
  for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
    if len(chosen) < slots and sizes[i] <= capacity - sum(sizes[j] for j in chosen):
      chosen.append(i)
  return chosen


def test_best_fit_ends_within_the_slack_of_the_fullest_subset():
  """Against every subset (brute force): the row holds at most `slots` items, fits, and is
  within `slack` of the fullest subset; a slack of the whole row is first-fit decreasing."""
  rng = np.random.default_rng(0)
  for _ in range(200):
    sizes = rng.integers(1, 60, rng.integers(1, 11)).tolist()
    capacity, slots, slack = int(rng.integers(20, 100)), int(rng.integers(1, 5)), int(
        rng.integers(0, 6))
    best = max(sum(sizes[i] for i in subset) for k in range(slots + 1)
               for subset in itertools.combinations(range(len(sizes)), k)
               if sum(sizes[i] for i in subset) <= capacity)
    chosen = packing.best_fit_decreasing(sizes, capacity, slots, slack)
    total = sum(sizes[i] for i in chosen)
    assert len(set(chosen)) == len(chosen) <= slots and best - slack <= total <= capacity
    assert ([sizes[i] for i in chosen] == sorted((sizes[i] for i in chosen), reverse=True))
    assert (packing.best_fit_decreasing(sizes, capacity, slots, capacity)
            == first_fit_decreasing(sizes, capacity, slots))


def test_no_image_waits_longer_than_max_wait_and_a_pool():
  """Many small images among large ones: small ones are fillers, yet each leaves the pool
  within max_wait + buffer_size newer images, and all leave in the final flush."""
  rng = np.random.default_rng(1)
  packer = packing.Packer(seq_len=64, max_images=4, buffer_size=8, max_wait=16)
  waits, emitted = [], []
  sizes = rng.choice([3, 50, 60, 64], 600, p=[0.4, 0.3, 0.2, 0.1])

  def emit(newest):
    chosen = packer.choose()
    assert 1 <= len(chosen) <= 4
    assert sum(len(packer.pool[i][1]["patches"]) for i in chosen) <= 64
    emitted.extend(packer.pool[i][0] for i in chosen)
    waits.extend(newest - packer.pool[i][0] for i in chosen)
    packer.pool = [item for i, item in enumerate(packer.pool) if i not in set(chosen)]

  for index, size in enumerate(sizes):
    packer.add(index, {"patches": np.zeros((size, 1), np.float32)})
    while packer.full:
      emit(index)
  assert max(waits) <= 16 + 8 and max(waits) > 16  # The rule was needed.
  while packer.pool:
    emit(len(sizes) - 1)
  assert sorted(emitted) == list(range(len(sizes)))


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

  config = navit_config.get_config()
  task = packed_classification.PackedClassification(config, model)
  params = variables["params"]
  loss = lambda b: task.loss(params, {}, b, jax.random.key(0))[0]
  wider_loss = compile_unoptimised(loss, wider)
  changed = dict(wider, labels=np.where(wider["label_mask"], wider["labels"], 5))
  np.testing.assert_allclose(wider_loss(changed), wider_loss(wider), rtol=1e-6)
  np.testing.assert_allclose(compile_unoptimised(loss, batch)(batch), wider_loss(wider),
                             rtol=1e-5)


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
  images = jnp.asarray(images)
  from_images, _ = compile_unoptimised(model.apply, variables, images)(variables,
                                                                       images)  # [B, C]
  from_packed, _ = apply(model, variables, batch)  # [B, 1, C]
  np.testing.assert_allclose(from_images, from_packed[:, 0], atol=1e-5, rtol=1e-5)


# Rows of 256 tokens (two forward blocks of 128, eight backward blocks of 32): segments of
# odd lengths cross block boundaries (37 + 101 = 138 > 128), the last tokens are padding.
SEGMENT_LENGTHS = ((37, 101, 59, 3, 29), (130, 1, 90))


def segment_ids_of(lengths, length=256):
  """[B, length] int32: segment i + 1 for lengths[b][i] tokens, then padding (0)."""
  rows = [np.concatenate([np.repeat(np.arange(1, len(row) + 1), row),
                          np.zeros(length - sum(row), int)]) for row in lengths]
  return jnp.asarray(np.stack(rows), jnp.int32)


def qkv(shape, seed=7):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))


def naive_segment_attention(q, k, v, segment_ids):
  """Each token's softmax over the keys of its own segment (padding: over the padding), numpy."""
  q, k, v, segment_ids = (np.asarray(x, np.float64) for x in (q, k, v, segment_ids))
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for segment in np.unique(segment_ids[b]):
      tokens = segment_ids[b] == segment
      logits = np.einsum("qhd,khd->hqk", q[b, tokens], k[b, tokens]) / np.sqrt(q.shape[-1])
      weights = np.exp(logits - logits.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      out[b, tokens] = np.einsum("hqk,khd->qhd", weights, v[b, tokens])
  return out


def squared_loss_grads(attention, q, k, v):
  """Gradients w.r.t. q, k, v of sum(attention(q, k, v) ** 2)."""
  return jax.jit(jax.grad(lambda *a: (attention(*a) ** 2).sum(), argnums=(0, 1, 2)))(q, k, v)


def test_reference_attention_matches_a_naive_per_segment_softmax():
  q, k, v = qkv((2, 256, 2, 16))
  segments = segment_ids_of(SEGMENT_LENGTHS)
  np.testing.assert_allclose(packed_attention.reference(q, k, v, segments),
                             naive_segment_attention(q, k, v, segments), atol=1e-5)
  with pytest.raises(ValueError, match="impl must be one of"):
    packed_attention.segment_attention(q, k, v, segments, impl="cuda")


def test_gpu_kernel_matches_reference_across_blocks_in_interpret_mode():
  """The Triton kernel (interpreted) with segments crossing its blocks, values and grads."""
  q, k, v = qkv((2, 256, 1, 16))
  segments = segment_ids_of(SEGMENT_LENGTHS)
  kernel = lambda q, k, v: packed_attention.segment_attention(q, k, v, segments,
                                                              impl="interpret")
  ref = lambda q, k, v: packed_attention.reference(q, k, v, segments)
  np.testing.assert_allclose(jax.jit(kernel)(q, k, v), ref(q, k, v), atol=1e-5)
  for got, want in zip(squared_loss_grads(kernel, q, k, v), squared_loss_grads(ref, q, k, v)):
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_tpu_kernel_matches_reference_across_blocks_in_tpu_interpret_mode():
  """`tpu_kernel` (JAX's TPU flash attention, layout and segment ids as the model calls it),
  run by Pallas's TPU interpreter on CPU; its gradients are the slow test below."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  q, k, v = qkv((1, 256, 1, 16))
  segments = segment_ids_of(SEGMENT_LENGTHS[:1])
  with pltpu.force_tpu_interpret_mode():
    out = jax.jit(packed_attention.tpu_kernel)(q, k, v, segments)
  np.testing.assert_allclose(out, packed_attention.reference(q, k, v, segments), atol=1e-5)


@pytest.mark.slow
def test_tpu_kernel_gradients_match_reference_in_tpu_interpret_mode():
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  q, k, v = qkv((1, 256, 1, 16))
  segments = segment_ids_of(SEGMENT_LENGTHS[:1])
  with pltpu.force_tpu_interpret_mode():
    grads = squared_loss_grads(lambda *a: packed_attention.tpu_kernel(*a, segments), q, k, v)
  ref = lambda *a: packed_attention.reference(*a, segments)
  for got, want in zip(grads, squared_loss_grads(ref, q, k, v)):
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("length", [48, 64, 96, 512])
def test_gpu_kernel_lowers_for_cuda_forward_and_backward_where_shapes_allow(length):
  """The Triton kernel (not interpret mode) lowered for CUDA on CPU, forward and gradients:
  it lowers exactly for the lengths `pallas_shapes_ok` lets impl='auto' send to it."""
  q = jax.ShapeDtypeStruct((2, length, 2, 32), jnp.float32)
  ids = jax.ShapeDtypeStruct((2, length), jnp.int32)
  forward = packed_attention.gpu_kernel
  backward = jax.grad(lambda *a: (forward(*a) ** 2).sum(), argnums=(0, 1, 2))
  allowed = packed_attention.pallas_shapes_ok(q, "gpu")
  assert allowed == (length in (64, 512))
  # Forward: one Triton call; gradients: forward, backward pre-processing and backward.
  for fn, kernels in ((forward, 1), (backward, 3)):
    lower = lambda fn=fn: jax.jit(fn).trace(q, q, q, ids).lower(lowering_platforms=("cuda",))
    if allowed:
      assert lower().as_text().count("xla.gpu.triton") == kernels
    else:
      with pytest.raises(ValueError, match="power of 2"):
        lower()


@pytest.mark.parametrize("length", [64, 256])
def test_tpu_kernel_takes_the_lengths_pallas_shapes_ok_allows(length):
  q = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  if packed_attention.pallas_shapes_ok(q, "tpu"):
    assert jax.eval_shape(packed_attention.tpu_kernel, q, q, q, ids).shape == q.shape
  else:
    with pytest.raises(ValueError, match="block_q=128"):
      jax.eval_shape(packed_attention.tpu_kernel, q, q, q, ids)
  assert packed_attention.pallas_shapes_ok(q, "tpu") == (length == 256)


def test_pallas_impl_rejects_shapes_its_kernel_cannot_take():
  q, k, v = qkv((1, 48, 1, 16))
  with pytest.raises(ValueError, match="L a multiple of 128 or one of 16, 32, 64; got L=48"):
    packed_attention.segment_attention(q, k, v, jnp.ones((1, 48), jnp.int32), impl="interpret")


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


def numpy_counts(logits, labels):
  """Top-1, top-5 and mean softmax cross-entropy of logits [N, C] and int labels [N]."""
  logits = np.asarray(logits, np.float64)
  ranks = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(-1)
  log_softmax = logits - logits.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  return {"top1": np.mean(ranks == 0), "top5": np.mean(ranks < 5),
          "loss": -np.mean(log_softmax[np.arange(len(labels)), labels])}


def test_packed_evaluation_equals_each_image_alone_and_the_plain_evaluator():
  """A tiny random NaViT on the 64 test images of shapes/tiny (24..96 px, several per row):
  the packed evaluator's top-1 / top-5 / loss are those of the model run on each image
  alone (numpy); at a fixed 32 px, those of the plain classification evaluator."""
  config = tiny_config()
  model = navit.Model(**config.model, head_zeroinit=False)
  data = dict(name="shapes/tiny", split="test")
  native_pp = 'decode|value_range(-1, 1)|keep("image", "label")'
  packing_config = dict(seq_len=128, patch_size=8, max_images=8)
  source, preprocess = data_lib.get_source(data), pp_lib.get_preprocess_fn(native_pp)
  examples = [preprocess(source[i], np.random.default_rng(i)) for i in range(len(source))]
  rows = [next(packing.pack([example], seq_len=128, patch_size=8, max_images=1,
                            shrink_to_fit=True)) for example in examples]
  variables = init(model, packing.stack(rows[:1]))
  logits = np.concatenate([apply(model, variables, packing.stack([row]))[0][:, 0]
                           for row in rows])  # [N, C]
  want = numpy_counts(logits, np.array([example["label"] for example in examples]))
  assert 0 < want["top1"] < want["top5"] < 1

  mesh = sharding.make_mesh([("data", 2)])
  packed_task = packed_classification.PackedClassification(config, model)
  eval_config = lambda pp, **extra: ml_collections.ConfigDict(
      dict(data=data, pp=pp, batch_size=4, **extra))
  packed = evaluators.PackedClassificationEvaluator(
      packed_task, mesh, eval_config(native_pp, packing=packing_config))
  assert max(batch["label_mask"].sum(-1).max() for batch in packed._batches()) > 1
  got = packed.run(variables)
  assert got.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)

  fixed_pp = native_pp.replace("decode|", "decode|resize(32)|")
  plain = evaluators.ClassificationEvaluator(
      classification.Classification(config, model), mesh, eval_config(fixed_pp))
  packed = evaluators.PackedClassificationEvaluator(
      packed_task, mesh, eval_config(fixed_pp, packing=packing_config))
  want, got = plain.run(variables), packed.run(variables)
  assert got.keys() == want.keys() and 0 < want["top1"] < want["top5"] < 1
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


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
