"""scan_layers: a scanned encoder (one `nn.scan` over stacked block params) gives the logits,
gradients and per-block outputs of the unscanned one with the same weights; checkpoints and
timm imports convert between the two layouts both ways."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from big_vision_lite import checkpointing
from big_vision_lite import models
from big_vision_lite.tools import import_timm

sys.path.insert(0, os.path.dirname(__file__))
import make_timm_reference  # pylint: disable=wrong-import-position
from test_remat import inputs  # pylint: disable=wrong-import-position

DEPTH = 3
CASES = {
    "vit": dict(width=16, depth=DEPTH, mlp_dim=32, num_heads=2, num_classes=3, patch_size=4,
                drop_path=0.2),
    "navit": dict(width=16, depth=DEPTH, mlp_dim=32, num_heads=2, num_classes=3, patch_size=4),
    "deepvit": dict(width=16, depth=DEPTH, mlp_dim=32, num_heads=4, num_classes=3,
                    patch_size=4),
    "memory_vit": dict(width=16, depth=DEPTH, mlp_dim=32, num_heads=2, num_classes=3,
                       patch_size=4, task_classes=(4, 2), num_memory=(2, 0), train_task=1,
                       drop_path=0.2),
    "text_transformer": dict(width=16, depth=DEPTH, mlp_dim=32, num_heads=2, vocab_size=50,
                             max_len=8, num_classes=3, causal=True),
}


def stacked_by_hand(params: dict) -> dict:
  """The unscanned tree with (Transformer/)encoderblock_{i} stacked on a new leading axis."""
  if "Transformer" in params:
    return dict(params, Transformer=stacked_by_hand(params["Transformer"]))
  params = dict(params)
  blocks = [params.pop(f"encoderblock_{i}") for i in range(DEPTH)]
  params["encoderblock"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
  return params


@pytest.mark.parametrize("name,remat_policy", [("vit", "none"), ("vit", "full"),
                                               ("navit", "none"), ("deepvit", "full"),
                                               ("memory_vit", "full"),
                                               ("text_transformer", "full")])
def test_scan_changes_no_logits_gradients_or_block_outputs(name, remat_policy):
  module, x = models.get(name), inputs(name)
  plain = module.Model(**CASES[name])
  scanned = module.Model(**CASES[name], scan_layers=True, remat_policy=remat_policy)
  params = jax.device_get(plain.init(jax.random.key(0), x)["params"])
  params = jax.tree.map(lambda p: p + np.float32(0.1), params)  # Zero heads too.
  stacked = stacked_by_hand(params)
  abstract = jax.eval_shape(scanned.init, jax.random.key(0), x)["params"]
  assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
      lambda a: (a.shape, a.dtype), stacked)

  def loss(model):
    def fn(p):
      out, aux = model.apply({"params": p}, x)
      return jnp.sum(jnp.sin(out)), aux
    return jax.jit(jax.value_and_grad(fn, has_aux=True))

  (want, want_aux), want_grads = loss(plain)(params)
  (got, got_aux), got_grads = loss(scanned)(stacked)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got_grads, stacked_by_hand(jax.device_get(want_grads)))
  for key in want_aux:
    if key.startswith("block"):
      np.testing.assert_allclose(got_aux[key], want_aux[key], rtol=1e-5, atol=1e-6)
  if name == "deepvit":  # Its re-attention maps, per layer.
    _, want_aux = plain.apply({"params": params}, x, return_attention=True)
    _, got_aux = scanned.apply({"params": stacked}, x, return_attention=True)
    assert len(got_aux["attention"]) == DEPTH
    for got_maps, want_maps in zip(got_aux["attention"], want_aux["attention"]):
      np.testing.assert_allclose(got_maps, want_maps, rtol=1e-4, atol=1e-4)


def test_scanned_drop_path_rises_per_layer():
  """In training, layer i drops whole examples at rate drop_path * i / (depth - 1), as the
  unscanned encoder: layer 0 never drops, so block00 equals the eval-mode one."""
  model = models.get("vit").Model(**dict(CASES["vit"], drop_path=0.9), scan_layers=True)
  x = np.random.default_rng(1).normal(size=(64, 8, 8, 3)).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  _, train_aux = model.apply({"params": params}, x, train=True,
                             rngs={"dropout": jax.random.key(1)})
  _, eval_aux = model.apply({"params": params}, x)
  np.testing.assert_allclose(train_aux["block00"], eval_aux["block00"], rtol=1e-6)
  assert not np.allclose(train_aux["block02"], eval_aux["block02"])


def test_layer_stacking_round_trip_and_timm_import_into_a_scanned_vit():
  label = "vit_tiny_patch16_224"
  state, x, expected = make_timm_reference.load(
      os.path.join(make_timm_reference.DATA_DIR, label))
  model_name, kwargs, variables = import_timm.convert(label, state)
  params = variables["params"]
  scanned = models.get(model_name).Model(**kwargs, scan_layers=True)
  images = np.transpose(x, (0, 2, 3, 1))
  abstract = jax.eval_shape(scanned.init, jax.random.key(0), images)["params"]
  stacked = checkpointing.match_layer_stacking(abstract, params)
  depth = kwargs["depth"]
  assert np.shape(stacked["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"]) == (
      depth, kwargs["width"])
  out, _ = jax.jit(scanned.apply)({"params": stacked}, images)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  # Back to the unscanned layout: the imported arrays, bit for bit.
  unstacked = checkpointing.match_layer_stacking(params, stacked)
  assert jax.tree.structure(unstacked) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, unstacked, params)
  # merge_init_params (what init_from runs) converts too.
  merged = checkpointing.merge_init_params(jax.tree.map(np.zeros_like, stacked), params, (),
                                           "test")
  jax.tree.map(np.testing.assert_array_equal, merged, stacked)


def test_unknown_scan_value_is_named():
  with pytest.raises(ValueError, match="'scan_layers' must be one of False, True"):
    models.get("vit").Model(scan_layers="yes")


def test_per_layer_sharding_rules_skip_the_scanned_layer_axis():
  from big_vision_lite import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh([("data", 2), ("model", 4)])
  bias = jax.ShapeDtypeStruct((DEPTH, 64), jnp.float32)
  tree = {"params": {"Transformer": {"encoderblock": {"MlpBlock_0": {"Dense_0": {"bias": bias}}},
                                     "encoderblock_0": {"MlpBlock_0": {"Dense_0": {
                                         "bias": jax.ShapeDtypeStruct((64,), jnp.float32)}}}}}}
  shardings = sharding.infer_shardings(tree, mesh, [(r".*Dense_0/bias", ("model",))])
  encoder = shardings["params"]["Transformer"]
  assert encoder["encoderblock"]["MlpBlock_0"]["Dense_0"]["bias"].spec == P(None, "model")
  assert encoder["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["bias"].spec == P("model")
