"""Image-text contrastive losses (CLIP softmax, SigLIP sigmoid) without the B x B logits.

`contrastive_loss(zimg, ztxt, *, kind, temperature, bias=None, chunk_size=None,
axis_name=None, impl="auto")` returns the mean loss over the global batch, with
logits = temperature · zimg @ ztxtᵀ (+ bias for "sigmoid"); `temperature` is the
multiplicative scale (big_vision's `exp(t)`), so it and `bias` can be learned.

  softmax  ½ · mean_i [lse_j l_ij − l_ii] + ½ · mean_j [lse_i l_ij − l_jj]
  sigmoid  −(1/B) · Σ_ij log σ(y_ij · l_ij), y_ij = +1 if i = j else −1

impl:
  "reference"  the naive loss on the full [B, B] logits (gathered across `axis_name`).
  "chunked"    images in chunks of `chunk_size` rows: a `lax.scan` whose custom VJP
               recomputes each [chunk, B] block of logits in the backward pass, so memory is
               O(B · chunk). With `axis_name` (call it inside `shard_map`, zimg / ztxt being
               this device's rows), a ring: the text block (with its running column
               statistics and, backwards, its gradient) moves to the next device by
               `ppermute`, so a device only ever holds its own images against one text block.
  "auto"       "chunked".
"""
import functools

import jax
import jax.numpy as jnp

KINDS = ("softmax", "sigmoid")
IMPLS = ("auto", "reference", "chunked")


def _logits(zimg, ztxt, temperature, bias):
  logits = temperature * (zimg @ ztxt.T)  # [b_img, b_txt]
  return logits if bias is None else logits + bias


def reference(zimg: jax.Array, ztxt: jax.Array, *, kind: str, temperature: jax.Array,
              bias: jax.Array | None = None) -> jax.Array:
  """The naive loss on the full logits; zimg, ztxt [B, D] -> scalar."""
  logits = _logits(zimg.astype(jnp.float32), ztxt.astype(jnp.float32), temperature, bias)
  n = logits.shape[0]
  if kind == "softmax":
    diag = jnp.diagonal(logits)
    rows = jax.nn.logsumexp(logits, axis=1) - diag
    cols = jax.nn.logsumexp(logits, axis=0) - diag
    return 0.5 * (rows.mean() + cols.mean())
  labels = 2.0 * jnp.eye(n) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n


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
  return tuple(a if axis_name in jax.typeof(a).manual_axis_type.varying else
               jax.lax.pcast(a, axis_name, to="varying") for a in arrays)


def _chunks(x, chunk):
  return x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])  # [n_chunks, chunk, ...]


def _block_pass(zimg, ztxt_block, temperature, bias, chunk, fn, carry):
  """Scans image chunks against one text block; fn(carry, index, img_chunk) -> carry."""
  def body(carry, inputs):
    index, img_chunk = inputs
    return fn(carry, index, img_chunk, ztxt_block, temperature, bias), None
  n_chunks = zimg.shape[0] // chunk
  carry, _ = jax.lax.scan(body, carry, (jnp.arange(n_chunks), _chunks(zimg, chunk)))
  return carry


def _add_rows(x, start, rows):
  """x with `rows` added to x[start:start + len(rows)] (start may be traced)."""
  current = jax.lax.dynamic_slice_in_dim(x, start, rows.shape[0])
  return jax.lax.dynamic_update_slice_in_dim(x, current + rows, start, 0)


def _diag_mask(chunk, index, n_txt, same_block):
  """[chunk, n_txt] True on the positive pairs of image chunk `index` of a block."""
  rows = index * chunk + jnp.arange(chunk)
  return (rows[:, None] == jnp.arange(n_txt)[None, :]) & same_block


def _softmax_stats(zimg, ztxt, temperature, chunk, axis_name):
  """Row and column log-sum-exps and the positive logits, by chunks (and around the ring)."""
  n_dev, shift = _ring(axis_name)
  b = zimg.shape[0]

  def fn(carry, index, img_chunk, txt, temperature, bias):
    del bias
    row_lse, col_max, col_sum, pos, same = carry
    logits = temperature * (img_chunk @ txt.T)  # [chunk, b]
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
  txt = ztxt
  for step in range(n_dev):  # The text block held now came from device (me - step).
    same = jnp.asarray(step == 0)  # Only a device's own texts hold its positives.
    row_lse, col_max, col_sum, pos, _ = _block_pass(
        zimg, txt, temperature, None, chunk, fn, (row_lse, col_max, col_sum, pos, same))
    txt, col_max, col_sum = shift(txt), shift(col_max), shift(col_sum)
  col_lse = col_max + jnp.log(col_sum)  # Back home after n_dev shifts: own texts' columns.
  return row_lse, col_lse, pos


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _softmax_loss(zimg, ztxt, temperature, chunk, axis_name):
  return _softmax_fwd(zimg, ztxt, temperature, chunk, axis_name)[0]


def _global_mean(per_example, axis_name):
  total, count = per_example.sum(), per_example.shape[0]
  if axis_name is not None:
    total, count = jax.lax.psum(total, axis_name), count * jax.lax.psum(1, axis_name)
  return total / count


def _softmax_fwd(zimg, ztxt, temperature, chunk, axis_name):
  row_lse, col_lse, pos = _softmax_stats(zimg, ztxt, temperature, chunk, axis_name)
  loss = _global_mean(0.5 * (row_lse + col_lse) - pos, axis_name)
  return loss, (zimg, ztxt, temperature, row_lse, col_lse)


def _softmax_bwd(chunk, axis_name, residuals, g):
  zimg, ztxt, temperature, row_lse, col_lse = residuals
  n_dev, shift = _ring(axis_name)
  b = zimg.shape[0]
  scale = g / (2.0 * b * n_dev)  # d loss / d logit = scale · (p_row + p_col − 2·1[i=j]).

  def fn(carry, index, img_chunk, txt, temperature, bias):
    del bias
    d_img, d_txt, d_t, col_lse_block, same = carry
    dots = img_chunk @ txt.T  # [chunk, b]
    logits = temperature * dots
    start = index * chunk
    lse = jax.lax.dynamic_slice_in_dim(row_lse, start, chunk)
    grad = (jnp.exp(logits - lse[:, None]) + jnp.exp(logits - col_lse_block[None, :])
            - 2.0 * _diag_mask(chunk, index, b, same)) * scale  # [chunk, b]
    d_img = _add_rows(d_img, start, temperature * grad @ txt)
    d_txt = d_txt + temperature * grad.T @ img_chunk
    d_t = d_t + (grad * dots).sum()
    return d_img, d_txt, d_t, col_lse_block, same

  d_img, d_txt, d_t = _varying(axis_name, jnp.zeros_like(zimg), jnp.zeros_like(ztxt),
                                jnp.zeros(()))
  txt, col_block = ztxt, col_lse
  for step in range(n_dev):
    same = jnp.asarray(step == 0)  # Only a device's own texts hold its positives.
    d_img, d_txt, d_t, _, _ = _block_pass(zimg, txt, temperature, None, chunk, fn,
                                          (d_img, d_txt, d_t, col_block, same))
    txt, d_txt, col_block = shift(txt), shift(d_txt), shift(col_block)
  if axis_name is not None:
    d_t = jax.lax.psum(d_t, axis_name)
  return d_img, d_txt, jnp.reshape(d_t, jnp.shape(temperature))


_softmax_loss.defvjp(_softmax_fwd, _softmax_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sigmoid_loss(zimg, ztxt, temperature, bias, chunk, axis_name):
  return _sigmoid_fwd(zimg, ztxt, temperature, bias, chunk, axis_name)[0]


def _sigmoid_fwd(zimg, ztxt, temperature, bias, chunk, axis_name):
  n_dev, shift = _ring(axis_name)
  b = zimg.shape[0]

  def fn(total, index, img_chunk, txt, temperature, bias):
    total, same = total
    logits = _logits(img_chunk, txt, temperature, bias)
    labels = jnp.where(_diag_mask(chunk, index, b, same), 1.0, -1.0)
    return total - jax.nn.log_sigmoid(labels * logits).sum(), same

  (total,), txt = _varying(axis_name, jnp.zeros(())), ztxt
  for step in range(n_dev):
    same = jnp.asarray(step == 0)  # Only a device's own texts hold its positives.
    total, _ = _block_pass(zimg, txt, temperature, bias, chunk, fn, (total, same))
    txt = shift(txt)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  return total / (b * n_dev), (zimg, ztxt, temperature, bias)


def _sigmoid_bwd(chunk, axis_name, residuals, g):
  zimg, ztxt, temperature, bias = residuals
  n_dev, shift = _ring(axis_name)
  b = zimg.shape[0]
  scale = g / (b * n_dev)

  def fn(carry, index, img_chunk, txt, temperature, bias):
    d_img, d_txt, d_t, d_b, same = carry
    dots = img_chunk @ txt.T  # [chunk, b]
    logits = temperature * dots + bias
    labels = jnp.where(_diag_mask(chunk, index, b, same), 1.0, -1.0)
    grad = -labels * jax.nn.sigmoid(-labels * logits) * scale  # d loss / d logit
    start = index * chunk
    d_img = _add_rows(d_img, start, temperature * grad @ txt)
    return (d_img, d_txt + temperature * grad.T @ img_chunk, d_t + (grad * dots).sum(),
            d_b + grad.sum(), same)

  d_img, d_txt, d_t, d_b = _varying(axis_name, jnp.zeros_like(zimg), jnp.zeros_like(ztxt),
                                     jnp.zeros(()), jnp.zeros(()))
  txt = ztxt
  for step in range(n_dev):
    same = jnp.asarray(step == 0)  # Only a device's own texts hold its positives.
    d_img, d_txt, d_t, d_b, _ = _block_pass(zimg, txt, temperature, bias, chunk, fn,
                                            (d_img, d_txt, d_t, d_b, same))
    txt, d_txt = shift(txt), shift(d_txt)
  if axis_name is not None:
    d_t, d_b = jax.lax.psum(d_t, axis_name), jax.lax.psum(d_b, axis_name)
  return (d_img, d_txt, jnp.reshape(d_t, jnp.shape(temperature)),
          jnp.reshape(d_b, jnp.shape(bias)))


_sigmoid_loss.defvjp(_sigmoid_fwd, _sigmoid_bwd)


def contrastive_loss(zimg: jax.Array, ztxt: jax.Array, *, kind: str = "softmax",
                     temperature: jax.Array | float, bias: jax.Array | float | None = None,
                     chunk_size: int | None = None, axis_name: str | None = None,
                     impl: str = "auto") -> jax.Array:
  """Mean contrastive loss over the global batch; zimg, ztxt [B_local, D] -> scalar."""
  if kind not in KINDS:
    raise ValueError(f"contrastive_loss kind must be one of {', '.join(KINDS)}; got {kind!r}.")
  if impl not in IMPLS:
    raise ValueError(f"contrastive_loss impl must be one of {', '.join(IMPLS)}; got {impl!r}.")
  if zimg.ndim != 2 or zimg.shape != ztxt.shape:
    raise ValueError(f"contrastive_loss needs zimg and ztxt of one shape [B, D]; got "
                     f"{zimg.shape} and {ztxt.shape}.")
  if kind == "sigmoid" and bias is None:
    raise ValueError("contrastive_loss kind='sigmoid' needs a bias (SigLIP's learned b).")
  b = zimg.shape[0]
  chunk = min(chunk_size or 256, b)
  if b % chunk:
    raise ValueError(f"contrastive_loss chunk_size {chunk} must divide the per-device batch "
                     f"{b}.")
  zimg, ztxt = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
  temperature = jnp.asarray(temperature, jnp.float32)
  if impl == "reference":
    if axis_name is not None:
      gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
      zimg, ztxt = gather(zimg), gather(ztxt)
    return reference(zimg, ztxt, kind=kind, temperature=temperature,
                     bias=None if bias is None else jnp.asarray(bias, jnp.float32))
  if kind == "softmax":
    return _softmax_loss(zimg, ztxt, temperature, chunk, axis_name)
  return _sigmoid_loss(zimg, ztxt, temperature, jnp.asarray(bias, jnp.float32), chunk,
                       axis_name)
