"""InternImage: stacking rules and the paper's sizes, DCNv3 against a box filter and its
softmax, the official PyTorch model's logits, the converter, bad fields, and training."""
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import kernels
from big_vision_lite.models import internimage
from big_vision_lite.tools import import_internimage

sys.path.insert(0, os.path.dirname(__file__))
import make_internimage_reference  # pylint: disable=wrong-import-position

DATA_DIR = make_internimage_reference.DATA_DIR
LABELS = sorted(make_internimage_reference.REFERENCES)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The official classification configs (configs/internimage_*.yaml): C1, depths, groups,
# layer scale, post-norm, offset scale; and the paper's parameter counts (its table of model
# sizes), in millions.
OFFICIAL = {
    "T": (64, (4, 4, 18, 4), (4, 8, 16, 32), 0.0, False, 1.0),
    "S": (80, (4, 4, 21, 4), (5, 10, 20, 40), 1e-5, True, 1.0),
    "B": (112, (4, 4, 21, 4), (7, 14, 28, 56), 1e-5, True, 1.0),
    "L": (160, (5, 5, 22, 5), (10, 20, 40, 80), 1e-5, True, 2.0),
    "XL": (192, (5, 5, 24, 5), (12, 24, 48, 96), 1e-5, True, 2.0),
}
PAPER_PARAMS_M = {"T": 30, "S": 50, "B": 97, "L": 223, "XL": 335}


def random_like(tree, seed, scale=0.3):
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32) for x in leaves])


@pytest.mark.parametrize("variant", sorted(OFFICIAL))
def test_variants_follow_the_stacking_rules_and_the_official_configs(variant):
  channels, depths, groups, layer_scale, post_norm, offset_scale = OFFICIAL[variant]
  hp = internimage.Model(variant=variant).hparams()
  assert hp["widths"] == tuple(channels * 2 ** i for i in range(4))  # C_i = 2^(i-1)·C1
  assert hp["depths"] == depths and depths[0] == depths[1] == depths[3] <= depths[2]
  assert hp["groups"] == groups
  assert {w // g for w, g in zip(hp["widths"], hp["groups"])} == {16}  # C' = 16
  assert (hp["layer_scale"], hp["post_norm"], hp["offset_scale"]) == (
      layer_scale, post_norm, offset_scale)


@pytest.mark.parametrize("variant", sorted(PAPER_PARAMS_M))
def test_parameter_counts_and_shapes_match_the_paper(variant):
  model = internimage.Model(num_classes=1000, variant=variant)
  (logits, aux), variables = jax.eval_shape(
      model.init_with_output, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"]))
  assert abs(count / 1e6 / PAPER_PARAMS_M[variant] - 1) < 0.03, count
  widths = model.hparams()["widths"]
  assert logits.shape == (1, 1000)
  assert [aux[f"stage{i}"].shape for i in range(4)] == [
      (1, 56 // 2 ** i, 56 // 2 ** i, w) for i, w in enumerate(widths)]
  assert aux["pre_logits"].shape == (1, int(1.5 * widths[-1]))
  assert jax.tree.map(lambda x: x.shape, variables["batch_stats"]) == {
      "conv_head_bn": {"mean": (int(1.5 * widths[-1]),), "var": (int(1.5 * widths[-1]),)}}


def test_headless_model_shapes_and_parameter_names():
  model = internimage.Model(num_classes=0, variant="mini", depths=(1, 1, 2, 1))
  (out, aux), variables = jax.eval_shape(
      model.init_with_output, jax.random.key(0), jnp.zeros((2, 40, 72, 3)))
  assert out.shape == aux["pre_logits"].shape == (2, 384)
  assert aux["stem"].shape == (2, 10, 18, 32) and aux["stage3"].shape == (2, 2, 3, 256)
  params = variables["params"]
  assert "head" not in params and "level3_norm" in params and "level3_downsample_conv" not in params
  assert sorted(k for k in params if k.startswith("level2_block")) == [
      "level2_block0", "level2_block1"]
  dcn = params["level1_block0"]["dcn"]
  assert sorted(dcn) == ["dw_conv", "dw_norm", "input_proj", "mask", "offset", "output_proj"]
  assert dcn["offset"]["kernel"].shape == (64, 4 * 9 * 2)  # G_2 = 64 / 16 = 4 groups.
  assert dcn["mask"]["kernel"].shape == (64, 4 * 9)
  post = internimage.Model(variant="mini", layer_scale=1e-5, post_norm=True)
  params = jax.eval_shape(post.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  assert params["level0_block0"]["gamma1"].shape == (32,) and "level0_norm" not in params


def test_dcnv3_at_init_is_a_box_filter_of_the_input_projection():
  """Zero-initialised offset and mask layers: uniform 1/9 weights at the 3x3 grid points."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 6, 32)), jnp.float32)
  module = internimage.DCNv3(group=2)
  params = jax.jit(module.init)(jax.random.key(0), x)["params"]
  out, sampling = jax.jit(module.apply, static_argnames="return_sampling")(
      {"params": params}, x, return_sampling=True)
  np.testing.assert_array_equal(sampling["offset"], 0.0)
  np.testing.assert_allclose(sampling["mask"], 1 / 9, rtol=1e-6)
  dense = lambda name, y: y @ params[name]["kernel"] + params[name]["bias"]
  value = np.pad(np.asarray(dense("input_proj", x)), ((0, 0), (1, 1), (1, 1), (0, 0)))
  box = sum(value[:, i:i + 5, j:j + 6] for i in range(3) for j in range(3)) / 9
  np.testing.assert_allclose(out, dense("output_proj", box), rtol=1e-5, atol=1e-5)


def test_dcnv3_mask_is_a_softmax_over_the_points_of_each_group():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 5, 48)), jnp.float32)
  module = internimage.DCNv3(group=3, offset_scale=1.5)
  params = random_like(jax.eval_shape(module.init, jax.random.key(0), x)["params"], seed=2)
  out, sampling = jax.jit(module.apply, static_argnames="return_sampling")(
      {"params": params}, x, return_sampling=True)
  offset, mask = sampling["offset"], sampling["mask"]
  assert out.shape == x.shape
  assert offset.shape == (2, 6, 5, 3 * 9 * 2) and mask.shape == (2, 6, 5, 3 * 9)
  per_group = np.asarray(mask).reshape(2, 6, 5, 3, 9)
  assert per_group.min() > 0 and per_group.std(-1).mean() > 0.01  # Not uniform.
  np.testing.assert_allclose(per_group.sum(-1), 1.0, rtol=1e-5)
  dense = lambda name, y: y @ params[name]["kernel"] + params[name]["bias"]
  want = kernels.dcnv3(dense("input_proj", x), offset, mask, group=3, offset_scale=1.5,
                       impl="reference")
  np.testing.assert_allclose(out, dense("output_proj", want), rtol=1e-5, atol=1e-5)
  assert np.abs(offset).mean() > 0.2  # Off the grid: the sampling is really deformable.


@pytest.mark.parametrize("label", LABELS)
def test_official_reference_logits(label):
  state, x, expected, meta = make_internimage_reference.load(os.path.join(DATA_DIR, label))
  model_name, kwargs, variables = import_internimage.convert(
      state, offset_scale=meta["offset_scale"])
  official = meta["official_kwargs"]
  assert model_name == "internimage"
  assert kwargs["post_norm"] == official.get("post_norm", False)
  assert kwargs["num_classes"] == official["num_classes"]
  model = internimage.Model(**kwargs)
  assert model.hparams()["groups"] == tuple(official["groups"])
  out, _ = jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert out.shape == expected.shape
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_converter_errors_name_the_problem():
  state, _, _, _ = make_internimage_reference.load(os.path.join(DATA_DIR, "tiny_prenorm"))
  with pytest.raises(ValueError, match="clip_projector.q.weight"):
    import_internimage.convert({**state, "clip_projector.q.weight": np.zeros((4, 4))})
  missing = {k: v for k, v in state.items() if k != "levels.1.blocks.0.dcn.mask.bias"}
  with pytest.raises(ValueError, match="levels.1.blocks.0.dcn.mask.bias"):
    import_internimage.convert(missing)
  with pytest.raises(ValueError, match="widths .* variant 'T'"):
    import_internimage.convert(state, variant="T")
  with pytest.raises(ValueError, match="'variant'.*XXL"):
    import_internimage.convert(state, variant="XXL")


def test_cli_writes_a_checkpoint_with_batch_stats(tmp_path):
  state, _, _, meta = make_internimage_reference.load(
      os.path.join(DATA_DIR, "tiny_postnorm_layerscale"))
  weights = tmp_path / "official.npz"
  np.savez(weights, **state)
  workdir = tmp_path / "imported"
  subprocess.run([sys.executable, "-m", "big_vision_lite.tools.import_internimage",
                  "--weights", str(weights), "--offset_scale", "2", "--workdir", str(workdir)],
                 check=True, capture_output=True, cwd=REPO_ROOT,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
  with open(workdir / "model.json") as f:
    saved = json.load(f)
  model_name, kwargs, variables = import_internimage.convert(state, offset_scale=2.0)
  assert saved == {"model_name": model_name, "model": json.loads(json.dumps(kwargs))}
  restored = ocp.StandardCheckpointer().restore(str(workdir / "params"))
  assert sorted(restored) == ["batch_stats", "params"]
  want = flax.traverse_util.flatten_dict(variables)
  got = flax.traverse_util.flatten_dict(restored)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=str(key))


@pytest.mark.parametrize("fields, named", [
    (dict(variant="Q"), "'variant'"),
    (dict(depths=(2, 1, 6, 2)), "'depths'"),
    (dict(depths=(2, 2, 1, 2)), "'depths'"),
    (dict(channels=40), "'channels'"),
    (dict(group_channels=0), "'group_channels'"),
    (dict(dcnv3_impl="cuda"), "'dcnv3_impl'"),
    (dict(drop_path=1.0), "'drop_path'"),
    (dict(post_norm="yes"), "'post_norm'"),
    (dict(offset_scale=0.0), "'offset_scale'"),
    (dict(num_classes=-1), "'num_classes'"),
])
def test_bad_fields_raise_naming_them(fields, named):
  with pytest.raises(ValueError, match=named):
    internimage.Model(**fields)


def test_bad_images_raise():
  model = internimage.Model(variant="mini")
  with pytest.raises(ValueError, match=r"NHWC images \[B, H, W, 3\]"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((32, 32, 3)))
