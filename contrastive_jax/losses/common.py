"""Shared pieces of the contrastive losses: input checks, normalised similarities,
cross-device gathering and the log-space running estimates of stateful losses.

Sharding convention. Every loss accepts `axis_name`. Inside `jax.shard_map` the
arguments are the local shard (b = B / N rows on each of N devices):
  * global-negative losses gather the keys over `axis_name` and score their b
    local anchors against all B keys; their output equals the single-device
    loss on the whole batch (value and gradient);
  * decomposable losses (gamma) keep keys local and reduce only scalars.
Without `axis_name` the arguments are the whole batch (plain `jit` with sharded
inputs lets GSPMD partition the same program).
"""

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from contrastive_jax.metrics import l2_normalize

NEG_INF = -jnp.inf


# ----------------------------------------------------------------------------
# Input checks (run at trace time: shapes and dtypes are static).


def check_embeddings(names: Sequence[str], *arrays: jax.Array, min_batch: int = 2) -> None:
  """Raises ValueError/TypeError unless all arrays are float [B, D] of one shape."""
  for name, x in zip(names, arrays):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 2:
      raise ValueError(f"{name} must have rank 2 [batch, dim], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be a floating dtype, got {x.dtype} (shape {tuple(x.shape)})")
  ref_name, ref = names[0], arrays[0]
  for name, x in zip(names[1:], arrays[1:]):
    if x.shape != ref.shape:
      raise ValueError(
          f"{name} shape {tuple(x.shape)} does not match {ref_name} shape {tuple(ref.shape)}: "
          "both need the same [batch, dim]")
  if ref.shape[0] < min_batch:
    raise ValueError(
        f"{ref_name} has batch size {ref.shape[0]}; contrastive losses need at least "
        f"{min_batch} examples (shape {tuple(ref.shape)})")


def check_positive(name: str, value) -> None:
  """Raises ValueError if `value` is a concrete number <= 0 (traced values pass)."""
  try:
    v = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return  # traced, e.g. a learnable temperature
  if not v > 0:
    raise ValueError(f"{name} must be > 0, got {v}")


def check_index(index: jax.Array, batch: int) -> None:
  if not hasattr(index, "shape") or index.ndim != 1 or index.shape[0] != batch:
    raise ValueError(
        f"index must have shape [{batch}] (one dataset index per example), "
        f"got {getattr(index, 'shape', type(index).__name__)}")
  if not jnp.issubdtype(index.dtype, jnp.integer):
    raise TypeError(f"index must be an integer array, got {index.dtype}")


# ----------------------------------------------------------------------------
# Similarities.


def similarity(a: jax.Array, b: jax.Array, temperature) -> jax.Array:
  """Cosine similarities / temperature: a [M, D], b [K, D] -> float32 [M, K].

  Inputs are normalised here; the matmul runs in the input dtype (bfloat16 on
  TPU) and accumulates in float32.
  """
  a, b = l2_normalize(a), l2_normalize(b)
  s = jnp.einsum("md,kd->mk", a, b, preferred_element_type=jnp.float32)
  return s / jnp.asarray(temperature, jnp.float32)


def gather_keys(x: jax.Array, axis_name: Optional[str], axis: int = 0
                ) -> tuple[jax.Array, jax.Array]:
  """Returns (x concatenated over `axis_name` along `axis`, global offset of the local rows).

  x [..., b, ...] -> ([..., N * b, ...], scalar int). Without axis_name: (x, 0).
  """
  if axis_name is None:
    return x, jnp.int32(0)
  offset = jax.lax.axis_index(axis_name) * x.shape[axis]
  return jax.lax.all_gather(x, axis_name, axis=axis, tiled=True), offset


def global_sum(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """Sum of a local scalar over devices (identity without axis_name)."""
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def global_mean(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def global_logsumexp(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """log sum_devices exp(x) of local log-sums x [...], stable (max-shifted)."""
  if axis_name is None:
    return x
  m = jax.lax.pmax(jax.lax.stop_gradient(x), axis_name)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  return m + jnp.log(jax.lax.psum(jnp.exp(x - m), axis_name))


def positive_logits(logits: jax.Array, positive: jax.Array) -> jax.Array:
  """logits [M, K] at each row's positive column [M] -> [M]."""
  return jnp.take_along_axis(logits, positive[:, None], axis=1)[:, 0]


def cross_entropy(logits: jax.Array, positive: jax.Array) -> jax.Array:
  """Per-row softmax cross-entropy: logits [M, K], positive column [M] -> [M]."""
  return jax.nn.logsumexp(logits, axis=1) - positive_logits(logits, positive)


def two_view_logits(z1: jax.Array, z2: jax.Array, temperature, axis_name: Optional[str]):
  """SimCLR layout: every local view of both z1 and z2 against all 2B views.

  Args:
    z1, z2: [b, D] local views (b = B without axis_name).
    axis_name: gather keys over this axis; None scores against the local views.
  Returns:
    logits [2b, 2K] float32 with each anchor's own column set to -inf (K = B if
    gathered, else b); keys are ordered [z1 keys; z2 keys];
    positive [2b] int32, the column of each anchor's other view.
  """
  b, d = z1.shape
  keys, offset = gather_keys(jnp.stack([z1, z2]), axis_name, axis=1)  # one gather: [2, K, D]
  k = keys.shape[1]
  keys = keys.reshape(2 * k, d)  # z1 keys then z2 keys
  logits = similarity(jnp.concatenate([z1, z2], 0), keys, temperature)  # [2b, 2K]
  rows = jnp.arange(b) + offset
  self_col = jnp.concatenate([rows, rows + k])
  positive = jnp.concatenate([rows + k, rows]).astype(jnp.int32)
  logits = jnp.where(jax.nn.one_hot(self_col, 2 * k, dtype=bool), NEG_INF, logits)
  return logits, positive


def log_mean_negatives(logits: jax.Array, positive: jax.Array, num_negatives: int,
                       include_positive: bool = False) -> jax.Array:
  """log( mean over negatives of exp(logits) ) per row; -inf entries are excluded.

  logits [M, K], positive [M]; `num_negatives` is the count of finite non-positive
  entries of each row. With include_positive the positive joins the mean.
  """
  if include_positive:
    return jax.nn.logsumexp(logits, axis=1) - jnp.log(num_negatives + 1.0)
  masked = jnp.where(jax.nn.one_hot(positive, logits.shape[1], dtype=bool), NEG_INF, logits)
  return jax.nn.logsumexp(masked, axis=1) - jnp.log(float(num_negatives))


# ----------------------------------------------------------------------------
# Running estimates for stateful losses, kept in log space.


def ema_log(old: jax.Array, new: jax.Array, rate) -> jax.Array:
  """log((1 - rate) * exp(old) + rate * exp(new)); -inf in `old` means unset: take new."""
  rate = jnp.asarray(rate, jnp.float32)
  mixed = jnp.logaddexp(jnp.log1p(-rate) + old, jnp.log(rate) + new)
  return jnp.where(jnp.isneginf(old), new, mixed)


def update_table(table: jax.Array, index: jax.Array, values: jax.Array, rate,
                 axis_name: Optional[str]) -> tuple[jax.Array, jax.Array]:
  """EMA-updates rows `index` of a per-example log table and reads them back.

  Args:
    table: [R, N] replicated log-space table (R directions, N dataset examples).
    index: [b] local dataset indices; values: [R, b] new log observations.
    axis_name: if set, every device applies every device's (index, value) pairs,
      so the replicated table stays identical: only 2 x B scalars per row cross
      devices, never embeddings.
  Returns:
    (new table [R, N], updated local values [R, b]).
  """
  values = jax.lax.stop_gradient(values.astype(table.dtype))
  all_index, all_values = index, values
  if axis_name is not None:
    # Gathered as invariant: every device then holds the same (replicated) table.
    all_index = jax.lax.all_gather(index, axis_name, tiled=True, to="invarying")
    all_values = jax.lax.all_gather(values, axis_name, axis=1, tiled=True, to="invarying")
  new_rows = ema_log(table[:, all_index], all_values, rate)
  table = table.at[:, all_index].set(new_rows)
  return table, table[:, index]


def update_scalar(log_z: jax.Array, values: jax.Array, rate,
                  axis_name: Optional[str]) -> jax.Array:
  """EMA-updates global log-means log_z [R] with the batch log-mean of values [R, b].

  Across devices only two scalars per row are reduced (a max and a sum).
  """
  values = jax.lax.stop_gradient(values.astype(log_z.dtype))
  log_sum = global_logsumexp(jax.nn.logsumexp(values, axis=1), axis_name)
  count = global_sum(jnp.float32(values.shape[1]), axis_name)
  return ema_log(log_z, log_sum - jnp.log(count), rate)
