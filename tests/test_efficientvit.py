"""EfficientViT: shapes, paper parameter counts, BatchNorm modes, the cascade, timm parity."""
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from big_vision_lite.models import efficientvit
from big_vision_lite.tools import import_timm

sys.path.insert(0, os.path.dirname(__file__))
import make_timm_reference  # pylint: disable=wrong-import-position

DATA_DIR = make_timm_reference.DATA_DIR
LABELS = sorted(label for label in make_timm_reference.REFERENCES
                if label.startswith("efficientvit_"))
# Paper, Table 1 (ImageNet-1k classifiers at 224 x 224), millions of parameters.
PAPER_PARAMS = {"M0": 2.3, "M1": 3.0, "M2": 4.2, "M3": 6.9, "M4": 8.8, "M5": 12.4}
TINY = dict(embed_dim=(16, 24, 32), depth=(1, 1, 1), num_heads=(2, 3, 2), key_dim=(4, 4, 4),
            window_size=(2, 2, 2), kernels=(3, 5, 3))
TINY_MODEL = efficientvit.Model(num_classes=7, **TINY)
tiny_eval = jax.jit(TINY_MODEL.apply)  # Shared by the tests on [2, 48, 80, 3] inputs.


def images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def random_variables(module, *args, seed=0, std=0.3):
  """Random params and BatchNorm statistics of the shapes `module.init` would make (random
  numbers from numpy: no compiled init)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name.endswith("['scale']"):
      value = 1.0 + 0.2 * rng.normal(size=leaf.shape)
    else:
      value = (3 * std if "attention_biases" in name else std) * rng.normal(size=leaf.shape)
    return jnp.asarray(value, jnp.float32)

  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def timm_bias_index(side):
  """timm's attention_bias_idxs: offsets (|dy|, |dx|) numbered in order of first appearance."""
  points = [(y, x) for y in range(side) for x in range(side)]
  numbers = {}
  return np.array([[numbers.setdefault((abs(p[0] - q[0]), abs(p[1] - q[1])), len(numbers))
                    for q in points] for p in points])


def test_shapes_on_rectangular_images():
  x = images((2, 48, 80, 3))
  variables = random_variables(TINY_MODEL, x, std=0.1)
  logits, aux = tiny_eval(variables, x)
  assert logits.shape == (2, 7) and aux["pre_logits"].shape == (2, 32)
  assert aux["stem"].shape == (2, 3, 5, 16)
  assert [aux[f"stage{i}"].shape for i in range(3)] == [(2, 3, 5, 16), (2, 2, 3, 24),
                                                        (2, 1, 2, 32)]
  # Windows of 2 on the 3x5 stage-0 map: a [heads, 2, 2] bias table; 1x2 stage-2 map: [.., 1, 2].
  params = variables["params"]
  assert params["stage0"]["block0"]["mixer"]["attn"]["attention_biases"].shape == (2, 2, 2)
  assert params["stage2"]["block0"]["mixer"]["attn"]["attention_biases"].shape == (2, 1, 2)
  assert params["stage1"]["block0"]["mixer"]["attn"]["dw_2"]["conv"]["kernel"].shape == (
      3, 3, 1, 4)
  assert params["stage1"]["downsample"]["patch_merge"]["se"]["fc1"]["kernel"].shape == (
      1, 1, 64, 16)


@pytest.mark.parametrize("variant", sorted(PAPER_PARAMS))
def test_parameter_count_matches_paper(variant):
  model = efficientvit.Model(num_classes=1000, variant=variant)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))
  assert count / 1e6 == pytest.approx(PAPER_PARAMS[variant], rel=0.03), count


@pytest.mark.parametrize("fields,message", [
    (dict(variant="M6"), r"'variant' must be one of M0, M1, M2, M3, M4, M5; got 'M6'"),
    (dict(embed_dim=(64, 128)), r"'depth' must have one entry per stage \(2"),
    (dict(num_heads=(4, 3, 4)), r"'embed_dim' \(128\) must be divisible by 'num_heads' \(3\)"),
    (dict(kernels=(5, 5)), r"'kernels' needs one size per head \(4\)"),
    (dict(kernels=(5, 4, 5, 5)), r"'kernels' must hold odd sizes"),
    (dict(window_size=(7, 0, 7)), r"'window_size' must hold positive ints"),
    (dict(depth=3), r"'depth' must be a sequence"),
])
def test_bad_fields_are_named(fields, message):
  with pytest.raises(ValueError, match=message):
    efficientvit.Model(**fields)


def test_train_updates_batch_stats_and_eval_ignores_the_batch():
  x = images((2, 48, 80, 3), seed=1)
  variables = random_variables(TINY_MODEL, x, std=0.1)
  train_apply = jax.jit(
      lambda v, x: TINY_MODEL.apply(v, x, train=True, mutable=["batch_stats"]))
  (out, _), updated = train_apply(variables, x)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"],
                         updated["batch_stats"])
  assert all(jax.tree.leaves(changed))
  # Training normalises with the batch's statistics: example 0's output depends on the other.
  (out_other, _), _ = train_apply(variables, x.at[1:].set(images((1, 48, 80, 3), seed=2)))
  assert not np.allclose(out[0], out_other[0], atol=1e-4)
  # Eval uses the running statistics: example 0 gives the same logits in any batch, and new
  # statistics give new logits.
  want = tiny_eval(variables, x)[0][0]
  for batch in (x.at[1:].multiply(5.0), jnp.tile(x[:1], (2, 1, 1, 1))):
    np.testing.assert_allclose(tiny_eval(variables, batch)[0][0], want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(tiny_eval(dict(variables, **updated), x)[0][0], want, atol=1e-4)


@pytest.mark.parametrize("cascade", [True, False])
def test_cascade_feeds_each_head_into_the_next(cascade):
  module = efficientvit.CascadedGroupAttention(num_heads=3, key_dim=4, kernels=(3, 3, 3),
                                               cascade=cascade)
  x = images((2, 4, 4, 12), seed=3)  # Three splits of 4 channels.
  variables = random_variables(module, x)
  heads = jax.jit(lambda x: module.apply(variables, x, mutable=["intermediates"])[1])
  base, first, last = (heads(x), heads(x.at[..., :4].add(1.0)),  # Perturb split 0 only.
                       heads(x.at[..., 8:].add(1.0)))  # Perturb split 2 only.
  changed = lambda other: [not np.allclose(base["intermediates"][f"head{j}"],
                                           other["intermediates"][f"head{j}"], atol=1e-5)
                           for j in range(3)]
  # Cascaded: head j+1's input includes head j's output, so split 0 reaches every head;
  # plain group attention keeps each head on its own split. Never does a head see a later one.
  assert changed(first) == ([True, True, True] if cascade else [True, False, False])
  assert changed(last) == [False, False, True]


def test_offset_index_matches_brute_force():
  index = efficientvit.offset_index(2, 3)
  points = [(y, x) for y in range(2) for x in range(3)]
  want = [[abs(p[0] - q[0]) * 3 + abs(p[1] - q[1]) for q in points] for p in points]
  np.testing.assert_array_equal(index, want)


def test_attention_matches_a_loop_over_token_pairs():
  module = efficientvit.CascadedGroupAttention(num_heads=2, key_dim=3, kernels=(3, 1))
  x = images((1, 3, 2, 8), seed=4)  # A 3x2 window, two splits of 4 channels.
  variables = random_variables(module, x, seed=5)
  got = jax.jit(module.apply)(variables, x)
  params, stats = variables["params"], variables["batch_stats"]

  def conv_bn(name, y):  # 1x1 conv, or depth-wise k x k with zero padding; eval BatchNorm.
    kernel = np.asarray(params[name]["conv"]["kernel"])  # [k, k, I or 1, O]
    if kernel.shape[2] == y.shape[-1]:
      y = y @ kernel[0, 0]
    else:
      r = kernel.shape[0] // 2
      padded = np.pad(y, ((r, r), (r, r), (0, 0)))
      y = sum(padded[a:a + y.shape[0], b:b + y.shape[1]] * kernel[a, b, 0]
              for a in range(2 * r + 1) for b in range(2 * r + 1))
    bn, bn_stats = params[name]["bn"], stats[name]["bn"]
    return (y - bn_stats["mean"]) / np.sqrt(bn_stats["var"] + 1e-5) * bn["scale"] + bn["bias"]

  tokens = np.asarray(x[0], np.float64)  # [3, 2, 8]
  points = [(y, x) for y in range(3) for x in range(2)]
  biases = np.asarray(params["attention_biases"])  # [heads, 3, 2]
  outputs = []
  for j in range(2):
    feat = tokens[..., 4 * j:4 * j + 4] + (outputs[-1] if j else 0.0)
    qkv = conv_bn(f"qkv_{j}", feat)
    q, k, v = conv_bn(f"dw_{j}", qkv[..., :3]), qkv[..., 3:6], qkv[..., 6:]
    out = np.zeros((3, 2, 4))
    for p in points:
      logits = np.array([q[p] @ k[t] / np.sqrt(3) + biases[j, abs(p[0] - t[0]), abs(p[1] - t[1])]
                         for t in points])
      weights = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
      out[p] = sum(wt * v[t] for wt, t in zip(weights, points))
    outputs.append(out)
  want = conv_bn("proj", np.maximum(np.concatenate(outputs, axis=-1), 0.0))
  np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _jitted_apply(kwargs_json):
  """One compiled apply per converted architecture (the saved and live tests share it)."""
  return jax.jit(efficientvit.Model(**json.loads(kwargs_json)).apply)


def _apply_converted(timm_name, state, x_nchw):
  model_name, kwargs, variables = import_timm.convert(timm_name, state)
  assert model_name == "efficientvit"
  apply = _jitted_apply(json.dumps(kwargs))  # model.json must be able to hold the kwargs.
  out, _ = apply(variables, np.transpose(x_nchw, (0, 2, 3, 1)))
  return np.asarray(out), kwargs


@pytest.mark.parametrize("label", LABELS)
def test_saved_timm_reference(label):
  state, x, expected = make_timm_reference.load(os.path.join(DATA_DIR, label))
  out, kwargs = _apply_converted(make_timm_reference.REFERENCES[label].timm_name, state, x)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  timm_kwargs = make_timm_reference.REFERENCES[label].kwargs
  for field in ("embed_dim", "depth", "num_heads", "key_dim"):
    assert tuple(kwargs[field]) == timm_kwargs[field]
  assert kwargs["num_classes"] == timm_kwargs["num_classes"]


@pytest.mark.parametrize("label", LABELS)
def test_live_timm(label, timm_live_dir):
  state, x, expected = make_timm_reference.load(os.path.join(timm_live_dir, label))
  saved = load_file(os.path.join(DATA_DIR, label, "state.safetensors"))
  assert not np.allclose(state["patch_embed.conv1.conv.weight"],
                         saved["patch_embed.conv1.conv.weight"])
  out, _ = _apply_converted(make_timm_reference.REFERENCES[label].timm_name, state, x)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def _m0_state():
  return dict(load_file(os.path.join(DATA_DIR, "efficientvit_m0", "state.safetensors")))


def test_conversion_layout_and_batch_stats():
  state = _m0_state()
  _, kwargs, variables = import_timm.convert("timm/efficientvit_m0.r224_in1k", state)
  assert kwargs["window_size"] == [2, 2, 1]  # min(window 2, stage side 4, 2, 1).
  attn = variables["params"]["stage0"]["block0"]["mixer"]["attn"]
  theirs = state["stages.0.blocks.0.mixer.m.attn.attention_biases"]  # [heads, r·r]
  ours = attn["attention_biases"]  # [heads, r, r]
  ys, xs = np.divmod(np.arange(4), 2)
  dy, dx = np.abs(ys[:, None] - ys[None]), np.abs(xs[:, None] - xs[None])
  np.testing.assert_array_equal(ours[:, dy, dx], theirs[:, timm_bias_index(2)])
  stats = variables["batch_stats"]["stage1"]["downsample"]["patch_merge"]["conv2"]["bn"]
  np.testing.assert_array_equal(
      stats["var"], state["stages.1.downsample.patchmerge.conv2.bn.running_var"])
  assert variables["params"]["stem"]["conv1"]["conv"]["kernel"].shape == (3, 3, 3, 2)


def test_unsupported_names_and_keys_are_named():
  with pytest.raises(ValueError, match=r"efficientvit_b0.*efficientvit_m\{0"):
    import_timm.convert("efficientvit_b0", _m0_state())
  state = _m0_state()
  state["stages.0.blocks.0.mixer.m.attn.extra_bias"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"stages[.]0[.]blocks[.]0[.]mixer[.]m[.]attn[.]extra_bias"
                     r".*supported: efficientvit_m"):
    import_timm.convert("efficientvit_m0", state)



def test_index_buffers_of_older_checkpoints_are_checked():
  """timm <= 0.9 saved `attention_bias_idxs`; the converter takes them if they are timm's."""
  state = _m0_state()
  for stage, block, side in ((0, 0, 2), (1, 0, 2), (1, 1, 2), (2, 0, 1)):
    index = timm_bias_index(side).astype(np.float32)
    state[f"stages.{stage}.blocks.{block}.mixer.m.attn.attention_bias_idxs"] = index
  with_buffers = import_timm.convert("efficientvit_m0", state)[2]
  np.testing.assert_array_equal(
      with_buffers["params"]["stage1"]["block1"]["mixer"]["attn"]["attention_biases"],
      import_timm.convert("efficientvit_m0", _m0_state())[2]["params"]["stage1"]["block1"][
          "mixer"]["attn"]["attention_biases"])
  key = "stages.1.blocks.1.mixer.m.attn.attention_bias_idxs"
  state[key] = state[key][::-1].copy()
  with pytest.raises(ValueError, match=key.replace(".", "[.]")):
    import_timm.convert("efficientvit_m0", state)


def test_config_validates_the_largest_variant():
  from big_vision_lite import config_lib  # pylint: disable=g-import-not-at-top
  from configs import efficientvit as efficientvit_config  # pylint: disable=g-import-not-at-top
  config = efficientvit_config.get_config("variant=M5,res=224,num_classes=1000")
  config_lib.validate(config)
  assert config.model.to_dict() == dict(variant="M5", num_classes=1000)
