"""Shared pieces of the contrastive losses: input checks, normalised similarities,
the SimCLR two-view reduction, cross-device gathering and the log-space running
estimates of stateful losses (the similarity reductions are in `streamed`).

Sharding convention. Every loss accepts `axis_name`. Inside `jax.shard_map` the
arguments are the local shard (b = B / N rows on each of N devices):
  * global-negative losses gather the keys over `axis_name` (or, with ring=True,
    pass key blocks between neighbours) and score their b local anchors against
    all B keys; their output equals the single-device loss on the whole batch
    (value and gradient);
  * decomposable losses (gamma) keep keys local and reduce only scalars.
Without `axis_name` the arguments are the whole batch (plain `jit` with sharded
inputs lets GSPMD partition the same program).
"""

import functools
from typing import Callable, Optional, Sequence
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.losses import streamed
from contrastive_jax.metrics import l2_normalize


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


Scalar = streamed.Scalar


class OptionError(ValueError):
  """A bad value of a loss's option; `option` names it (so a trainer can name its own
  config field without reading the message)."""

  def __init__(self, option: str, message: str):
    super().__init__(message)
    self.option = option


def check_positive(name: str, value: Scalar) -> None:
  """Raises OptionError if `value` is a concrete number <= 0 (traced values pass)."""
  try:
    v = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return  # traced, e.g. a learnable temperature
  if not v > 0:
    raise OptionError(name, f"{name} must be > 0, got {v}")


def check_rate(name: str, value: Scalar, allow_zero: bool = True) -> None:
  """Raises OptionError unless a concrete `value` is in [0, 1] ((0, 1] without allow_zero)."""
  try:
    v = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return
  if not ((0.0 <= v if allow_zero else 0.0 < v) and v <= 1.0):
    raise OptionError(name, f"{name} must be in {'[0' if allow_zero else '(0'}, 1], got {v}")


def renamed(**old_to_new: str) -> Callable:
  """Decorator: the loss still takes its options' old keywords (old="new"), for one release,
  with a DeprecationWarning. The signature (and the registry, and the docs) show only the
  new names; `fn.renamed` holds the map."""
  def wrap(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def loss(*args, **kwargs):
      for old, new in old_to_new.items():
        if old in kwargs:
          if new in kwargs:
            raise TypeError(f"{fn.__name__}: give {new}= only ({old}= is its old name)")
          warnings.warn(f"{fn.__name__}({old}=...) is deprecated and will be removed in the "
                        f"next release: use {new}=", DeprecationWarning, stacklevel=2)
          kwargs[new] = kwargs.pop(old)
      return fn(*args, **kwargs)
    loss.renamed = dict(old_to_new)
    return loss
  return wrap


RATE_SCHEDULES = ("constant", "cosine")


def scheduled_rate(rate: Scalar, schedule: str, progress: Optional[Scalar], rate_min: Scalar,
                   fraction: float) -> Scalar:
  """The moving-average weight of a stateful loss at a point of training.

  constant: `rate` throughout (`progress` unused).
  cosine: FastCLIP's schedule: from 1 (the batch's own estimate replaces the entry) down
    to `rate_min` along a half cosine over the first `fraction` of training, then
    `rate_min`; `rate` is unused. An entry refreshed once an epoch is then trusted more
    as the encoder, and so the denominators, change less.

  Args:
    rate: the constant schedule's weight, in [0, 1].
    schedule: "constant" or "cosine".
    progress: the fraction of training done, in [0, 1] (a traced scalar is fine, e.g.
      step / num_steps); required by cosine.
    rate_min: cosine's final weight, in (0, 1].
    fraction: cosine's length as a fraction of training, in (0, 1].
  Returns:
    The weight, a scalar (float32 for cosine).
  """
  if schedule == "constant":
    return rate
  if schedule != "cosine":
    raise OptionError("rate_schedule", f"rate_schedule must be one of {RATE_SCHEDULES}, "
                                       f"got {schedule!r}")
  check_rate("rate_min", rate_min, allow_zero=False)
  try:
    f = float(fraction)
  except TypeError:
    f = float("nan")
  if not 0.0 < f <= 1.0:
    raise OptionError("rate_fraction", f"rate_fraction must be in (0, 1], got {fraction!r}")
  if progress is None:
    raise ValueError("rate_schedule='cosine' needs progress, the fraction of training done "
                     "(e.g. step / num_steps)")
  t = jnp.clip(jnp.asarray(progress, jnp.float32) / f, 0.0, 1.0)
  return rate_min + (1.0 - rate_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))


def check_index(index: jax.Array, batch: int, num_examples: Optional[int] = None) -> None:
  """Shape and dtype always; in eager calls also the values: in [0, num_examples) and
  no index twice in one batch (an out-of-range read is clamped and its write dropped
  by JAX, a duplicate keeps one of its writes: the state would be silently wrong).

  Under `jit` the values are not concrete; wrap the call in
  `jax.experimental.checkify.checkify(f, errors=checkify.index_checks | checkify.user_checks)`
  with `index_checks` below, or keep the indices in range by construction (the
  trainer's come from the grain record keys, in [0, N) and distinct in a batch).
  """
  if not hasattr(index, "shape") or index.ndim != 1 or index.shape[0] != batch:
    raise ValueError(
        f"index must have shape [{batch}] (one dataset index per example), "
        f"got {getattr(index, 'shape', type(index).__name__)}")
  if not jnp.issubdtype(index.dtype, jnp.integer):
    raise TypeError(f"index must be an integer array, got {index.dtype}")
  if isinstance(index, jax.core.Tracer) or num_examples is None:
    return
  values = np.asarray(index)
  bad = values[(values < 0) | (values >= num_examples)]
  if bad.size:
    raise ValueError(f"index holds {bad.size} value(s) outside [0, {num_examples}) (the "
                     f"state's size), e.g. {int(bad[0])}; negative indices are not allowed")
  unique, counts = np.unique(values, return_counts=True)
  if np.any(counts > 1):
    raise ValueError(f"index holds duplicates in one batch, e.g. {int(unique[counts > 1][0])}: "
                     "each example's state entry can take one update a step")


def index_checks(index: jax.Array, num_examples: int) -> None:
  """The value checks of `check_index` as `checkify` checks, for use under `jit`:

    f = checkify.checkify(lambda ...: (index_checks(idx, N), loss_fn(...))[1])
    err, out = jax.jit(f)(...); err.throw()
  """
  from jax.experimental import checkify
  checkify.check(jnp.all((index >= 0) & (index < num_examples)),
                 f"index outside [0, {num_examples})")
  s = jnp.sort(index)
  checkify.check(jnp.all(s[1:] != s[:-1]), "duplicate index in one batch")


# ----------------------------------------------------------------------------
# Similarities.


def similarity(a: jax.Array, b: jax.Array, temperature: Scalar) -> jax.Array:
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


def inverse_temperature(temperature: Scalar) -> jax.Array:
  return 1.0 / jnp.asarray(temperature, jnp.float32)


def positive_scores(a: jax.Array, b: jax.Array, inv_t: jax.Array) -> jax.Array:
  """inv_t * a_i . b_i of unit rows a, b [n, D] -> float32 [n]."""
  return inv_t * jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=1)


def two_view_lse(z1: jax.Array, z2: jax.Array, temperature: Scalar, axis_name: Optional[str],
                 exclude_positive: bool, chunk_size: Optional[int], ring: bool = False) -> jax.Array:
  """SimCLR layout: every local view of z1 and z2 against all 2B views, streamed.

  Args:
    z1, z2: [b, D] raw local views (b = B without axis_name).
    axis_name: keys of all devices over this axis; None scores against the local views.
    exclude_positive: leave each anchor's other view out of its sum (negatives only).
    chunk_size: see `streamed.logsumexp`.
    ring: pass key blocks around the devices (`streamed.ring_logsumexp`) instead of
      all-gathering them.
  Returns:
    lse [2b]: log sum over each anchor's keys (never itself) of exp(s), s = cos / t;
    pos [2b]: each anchor's positive score s_{k, p(k)};
    num_keys: 2K, the views of the (global) batch.
  """
  b, d = z1.shape
  u1, u2 = l2_normalize(z1), l2_normalize(z2)
  inv_t = inverse_temperature(temperature)
  n_dev = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  k = b * n_dev
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
  rows = jnp.arange(b, dtype=jnp.int32) + offset
  self_col = jnp.concatenate([rows, rows + k])  # key order: z1 of all devices, then z2
  exclude = self_col[:, None]
  if exclude_positive:
    exclude = jnp.stack([self_col, jnp.concatenate([rows + k, rows])], axis=1)
  anchors = jnp.concatenate([u1, u2])
  if ring:
    check_ring(axis_name)
    local = jnp.arange(b, dtype=jnp.int32)
    lse, _ = streamed.ring_logsumexp(anchors, anchors, inv_t, exclude, axis_name=axis_name,
                                     block_cols=jnp.concatenate([local, local + k]), stride=b)
  else:
    keys, _ = gather_keys(jnp.stack([u1, u2]), axis_name, axis=1)  # one gather: [2, K, D]
    lse, _ = streamed.logsumexp(anchors, keys.reshape(2 * k, d), inv_t, exclude,
                                chunk_size=chunk_size)
  pos = positive_scores(u1, u2, inv_t)
  return lse, jnp.concatenate([pos, pos]), 2 * k


def check_ring(axis_name: Optional[str]) -> None:
  if axis_name is None:
    raise ValueError("ring=True passes keys between the devices of `axis_name` inside "
                     "shard_map: give axis_name (or use ring=False)")


# ----------------------------------------------------------------------------
# Running estimates for stateful losses, kept in log space.


def ema_log(old: jax.Array, new: jax.Array, rate: Scalar) -> jax.Array:
  """log((1 - rate) * exp(old) + rate * exp(new)); -inf in `old` means unset: take new."""
  rate = jnp.asarray(rate, jnp.float32)
  mixed = jnp.logaddexp(jnp.log1p(-rate) + old, jnp.log(rate) + new)
  return jnp.where(jnp.isneginf(old), new, mixed)


def update_table(table: jax.Array, index: jax.Array, values: jax.Array, rate: Scalar,
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
  old_rows = table[:, all_index]
  # A non-finite estimate (NaN or inf embeddings) never enters the table: the entry keeps
  # its old value.
  new_rows = ema_log(old_rows, all_values, rate)
  new_rows = jnp.where(jnp.isfinite(all_values), new_rows, old_rows)
  table = table.at[:, all_index].set(new_rows)
  return table, table[:, index]


def batch_log_mean(values: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """log of the mean of exp(values) [R, b] over the (global) batch, [R].

  Across devices only two scalars per row are reduced (a max and a sum).
  """
  values = jax.lax.stop_gradient(values.astype(jnp.float32))
  log_sum = global_logsumexp(jax.nn.logsumexp(values, axis=1), axis_name)
  return log_sum - jnp.log(global_sum(jnp.float32(values.shape[1]), axis_name))


def update_scalar(log_z: jax.Array, values: jax.Array, rate: Scalar,
                  axis_name: Optional[str]) -> jax.Array:
  """EMA-updates global log-means log_z [R] with the batch log-mean of values [R, b]."""
  new = batch_log_mean(values, axis_name).astype(log_z.dtype)
  return jnp.where(jnp.isfinite(new), ema_log(log_z, new, rate), log_z)
