"""Gradient bias on a synthetic problem with a known optimum (NeurIPS 2022 claim).

One scalar parameter theta, negatives x ~ p (Gaussian, or a Gaussian mixture for
heavy-tailed contamination), objective
    L(theta) = -a theta + log E_p[exp(theta x)],
with `a` chosen so that the optimum is theta* = 1. One anchor sees B fresh negatives
per step; its log Zb = log mean_j exp(theta x_j) and positive logit a theta go through
the library's `losses.decomposable_loss` (the E/M step of `gamma_loss`), with a one-entry
state, so what runs here is the library's estimator:
  infonce             -a + sum_j x_j e^{theta x_j} / sum_j e^{theta x_j}  (biased, O(1/B))
  sogclr              decomposable_loss(update_first=True, eps_shape=inf, max_ratio=inf):
                      SogCLR's gradient, u from the estimate that holds the batch
  gamma               decomposable_loss with its default options (eps_shape 1, u from the
                      pre-update estimate, max_ratio 100, rate 0.01)
  gamma_no_bound      the same with max_ratio = inf
  gamma_update_first  the same with SogCLR's order (the default before 2026-11-25)
--runs runs from theta_0 ~ U(-1, 3), SGD with lr 0.01 / (1 + t / 2000); the final
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

from contrastive_jax import losses as L

# name -> (variance sigma^2, contamination probability p, contamination scale k)
NOISE = {"gauss_s2=0.5": (0.5, 0.0, 1.0), "gauss_s2=1": (1.0, 0.0, 1.0),
         "gauss_s2=2": (2.0, 0.0, 1.0), "contaminated_s2=1_p=0.05_k=2": (1.0, 0.05, 2.0)}
INF = float("inf")
# Options of decomposable_loss per method (None: minibatch InfoNCE); the rest are defaults.
METHODS = {"infonce": None,
           "sogclr": dict(update_first=True, eps_shape=INF, max_ratio=INF),
           "gamma": {},
           "gamma_no_bound": dict(max_ratio=INF),
           "gamma_update_first": dict(update_first=True)}


def log_mgf(theta, s2, p, k):
  """log E[exp(theta x)] of the mixture (1 - p) N(0, s2) + p N(0, k^2 s2)."""
  return jnp.logaddexp(jnp.log1p(-p) + 0.5 * theta ** 2 * s2,
                       jnp.log(p) + 0.5 * theta ** 2 * k ** 2 * s2) if p > 0 else \
      0.5 * theta ** 2 * s2


def sample(key, shape, s2, p, k):
  k1, k2 = jax.random.split(key)
  scale = jnp.where(jax.random.uniform(k1, shape) < p, k * np.sqrt(s2), np.sqrt(s2))
  return scale * jax.random.normal(k2, shape)


def estimator(method, theta, x, state, key, a, options=None):
  """(gradient d loss / d theta, new state) for one step with negatives x [B]."""
  if METHODS[method] is None:
    return -a + jnp.sum(x * jax.nn.softmax(theta * x)), state

  def loss(th):
    log_zb = jax.nn.logsumexp(th * x) - jnp.log(x.shape[0])
    return L.decomposable_loss(log_zb[None, None], (a * th)[None, None], state,
                               jnp.zeros(1, jnp.int32), key,
                               **{**METHODS[method], **(options or {})})

  return jax.grad(loss, has_aux=True)(theta)


def run(method, noise, theta0, key, *, steps, batch, lr0, options=None):
  s2, p, k = NOISE[noise]
  a = jax.grad(log_mgf)(1.0, s2, p, k)  # makes theta* = 1

  def step(carry, t):
    theta, state, key = carry
    key, kx, ke = jax.random.split(key, 3)
    g, state = estimator(method, theta, sample(kx, (batch,), s2, p, k), state, ke, a, options)
    theta = theta - lr0 / (1.0 + t / 2000.0) * g
    return (theta, state, key), theta

  state = L.init_gamma_state(1, rows=1)
  _, traj = jax.lax.scan(step, (jnp.float32(theta0), state, key),
                         jnp.arange(steps, dtype=jnp.float32))
  return traj


def final_values(method, noise, theta0, keys, *, steps, batch, lr0, options=None):
  """Mean of the last half of each run's trajectory [runs] (NaN for a run that blew up)."""
  f = jax.jit(jax.vmap(lambda t0, k: run(method, noise, t0, k, steps=steps, batch=batch,
                                         lr0=lr0, options=options)))
  traj = np.asarray(f(theta0, keys))
  return traj, traj[:, steps // 2:].mean(1)


def bias_variance(noise, method, batch, key, *, draws):
  """Mean and variance of the gradient at theta* = 1 (exact gradient 0), u exact (the
  state holds log Z and rate 0 keeps it there)."""
  s2, p, k = NOISE[noise]
  a = jax.grad(log_mgf)(1.0, s2, p, k)
  state = {"log_z": jnp.full((1, 1), log_mgf(1.0, s2, p, k), jnp.float32)}
  options = dict(rate=0.0)

  def one(key):
    kx, ke = jax.random.split(key)
    return estimator(method, jnp.float32(1.0), sample(kx, (batch,), s2, p, k), state, ke, a,
                     options)[0]

  g = jax.jit(jax.vmap(one))(jax.random.split(key, draws))
  return float(jnp.mean(g)), float(jnp.var(g))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/gradient_bias")
  parser.add_argument("--steps", type=int, default=40000)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--lr", type=float, default=0.01)
  parser.add_argument("--draws", type=int, default=200000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  theta0 = jax.random.uniform(jax.random.key(args.seed), (args.runs,), minval=-1.0, maxval=3.0)
  keys = jax.random.split(jax.random.key(args.seed + 1), args.runs)
  summary, trajectories = {"args": vars(args), "final": {}}, {}
  for noise in NOISE:
    for method in METHODS:
      traj, final = final_values(method, noise, theta0, keys, steps=args.steps,
                                 batch=args.batch, lr0=args.lr)
      trajectories[(noise, method)] = traj
      done = final[np.isfinite(final)]
      summary["final"][f"{noise}/{method}"] = {
          **({"mean": float(done.mean()), "min": float(done.min()), "max": float(done.max())}
             if done.size else {"mean": None, "min": None, "max": None}),
          "non_finite": int(final.size - done.size),
          "runs_within_0.1_of_1": int(np.sum(np.abs(done - 1.0) < 0.1)), "runs": args.runs}
      print(f"{noise:>30} {method:>18}: {_cell(summary['final'][f'{noise}/{method}'])}",
            flush=True)

  rows = []  # at theta* with u exact the order and the bound do not act: three estimators
  for noise in NOISE:
    for method in ("infonce", "sogclr", "gamma"):
      for b in (4, 8, 16, 64, 256):
        mean, var = bias_variance(noise, method, b, jax.random.key(b), draws=args.draws)
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
      f.write(f"| {noise} | " + " | ".join(
          _cell(summary["final"][f"{noise}/{m}"]) for m in METHODS) + " |\n")
  _plot(trajectories, rows, args.out)
  print(open(os.path.join(args.out, "table.md")).read())
  print(json.dumps(summary["final"]))


def _cell(c: dict) -> str:
  """'1.004 [0.983, 1.023], 10/10' (runs within 0.1 of 1.0; NaN runs counted)."""
  head = "all NaN" if c["mean"] is None else f"{c['mean']:.3f} [{c['min']:.3f}, {c['max']:.3f}]"
  nan = f", {c['non_finite']} NaN" if c["non_finite"] else ""
  return f"{head}{nan}, {c['runs_within_0.1_of_1']}/{c['runs']}"


def _plot(trajectories, rows, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
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
    for method in ("infonce", "sogclr", "gamma"):
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
