"""The exact gradient bias of each minibatch estimator: the expected gradient over ALL
C(N, b) minibatches of a pool of N pairs, against the gradient of the full objective
mean_k [-s_k+ + log Z_k] (Z_k: anchor k's mean over the 2(N - 1) other views).

  python experiments/estimator_bias.py [--n 32 --b 4]

No sampling: every minibatch is enumerated, and the E-step's eps is 1 (shape = inf;
a finite shape multiplies u by an independent mean-1 factor and leaves the expectation
as it is). The state starts from the exact log Z (a perfect prior), so what is left is
the bias of the estimator itself. Rows: minibatch InfoNCE (nt_xent without the
positive in the denominator, the same objective), the gamma loss with u drawn from the
pre-update estimate (the default) and with SogCLR's order (update_first=True), the
relative estimator (offsets from a running level) and the global estimator, against
rate. Results: experiments/results/estimator_bias.json.
"""

import argparse
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax import losses as L
from contrastive_jax.metrics import l2_normalize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pool(n: int, d: int = 8, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """n positive pairs [n, d]: z2 is z1 plus noise."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  z1 = jax.random.normal(k1, (n, d))
  return z1, z1 + 0.8 * jax.random.normal(k2, (n, d))


def full_objective(z1, z2, temperature: float) -> jax.Array:
  """mean over the 2n anchors of -s+ + log Z, Z = mean over the 2(n - 1) other views."""
  u = l2_normalize(jnp.concatenate([z1, z2]))
  n = z1.shape[0]
  s = u @ u.T / temperature
  idx = jnp.arange(2 * n)
  partner = (idx + n) % (2 * n)
  negative = (idx[:, None] != idx[None, :]) & (partner[:, None] != idx[None, :])
  log_z = jax.nn.logsumexp(jnp.where(negative, s, -jnp.inf), axis=1) - jnp.log(2.0 * (n - 1))
  return jnp.mean(-s[idx, partner] + log_z), log_z.reshape(2, n)


def expected_gradient(loss_fn, z1, z2, b: int, chunk: int = 4096):
  """Mean over all C(n, b) minibatches of grad_{z1, z2} loss_fn(z1[idx], z2[idx], idx)."""
  n = z1.shape[0]
  batches = np.array(list(itertools.combinations(range(n), b)), np.int32)

  def one(idx):
    return jax.grad(lambda a, c: loss_fn(a[idx], c[idx], idx), (0, 1))(z1, z2)

  grads = jax.jit(jax.vmap(one))
  total = [jnp.zeros_like(z1), jnp.zeros_like(z2)]
  for i in range(0, len(batches), chunk):
    g1, g2 = grads(jnp.asarray(batches[i:i + chunk]))
    total = [total[0] + g1.sum(0), total[1] + g2.sum(0)]
  return [t / len(batches) for t in total]


def relative_bias(expected, exact) -> float:
  num = sum(float(jnp.sum((e - x) ** 2)) for e, x in zip(expected, exact))
  den = sum(float(jnp.sum(x ** 2)) for x in exact)
  return (num / den) ** 0.5


def exact_biases(n: int = 32, b: int = 4, temperature: float = 0.5,
                 rates=(0.01, 0.1, 0.5, 0.9), seed: int = 0) -> dict:
  """{row: {rate: relative bias}} (InfoNCE has no rate: one value)."""
  z1, z2 = pool(n, seed=seed)
  exact = jax.grad(lambda a, c: full_objective(a, c, temperature)[0], (0, 1))(z1, z2)
  log_z = jax.lax.stop_gradient(full_objective(z1, z2, temperature)[1])
  # The global estimator's perfect prior: one mean denominator per view.
  log_zbar = jax.nn.logsumexp(log_z, axis=1) - jnp.log(float(n))
  key = jax.random.key(0)
  out = {"infonce": relative_bias(expected_gradient(
      lambda a, c, i: L.dcl_loss(a, c, temperature=temperature), z1, z2, b), exact)}
  for rate in rates:
    def gamma(update_first, estimator="per_example"):
      state = {"per_example": {"log_z": log_z}, "global": {"log_z": log_zbar}}[estimator]
      return lambda a, c, i: L.gamma_loss(a, c, state, i, key, temperature=temperature,
                                          eps_shape=float("inf"), rate=rate,
                                          estimator=estimator, update_first=update_first)[0]
    for row, fn in (("gamma", gamma(False)), ("gamma_update_first", gamma(True)),
                    ("gamma_global", gamma(False, "global"))):
      out.setdefault(row, {})[str(rate)] = relative_bias(
          expected_gradient(fn, z1, z2, b), exact)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=32)
  parser.add_argument("--b", type=int, default=4)
  parser.add_argument("--out", default=os.path.join(ROOT, "experiments", "results",
                                                    "estimator_bias.json"))
  args = parser.parse_args()
  result = exact_biases(args.n, args.b)
  rates = list(result["gamma"])
  print(f"exact relative gradient bias, all C({args.n}, {args.b}) minibatches, perfect prior")
  print(f"{'estimator':<22}" + "".join(f"{'rate ' + r:>12}" for r in rates))
  print(f"{'minibatch InfoNCE':<22}" + f"{result['infonce']:>12.2e}" * len(rates))
  for row in ("gamma", "gamma_update_first", "gamma_global"):
    print(f"{row:<22}" + "".join(f"{result[row][r]:>12.2e}" for r in rates))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"n": args.n, "b": args.b, "temperature": 0.5, **result}, f, indent=2)
  print(json.dumps({"out": args.out}))


if __name__ == "__main__":
  main()
