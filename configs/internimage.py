r"""InternImage classification; by default a CPU-sized InternImage on the embedded "shapes".

  python -m big_vision_lite.train --config configs/internimage.py --workdir /tmp/internimage

The default (`variant=mini`: C1 = 32, C' = 16, depths 1-1-3-1, 1.9M parameters, on 64x64
images, 300 steps of batch 32) runs on CPU with the jnp DCNv3 reference (`dcnv3_impl=auto`
picks it there) and reaches ~48% top-1 / ~88% top-5 test accuracy (chance: 10% / 50%). On 2
CPU cores shared with other jobs it ran at ~0.7 steps/s after a compilation of several
minutes (XLA:CPU compiles the gathers and scatters of DCNv3's backward slowly).
Arguments: `configs/internimage.py:variant=T,res=224,dataset=imagenet2012,num_classes=1000,
eval_split=validation,drop_path=0.1,...` (variant: mini, T, S, B, L, XL; the official
ImageNet-1k drop-path rates are T 0.1, S 0.4, B 0.5), `dcnv3_impl` (auto, reference,
pallas), plus any `--config.<field>=<value>` override (e.g. `--config.model.depths=[2,2,6,2]`).
Fine-tuning from official weights (`tools/import_internimage.py`):
`--config.init_from=DIR --config.init_skip="('head/.*',)"` for a new classifier.
"""
from big_vision_lite import config_lib
from configs import common


def get_config(arg: str | None = None):
  """Returns the ConfigDict of an InternImage classification run."""
  arg = config_lib.parse_arg(arg, variant="mini", res=64, batch_size=32, total_steps=300,
                             lr=1e-3, wd=0.05, drop_path=0.0, dcnv3_impl="auto",
                             **common.DATA_ARGS)
  model = dict(variant=arg.variant, num_classes=arg.num_classes,
               drop_path=arg.drop_path, dcnv3_impl=arg.dcnv3_impl)
  # Weight decay is decoupled, on kernels only (not norms, biases or layer scales).
  return common.classification(arg, "internimage", model, wd=arg.wd, grad_clip_norm=5.0,
                               eval_log_steps=300, eval_batch_size=128)
