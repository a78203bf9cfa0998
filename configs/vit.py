r"""ViT classification; by default a small ViT on the embedded "shapes" dataset.

  python -m big_vision_lite.train --config configs/vit.py --workdir /tmp/vit

On 2 CPU cores the default (a 4-layer width-96 ViT with 4x4 patches on 32x32 images,
400 steps of batch 128) takes about 5 minutes and reaches ~40% top-1 / ~89% top-5 test
accuracy (chance: 10% / 50%; a linear classifier on the pixels gets 12-15%).
Arguments: `configs/vit.py:variant=S/16,res=224,dataset=imagenet2012,num_classes=1000,...`
(`variant=mini/4` is the CPU default; any ViT variant such as Ti/16, S/16, B/32 works),
`feature_evals=true` (adds the k-NN and linear-probe evals of configs/dino.py, e.g. for
`python -m big_vision_lite.evaluate ... --evals knn,linear_probe`), plus any
`--config.<field>=<value>` override.

Fine-tuning an import (`tools/import_timm.py`): `--config.init_from=DIR` takes the model's
structural fields from DIR/model.json (pooling and class token, heads, norms, GELU form,
...); `pool_type="gap"` here is the model's default, so an import's class token wins, while
the sizes of `variant` must be the import's (e.g. variant=S/16 for vit_small_patch16_224).
"""
from big_vision_lite import config_lib
from configs import common

MINI = dict(width=96, depth=4, mlp_dim=384, num_heads=4)


def get_config(arg: str | None = None):
  """Returns the ConfigDict of a ViT classification run."""
  arg = config_lib.parse_arg(arg, variant="mini/4", res=32, batch_size=128, total_steps=400,
                             lr=1.5e-3, feature_evals=False, **common.DATA_ARGS)
  size, patch = arg.variant.split("/")
  if size == "mini":
    model = dict(MINI, patch_size=(int(patch), int(patch)))
  else:
    model = dict(variant=arg.variant)
  model.update(num_classes=arg.num_classes, pool_type="gap", posemb="learn")
  config = common.classification(arg, "vit", model, wd=1e-4)
  if arg.feature_evals:  # k-NN and linear probe of the pooled features, as DINO's evals.
    config.evals.update(common.feature_evals(arg, arg.res, arg.total_steps))
  return config
