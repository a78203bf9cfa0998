"""Two towers: each tower's own param tree, embeddings = the towers' outputs normalised,
SigLIP/CLIP temperature and bias, one tower at a time, packed NaViT slots = unpacked
images, init_from an image model, config errors."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_vision_lite import checkpointing
from big_vision_lite import config_lib
from big_vision_lite.input import packing
from big_vision_lite.models import text_transformer
from big_vision_lite.models import two_towers
from big_vision_lite.models import vit

OUT_DIM = 12
IMAGE = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=8)
TEXT = dict(vocab_size=30, width=8, depth=1, mlp_dim=16, num_heads=2, max_len=6)
MODEL = two_towers.Model(image_model="vit", image=IMAGE, text=TEXT, out_dim=OUT_DIM)
IMAGES = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
TOKENS = np.array([[4, 9, 1, 0, 0, 0], [7, 1, 0, 0, 0, 0], [3, 3, 3, 5, 6, 1]], np.int32)


def run(fn, *args, **kwargs):
  """fn(*args, **kwargs) compiled without XLA's optimisations (cheaper for one call)."""
  compiled = jax.jit(fn).lower(*args, **kwargs).compile({"xla_backend_optimization_level": 0})
  return compiled(*args, **kwargs)


def random_variables(model, *args, **kwargs):
  """Random normal variables of `model.init`'s shapes (compiling init costs ~10 s)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: 0.3 * rng.normal(size=s.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def variables():
  return random_variables(MODEL, IMAGES, text=TOKENS)


@pytest.fixture(scope="module")
def outputs(variables):
  """MODEL's (out, aux) on IMAGES and TOKENS."""
  return run(MODEL.apply, variables, IMAGES, text=TOKENS)


def normalised(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


def test_params_hold_each_towers_own_tree(variables):
  params = variables["params"]
  assert set(params) == {"img", "txt", "t", "b"}
  image_model = vit.Model(num_classes=OUT_DIM, **IMAGE)
  text_model = text_transformer.Model(num_classes=OUT_DIM, **TEXT)
  assert shapes(params["img"]) == shapes(
      jax.eval_shape(image_model.init, jax.random.key(0), IMAGES)["params"])
  assert shapes(params["txt"]) == shapes(
      jax.eval_shape(text_model.init, jax.random.key(0), TOKENS)["params"])
  assert MODEL.image_tower().head_zeroinit is False  # vit's zero head: zero embeddings.
  assert MODEL.image_tower().num_classes == MODEL.text_tower().num_classes == OUT_DIM


def test_siglip_init():
  variables = MODEL.init(jax.random.key(0), None, None)  # Neither tower: t and b only.
  assert set(variables["params"]) == {"t", "b"}
  np.testing.assert_allclose(variables["params"]["t"], np.log(10.0), rtol=1e-6)
  np.testing.assert_allclose(variables["params"]["b"], -10.0)
  out, _ = MODEL.apply(variables, None, None)
  np.testing.assert_allclose(out["temperature"], 10.0, rtol=1e-6)
  np.testing.assert_allclose(out["bias"], -10.0)


def test_embeddings_are_the_towers_outputs_normalised(variables, outputs):
  params = variables["params"]
  out, aux = outputs
  image_out, image_aux = run(vit.Model(num_classes=OUT_DIM, **IMAGE).apply,
                     {"params": params["img"]}, IMAGES)
  text_out, _ = run(text_transformer.Model(num_classes=OUT_DIM, **TEXT).apply,
                    {"params": params["txt"]}, TOKENS)
  assert out["zimg"].shape == (2, OUT_DIM) and out["ztxt"].shape == (3, OUT_DIM)
  assert out["zimg"].dtype == out["ztxt"].dtype == jnp.float32
  np.testing.assert_allclose(out["zimg"], normalised(image_out), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["ztxt"], normalised(text_out), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(out["ztxt"], axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(out["temperature"], np.exp(params["t"]), rtol=1e-6)
  np.testing.assert_allclose(out["bias"], params["b"])
  np.testing.assert_allclose(aux["txt"]["pre_logits"].shape, (3, TEXT["width"]))
  np.testing.assert_allclose(aux["pre_logits"], image_aux["pre_logits"], rtol=1e-5, atol=1e-6)


def test_one_tower_at_a_time(variables, outputs):
  both, _ = outputs
  images_only, _ = run(MODEL.apply, variables, IMAGES, text=None)
  text_only, _ = run(MODEL.apply, variables, None, text=TOKENS)
  assert images_only["ztxt"] is None and text_only["zimg"] is None
  np.testing.assert_allclose(images_only["zimg"], both["zimg"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(text_only["ztxt"], both["ztxt"], rtol=1e-5, atol=1e-6)


def test_clip_init_has_no_bias():
  model = two_towers.Model(image=IMAGE, text=TEXT, out_dim=OUT_DIM, temperature_init=1 / 0.07,
                           bias_init=None)
  variables = model.init(jax.random.key(0), None, None)  # Neither tower: t (and b) only.
  assert set(variables["params"]) == {"t"}
  np.testing.assert_allclose(variables["params"]["t"], np.log(1 / 0.07), rtol=1e-6)
  out, _ = model.apply(variables, None, None)
  np.testing.assert_allclose(out["temperature"], 1 / 0.07, rtol=1e-6)
  assert out["bias"] is None and out["zimg"] is None and out["ztxt"] is None


def test_packed_navit_slots_equal_unpacked_images():
  """zimg of each packed image slot = zimg of the image alone as an NHWC batch; empty slots
  are finite."""
  patch = 4
  model = two_towers.Model(
      image_model="navit", text=TEXT, out_dim=OUT_DIM,
      image=dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=patch))
  rng = np.random.default_rng(1)
  sizes = [(8, 12), (12, 8), (8, 12)]  # 6 tokens each.
  images = [rng.normal(size=(*hw, 3)).astype(np.float32) for hw in sizes]
  batch = packing.stack(list(packing.pack(
      [{"image": x, "label": i} for i, x in enumerate(images)], seq_len=16, patch_size=patch,
      max_images=3, buffer_size=4)))
  packed_inputs = {k: batch[k] for k in ("segment_ids", "positions", "image_sizes")}
  assert batch["label_mask"].sum() == 3 and not batch["label_mask"].all()
  variables = random_variables(model, batch["patches"], text=None, **packed_inputs)
  packed, _ = run(model.apply, variables, batch["patches"], text=None, **packed_inputs)
  assert packed["zimg"].shape == (*batch["label_mask"].shape, OUT_DIM)
  assert np.isfinite(packed["zimg"]).all()
  alone = {}
  for hw in set(sizes):
    group = [i for i, s in enumerate(sizes) if s == hw]
    out, _ = run(model.apply, variables, np.stack([images[i] for i in group]), text=None)
    alone.update(zip(group, out["zimg"]))
  for row, slot in zip(*np.nonzero(batch["label_mask"])):
    np.testing.assert_allclose(packed["zimg"][row, slot], alone[batch["labels"][row, slot]],
                               rtol=1e-4, atol=1e-5)


def test_init_from_an_image_model_fills_img(variables):
  """A vit run (its classifier head, another grid) goes into params["img"]: its head is
  dropped, the tower's projection head and the rest of the model keep their init values,
  the position embeddings are resampled, and the result passes the loader's shape check."""
  init = jax.tree.map(np.asarray, variables)
  source = vit.Model(num_classes=5, **IMAGE)
  loaded = jax.eval_shape(source.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  rng = np.random.default_rng(0)
  loaded = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), loaded)
  assert two_towers.backbone({"image_model": "navit"}) == "navit"
  assert config_lib.backbone_source("two_towers", {"image_model": "vit"}) == "vit"
  assert "vit" in two_towers.LOADS_FROM
  kwargs = dict(image_model="vit", image=IMAGE, text=TEXT, out_dim=OUT_DIM)
  merged = two_towers.load_backbone(init, loaded, kwargs)
  params = two_towers.load(init["params"], merged["params"], kwargs)
  params = checkpointing.merge_init_params(init["params"], params, [], "test")
  for name, value in params["img"].items():
    if name == "head":
      np.testing.assert_array_equal(value["kernel"], init["params"]["img"]["head"]["kernel"])
    elif name == "pos_embedding":
      np.testing.assert_allclose(value, vit.resample_posemb(loaded["params"][name], (2, 2)),
                                 rtol=1e-6)
    else:
      jax.tree.map(np.testing.assert_array_equal, value, loaded["params"][name])
  for name in ("txt", "t", "b"):
    jax.tree.map(np.testing.assert_array_equal, params[name], init["params"][name])

  headless = dict(kwargs, image=dict(IMAGE, num_classes=0), out_dim=IMAGE["width"])
  headless_init = jax.eval_shape(two_towers.Model(**headless).init, jax.random.key(0), IMAGES,
                                 text=TOKENS)
  merged = two_towers.load_backbone(headless_init, loaded, headless)
  assert "head" not in merged["params"]["img"]


@pytest.mark.parametrize("kwargs,words", [
    (dict(image_model="detr"), ["'image_model'", "navit", "vit", "'detr'"]),
    (dict(text=dict(TEXT, pool_type="tok")), ["'text'", "'pool_type'", "last, first"]),
    (dict(image=dict(IMAGE, widht=8)), ["'image'", "['widht']", "width"]),
    (dict(image=[1]), ["'image'", "mapping"]),
    (dict(out_dim=0), ["'out_dim'", ">= 1"]),
    (dict(temperature_init=-1.0), ["'temperature_init'", "> 0"]),
    (dict(bias_init=float("nan")), ["'bias_init'", "None"]),
    (dict(dtype_mm="int8"), ["'dtype_mm'", "bfloat16"])])
def test_bad_config_names_the_field(kwargs, words):
  with pytest.raises(ValueError) as e:
    two_towers.Model(**{**dict(image=IMAGE, text=TEXT, out_dim=OUT_DIM), **kwargs})
  for word in words:
    assert word in str(e.value)


def test_headless_tower_must_match_out_dim():
  model = two_towers.Model(image=dict(IMAGE, num_classes=0), text=TEXT, out_dim=OUT_DIM)
  with pytest.raises(ValueError, match="width 16, not Model field 'out_dim' \\(12\\)"):
    jax.eval_shape(model.init, jax.random.key(0), IMAGES, text=None)


def test_tower_fields_may_be_config_dicts():
  """A config's model.image / model.text arrive as ConfigDicts."""
  model = two_towers.Model(image=ml_collections.ConfigDict(IMAGE),
                           text=ml_collections.ConfigDict(TEXT), out_dim=OUT_DIM)
  assert shapes(jax.eval_shape(model.init, jax.random.key(0), IMAGES, text=TOKENS)) == shapes(
      jax.eval_shape(MODEL.init, jax.random.key(0), IMAGES, text=TOKENS))


def test_dtype_mm_reaches_both_towers():
  model = two_towers.Model(image=IMAGE, text=dict(TEXT, dtype_mm="float32"), out_dim=OUT_DIM,
                           dtype_mm="bfloat16")
  assert model.image_tower().dtype_mm == "bfloat16"
  assert model.text_tower().dtype_mm == "float32"  # The tower's own setting wins.
  assert two_towers.Model(image=IMAGE, text=TEXT).text_tower().dtype_mm == "float32"
