"""activation_rules: logical activation axes shard as the rules say on an 8-device CPU mesh,
change no numbers, cut the compiled step's per-device temporaries, and bad rules are named."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_vision_lite import config_lib
from big_vision_lite import models
from big_vision_lite import sharding
from big_vision_lite import tasks
from big_vision_lite import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import vit as vit_config  # pylint: disable=g-import-not-at-top,wrong-import-position

MESH = [("data", 2), ("model", 4)]
TENSOR_PARALLEL = [("batch", "data"), ("embed", "model"), ("mlp", "model"),
                   ("heads", "model")]
SMALL = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=(4, 4), num_classes=8)


def test_rules_shard_block_activations_and_change_no_logits():
  assert jax.device_count() >= 8, "conftest sets 8 host devices"
  mesh = sharding.make_mesh(MESH)
  model = models.get("vit").Model(**SMALL)
  x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda p: p + 0.01, params)  # A nonzero head.
  x = jax.device_put(x, NamedSharding(mesh, P()))

  def forward(rules):
    def fn(params, x):
      with sharding.activation_sharding(rules, mesh):
        logits, aux = model.apply({"params": params}, x)
      return logits, aux["block00"], aux["block01"]
    return jax.jit(fn)(params, x)

  logits, block0, block1 = forward(TENSOR_PARALLEL)
  want_logits, want_block0, _ = forward(None)
  for block in (block0, block1):  # [B, N, D]: batch over data, embed over model.
    assert block.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "model")), 3)
  assert not want_block0.sharding.is_equivalent_to(block0.sharding, 3)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(block0, want_block0, rtol=1e-5, atol=1e-6)


def compiled_temp_bytes(rules) -> int:
  """Per-device temporaries of the train loop's ViT step on the 2 x 4 mesh."""
  config = vit_config.get_config("res=32,batch_size=16")
  config.model.update(SMALL)
  config.mesh = MESH
  config.sharding_rules = [(".*", "fsdp")]
  config.activation_rules = rules
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  task = tasks.REGISTRY.get(config.task)(config, models.from_config(config), mesh)
  spec = {"image": jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32),
          "labels": jax.ShapeDtypeStruct((16, 8), jnp.float32)}
  training = train.build_training(config, task, mesh, spec)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
           for k, v in spec.items()}
  compiled = training.step.lower(training.abstract_state, batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_tensor_parallel_rules_cut_the_steps_temporaries():
  """FSDP alone replicates each data shard's activations over the 4 model devices; with
  the rules they are split 4 ways, so the compiled step keeps less per device."""
  plain, sharded = compiled_temp_bytes(None), compiled_temp_bytes(TENSOR_PARALLEL)
  assert sharded < 0.6 * plain, (sharded, plain)


def test_bad_rules_are_named():
  config = vit_config.get_config("res=32,batch_size=16")
  config.mesh = MESH
  config.activation_rules = [("sequence", "model")]
  with pytest.raises(ValueError, match="'activation_rules'.*one of batch, length, embed"):
    config_lib.validate(config)
  config.activation_rules = [("mlp", "tensor")]
  with pytest.raises(ValueError, match="names mesh axis 'tensor'; the mesh axes are 'data', "
                     "'model'"):
    config_lib.validate(config)
