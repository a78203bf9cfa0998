"""timm -> big_vision_lite weight import: saved references, live timm, errors and the CLI."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from big_vision_lite import models
from big_vision_lite.tools import import_timm

sys.path.insert(0, os.path.dirname(__file__))
import make_timm_reference  # pylint: disable=wrong-import-position

DATA_DIR = make_timm_reference.DATA_DIR
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = sorted(label for label in make_timm_reference.REFERENCES if label.startswith("vit_"))
EXPECTED = {  # label -> (pool_type, final_norm, num_classes)
    "vit_tiny_patch16_224": ("tok", "pre_pool", 10),
    "vit_small_patch16_224.augreg_in21k_ft_in1k": ("gap", "post_pool", 7),
    "vit_base_patch32_224": ("gap", "pre_pool", 5),
    "vit_small_patch8_224_rect_nobias": ("tok", "pre_pool", 3),
    "vit_large_patch14_224_headless": ("tok", "pre_pool", 0),
}


def _timm_name(label):
  return make_timm_reference.REFERENCES[label].timm_name


_load_reference = make_timm_reference.load


def _apply(timm_name, state, x_nchw):
  model_name, kwargs, variables = import_timm.convert(timm_name, state)
  assert model_name == "vit"
  json.dumps(kwargs)  # model.json must be able to hold the kwargs.
  model = models.get(model_name).Model(**kwargs)
  out, _ = jax.jit(model.apply)(variables, np.transpose(x_nchw, (0, 2, 3, 1)))
  return np.asarray(out), kwargs


@pytest.mark.parametrize("label", LABELS)
def test_saved_reference(label):
  state, x, expected = _load_reference(os.path.join(DATA_DIR, label))
  out, kwargs = _apply(_timm_name(label), state, x)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  assert (kwargs["pool_type"], kwargs["final_norm"], kwargs["num_classes"]) == EXPECTED[label]
  assert kwargs["gelu_approximate"] is False
  assert kwargs["patch_size"][0] == state["patch_embed.proj.weight"].shape[-1]


def test_live_timm(label, timm_live_dir):
  state, x, expected = _load_reference(os.path.join(timm_live_dir, label))
  saved_state = load_file(os.path.join(DATA_DIR, label, "state.safetensors"))
  assert not np.allclose(state["patch_embed.proj.weight"], saved_state["patch_embed.proj.weight"])
  out, _ = _apply(_timm_name(label), state, x)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def _tiny_state():
  return dict(load_file(os.path.join(DATA_DIR, "vit_tiny_patch16_224", "state.safetensors")))


def test_conversion_layout():
  state = _tiny_state()
  _, kwargs, variables = import_timm.convert("timm/vit_tiny_patch16_224.augreg_in21k", state)
  params = variables["params"]
  assert kwargs["width"] == 48 and kwargs["depth"] == 2 and kwargs["num_heads"] == 3
  assert params["embedding"]["kernel"].shape == (16, 16, 3, 48)
  assert params["pos_embedding"].shape == (1, 16, 48)
  np.testing.assert_allclose(params["cls"],
                             state["cls_token"] + state["pos_embed"][:, :1], rtol=1e-6)
  attn = params["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_0"]
  assert attn["query"]["kernel"].shape == (48, 3, 16)
  assert attn["out"]["kernel"].shape == (3, 16, 48)
  np.testing.assert_array_equal(attn["value"]["kernel"].reshape(48, 48).T,
                                state["blocks.1.attn.qkv.weight"][96:])


@pytest.mark.parametrize("name", ["resnet50", "vit_nano_patch16_224", "vit_base_patch15_224",
                                  "deit_tiny_patch16_224"])
def test_unknown_name_lists_supported(name):
  with pytest.raises(ValueError, match=rf"{name}.*vit_\{{tiny"):
    import_timm.convert(name, _tiny_state())


@pytest.mark.parametrize("extra", ["reg_token", "blocks.0.ls1.gamma", "attn_pool.latent",
                                   "norm_pre.weight", "blocks.1.attn.q_norm.weight"])
def test_unsupported_key_is_named(extra):
  state = _tiny_state()
  state[extra] = np.zeros((1, 1, 48), np.float32)
  with pytest.raises(ValueError, match=rf"{extra.replace('.', r'[.]')}.*supported: vit_"):
    import_timm.convert("vit_tiny_patch16_224", state)


def test_class_token_with_fc_norm_is_rejected():
  state = _tiny_state()
  state["fc_norm.weight"] = state.pop("norm.weight")
  state["fc_norm.bias"] = state.pop("norm.bias")
  with pytest.raises(ValueError, match="fc_norm"):
    import_timm.convert("vit_tiny_patch16_224", state)


def test_cli_writes_loadable_checkpoint(tmp_path):
  label = "vit_small_patch16_224.augreg_in21k_ft_in1k"
  state, x, expected = _load_reference(os.path.join(DATA_DIR, label))
  weights = tmp_path / "model.npz"
  np.savez(weights, **state)
  workdir = tmp_path / "imported"
  subprocess.run([sys.executable, "-m", "big_vision_lite.tools.import_timm", "--name", label,
                  "--weights", str(weights), "--workdir", str(workdir)], check=True,
                 capture_output=True, cwd=REPO_ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert sorted(os.listdir(workdir)) == ["model.json", "params"]
  with open(workdir / "model.json") as f:
    meta = json.load(f)
  model_name, kwargs, variables = import_timm.convert(label, state)
  assert meta == {"model_name": model_name, "model": json.loads(json.dumps(kwargs))}
  restored = ocp.StandardCheckpointer().restore(str(workdir / "params"))["params"]
  restored_flat = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
  expected_flat = dict(jax.tree_util.tree_flatten_with_path(variables["params"])[0])
  assert sorted(map(str, restored_flat)) == sorted(map(str, expected_flat))
  for path, value in expected_flat.items():
    np.testing.assert_array_equal(np.asarray(restored_flat[path]), value, err_msg=str(path))
  model = models.get(meta["model_name"]).Model(**meta["model"])
  out, _ = jax.jit(model.apply)({"params": restored}, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
