"""Similarity reductions that never hold the [M, K] similarity matrix.

Every similarity loss reduces S = (a kᵀ) / temperature, a [M, D] and k [K, D]
unit rows, to per-row (and per-column) log-sum-exps or to a sum of softplus
terms. Two paths compute the same values and gradients:

  * direct: S in one piece, kept for the backward pass (three matmuls: S,
    dA = G k, dk = Gᵀ a). Fastest while S fits.
  * streamed: `lax.scan` over key chunks of `chunk` columns with an online
    log-sum-exp; a `custom_vjp` recomputes each chunk's S in the backward pass
    (four matmuls, memory O(M x chunk)), as Inf-CL and flash-attention do.

`chunk_size=None` picks the direct path while M x K <= DIRECT_MAX_ELEMENTS and
streams otherwise; an int forces streaming with that chunk (any size: the keys
are padded to a multiple and the padding is masked).

Masks: `exclude` [M, E] int32 names, per row, up to E columns left out of both
that row's and those columns' reductions (the anchor itself, its positive);
negative entries exclude nothing. Column reductions see every row of `a`: in
`shard_map` combine their per-device parts with `common.global_logsumexp`.
"""

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp

# A number option that may also be traced (a learnable temperature or bias).
Scalar = Union[float, jax.Array]

DIRECT_MAX_ELEMENTS = 1 << 28  # 1 GiB of float32 similarities
STREAM_CHUNK_ELEMENTS = 1 << 25  # elements of one streamed [M, chunk] block (128 MiB)
# Unit rows give |S| <= inv_t, so exp(S - inv_t) >= exp(-2 inv_t): no row or column sum
# underflows to 0 in float32 while inv_t <= 40 (t >= 0.025). Then one exponential serves
# both reductions and the backward pass; a smaller temperature takes the max-shifted path.
FIXED_SHIFT_MAX_INV_T = 40.0


def choose_chunk(m: int, k: int, chunk_size: Optional[int]) -> Optional[int]:
  """None (direct path) or the key chunk of the streamed path."""
  if chunk_size is not None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
      raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return min(chunk_size, k)
  if m * k <= DIRECT_MAX_ELEMENTS:
    return None
  return int(max(128, min(k, STREAM_CHUNK_ELEMENTS // max(m, 1))))


def _scores(a, k, inv_t):
  return jnp.einsum("md,kd->mk", a, k, preferred_element_type=jnp.float32) * inv_t


def _mask(exclude, cols, num_valid):
  """[M, c] True where a score is left out: excluded pairs and padded columns."""
  out = cols[None, :] >= num_valid
  for e in range(exclude.shape[1]):
    out = out | (exclude[:, e:e + 1] == cols[None, :])
  return out


def _safe_lse(m, s):
  """log of a running (max, scaled sum); -inf where nothing was summed."""
  return jnp.where(s > 0, m + jnp.log(jnp.where(s > 0, s, 1.0)), -jnp.inf)


def _lse_axis(x, axis):
  m = jnp.max(x, axis=axis, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  return jnp.squeeze(m, axis) + jnp.log(jnp.sum(jnp.exp(x - m), axis=axis))


def _inf_where_unsummed(lse):
  """+inf where nothing was summed, so that exp(s - lse) is 0 there in a backward pass."""
  return jnp.where(jnp.isneginf(lse), jnp.inf, lse)


def _varying_like(args):
  """Casts each float argument to vary over every manual mesh axis any argument
  varies over (inside `shard_map`): a custom_vjp cotangent must have its input's
  type, and a replicated temperature's gradient is a sum over devices (the cast's
  transpose), which JAX then inserts. Outside `shard_map`, unchanged."""
  def axes(x):
    t = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset() if t is None else t.varying
  union = frozenset().union(*(axes(x) for x in args))
  return [jax.lax.pcast(x, tuple(sorted(union - axes(x))), to="varying")
          if union - axes(x) and jnp.issubdtype(x.dtype, jnp.floating) else x for x in args]


def _varying_as(x, like):
  """x cast to vary over the manual mesh axes `like` varies over (scan carries
  inside `shard_map` must keep their type)."""
  t = getattr(jax.typeof(like), "manual_axis_type", None)
  return jax.lax.pcast(x, tuple(sorted(t.varying)), to="varying") if t and t.varying else x


def _chunks(k, chunk):
  """k [K, D] -> ([n, chunk, D] zero-padded, n)."""
  n = -(-k.shape[0] // chunk)
  k = jnp.pad(k, ((0, n * chunk - k.shape[0]), (0, 0)))
  return k.reshape(n, chunk, k.shape[1]), n


# ----------------------------------------------------------------------------
# Log-sum-exp over rows and columns.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lse_streamed(a, k, inv_t, exclude, chunk, want_cols):
  return _lse_streamed_fwd(a, k, inv_t, exclude, chunk, want_cols)[0]


def _lse_streamed_fwd(a, k, inv_t, exclude, chunk, want_cols):
  kc, n = _chunks(k, chunk)
  zero = _varying_as(jnp.zeros((a.shape[0],), jnp.float32), a)
  xs = (kc, jnp.arange(n))

  def scores(k_c, i):
    mask = _mask(exclude, i * chunk + jnp.arange(chunk), k.shape[0])
    return jnp.where(mask, -jnp.inf, _scores(a, k_c, inv_t))

  def fixed(_):  # exp(S - inv_t) cannot underflow (see FIXED_SHIFT_MAX_INV_T): plain sums
    def body(total, xs):
      e = jnp.exp(scores(*xs) - inv_t)
      col = inv_t + jnp.log(jnp.ones((e.shape[0],), e.dtype) @ e) if want_cols else None
      return total + jnp.sum(e, axis=1), col
    total, col = jax.lax.scan(body, zero, xs)
    return inv_t + jnp.log(total), col

  def online(_):  # running max and rescaled sum
    def body(carry, xs):
      m, total = carry
      sc = scores(*xs)
      m_new = jnp.maximum(m, jnp.max(sc, axis=1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      total = total * jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf)) + jnp.sum(
          jnp.exp(sc - m_safe[:, None]), axis=1)
      return (m_new, total), _lse_axis(sc, 0) if want_cols else None
    (m, total), col = jax.lax.scan(body, (zero - jnp.inf, zero), xs)
    return _safe_lse(jnp.where(jnp.isfinite(m), m, 0.0), total), col

  rows, col = jax.lax.cond(inv_t <= FIXED_SHIFT_MAX_INV_T, fixed, online, None)
  cols = col.reshape(-1)[:k.shape[0]] if want_cols else jnp.zeros((0,), jnp.float32)
  return (rows, cols), (a, k, inv_t, exclude, rows, cols)


def _lse_streamed_bwd(chunk, want_cols, res, g):
  a, k, inv_t, exclude, rows, cols = res
  g_rows, g_cols = g
  rows = _inf_where_unsummed(rows)
  kc, n = _chunks(k, chunk)
  pad = n * chunk - k.shape[0]
  if want_cols:
    col_lse = jnp.pad(_inf_where_unsummed(cols), (0, pad), constant_values=jnp.inf).reshape(n, chunk)
    g_col = jnp.pad(g_cols, (0, pad)).reshape(n, chunk)
  else:  # placeholders, unused
    col_lse = g_col = jnp.zeros((n, 1), jnp.float32)

  use_fixed = inv_t <= FIXED_SHIFT_MAX_INV_T

  def body(carry, xs):
    da, dt = carry
    k_c, lse_c, g_c, i = xs
    cols_i = i * chunk + jnp.arange(chunk)
    sc = _scores(a, k_c, inv_t)

    def fixed(sc):  # one exponential: softmax = exp(S - inv_t) * exp(inv_t - lse)
      coef = (g_rows * jnp.exp(inv_t - rows))[:, None]
      if want_cols:
        coef = coef + (g_c * jnp.exp(inv_t - lse_c))[None, :]
      return jnp.exp(sc - inv_t) * coef

    def shifted(sc):
      w = g_rows[:, None] * jnp.exp(sc - rows[:, None])
      if want_cols:
        w = w + g_c[None, :] * jnp.exp(sc - lse_c[None, :])
      return w

    w = jax.lax.cond(use_fixed, fixed, shifted, sc)
    w = jnp.where(_mask(exclude, cols_i, k.shape[0]), 0.0, w)
    dt = dt + jnp.sum(w * sc)
    wd = w.astype(a.dtype)
    da = da + jnp.einsum("mk,kd->md", wd, k_c, preferred_element_type=jnp.float32)
    dk = jnp.einsum("mk,md->kd", wd, a, preferred_element_type=jnp.float32)
    return (da, dt), dk

  zeros = (_varying_as(jnp.zeros(a.shape, jnp.float32), a), _varying_as(jnp.float32(0.0), a))
  (da, dt), dk = jax.lax.scan(body, zeros, (kc, col_lse, g_col, jnp.arange(n)))
  dk = dk.reshape(-1, k.shape[1])[:k.shape[0]]
  return ((da * inv_t).astype(a.dtype), (dk * inv_t).astype(k.dtype),
          (dt / inv_t).astype(jnp.result_type(inv_t)), None)


_lse_streamed.defvjp(_lse_streamed_fwd, _lse_streamed_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lse_direct(a, k, inv_t, exclude, want_cols):
  return _lse_direct_fwd(a, k, inv_t, exclude, want_cols)[0]


def _lse_direct_fwd(a, k, inv_t, exclude, want_cols):
  mask = _mask(exclude, jnp.arange(k.shape[0]), k.shape[0])
  s = _scores(a, k, inv_t)

  def fixed(s):  # R = exp(S - inv_t), 0 where excluded
    e = jnp.where(mask, 0.0, jnp.exp(s - inv_t))
    rows = inv_t + jnp.log(e @ jnp.ones((e.shape[1],), e.dtype))
    # Column sums as a vector-matrix product: contiguous reads, unlike a column reduction.
    cols = (inv_t + jnp.log(jnp.ones((e.shape[0],), e.dtype) @ e) if want_cols
            else jnp.zeros((0,), jnp.float32))
    return e, rows, cols

  def shifted(s):  # R = S, -inf where excluded
    s = jnp.where(mask, -jnp.inf, s)
    cols = _lse_axis(s, 0) if want_cols else jnp.zeros((0,), jnp.float32)
    return s, _lse_axis(s, 1), cols

  use_fixed = inv_t <= FIXED_SHIFT_MAX_INV_T
  r, rows, cols = jax.lax.cond(use_fixed, fixed, shifted, s)
  return (rows, cols), (a, k, inv_t, use_fixed, r, rows, cols)


def _lse_direct_bwd(want_cols, res, g):
  a, k, inv_t, use_fixed, r, rows, cols = res
  g_rows, g_cols = g

  def fixed(r):  # softmax = R * exp(inv_t - lse): no exponential of a matrix
    coef = (g_rows * jnp.exp(inv_t - _inf_where_unsummed(rows)))[:, None]
    if want_cols:
      coef = coef + (g_cols * jnp.exp(inv_t - _inf_where_unsummed(cols)))[None, :]
    w = r * coef
    s = jnp.where(r > 0, inv_t + jnp.log(jnp.where(r > 0, r, 1.0)), 0.0)
    return w, jnp.sum(w * s)

  def shifted(r):  # exp(-inf - x) = 0 at excluded entries: no mask needed
    w = g_rows[:, None] * jnp.exp(r - _inf_where_unsummed(rows)[:, None])
    if want_cols:
      w = w + g_cols[None, :] * jnp.exp(r - _inf_where_unsummed(cols)[None, :])
    return w, jnp.sum(jnp.where(jnp.isfinite(r), w * r, 0.0))

  w, dt = jax.lax.cond(use_fixed, fixed, shifted, r)
  dt = dt / inv_t
  wd = w.astype(a.dtype)
  da = jnp.einsum("mk,kd->md", wd, k, preferred_element_type=jnp.float32) * inv_t
  dk = jnp.einsum("mk,md->kd", wd, a, preferred_element_type=jnp.float32) * inv_t
  return da.astype(a.dtype), dk.astype(k.dtype), dt.astype(jnp.result_type(inv_t)), None


_lse_direct.defvjp(_lse_direct_fwd, _lse_direct_bwd)


def logsumexp(a: jax.Array, k: jax.Array, inv_temperature: Scalar, exclude: Optional[jax.Array] = None,
              *, cols: bool = False, chunk_size: Optional[int] = None
              ) -> tuple[jax.Array, jax.Array]:
  """(row, column) log-sum-exps of S = inv_temperature * a kᵀ, excluded pairs left out.

  Args:
    a: [M, D] unit rows (anchors); k: [K, D] unit rows (keys); same dtype.
    inv_temperature: scalar 1 / temperature (may be traced: it gets a gradient).
    exclude: [M, E] int32 columns left out of row i (and row i left out of those
      columns); -1 for none. None: nothing excluded.
    cols: also reduce the columns (from the same S, no second matmul).
    chunk_size: None = automatic (direct while M x K <= DIRECT_MAX_ELEMENTS),
      else stream over key chunks of this many columns.
  Returns:
    rows [M] = log sum_j exp(S_ij), cols [K] = log sum_i exp(S_ij) ([0] unless
    `cols`), float32; -inf where every entry is excluded.
  """
  if exclude is None:
    exclude = jnp.zeros((a.shape[0], 0), jnp.int32)
  inv_t = jnp.asarray(inv_temperature, jnp.float32)
  chunk = choose_chunk(a.shape[0], k.shape[0], chunk_size)
  a, k, inv_t = _varying_like([a, k, inv_t])
  if chunk is None:
    return _lse_direct(a, k, inv_t, exclude.astype(jnp.int32), cols)
  return _lse_streamed(a, k, inv_t, exclude.astype(jnp.int32), chunk, cols)


# ----------------------------------------------------------------------------
# Sum of softplus (SigLIP's negatives).


def _softplus_terms(a, k_c, inv_t, bias, cols, num_valid):
  x = _scores(a, k_c, inv_t) + bias
  valid = (cols < num_valid)[None, :]
  return x, valid


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softplus_sum(a, k, inv_t, bias, chunk):
  return _softplus_sum_fwd(a, k, inv_t, bias, chunk)[0]


def _softplus_sum_fwd(a, k, inv_t, bias, chunk):
  kc, n = _chunks(k, chunk)

  def body(total, xs):
    k_c, i = xs
    x, valid = _softplus_terms(a, k_c, inv_t, bias, i * chunk + jnp.arange(chunk), k.shape[0])
    return total + jnp.sum(jnp.where(valid, jax.nn.softplus(x), 0.0)), None

  total, _ = jax.lax.scan(body, _varying_as(jnp.float32(0.0), a), (kc, jnp.arange(n)))
  return total, (a, k, inv_t, bias)


def _softplus_sum_bwd(chunk, res, g):
  a, k, inv_t, bias = res
  kc, n = _chunks(k, chunk)

  def body(carry, xs):
    da, dt, db = carry
    k_c, i = xs
    x, valid = _softplus_terms(a, k_c, inv_t, bias, i * chunk + jnp.arange(chunk), k.shape[0])
    w = jnp.where(valid, g * jax.nn.sigmoid(x), 0.0)
    dt, db = dt + jnp.sum(w * (x - bias)), db + jnp.sum(w)
    wd = w.astype(a.dtype)
    da = da + jnp.einsum("mk,kd->md", wd, k_c, preferred_element_type=jnp.float32)
    return (da, dt, db), jnp.einsum("mk,md->kd", wd, a, preferred_element_type=jnp.float32)

  zeros = tuple(_varying_as(z, a) for z in (jnp.zeros(a.shape, jnp.float32), jnp.float32(0.0),
                                      jnp.float32(0.0)))
  (da, dt, db), dk = jax.lax.scan(body, zeros, (kc, jnp.arange(n)))
  dk = dk.reshape(-1, k.shape[1])[:k.shape[0]]
  return ((da * inv_t).astype(a.dtype), (dk * inv_t).astype(k.dtype),
          (dt / inv_t).astype(jnp.result_type(inv_t)), db.astype(jnp.result_type(bias)))


_softplus_sum.defvjp(_softplus_sum_fwd, _softplus_sum_bwd)


def softplus_sum(a: jax.Array, k: jax.Array, inv_temperature: Scalar, bias: Scalar, *,
                 chunk_size: Optional[int] = None) -> jax.Array:
  """sum_ij softplus(inv_temperature * a_i . k_j + bias), float32 scalar; a [M, D], k [K, D].

  The direct path is plain autodiff; the streamed path recomputes each key chunk
  in its backward pass.
  """
  inv_t = jnp.asarray(inv_temperature, jnp.float32)
  bias = jnp.asarray(bias, jnp.float32)
  chunk = choose_chunk(a.shape[0], k.shape[0], chunk_size)
  a, k, inv_t, bias = _varying_like([a, k, inv_t, bias])
  if chunk is None:  # autodiff: XLA fuses softplus and its sigmoid backward well
    return jnp.sum(jax.nn.softplus(_scores(a, k, inv_t) + bias))
  return _softplus_sum(a, k, inv_t, bias, chunk)


# ----------------------------------------------------------------------------
# Ring: key blocks pass between neighbours instead of being all-gathered.


def _ring_perm(n):
  return [(i, (i + 1) % n) for i in range(n)]


def _block_scores(a, k_blk, inv_t, exclude, base_cols, stride, src):
  cols = base_cols + src * stride
  sc = _scores(a, k_blk, inv_t)
  return jnp.where(_mask(exclude, cols, jnp.iinfo(jnp.int32).max), -jnp.inf, sc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _lse_ring(a, k, inv_t, exclude, base_cols, stride, axis_name, want_cols):
  return _lse_ring_fwd(a, k, inv_t, exclude, base_cols, stride, axis_name, want_cols)[0]


def _lse_ring_fwd(a, k, inv_t, exclude, base_cols, stride, axis_name, want_cols):
  n, me = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
  rows = _varying_as(jnp.full((a.shape[0],), -jnp.inf, jnp.float32), a)
  col = _varying_as(jnp.full((k.shape[0],), -jnp.inf, jnp.float32), a)
  blk = k
  for step in range(n):  # n is static: unrolled, each block visits every device once
    src = (me - step) % n
    sc = _block_scores(a, blk, inv_t, exclude, base_cols, stride, src)
    rows = jnp.logaddexp(rows, _lse_axis(sc, 1))
    if want_cols:
      col = jnp.logaddexp(col, _lse_axis(sc, 0))
    # Pass the block and its column sums on; the block needs n - 1 hops, its column
    # sums one more to come home.
    if step < n - 1:
      blk, col = jax.lax.ppermute((blk, col), axis_name, _ring_perm(n))
    elif want_cols:
      col = jax.lax.ppermute(col, axis_name, _ring_perm(n))
  cols = col if want_cols else jnp.zeros((0,), jnp.float32)
  return (rows, cols), (a, k, inv_t, exclude, base_cols, rows, cols)


def _lse_ring_bwd(stride, axis_name, want_cols, res, g):
  a, k, inv_t, exclude, base_cols, rows, cols = res
  g_rows, g_cols = g
  n, me = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
  rows = _inf_where_unsummed(rows)
  if want_cols:
    col_lse, g_col = _inf_where_unsummed(cols), g_cols
  else:
    col_lse = g_col = _varying_as(jnp.zeros((k.shape[0],), jnp.float32), a)
  blk, dk = k, _varying_as(jnp.zeros(k.shape, jnp.float32), a)
  da, dt = _varying_as(jnp.zeros(a.shape, jnp.float32), a), _varying_as(jnp.float32(0.0), a)
  for step in range(n):
    src = (me - step) % n
    sc = _block_scores(a, blk, inv_t, exclude, base_cols, stride, src)
    w = g_rows[:, None] * jnp.exp(sc - rows[:, None])
    if want_cols:
      w = w + g_col[None, :] * jnp.exp(sc - col_lse[None, :])
    w = jnp.where(jnp.isfinite(sc), w, 0.0)
    dt = dt + jnp.sum(jnp.where(jnp.isfinite(sc), w * sc, 0.0))
    wd = w.astype(a.dtype)
    da = da + jnp.einsum("mk,kd->md", wd, blk, preferred_element_type=jnp.float32)
    dk = dk + jnp.einsum("mk,md->kd", wd, a, preferred_element_type=jnp.float32)
    # The block's gradient travels with it and arrives home after n hops.
    if step < n - 1:
      blk, dk, col_lse, g_col = jax.lax.ppermute((blk, dk, col_lse, g_col), axis_name,
                                                 _ring_perm(n))
    else:
      dk = jax.lax.ppermute(dk, axis_name, _ring_perm(n))
  return ((da * inv_t).astype(a.dtype), (dk * inv_t).astype(k.dtype),
          (dt / inv_t).astype(jnp.result_type(inv_t)), None, None)


_lse_ring.defvjp(_lse_ring_fwd, _lse_ring_bwd)


def ring_logsumexp(a: jax.Array, k: jax.Array, inv_temperature: Scalar, exclude: Optional[jax.Array],
                   *, axis_name: str, block_cols: jax.Array, stride: int, cols: bool = False
                   ) -> tuple[jax.Array, jax.Array]:
  """`logsumexp` of local anchors against the keys of EVERY device, inside
  `shard_map`, without gathering them: the [bk, D] key blocks travel around the
  ring of `axis_name` with `ppermute` (n - 1 hops forward, their gradients n in
  the backward pass), so a device holds one block and b x bk scores at a time.

  Args:
    a: [b, D] local unit anchors; k: [bk, D] local unit keys.
    exclude: [b, E] GLOBAL column ids left out per row (see `logsumexp`).
    block_cols: [bk] int32 global column ids of device 0's keys; device d's
      are block_cols + d * stride.
    cols: also return each LOCAL key's log-sum-exp over every device's anchors.
  Returns:
    rows [b] over all keys of all devices; cols [bk] ([0] unless `cols`).
  """
  if exclude is None:
    exclude = jnp.zeros((a.shape[0], 0), jnp.int32)
  inv_t = jnp.asarray(inv_temperature, jnp.float32)
  a, k, inv_t = _varying_like([a, k, inv_t])
  return _lse_ring(a, k, inv_t, exclude.astype(jnp.int32), block_cols.astype(jnp.int32),
                   int(stride), axis_name, cols)
