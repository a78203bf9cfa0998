r"""Our attention op against `jax.nn.dot_product_attention`, forward + backward, one run.

  python -m benchmarks.attention --batch 4 --length 512 --heads 3 --head_dim 64 --segments 8

Times jit(grad) of the summed output w.r.t. q, k and v for: `kernels.packed_attention`'s
`reference` (plain einsums, what NaViT runs off GPU/TPU) and `dot_product_attention`
without a mask (what ViT runs), each beside `jax.nn.dot_product_attention` with the same
segment mask or none. The steps of all cases are interleaved (`timing.time_interleaved`);
ratios are ours / jax.nn's median seconds. Also prints the largest output difference.
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import timing
from kernels import packed_attention

flags.DEFINE_integer("batch", 4, "Rows B.")
flags.DEFINE_integer("length", 512, "Tokens per row L.")
flags.DEFINE_integer("heads", 3, "Heads H.")
flags.DEFINE_integer("head_dim", 64, "Head width Dh.")
flags.DEFINE_integer("segments", 8, "Equal segments per row for the masked cases.")
flags.DEFINE_integer("steps", 30, "Timed calls per case.")
flags.DEFINE_integer("warmup", 3, "Untimed calls per case after compilation.")
FLAGS = flags.FLAGS


def grad_fn(attention):
  """jit(grad) w.r.t. (q, k, v) of attention(q, k, v).sum()."""
  return jax.jit(jax.grad(lambda q, k, v: attention(q, k, v).sum(), argnums=(0, 1, 2)))


def main(argv):
  del argv
  if FLAGS.length % FLAGS.segments:
    raise ValueError(f"--length ({FLAGS.length}) must be a multiple of --segments "
                     f"({FLAGS.segments}).")
  shape = (FLAGS.batch, FLAGS.length, FLAGS.heads, FLAGS.head_dim)
  q, k, v = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(0), 3))
  segment_ids = jnp.asarray(np.repeat(np.arange(1, FLAGS.segments + 1),
                                      FLAGS.length // FLAGS.segments)[None].repeat(
                                          FLAGS.batch, 0), jnp.int32)  # [B, L]
  mask = packed_attention.segment_mask(segment_ids)  # [B, 1, L, L]
  ops = {
      "masked, ours": lambda q, k, v: packed_attention.reference(q, k, v, segment_ids),
      "masked, jax.nn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask),
      "unmasked, ours": lambda q, k, v: packed_attention.dot_product_attention(q, k, v)[0],
      "unmasked, jax.nn": jax.nn.dot_product_attention,
  }
  for kind in ("masked", "unmasked"):
    diff = jnp.abs(ops[f"{kind}, ours"](q, k, v) - ops[f"{kind}, jax.nn"](q, k, v)).max()
    print(f"{kind}: largest output difference {float(diff):.2e}")
  _, median_s = timing.time_interleaved({name: (grad_fn(op), (q, k, v))
                                         for name, op in ops.items()},
                                        warmup=FLAGS.warmup, steps=FLAGS.steps)
  print(f"{jax.default_backend()}, q/k/v {list(shape)}, fwd+bwd median ms:")
  for name, seconds in median_s.items():
    print(f"  {name:18s} {seconds * 1e3:8.2f}")
  for kind in ("masked", "unmasked"):
    ratio = median_s[f"{kind}, ours"] / median_s[f"{kind}, jax.nn"]
    print(f"{kind}: ours / jax.nn = {ratio:.3f}")


if __name__ == "__main__":
  app.run(main)
