"""The gamma estimator's order: u drawn from the pre-update estimate is exactly
unbiased with a perfect prior; SogCLR's order (update_first=True) is not.

Exact expectations over all C(16, 4) minibatches of a 16-pair pool
(experiments/estimator_bias.py runs the 32-pair pool of docs/results.md)."""

import pytest
import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax import losses as L
from experiments import estimator_bias as E


@pytest.mark.slow
def test_default_order_is_exactly_unbiased_and_update_first_is_not():
  result = E.exact_biases(n=16, b=4, rates=(0.1, 0.5))
  assert result["infonce"] > 0.02, result  # the bias the loss exists to remove
  for rate in ("0.1", "0.5"):
    assert result["gamma"][rate] < 1e-4, result  # float32 rounding only
    assert result["gamma_update_first"][rate] > 0.1 * result["infonce"], result
  # SogCLR's order: more of the batch in u, more bias.
  assert result["gamma_update_first"]["0.5"] > result["gamma_update_first"]["0.1"]
  # The global estimator fits mean_k Z_k / Zbar, not mean_k log Z_k: biased (documented).
  assert result["gamma_global"]["0.1"] > 0.1 * result["infonce"], result


def test_a_first_visit_draws_u_from_the_batch_and_a_revisit_from_the_prior():
  z1, z2 = jax.random.normal(jax.random.key(0), (2, 8, 4))
  index = jnp.arange(8)
  t = 0.5
  fresh = L.init_gamma_state(8)
  # First visit: the estimate is the batch's own, whatever the rate.
  a, state = L.gamma_loss(z1, z2, fresh, index, jax.random.key(1), temperature=t,
                          eps_shape=float("inf"), rate=0.3)
  b, _ = L.gamma_loss(z1, z2, fresh, index, jax.random.key(1), temperature=t,
                      eps_shape=float("inf"), rate=0.3, update_first=True)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  # Revisit with a known prior: u = 1 / prior, not 1 / the updated estimate.
  prior = {"log_z": jnp.full((2, 8), 0.7)}
  value, new = L.gamma_loss(z1, z2, prior, index, jax.random.key(1), temperature=t,
                            eps_shape=float("inf"), rate=0.3)
  u1, u2 = (z / jnp.linalg.norm(z, axis=1, keepdims=True) for z in (z1, z2))
  u = jnp.concatenate([u1, u2])
  s = u @ u.T / t
  n = 8
  idx = jnp.arange(2 * n)
  partner = (idx + n) % (2 * n)
  neg = (idx[:, None] != idx[None, :]) & (partner[:, None] != idx[None, :])
  zb = jnp.sum(jnp.where(neg, jnp.exp(s), 0.0), 1) / (2 * n - 2)
  expected = jnp.mean(jnp.exp(-0.7) * zb - s[idx, partner])
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(new["log_z"].reshape(-1),
                             jnp.log(0.7 * jnp.exp(0.7) + 0.3 * zb), rtol=1e-5)
