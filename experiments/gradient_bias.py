"""Gradient bias on a synthetic problem with a known optimum (NeurIPS 2022 claim).

One scalar parameter theta, negatives x ~ p (Gaussian, or a Gaussian mixture for
heavy-tailed contamination), objective
    L(theta) = -a theta + log E_p[exp(theta x)],
with `a` chosen so that the optimum is theta* = 1. Three stochastic gradients
from B negatives per step (the anchor's positive term is the constant -a):
  infonce  -a + sum_j x_j e^{theta x_j} / sum_j e^{theta x_j}   (biased, O(1/B))
  sogclr   -a + mean_j x_j e^{theta x_j} / u,   u <- (1 - rho) u + rho mean_j e^{theta x_j}
  gamma    -a + eps mean_j x_j e^{theta x_j} / u, eps ~ Gamma(shape, 1) / shape, same u
  gamma_warmup  gamma with eps = 1 (SogCLR's step) for the first --warmup steps, so that
           u is estimated before the Exponential(1) weight multiplies the gradient
10 runs from theta_0 ~ U(-1, 3), SGD with lr 0.01 / (1 + t / 2000); the final
value is the mean of the last half of the trajectory. Also measures each
estimator's bias and variance at theta* against the exact gradient (0) as a
function of B, with u at the exact denominator.

  python experiments/gradient_bias.py --out results/gradient_bias [--steps 40000]
Writes summary.json, table.md, trajectories.png, bias_variance.csv / .png.
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

# name -> (variance sigma^2, contamination probability p, contamination scale k)
NOISE = {"gauss_s2=0.5": (0.5, 0.0, 1.0), "gauss_s2=1": (1.0, 0.0, 1.0),
         "gauss_s2=2": (2.0, 0.0, 1.0), "contaminated_s2=1_p=0.05_k=2": (1.0, 0.05, 2.0)}
METHODS = ("infonce", "sogclr", "gamma", "gamma_warmup")


def log_mgf(theta, s2, p, k):
  """log E[exp(theta x)] of the mixture (1 - p) N(0, s2) + p N(0, k^2 s2)."""
  return jnp.logaddexp(jnp.log1p(-p) + 0.5 * theta ** 2 * s2,
                       jnp.log(p) + 0.5 * theta ** 2 * k ** 2 * s2) if p > 0 else \
      0.5 * theta ** 2 * s2


def sample(key, shape, s2, p, k):
  k1, k2 = jax.random.split(key)
  scale = jnp.where(jax.random.uniform(k1, shape) < p, k * np.sqrt(s2), np.sqrt(s2))
  return scale * jax.random.normal(k2, shape)


def estimator(method, theta, x, log_u, key, a, rho, shape, warm=True):
  """(gradient, new log u) for one step with negatives x [B]; warm=False: eps = 1."""
  logits = theta * x
  log_zb = jax.nn.logsumexp(logits) - jnp.log(x.shape[0])
  log_u = jnp.where(jnp.isneginf(log_u), log_zb,
                    jnp.logaddexp(jnp.log1p(-rho) + log_u, jnp.log(rho) + log_zb))
  weighted = jnp.mean(x * jnp.exp(logits - log_u))
  if method == "infonce":
    return -a + jnp.sum(x * jax.nn.softmax(logits)), log_u
  if method == "sogclr":
    return -a + weighted, log_u
  eps = jnp.where(warm, jax.random.gamma(key, shape) / shape, 1.0)
  return -a + eps * weighted, log_u


def run(method, noise, theta0, key, *, steps, batch, rho, shape, lr0, warmup):
  s2, p, k = NOISE[noise]
  a = jax.grad(log_mgf)(1.0, s2, p, k)  # makes theta* = 1

  def step(carry, t):
    theta, log_u, key = carry
    key, kx, ke = jax.random.split(key, 3)
    warm = t >= (warmup if method == "gamma_warmup" else 0)
    g, log_u = estimator(method, theta, sample(kx, (batch,), s2, p, k), log_u, ke, a, rho, shape,
                         warm)
    theta = theta - lr0 / (1.0 + t / 2000.0) * g
    return (theta, log_u, key), theta

  _, traj = jax.lax.scan(step, (theta0, -jnp.inf, key), jnp.arange(steps, dtype=jnp.float32))
  return traj


def bias_variance(noise, method, batch, key, *, draws, shape):
  """Mean and variance of the gradient at theta* = 1 (exact gradient 0), u exact."""
  s2, p, k = NOISE[noise]
  a = jax.grad(log_mgf)(1.0, s2, p, k)
  log_u = log_mgf(1.0, s2, p, k)

  def one(key):
    kx, ke = jax.random.split(key)
    return estimator(method, 1.0, sample(kx, (batch,), s2, p, k), log_u, ke, a, 0.0, shape)[0]

  g = jax.vmap(one)(jax.random.split(key, draws))
  return float(jnp.mean(g)), float(jnp.var(g))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/gradient_bias")
  parser.add_argument("--steps", type=int, default=40000)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--rho", type=float, default=0.01)
  parser.add_argument("--shape", type=float, default=1.0)
  parser.add_argument("--lr", type=float, default=0.01)
  parser.add_argument("--warmup", type=int, default=1000, help="eps = 1 steps of gamma_warmup")
  parser.add_argument("--draws", type=int, default=200000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  theta0 = jax.random.uniform(jax.random.key(args.seed), (args.runs,), minval=-1.0, maxval=3.0)
  keys = jax.random.split(jax.random.key(args.seed + 1), args.runs)
  summary, trajectories = {"args": vars(args), "final": {}}, {}
  for noise in NOISE:
    for method in METHODS:
      f = jax.jit(jax.vmap(lambda t0, k, m=method, n=noise: run(
          m, n, t0, k, steps=args.steps, batch=args.batch, rho=args.rho, shape=args.shape,
          lr0=args.lr, warmup=args.warmup)))
      traj = np.asarray(f(theta0, keys))
      final = traj[:, args.steps // 2:].mean(1)
      trajectories[(noise, method)] = traj
      summary["final"][f"{noise}/{method}"] = {
          "mean": float(final.mean()), "min": float(final.min()), "max": float(final.max()),
          "within_0.1_of_1": bool(np.all(np.abs(final - 1.0) < 0.1))}
      print(f"{noise:>30} {method:>8}: final {final.mean():.3f} "
            f"[{final.min():.3f}, {final.max():.3f}]", flush=True)

  rows = []  # gamma_warmup is the gamma estimator at theta*: not repeated
  for noise in NOISE:
    for method in METHODS[:3]:
      for b in (4, 8, 16, 64, 256):
        mean, var = bias_variance(noise, method, b, jax.random.key(b), draws=args.draws,
                                  shape=args.shape)
        rows.append((noise, method, b, mean, var))
  summary["bias_variance"] = [dict(zip(("noise", "method", "batch", "bias", "variance"), r))
                              for r in rows]
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(args.out, "bias_variance.csv"), "w") as f:
    f.write("noise,method,batch,bias,variance\n")
    f.writelines(f"{n},{m},{b},{mu:.6g},{v:.6g}\n" for n, m, b, mu, v in rows)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write("| noise | " + " | ".join(METHODS) + " |\n|---|" + "---|" * len(METHODS) + "\n")
    for noise in NOISE:
      cells = [summary["final"][f"{noise}/{m}"] for m in METHODS]
      f.write(f"| {noise} | " + " | ".join(
          f"{c['mean']:.3f} [{c['min']:.3f}, {c['max']:.3f}]" for c in cells) + " |\n")
  _plot(trajectories, rows, args.out)
  print(open(os.path.join(args.out, "table.md")).read())
  print(json.dumps(summary["final"]))


def _plot(trajectories, rows, out):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(len(NOISE), len(METHODS), figsize=(15, 3 * len(NOISE)),
                           sharex=True, squeeze=False)
  for i, noise in enumerate(NOISE):
    for j, method in enumerate(METHODS):
      ax = axes[i, j]
      traj = trajectories[(noise, method)]
      stride = max(1, traj.shape[1] // 500)
      ax.plot(np.arange(0, traj.shape[1], stride), traj[:, ::stride].T, lw=0.7)
      ax.axhline(1.0, color="k", ls="--", lw=0.8)
      ax.set_title(f"{method}, {noise}", fontsize=9)
      ax.set_ylim(-1.5, 7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "trajectories.png"), dpi=100)
  plt.close(fig)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  for noise in NOISE:
    for method in METHODS[:3]:
      pts = [(b, mu, v) for n, m, b, mu, v in rows if n == noise and m == method]
      b, mu, v = map(np.array, zip(*pts))
      axes[0].plot(b, np.abs(mu), marker="o", label=f"{method} {noise}")
      axes[1].plot(b, v, marker="o")
  for ax, title in zip(axes, ("|bias| at theta*", "variance at theta*")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_title(title)
  axes[0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "bias_variance.png"), dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  main()
