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
import ml_collections

from big_vision_lite import config_lib


def get_config(arg: str | None = None):
  """Returns the ConfigDict of an InternImage classification run."""
  arg = config_lib.parse_arg(
      arg, variant="mini", res=64, batch_size=32, total_steps=300, dataset="shapes",
      train_split="train", eval_split="test", num_classes=10, lr=1e-3, wd=0.05,
      drop_path=0.0, dcnv3_impl="auto", data_dir="")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = "classification"
  config.total_steps = arg.total_steps

  config.input = dict(batch_size=arg.batch_size)
  data_dir = arg.data_dir or None
  config.input.data = dict(name=arg.dataset, split=arg.train_split, data_dir=data_dir)
  labels = f'onehot({arg.num_classes}, key="label", key_result="labels")'
  config.input.pp = (f"decode|resize({arg.res})|flip_lr|"
                     f'value_range(-1, 1)|{labels}|keep("image", "labels")')

  config.model_name = "internimage"
  config.model = dict(variant=arg.variant, num_classes=arg.num_classes,
                      drop_path_rate=arg.drop_path, dcnv3_impl=arg.dcnv3_impl)

  config.optax_name = "adamw"
  config.optax = dict(b2=0.999)
  config.lr = arg.lr
  config.wd = arg.wd  # Decoupled, on kernels only (not norms, biases or layer scales).
  config.schedule = dict(decay_type="cosine", warmup_percent=0.05)
  config.grad_clip_norm = 5.0

  config.log_training_steps = 50
  config.ckpt_steps = 200
  config.keep_ckpt = 2
  config.init_from = ""  # A run or import dir to start from (`tools/import_internimage.py`).
  config.init_skip = ()  # Regexes of params kept fresh, e.g. ("head/.*",) for a new head.
  config.mesh = (("data", -1),)
  config.sharding_rules = ((".*", "replicate"),)

  config.evals = dict(val=dict(
      type="classification", log_steps=300, batch_size=128,
      data=dict(name=arg.dataset, split=arg.eval_split, data_dir=data_dir),
      pp=f'decode|resize({arg.res})|value_range(-1, 1)|{labels}|keep("image", "labels")'))
  return config
