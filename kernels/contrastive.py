"""Image-text contrastive losses (CLIP softmax, SigLIP sigmoid) without the B x B logits.

`contrastive_loss(zimg, ztxt, *, kind, temperature, bias=None, chunk_size=None,
axis_name=None, impl="auto", valid=None)` returns the mean loss over the global batch, with
logits = temperature · zimg @ ztxtᵀ (+ bias for "sigmoid"); `temperature` is the
multiplicative scale (big_vision's `exp(t)`), so it and `bias` can be learned.

  softmax  ½ · mean_i [lse_j l_ij − l_ii] + ½ · mean_j [lse_i l_ij − l_jj]
  sigmoid  −(1/B) · Σ_ij log σ(y_ij · l_ij), y_ij = +1 if i = j else −1

`valid` [B_local] bool marks the real pairs (packed batches have empty slots): rows and
columns where it is False are left out as if absent, B above becomes the global number of
valid pairs (a `psum` across `axis_name`), and their embeddings get zero gradient. No valid
pair at all gives a loss of 0 with zero gradients.

impl:
  "reference"  the naive loss on the full [B, B] logits (gathered across `axis_name`).
  "chunked"    images in chunks of `chunk_size` rows: a `lax.scan` whose custom VJP
               recomputes each [chunk, B] block of logits in the backward pass, so memory is
               O(B · chunk). With `axis_name` (call it inside `shard_map`, zimg / ztxt being
               this device's rows), a ring: the text block (with its running column
               statistics and, backwards, its gradient) moves to the next device by
               `ppermute`, so a device only ever holds its own images against one text block.
  "pallas"     the same custom VJP and ring, the per-block work in Pallas kernels (flash-
               attention style): a grid over image blocks, each looping over the text block
               to keep running row log-sum-exps (or sigmoid sums) and write per-block column
               statistics; backwards, one kernel per side recomputes the logits and
               accumulates d zimg (grid over images) or d ztxt (grid over texts), never
               storing a [B, B] array. Blocks are the largest power of two <= chunk_size,
               16..128 (default 128; on GPU, where Triton holds [block, D'] tiles in
               registers, 16k / D' by default; on TPU always 128 unless one block holds the
               batch), the batch is padded to a block multiple (padded rows are invalid
               pairs) and the width to a power of two (GPU, Triton) or a multiple of 128
               (TPU, Mosaic); a device's whole text block is one kernel input (VMEM on
               TPU). Temperature is folded into the image rows and the bias into one extra
               width column, so the kernels see only two matrices. On CPU it runs in Pallas
               interpret mode (slow; for tests).
  "auto"       "pallas" on GPU and TPU backends, "chunked" elsewhere.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

KINDS = ("softmax", "sigmoid")
IMPLS = ("auto", "reference", "chunked", "pallas")
NEG = -1e30  # Masked logits: finite, so all-masked rows and columns give no inf - inf = NaN.
_HIGHEST = jax.lax.Precision.HIGHEST


def _logits(zimg, ztxt, temperature, bias):
  logits = temperature * (zimg @ ztxt.T)  # [b_img, b_txt]
  return logits if bias is None else logits + bias


def _valid_count(valid, axis_name):
  """Global number of valid pairs, at least 1 (zero valid pairs then give a zero loss)."""
  count = jnp.sum(valid.astype(jnp.float32))
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
  return jnp.maximum(count, 1.0)


def reference(zimg: jax.Array, ztxt: jax.Array, *, kind: str, temperature: jax.Array,
              bias: jax.Array | None = None, valid: jax.Array | None = None) -> jax.Array:
  """The naive loss on the full logits; zimg, ztxt [B, D], valid [B] bool -> scalar."""
  logits = _logits(zimg.astype(jnp.float32), ztxt.astype(jnp.float32), temperature, bias)
  n = logits.shape[0]
  if valid is None:
    if kind == "softmax":
      diag = jnp.diagonal(logits)
      rows = jax.nn.logsumexp(logits, axis=1) - diag
      cols = jax.nn.logsumexp(logits, axis=0) - diag
      return 0.5 * (rows.mean() + cols.mean())
    labels = 2.0 * jnp.eye(n) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n
  pairs = valid[:, None] & valid[None, :]  # [B, B]
  count = _valid_count(valid, None)
  if kind == "softmax":
    masked = jnp.where(pairs, logits, NEG)
    diag = jnp.diagonal(masked)
    rows = jax.nn.logsumexp(masked, axis=1) - diag
    cols = jax.nn.logsumexp(masked, axis=0) - diag
    return 0.5 * jnp.sum(jnp.where(valid, rows + cols, 0.0)) / count
  labels = 2.0 * jnp.eye(n) - 1.0
  return -jnp.sum(jnp.where(pairs, jax.nn.log_sigmoid(labels * logits), 0.0)) / count


def _ring(axis_name):
  """(number of devices, shift of a block to the next device around the ring)."""
  if axis_name is None:
    return 1, lambda x: x
  n = jax.lax.psum(1, axis_name)
  perm = [(i, (i + 1) % n) for i in range(n)]
  return n, lambda x: jax.lax.ppermute(x, axis_name, perm)


def _varying(axis_name, *arrays):
  """Marks fresh accumulators as per-device values (shard_map's scan needs matching types)."""
  if axis_name is None:
    return arrays
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)

  def varying(a):
    missing = tuple(n for n in names if n not in jax.typeof(a).manual_axis_type.varying)
    return jax.lax.pcast(a, missing, to="varying") if missing else a
  return tuple(varying(a) for a in arrays)


def _chunks(x, chunk):
  return x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])  # [n_chunks, chunk, ...]


def _block_pass(zimg, img_valid, ztxt_block, txt_valid, temperature, bias, chunk, fn, carry):
  """Scans image chunks against one text block;
  fn(carry, index, img_chunk, pair_mask, txt, temperature, bias) -> carry, where pair_mask
  [chunk, b_txt] is None without `valid`."""
  def body(carry, inputs):
    index, img_chunk, chunk_valid = inputs
    mask = None if chunk_valid is None else chunk_valid[:, None] & txt_valid[None, :]
    return fn(carry, index, img_chunk, mask, ztxt_block, temperature, bias), None
  n_chunks = zimg.shape[0] // chunk
  chunk_valid = None if img_valid is None else _chunks(img_valid, chunk)
  carry, _ = jax.lax.scan(body, carry,
                          (jnp.arange(n_chunks), _chunks(zimg, chunk), chunk_valid))
  return carry


def _add_rows(x, start, rows):
  """x with `rows` added to x[start:start + len(rows)] (start may be traced)."""
  current = jax.lax.dynamic_slice_in_dim(x, start, rows.shape[0])
  return jax.lax.dynamic_update_slice_in_dim(x, current + rows, start, 0)


def _diag_mask(chunk, index, n_txt, same_block):
  """[chunk, n_txt] True on the positive pairs of image chunk `index` of a block."""
  rows = index * chunk + jnp.arange(chunk)
  return (rows[:, None] == jnp.arange(n_txt)[None, :]) & same_block


def _masked(values, mask, fill):
  return values if mask is None else jnp.where(mask, values, fill)


def _softmax_stats(zimg, ztxt, temperature, valid, chunk, axis_name):
  """Row and column log-sum-exps and the positive logits, by chunks (and around the ring)."""
  n_dev, shift = _ring(axis_name)
  b = zimg.shape[0]

  def fn(carry, index, img_chunk, mask, txt, temperature, bias):
    del bias
    row_lse, col_max, col_sum, pos, same = carry
    logits = _masked(temperature * (img_chunk @ txt.T), mask, NEG)  # [chunk, b]
    start = index * chunk
    old = jax.lax.dynamic_slice_in_dim(row_lse, start, chunk)
    new = jnp.logaddexp(old, jax.nn.logsumexp(logits, axis=1))
    row_lse = jax.lax.dynamic_update_slice_in_dim(row_lse, new, start, 0)
    chunk_max = logits.max(0)
    new_max = jnp.maximum(col_max, chunk_max)
    col_sum = (col_sum * jnp.exp(col_max - new_max)
               + jnp.exp(logits - new_max).sum(0))
    diag = jnp.where(_diag_mask(chunk, index, b, same), logits, 0.0).sum(1)
    pos = _add_rows(pos, start, diag)
    return row_lse, new_max, col_sum, pos, same

  row_lse, pos, col_max, col_sum = _varying(
      axis_name, jnp.full((b,), -jnp.inf), jnp.zeros((b,)), jnp.full((b,), -jnp.inf),
      jnp.zeros((b,)))
  txt, txt_valid = ztxt, valid
  for step in range(n_dev):  # The text block held now came from device (me - step).
    same = jnp.asarray(step == 0)  # Only a device's own texts hold its positives.
    row_lse, col_max, col_sum, pos, _ = _block_pass(
        zimg, valid, txt, txt_valid, temperature, None, chunk, fn,
        (row_lse, col_max, col_sum, pos, same))
    txt, col_max, col_sum = shift(txt), shift(col_max), shift(col_sum)
    txt_valid = None if valid is None else shift(txt_valid)
  col_lse = col_max + jnp.log(col_sum)  # Back home after n_dev shifts: own texts' columns.
  return row_lse, col_lse, pos


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _softmax_loss(zimg, ztxt, temperature, valid, chunk, axis_name):
  return _softmax_fwd(zimg, ztxt, temperature, valid, chunk, axis_name)[0]


def _global_mean(per_example, valid, axis_name):
  """Mean over the (valid) examples of all devices."""
  if valid is not None:
    total = jnp.where(valid, per_example, 0.0).sum()
    if axis_name is not None:
      total = jax.lax.psum(total, axis_name)
    return total / _valid_count(valid, axis_name)
  total, count = per_example.sum(), per_example.shape[0]
  if axis_name is not None:
    total, count = jax.lax.psum(total, axis_name), count * jax.lax.psum(1, axis_name)
  return total / count


def _softmax_fwd(zimg, ztxt, temperature, valid, chunk, axis_name):
  row_lse, col_lse, pos = _softmax_stats(zimg, ztxt, temperature, valid, chunk, axis_name)
  loss = _global_mean(0.5 * (row_lse + col_lse) - pos, valid, axis_name)
  return loss, (zimg, ztxt, temperature, valid, row_lse, col_lse)


def _softmax_bwd(chunk, axis_name, residuals, g):
  zimg, ztxt, temperature, valid, row_lse, col_lse = residuals
  n_dev, shift = _ring(axis_name)
  b = zimg.shape[0]
  count = b * n_dev if valid is None else _valid_count(valid, axis_name)
  scale = g / (2.0 * count)  # d loss / d logit = scale · (p_row + p_col − 2·1[i=j]).

  def fn(carry, index, img_chunk, mask, txt, temperature, bias):
    del bias
    d_img, d_txt, d_t, col_lse_block, same = carry
    dots = img_chunk @ txt.T  # [chunk, b]
    logits = temperature * dots
    start = index * chunk
    lse = jax.lax.dynamic_slice_in_dim(row_lse, start, chunk)
    grad = (jnp.exp(logits - lse[:, None]) + jnp.exp(logits - col_lse_block[None, :])
            - 2.0 * _diag_mask(chunk, index, b, same)) * scale  # [chunk, b]
    grad = _masked(grad, mask, 0.0)
    d_img = _add_rows(d_img, start, temperature * grad @ txt)
    d_txt = d_txt + temperature * grad.T @ img_chunk
    d_t = d_t + (grad * dots).sum()
    return d_img, d_txt, d_t, col_lse_block, same

  d_img, d_txt, d_t = _varying(axis_name, jnp.zeros_like(zimg), jnp.zeros_like(ztxt),
                                jnp.zeros(()))
  txt, txt_valid, col_block = ztxt, valid, col_lse
  for step in range(n_dev):
    same = jnp.asarray(step == 0)  # Only a device's own texts hold its positives.
    d_img, d_txt, d_t, _, _ = _block_pass(zimg, valid, txt, txt_valid, temperature, None,
                                          chunk, fn, (d_img, d_txt, d_t, col_block, same))
    txt, d_txt, col_block = shift(txt), shift(d_txt), shift(col_block)
    txt_valid = None if valid is None else shift(txt_valid)
  if axis_name is not None:
    d_t = jax.lax.psum(d_t, axis_name)
  return d_img, d_txt, jnp.reshape(d_t, jnp.shape(temperature)), None


_softmax_loss.defvjp(_softmax_fwd, _softmax_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _sigmoid_loss(zimg, ztxt, temperature, bias, valid, chunk, axis_name):
  return _sigmoid_fwd(zimg, ztxt, temperature, bias, valid, chunk, axis_name)[0]


def _sigmoid_fwd(zimg, ztxt, temperature, bias, valid, chunk, axis_name):
  n_dev, shift = _ring(axis_name)
  b = zimg.shape[0]

  def fn(total, index, img_chunk, mask, txt, temperature, bias):
    total, same = total
    logits = _logits(img_chunk, txt, temperature, bias)
    labels = jnp.where(_diag_mask(chunk, index, b, same), 1.0, -1.0)
    return total - _masked(jax.nn.log_sigmoid(labels * logits), mask, 0.0).sum(), same

  (total,), txt, txt_valid = _varying(axis_name, jnp.zeros(())), ztxt, valid
  for step in range(n_dev):
    same = jnp.asarray(step == 0)  # Only a device's own texts hold its positives.
    total, _ = _block_pass(zimg, valid, txt, txt_valid, temperature, bias, chunk, fn,
                           (total, same))
    txt = shift(txt)
    txt_valid = None if valid is None else shift(txt_valid)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  count = b * n_dev if valid is None else _valid_count(valid, axis_name)
  return total / count, (zimg, ztxt, temperature, bias, valid)


def _sigmoid_bwd(chunk, axis_name, residuals, g):
  zimg, ztxt, temperature, bias, valid = residuals
  n_dev, shift = _ring(axis_name)
  b = zimg.shape[0]
  scale = g / (b * n_dev if valid is None else _valid_count(valid, axis_name))

  def fn(carry, index, img_chunk, mask, txt, temperature, bias):
    d_img, d_txt, d_t, d_b, same = carry
    dots = img_chunk @ txt.T  # [chunk, b]
    logits = temperature * dots + bias
    labels = jnp.where(_diag_mask(chunk, index, b, same), 1.0, -1.0)
    grad = _masked(-labels * jax.nn.sigmoid(-labels * logits) * scale, mask, 0.0)
    start = index * chunk
    d_img = _add_rows(d_img, start, temperature * grad @ txt)
    return (d_img, d_txt + temperature * grad.T @ img_chunk, d_t + (grad * dots).sum(),
            d_b + grad.sum(), same)

  d_img, d_txt, d_t, d_b = _varying(axis_name, jnp.zeros_like(zimg), jnp.zeros_like(ztxt),
                                     jnp.zeros(()), jnp.zeros(()))
  txt, txt_valid = ztxt, valid
  for step in range(n_dev):
    same = jnp.asarray(step == 0)  # Only a device's own texts hold its positives.
    d_img, d_txt, d_t, d_b, _ = _block_pass(zimg, valid, txt, txt_valid, temperature, bias,
                                            chunk, fn, (d_img, d_txt, d_t, d_b, same))
    txt, d_txt = shift(txt), shift(d_txt)
    txt_valid = None if valid is None else shift(txt_valid)
  if axis_name is not None:
    d_t, d_b = jax.lax.psum(d_t, axis_name), jax.lax.psum(d_b, axis_name)
  return (d_img, d_txt, jnp.reshape(d_t, jnp.shape(temperature)),
          jnp.reshape(d_b, jnp.shape(bias)), None)


_sigmoid_loss.defvjp(_sigmoid_fwd, _sigmoid_bwd)


def _block_logits(own, other_ref, other_valid_ref, own_valid, j, block):
  """Logits [own rows, block] of `own` against other block j, their pair mask, its start."""
  start = pl.multiple_of(j * block, block)
  other = other_ref[pl.ds(start, block), :]  # [block, D]
  logits = jax.lax.dot_general(own, other, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                               preferred_element_type=jnp.float32)
  mask = own_valid & (other_valid_ref[:, pl.ds(start, block)] > 0)  # [rows, block]
  return logits, mask, other, start


def _stats_kernel(own_ref, other_ref, own_valid_ref, other_valid_ref, *out_refs, kind, block):
  """One block of own rows against all other rows: softmax row log-sum-exps [rows, 1] and
  this block's column max / sum-exp [1, n_other]; sigmoid Σ_j softplus(l_ij) [rows, 1]."""
  own = own_ref[...]  # [rows, D]
  own_valid = own_valid_ref[...] > 0  # [rows, 1]
  rows = own.shape[0]
  n_blocks = other_ref.shape[0] // block
  if kind == "sigmoid":
    def add_block(j, total):
      logits, mask, _, _ = _block_logits(own, other_ref, other_valid_ref, own_valid, j, block)
      softplus = jnp.maximum(logits, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(logits)))
      return total + jnp.sum(jnp.where(mask, softplus, 0.0), axis=1, keepdims=True)
    out_refs[0][...] = jax.lax.fori_loop(0, n_blocks, add_block,
                                         jnp.zeros((rows, 1), jnp.float32))
    return
  row_lse_ref, col_max_ref, col_sum_ref = out_refs

  def add_block(j, carry):
    row_max, row_sum = carry  # [rows, 1]
    logits, mask, _, start = _block_logits(own, other_ref, other_valid_ref, own_valid, j,
                                           block)
    logits = jnp.where(mask, logits, NEG)
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=1, keepdims=True))
    row_sum = (row_sum * jnp.exp(row_max - new_max)
               + jnp.sum(jnp.exp(logits - new_max), axis=1, keepdims=True))
    col_max = jnp.max(logits, axis=0, keepdims=True)  # [1, block]
    col_max_ref[:, pl.ds(start, block)] = col_max
    col_sum_ref[:, pl.ds(start, block)] = jnp.sum(jnp.exp(logits - col_max), axis=0,
                                                  keepdims=True)
    return new_max, row_sum

  row_max, row_sum = jax.lax.fori_loop(
      0, n_blocks, add_block,
      (jnp.full((rows, 1), NEG, jnp.float32), jnp.zeros((rows, 1), jnp.float32)))
  row_lse_ref[...] = row_max + jnp.log(row_sum)


def _grad_kernel(own_ref, other_ref, own_valid_ref, other_valid_ref, *refs, kind, block):
  """Σ_j dl_ij · other_j for one block of own rows [rows, D], recomputing each logit block;
  dl = p_row + p_col (softmax, from the saved log-sum-exps) or σ(l) (sigmoid), on valid pairs.
  Symmetric in own / other, so the same kernel gives both sides' gradients."""
  if kind == "softmax":
    own_lse_ref, other_lse_ref, out_ref = refs
  else:
    (out_ref,) = refs
  own = own_ref[...]
  own_valid = own_valid_ref[...] > 0

  def add_block(j, acc):
    logits, mask, other, start = _block_logits(own, other_ref, other_valid_ref, own_valid, j,
                                               block)
    if kind == "softmax":
      grad = (jnp.exp(logits - own_lse_ref[...])
              + jnp.exp(logits - other_lse_ref[:, pl.ds(start, block)]))
    else:
      grad = 1.0 / (1.0 + jnp.exp(-logits))
    grad = jnp.where(mask, grad, 0.0)  # [rows, block]
    return acc + jnp.dot(grad, other, precision=_HIGHEST, preferred_element_type=jnp.float32)

  out_ref[...] = jax.lax.fori_loop(0, other_ref.shape[0] // block, add_block,
                                   jnp.zeros(own.shape, jnp.float32))


def _compiler_params(backend):
  """Triton on GPU (pallas_call's GPU default is Mosaic GPU), parallel blocks on TPU."""
  if backend == "gpu":
    return plt.CompilerParams(num_warps=4, num_stages=2)
  if backend == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel",))
  return None


def _interpret(backend, like):
  """Compiled on GPU / TPU; elsewhere Pallas' HLO interpreter, or inside shard_map (which it
  fails to type: its kernel constants are not per-device values) the slower TPU one."""
  if backend in ("gpu", "tpu"):
    return False
  return pltpu.InterpretParams() if jax.typeof(like).manual_axis_type.varying else True


def _kernel_call(kernel, own, other, own_valid, other_valid, extra, out_shape, out_specs,
                 block, backend):
  """Grid over blocks of own rows (interpret mode off GPU / TPU); `other` (and its [1, n]
  vectors) is read whole and looped over in blocks inside the kernel. extra: (own [n, 1]
  vector, other [1, n] vector)."""
  n, width = own.shape
  own_rows = lambda cols: pl.BlockSpec((block, cols), lambda i: (i, 0))
  whole = lambda shape: pl.BlockSpec(shape, lambda i: (0, 0))
  in_specs = [own_rows(width), whole(other.shape), own_rows(1), whole((1, n))]
  inputs = [own, other, own_valid[:, None], other_valid[None, :]]
  if extra:
    in_specs += [own_rows(1), whole((1, n))]
    inputs += [extra[0][:, None], extra[1][None, :]]
  return pl.pallas_call(functools.partial(kernel, block=block), grid=(n // block,),
                        in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        compiler_params=_compiler_params(backend),
                        interpret=_interpret(backend, own))(*inputs)


def _out_struct(shape, like):
  """A float32 kernel output varying over the same shard_map axes as `like`."""
  return jax.ShapeDtypeStruct(shape, jnp.float32,
                              manual_axis_type=jax.typeof(like).manual_axis_type)


def _block_stats(own, other, own_valid, other_valid, kind, block, backend):
  """Softmax: (row lse [n], column max [n], column sum-exp [n]) of own against other;
  sigmoid: (Σ_j softplus(l_ij) [n],)."""
  n = own.shape[0]
  row = _out_struct((n, 1), own)
  row_spec = pl.BlockSpec((block, 1), lambda i: (i, 0))
  kernel = functools.partial(_stats_kernel, kind=kind)
  if kind == "sigmoid":
    (total,) = _kernel_call(kernel, own, other, own_valid, other_valid, None, [row],
                            [row_spec], block, backend)
    return (total[:, 0],)
  col = _out_struct((n // block, 1, n), own)  # Per own block.
  col_spec = pl.BlockSpec((None, 1, n), lambda i: (i, 0, 0))
  row_lse, col_max, col_sum = _kernel_call(kernel, own, other, own_valid, other_valid, None,
                                           [row, col, col], [row_spec, col_spec, col_spec],
                                           block, backend)
  col_max, col_sum = col_max[:, 0], col_sum[:, 0]  # [n_blocks, n]
  new_max = col_max.max(0)
  return row_lse[:, 0], new_max, (col_sum * jnp.exp(col_max - new_max)).sum(0)


def _block_grad(own, other, own_valid, other_valid, lse, kind, block, backend):
  """[n, D]: Σ_j dl_ij · other_j over valid pairs (lse: (own's, other's) for softmax)."""
  out = _out_struct(own.shape, own)
  spec = pl.BlockSpec((block, own.shape[1]), lambda i: (i, 0))
  return _kernel_call(functools.partial(_grad_kernel, kind=kind), own, other, own_valid,
                      other_valid, lse, out, spec, block, backend)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _pallas_loss(zs, zt, valid, kind, block, axis_name, backend):
  return _pallas_fwd(zs, zt, valid, kind, block, axis_name, backend)[0]


def _pallas_fwd(zs, zt, valid, kind, block, axis_name, backend):
  """zs, zt [n, D'] (temperature folded into zs; the sigmoid's bias in one column), valid
  [n] float: logits = zs @ ztᵀ."""
  n_dev, shift = _ring(axis_name)
  stats = functools.partial(_block_stats, kind=kind, block=block, backend=backend)
  pos = jnp.sum(zs * zt, axis=1)  # [n] this device's positive logits
  txt, txt_valid = zt, valid
  if kind == "sigmoid":  # Σ over pairs of softplus(l) (all as negatives), minus Σ_i l_ii.
    (total,) = _varying(axis_name, jnp.zeros(()))
    for _ in range(n_dev):
      (rows,) = stats(zs, txt, valid, txt_valid)
      total = total + rows.sum()
      txt, txt_valid = shift(txt), shift(txt_valid)
    total = total - jnp.sum(valid * pos)
    lse = None
  else:
    row_lse, col_max, col_sum = _varying(axis_name, jnp.full(pos.shape, -jnp.inf),
                                         jnp.full(pos.shape, -jnp.inf), jnp.zeros(pos.shape))
    for _ in range(n_dev):
      block_lse, block_max, block_sum = stats(zs, txt, valid, txt_valid)
      row_lse = jnp.logaddexp(row_lse, block_lse)
      new_max = jnp.maximum(col_max, block_max)
      col_sum = col_sum * jnp.exp(col_max - new_max) + block_sum * jnp.exp(block_max - new_max)
      txt, txt_valid = shift(txt), shift(txt_valid)
      col_max, col_sum = shift(new_max), shift(col_sum)
    lse = (row_lse, col_max + jnp.log(col_sum))  # Back home: own texts' columns.
    total = 0.5 * jnp.sum(jnp.where(valid > 0, lse[0] + lse[1] - 2.0 * pos, 0.0))
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  return total / _valid_count(valid, axis_name), (zs, zt, valid, lse)


def _pallas_bwd(kind, block, axis_name, backend, residuals, g):
  zs, zt, valid, lse = residuals
  n_dev, shift = _ring(axis_name)
  grad = functools.partial(_block_grad, kind=kind, block=block, backend=backend)
  d_zs, d_txt = _varying(axis_name, jnp.zeros_like(zs), jnp.zeros_like(zt))
  txt, txt_valid = zt, valid
  row_lse, col_lse = lse if kind == "softmax" else (None, None)
  for _ in range(n_dev):
    d_zs = d_zs + grad(zs, txt, valid, txt_valid, None if lse is None else (row_lse, col_lse))
    d_txt = d_txt + grad(txt, zs, txt_valid, valid,
                         None if lse is None else (col_lse, row_lse))
    txt, txt_valid, d_txt = shift(txt), shift(txt_valid), shift(d_txt)
    col_lse = None if lse is None else shift(col_lse)
  positives = 2.0 if kind == "softmax" else 1.0  # d/dl_ii of the −l_ii terms.
  scale = g / ((2.0 if kind == "softmax" else 1.0) * _valid_count(valid, axis_name))
  d_zs = scale * (d_zs - positives * valid[:, None] * zt)
  d_zt = scale * (d_txt - positives * valid[:, None] * zs)
  return d_zs, d_zt, jnp.zeros_like(valid)


_pallas_loss.defvjp(_pallas_fwd, _pallas_bwd)


def _power_of_two_at_most(n: int) -> int:
  return 1 << (n.bit_length() - 1)


def _pallas_layout(b, width, chunk_size, backend):
  """(block rows, padded batch, padded width) for the kernels on `backend`."""
  padded_width = max(16, 1 << (width - 1).bit_length() if backend == "gpu"
                     else -(-width // 128) * 128)
  if chunk_size is None:  # GPU: [block, width] tiles of at most 16k floats (Triton registers).
    chunk_size = 128 if backend != "gpu" else max(16, (1 << 14) // padded_width)
  whole = max(16, 1 << (b - 1).bit_length())  # One power-of-two block holding the batch.
  block = min(max(16, _power_of_two_at_most(min(chunk_size, 128))), whole)
  if backend == "tpu":  # Mosaic: [1, block] lane slices need block % 128 == 0 or one block.
    block = min(128, whole)
  return block, -(-b // block) * block, padded_width


def pallas_loss(zimg: jax.Array, ztxt: jax.Array, *, kind: str, temperature: jax.Array,
                bias: jax.Array | None, valid: jax.Array | None, chunk_size: int | None,
                axis_name: str | None, backend: str | None = None) -> jax.Array:
  """impl="pallas" for kernels built for `backend` ("gpu": Triton, "tpu": Mosaic, else
  interpret mode; None: the default backend): pads, folds temperature (and bias) into the
  two matrices, then runs the kernels (see the module docstring)."""
  backend = backend or jax.default_backend()
  b = zimg.shape[0]
  zs, zt = temperature * zimg, ztxt  # [b, D]
  if kind == "sigmoid":  # logits + bias = [zs, bias] · [zt, 1]
    zs = jnp.concatenate([zs, bias * jnp.ones((b, 1), jnp.float32)], axis=1)
    zt = jnp.concatenate([zt, jnp.ones((b, 1), jnp.float32)], axis=1)
  block, n, padded_width = _pallas_layout(b, zs.shape[1], chunk_size, backend)
  pad = ((0, n - b), (0, padded_width - zs.shape[1]))
  valid = jnp.ones((b,), jnp.float32) if valid is None else valid.astype(jnp.float32)
  return _pallas_loss(jnp.pad(zs, pad), jnp.pad(zt, pad), jnp.pad(valid, (0, n - b)), kind,
                      block, axis_name, backend)


def contrastive_loss(zimg: jax.Array, ztxt: jax.Array, *, kind: str = "softmax",
                     temperature: jax.Array | float, bias: jax.Array | float | None = None,
                     chunk_size: int | None = None, axis_name: str | None = None,
                     impl: str = "auto", valid: jax.Array | None = None) -> jax.Array:
  """Mean contrastive loss over the global batch (its valid pairs); zimg, ztxt [B_local, D],
  valid [B_local] bool or None (all real) -> scalar."""
  if kind not in KINDS:
    raise ValueError(f"contrastive_loss kind must be one of {', '.join(KINDS)}; got {kind!r}.")
  if impl not in IMPLS:
    raise ValueError(f"contrastive_loss impl must be one of {', '.join(IMPLS)}; got {impl!r}.")
  if zimg.ndim != 2 or zimg.shape != ztxt.shape:
    raise ValueError(f"contrastive_loss needs zimg and ztxt of one shape [B, D]; got "
                     f"{zimg.shape} and {ztxt.shape}.")
  if valid is not None and jnp.shape(valid) != zimg.shape[:1]:
    raise ValueError(f"contrastive_loss valid must have shape [B] = {zimg.shape[:1]}; got "
                     f"{jnp.shape(valid)}.")
  if kind == "sigmoid" and bias is None:
    raise ValueError("contrastive_loss kind='sigmoid' needs a bias (SigLIP's learned b).")
  if impl == "auto":
    impl = "pallas" if jax.default_backend() in ("gpu", "tpu") else "chunked"
  b = zimg.shape[0]
  chunk = min(chunk_size or 256, b)
  if impl == "chunked" and b % chunk:
    raise ValueError(f"contrastive_loss chunk_size {chunk} must divide the per-device batch "
                     f"{b}.")
  zimg, ztxt = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
  temperature = jnp.asarray(temperature, jnp.float32)
  bias = None if bias is None else jnp.asarray(bias, jnp.float32)
  valid = None if valid is None else jnp.asarray(valid, bool)
  if impl == "reference":
    if axis_name is not None:
      gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
      zimg, ztxt = gather(zimg), gather(ztxt)
      valid = None if valid is None else gather(valid)
    return reference(zimg, ztxt, kind=kind, temperature=temperature, bias=bias, valid=valid)
  if impl == "pallas":
    return pallas_loss(zimg, ztxt, kind=kind, temperature=temperature, bias=bias, valid=valid,
                       chunk_size=chunk_size, axis_name=axis_name)
  if kind == "softmax":
    return _softmax_loss(zimg, ztxt, temperature, valid, chunk, axis_name)
  return _sigmoid_loss(zimg, ztxt, temperature, bias, valid, chunk, axis_name)
