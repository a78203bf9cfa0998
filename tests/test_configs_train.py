"""Every default config trains: a few steps at a tiny size, and its loss falls.

Each case runs its config as a user would (`configs/<name>.py:<args>`), keeping the config's
task, preprocessing, optimiser, schedule and weight decay, and shrinks only what its
arguments and model fields allow: the model, resolution, batch and steps, on 32 training
images seen again and again. With the fixed seed, the mean loss of the last steps must be
below the first step's loss (an untrained model, about ln 10 = 2.30) by a margin far above
the step-to-step noise: with lr=0 each case's mean moves by less than a tenth of it.
The long "learns to X%" runs of the default sizes are the `slow` tests of each model.
"""
import importlib
from typing import Any

import numpy as np
import pytest

TRAIN_IMAGES = "train[:32]"
LAST = 5  # The last logged losses averaged.
MARGIN = 0.3  # Required fall below the first loss.
# DETR's loss (set-loss terms of both decoder layers, ~18 untrained here) swings by ~1 from
# batch to batch with its boxes: the last 10 steps' mean, 1.2 below the first loss. With
# lr=0 that mean is 0.4 below it; with the case's lr 1.9.
CHECKS = {"detr": (10, 1.2)}

# config name -> (config arguments, model field overrides): the smallest size each allows.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("variant=mini/8,res=32,batch_size=16,total_steps=30,lr=1e-2",
            dict(width=32, depth=1, mlp_dim=64, num_heads=2)),
    "navit": ("variant=mini/8,seq_len=64,max_images=8,batch_size=4,res_min=16,res_max=32,"
              "total_steps=30,lr=1e-2", dict(width=32, depth=1, mlp_dim=64, num_heads=2)),
    "deepvit": ("depth=2,variant=mini/8,res=32,batch_size=16,total_steps=30,lr=1e-2",
                dict(width=32, mlp_dim=64, num_heads=2)),
    "memory_vit": ("memory=2,variant=mini/8,res=32,batch_size=16,total_steps=30,lr=1e-2",
                   dict(width=32, depth=1, mlp_dim=64, num_heads=2)),
    "efficientvit": ("res=32,batch_size=16,total_steps=30,lr=1e-2",
                     dict(embed_dim=(16,), depth=(1,), num_heads=(2,), key_dim=(8,))),
    "mobilevit": ("res=32,batch_size=16,total_steps=30,lr=1e-2",
                  dict(stem_width=8, widths=(8, 8, 8, 16, 16), mv2_depths=(1, 1, 1, 1, 1),
                       transformer_widths=(16,), transformer_depths=(1,), final_width=32)),
    "mobilevit2": ("res=32,batch_size=16,total_steps=30,lr=1e-2",
                   dict(stem_width=8, widths=(8, 8, 8, 16, 16), mv2_depths=(1, 1, 1, 1, 1),
                        transformer_widths=(16,), transformer_depths=(1,))),
    "convnext2": ("res=32,batch_size=16,total_steps=30,lr=1e-2",
                  dict(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16))),
    "internimage": ("res=32,batch_size=16,total_steps=30,lr=1e-2",
                    dict(channels=8, group_channels=8, depths=(1, 1, 1, 1))),
    "detr": ("batch_size=8,total_steps=30,lr=3e-3",
             dict(num_queries=6, hidden=16, num_heads=2, enc_layers=1, dec_layers=2, mlp_dim=32,
                  backbone_kwargs=dict(depth=18, width=8, stage_sizes=(1, 1, 1, 1)))),
}


def tiny_config(name: str):
  """configs/`name`.py at its tiny size, on TRAIN_IMAGES."""
  arg, model = CASES[name]
  config = importlib.import_module(f"configs.{name}").get_config(
      f"{arg},train_split={TRAIN_IMAGES}")
  config.model.update(model)
  return config


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_trains(name, train_losses):
  losses = train_losses(tiny_config(name), log_every=1)
  assert len(losses) == tiny_config(name).total_steps
  last, margin = CHECKS.get(name, (LAST, MARGIN))
  assert np.mean(losses[-last:]) < losses[0] - margin, np.round(losses, 3)
