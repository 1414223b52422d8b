"""SogCLR (Yuan et al., "Provable Stochastic Optimization for Global Contrastive
Learning: Small Batch Does Not Harm Performance", ICML 2022)."""

from typing import Optional

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common


def init_sogclr_state(num_examples: int) -> dict:
  """Per-example log running denominators, one row per view: {"log_u": [2, N]} = -inf (unset)."""
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples}")
  return {"log_u": jnp.full((2, num_examples), -jnp.inf, jnp.float32)}


def sogclr_loss(z1: jax.Array, z2: jax.Array, state: dict, index: jax.Array, *,
                temperature: float, gamma: float = 0.9,
                axis_name: Optional[str] = None) -> tuple[jax.Array, dict]:
  """SogCLR: NT-Xent with a per-example moving-average denominator.

  For the 2B anchors of the SimCLR layout (negatives: the 2(B - 1) other views),
    Zb_k = mean_{j in neg(k)} exp(s_kj),           s = cos / temperature,
    u_k <- (1 - gamma) u_k + gamma Zb_k            (first visit: u_k = Zb_k),
    loss = mean_k [ -s_{k,p(k)} + mean_{j in neg(k)} sg(exp(s_kj) / u_k) s_kj ],
  whose gradient is SogCLR's: -grad s+ + mean_j exp(s_kj) grad s_kj / u_k. The
  loss value is a surrogate; log `nt_xent` to monitor the objective.

  Args:
    z1, z2: [B, D] raw embeddings of two views.
    state: from `init_sogclr_state(N)`; log u per view and dataset example.
    index: [B] int dataset indices of the examples (in [0, N)).
    gamma: weight of the new batch estimate, in (0, 1].
    axis_name: mesh axis; negatives are gathered (global-negative loss) and the
      replicated state is updated with every device's (index, value) pairs.
  Returns:
    (float32 scalar loss, new state).
  """
  common.check_embeddings(("z1", "z2"), z1, z2)
  common.check_positive("temperature", temperature)
  common.check_index(index, z1.shape[0])
  logits, positive = common.two_view_logits(z1, z2, temperature, axis_name)
  b = z1.shape[0]
  num_neg = logits.shape[1] - 2
  log_zb = common.log_mean_negatives(logits, positive, num_neg).reshape(2, b)
  log_u_table, log_u = common.update_table(state["log_u"], index, log_zb, gamma, axis_name)
  neg_mask = jax.nn.one_hot(positive, logits.shape[1], dtype=bool) | jnp.isneginf(logits)
  weights = jax.lax.stop_gradient(jnp.exp(logits - log_u.reshape(-1)[:, None]))
  weighted = jnp.sum(jnp.where(neg_mask, 0.0, weights * logits), axis=1) / num_neg
  pos = common.positive_logits(logits, positive)
  total = common.global_sum(jnp.sum(weighted - pos), axis_name)
  return total / logits.shape[1], {"log_u": log_u_table}
