"""SogCLR (Yuan et al., "Provable Stochastic Optimization for Global Contrastive
Learning: Small Batch Does Not Harm Performance", ICML 2022)."""

from typing import Optional

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common


def init_sogclr_state(num_examples: int, shared: bool = False) -> dict:
  """Per-example log running denominators, = -inf (unset): {"log_u": [2, N]}, one row per
  view, or with `shared` {"log_u": [1, N]}, one entry per example for both views (the
  official code's bookkeeping: `sogclr_loss(..., shared_state=True)`)."""
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples}")
  return {"log_u": jnp.full((1 if shared else 2, num_examples), -jnp.inf, jnp.float32)}


@common.renamed(gamma="rate")
def sogclr_loss(z1: jax.Array, z2: jax.Array, state: dict, index: jax.Array, *,
                temperature: float, rate: float = 0.9, rate_schedule: str = "constant",
                rate_min: float = 0.2, rate_fraction: float = 0.5,
                progress: Optional[common.Scalar] = None, shared_state: bool = False,
                chunk_size: Optional[int] = None, ring: bool = False,
                axis_name: Optional[str] = None) -> tuple[jax.Array, dict]:
  """SogCLR: NT-Xent with a per-example moving-average denominator.

  For the 2B anchors of the SimCLR layout (negatives: the 2(B - 1) other views),
    Zb_k = mean_{j in neg(k)} exp(s_kj),           s = cos / temperature,
    u_k <- (1 - rate) u_k + rate Zb_k              (first visit: u_k = Zb_k),
    loss = mean_k [ -s_{k,p(k)} + sg(Zb_k / u_k) log Zb_k ],
  whose gradient is SogCLR's: -grad s+ + mean_j exp(s_kj) grad s_kj / u_k. The
  value is a surrogate (NT-Xent without the positive on a first visit); log
  `nt_xent` to monitor the objective.

  Args:
    z1, z2: [B, D] raw embeddings of two views.
    state: from `init_sogclr_state(N)`; log u per view and dataset example.
    index: [B] int dataset indices of the examples (in [0, N)).
    rate: weight of the new batch estimate, in (0, 1] (the paper's gamma; formerly
      `gamma=`, the name `gamma_loss` uses for its own family: one name, `rate`, now).
    rate_schedule: "constant" (rate throughout) or "cosine" (FastCLIP's schedule of this
      weight: from 1 to rate_min over the first rate_fraction of training, then rate_min;
      rate unused); see `common.scheduled_rate`.
    rate_min, rate_fraction: the cosine schedule's final weight and length.
    progress: fraction of training done, in [0, 1] (e.g. step / num_steps); cosine only.
    shared_state: the official code's bookkeeping (Optimization-AI/SogCLR): one u per
      example shared by the two views (state from `init_sogclr_state(N, shared=True)`);
      each view's anchors use u_v = (1 - r) u + r Zb_v from the shared prior, the entry
      becomes (u_1 + u_2) / 2, and the rate r is 1 only when every example of the
      (device's) batch is new (an unset u counts as 0, so a new example in a batch with
      seen ones starts at r Zb). Default: one u per view and example, each first visit
      u = Zb.
    chunk_size: None (automatic) or the key chunk to stream over: see `streamed`.
    ring: pass key blocks between the devices instead of gathering them.
    axis_name: mesh axis; negatives are gathered (global-negative loss) and the
      replicated state is updated with every device's (index, value) pairs.
  Returns:
    (float32 scalar loss, new state).

  References:
    Z. Yuan, Y. Wu, Z.-H. Qiu, X. Du, L. Zhang, D. Zhou, T. Yang, "Provable Stochastic
      Optimization for Global Contrastive Learning: Small Batch Does Not Harm
      Performance" (SogCLR), ICML 2022.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from contrastive_jax import losses
    >>> z1, z2 = jax.random.normal(jax.random.key(0), (2, 8, 4))
    >>> state = losses.init_sogclr_state(100)  # one entry per dataset example
    >>> loss, state = losses.sogclr_loss(z1, z2, state, jnp.arange(8), temperature=0.1)
    >>> bool(jnp.isfinite(state["log_u"][:, :8]).all())
    True
  """
  common.check_embeddings(("z1", "z2"), z1, z2)
  common.check_positive("temperature", temperature)
  common.check_rate("rate", rate, allow_zero=False)
  rate = common.scheduled_rate(rate, rate_schedule, progress, rate_min, rate_fraction)
  common.check_index(index, z1.shape[0], state["log_u"].shape[1])
  if state["log_u"].shape[0] != (1 if shared_state else 2):
    raise ValueError(f"shared_state={shared_state} takes the state of init_sogclr_state(N, "
                     f"shared={shared_state}), got log_u of shape {state['log_u'].shape}")
  lse, pos, n = common.two_view_lse(z1, z2, temperature, axis_name, exclude_positive=True,
                                    chunk_size=chunk_size, ring=ring)
  b = z1.shape[0]
  log_zb = lse - jnp.log(float(n - 2))
  if shared_state:
    log_u_table, log_u = _shared_update(state["log_u"], index, log_zb.reshape(2, b), rate,
                                        axis_name)
  else:
    log_u_table, log_u = common.update_table(state["log_u"], index, log_zb.reshape(2, b),
                                             rate, axis_name)
  ratio = jax.lax.stop_gradient(jnp.exp(log_zb - log_u.reshape(-1)))
  total = common.global_sum(jnp.sum(ratio * log_zb - pos), axis_name)
  return total / n, {"log_u": log_u_table}


def _shared_update(table: jax.Array, index: jax.Array, log_zb: jax.Array, rate: common.Scalar,
                   axis_name: Optional[str]) -> tuple[jax.Array, jax.Array]:
  """The official shared bookkeeping: (new table [1, N], log u of each view's anchors [2, b])
  from the table, the batch's log Zb [2, b] and the rate (see `sogclr_loss`)."""
  log_zb = jax.lax.stop_gradient(log_zb)
  prior = table[0, index]  # [b]; -inf: unset (the official zeros)
  rate = jnp.where(jnp.all(jnp.isneginf(prior)), 1.0, jnp.asarray(rate, jnp.float32))
  log_u = jnp.logaddexp(jnp.log1p(-rate) + prior, jnp.log(rate) + log_zb)  # [2, b]
  entry = jax.nn.logsumexp(log_u, axis=0, keepdims=True) - jnp.log(2.0)  # log (u1 + u2) / 2
  table, _ = common.update_table(table, index, entry, 1.0, axis_name)
  return table, log_u
