"""timm -> big_vision_lite weight import: saved references, live timm, errors and the CLI."""
import dataclasses
import importlib
import json
import os
import re
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
LABELS, SAVED_LABELS = make_timm_reference.labels("vit_")
# label -> (num_heads, pool_type, gelu_approximate, num_classes), as timm defines each name.
EXPECTED = {
    "vit_tiny_patch16_224": (3, "tok", False, 10),
    "vit_small_patch16_224.augreg_in21k_ft_in1k": (6, "tok", False, 7),
    "vit_base_patch32_224": (12, "tok", False, 5),
    "vit_base_patch16_gap_224": (16, "gap", False, 6),
    "vit_base_patch32_siglip_gap_256": (12, "gap", True, 4),
    "vit_small_patch8_224_rect_nobias": (6, "tok", False, 3),
    "vit_large_patch14_224_headless": (16, "tok", False, 0),
}
GAP_LABEL = "vit_base_patch16_gap_224"


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


def test_every_vit_reference_is_saved():
  assert SAVED_LABELS == LABELS == sorted(EXPECTED)


@pytest.mark.parametrize("label", make_timm_reference.labels("")[1])
def test_saved_reference_records_its_making(label):
  """Every family's saved reference names the timm, torch and seed that made it, and the
  REFERENCES entry it was made from."""
  with open(os.path.join(DATA_DIR, label, "meta.json")) as f:
    meta = json.load(f)
  assert re.fullmatch(r"\d+\.\d+\.\d+.*", meta.pop("timm"))
  assert re.fullmatch(r"\d+\.\d+\.\d+.*", meta.pop("torch"))
  assert isinstance(meta.pop("seed"), int)
  reference = make_timm_reference.REFERENCES[label]
  assert meta == json.loads(json.dumps(reference._asdict()))
  x = np.load(os.path.join(DATA_DIR, label, "input.npy"))
  assert x.shape == (2, 3, *reference.img_size)


@pytest.mark.parametrize("label", SAVED_LABELS)
def test_saved_reference(label):
  state, x, expected = _load_reference(os.path.join(DATA_DIR, label))
  out, kwargs = _apply(_timm_name(label), state, x)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  assert (kwargs["num_heads"], kwargs["pool_type"], kwargs["gelu_approximate"],
          kwargs["num_classes"]) == EXPECTED[label]
  assert kwargs["final_norm"] == "pre_pool" and kwargs["layernorm_eps"] == 1e-6
  assert kwargs["patch_size"][0] == state["patch_embed.proj.weight"].shape[-1]


def test_gap_heads_come_from_the_name(monkeypatch):
  """timm's vit_base_patch16_gap_224 has 16 heads, not ViT-B's 12; width 48 divides by
  both, so only the name tells them apart."""
  state, x, expected = _load_reference(os.path.join(DATA_DIR, GAP_LABEL))
  out, kwargs = _apply(f"timm/{GAP_LABEL}.sw_in1k", state, x)
  assert kwargs["num_heads"] == 16 and kwargs["width"] == 48
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  # The same weights split into ViT-B's 12 heads compute something else.
  monkeypatch.setitem(import_timm.VIT_DEFINITIONS, GAP_LABEL,
                      import_timm.VIT_DEFINITIONS[GAP_LABEL]._replace(num_heads=12))
  out_12_heads, _ = _apply(GAP_LABEL, state, x)
  assert np.abs(out_12_heads - expected).max() > 1e-3 * np.abs(expected).max()


def test_activation_comes_from_the_name():
  """timm's vit_large_patch16_siglip_gap_512 uses the tanh GELU, _384 the exact one."""
  state = _load_reference(os.path.join(DATA_DIR, GAP_LABEL))[0]
  _, exact, _ = import_timm.convert("vit_large_patch16_siglip_gap_384", state)
  _, tanh, _ = import_timm.convert("vit_large_patch16_siglip_gap_512", state)
  assert exact["gelu_approximate"] is False and tanh == {**exact, "gelu_approximate": True}


@pytest.mark.parametrize("label", LABELS)
def test_live_timm(label, timm_live_dir):
  state, x, expected = _load_reference(os.path.join(timm_live_dir, label))
  saved_state = load_file(os.path.join(DATA_DIR, label, "state.safetensors"))
  assert not np.allclose(state["patch_embed.proj.weight"], saved_state["patch_embed.proj.weight"])
  out, _ = _apply(_timm_name(label), state, x)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


LIVE_TEST_MODULES = ("test_import_timm", "test_convnext2", "test_efficientvit", "test_mobilevit",
                     "test_mobilevit2", "test_resnet")


def test_live_tests_cover_every_reference():
  """Each family's test_live_timm runs once per reference (without timm they are skipped, so
  a lost parametrize would otherwise go unseen), and together they cover REFERENCES."""
  covered = []
  for name in LIVE_TEST_MODULES:
    module = importlib.import_module(name)
    marks = [(m.args, m.kwargs) for m in getattr(module.test_live_timm, "pytestmark", [])]
    assert marks == [(("label", module.LABELS), {})], name
    covered += module.LABELS
  assert sorted(covered) == sorted(make_timm_reference.REFERENCES)


def _convertible(definition):
  """Whether what timm builds for a name is the ViT that `vit` reproduces."""
  return (definition["model_class"] == "VisionTransformer"
          and definition["block_class"] == "Block"
          and definition["attn_class"] == "Attention" and definition["mlp_class"] == "Mlp"
          and (definition["act"], definition["gelu_approximate"]) in (("GELU", "none"),
                                                                      ("GELUTanh", None))
          and (definition["class_token"], definition["global_pool"]) in ((True, "token"),
                                                                          (False, "avg"))
          and not definition["no_embed_class"] and definition["reg_tokens"] == 0
          and definition["pos_embed"] and definition["patch_bias"]
          and not definition["dynamic_img_pad"] and definition["norm"] == "LayerNorm"
          and definition["block_norm"] == "LayerNorm"
          and definition["norm_eps_final"] == definition["norm_eps"]
          and not any(definition[k] for k in ("norm_pre", "fc_norm", "attn_pool", "layer_scale",
                                             "qk_norm", "attn_norm", "mlp_norm")))


def test_vit_definitions_match_timm(timm_live_dir):
  """import_timm's table is exactly installed timm's convertible ViTs, with their heads,
  class token, GELU form and norm epsilon."""
  with open(os.path.join(timm_live_dir, "vit_definitions.json")) as f:
    definitions = json.load(f)
  assert "vit_base_patch16_gap_224" in definitions and len(definitions) > 100
  expected = {
      name: import_timm.ViTDefinition(d["num_heads"], d["class_token"], d["act"] == "GELUTanh",
                                      d["norm_eps"])
      for name, d in definitions.items() if _convertible(d)}
  assert import_timm.VIT_DEFINITIONS == expected


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


@pytest.mark.parametrize("name", ["regnetx_002", "deit_tiny_patch16_224"])
def test_unknown_family_lists_supported(name):
  with pytest.raises(ValueError, match=rf"Unsupported timm model name '{name}'.*vit_"):
    import_timm.convert(name, _tiny_state())


@pytest.mark.parametrize("name", [
    "vit_nano_patch16_224", "vit_base_patch15_224", "timm/vit_base_patch16_clip_224.openai",
    "vit_base_patch16_reg4_gap_256", "vit_small_patch14_dinov2.lvd142m",
    "vit_medium_patch16_gap_256"])
def test_unknown_vit_name_lists_known(name):
  """A ViT name not in the table is refused (also by name alone, before weights are read)."""
  match = rf"Unknown timm ViT name '{name.removeprefix('timm/')}'.*vit_base_patch16_gap_224"
  with pytest.raises(ValueError, match=match):
    import_timm.find_converter(name)
  with pytest.raises(ValueError, match=match):
    import_timm.convert(name, _tiny_state())


@pytest.mark.parametrize("label, name, match", [
    ("vit_tiny_patch16_224", GAP_LABEL, "has 'cls_token'.*has no class token"),
    (GAP_LABEL, "vit_base_patch16_224", "lacks 'cls_token'.*has a class token"),
])
def test_class_token_must_match_the_name(label, name, match):
  state = load_file(os.path.join(DATA_DIR, label, "state.safetensors"))
  with pytest.raises(ValueError, match=match):
    import_timm.convert(name, state)


@pytest.mark.parametrize("extra", ["reg_token", "blocks.0.ls1.gamma", "attn_pool.latent",
                                   "norm_pre.weight", "blocks.1.attn.q_norm.weight"])
def test_unsupported_key_is_named(extra):
  state = _tiny_state()
  state[extra] = np.zeros((1, 1, 48), np.float32)
  with pytest.raises(ValueError, match=rf"{extra.replace('.', r'[.]')}.*supported: the timm ViTs"):
    import_timm.convert("vit_tiny_patch16_224", state)


def test_fc_norm_is_rejected():
  state = _tiny_state()
  state["fc_norm.weight"] = state.pop("norm.weight")
  state["fc_norm.bias"] = state.pop("norm.bias")
  with pytest.raises(ValueError, match="Unsupported parameter 'fc_norm.weight'.*no fc_norm"):
    import_timm.convert("vit_tiny_patch16_224", state)


def test_cli_writes_loadable_checkpoint(tmp_path):
  state, x, expected = _load_reference(os.path.join(DATA_DIR, GAP_LABEL))
  weights = tmp_path / "model.npz"
  np.savez(weights, **state)
  workdir = tmp_path / "imported"
  subprocess.run([sys.executable, "-m", "big_vision_lite.tools.import_timm", "--name",
                  f"timm/{GAP_LABEL}.augreg_in21k_ft_in1k", "--weights", str(weights),
                  "--workdir", str(workdir)], check=True, capture_output=True, cwd=REPO_ROOT,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert sorted(os.listdir(workdir)) == ["model.json", "params"]
  with open(workdir / "model.json") as f:
    meta = json.load(f)
  model_name, kwargs, variables = import_timm.convert(GAP_LABEL, state)
  assert meta == {"model_name": model_name, "model": json.loads(json.dumps(kwargs))}
  # Every architecture field of vit.Model is explicit, so no config default can replace it.
  training_only = {"head_zeroinit", "dropout", "drop_path", "dtype_mm", "remat_policy",
                   "scan_layers", "parent", "name"}
  structural = {f.name for f in dataclasses.fields(models.get("vit").Model)} - training_only
  assert structural <= set(meta["model"]), structural - set(meta["model"])
  assert (meta["model"]["num_heads"], meta["model"]["pool_type"]) == (16, "gap")
  restored = ocp.StandardCheckpointer().restore(str(workdir / "params"))["params"]
  restored_flat = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
  expected_flat = dict(jax.tree_util.tree_flatten_with_path(variables["params"])[0])
  assert sorted(map(str, restored_flat)) == sorted(map(str, expected_flat))
  for path, value in expected_flat.items():
    np.testing.assert_array_equal(np.asarray(restored_flat[path]), value, err_msg=str(path))
  model = models.get(meta["model_name"]).Model(**meta["model"])
  out, _ = jax.jit(model.apply)({"params": restored}, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
