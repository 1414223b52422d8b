"""How far is each estimator's denominator from the full-data one, on real embeddings?

Every small-batch estimator divides anchor k's negative gradient by some D_k, where the
full objective wants Z_k, the mean of exp(s_kj) over the whole data. With the
embeddings of a trained two-view checkpoint held fixed (sampling noise only, no drift
while training), this draws `--visits` epochs of visits per anchor, each a batch of
2b - 2 random negatives, and reports the error log D_k - log Z_k at the last visit:
  infonce       D = Zb, this batch's mean (self-normalised; E[log Zb] < log Z: biased)
  sogclr        D = (1 - g) u + g Zb, u its estimate from earlier visits (g = 0.9)
  gamma_inf     D = Zhat, the rate-r estimate from earlier visits only (the default order)
  gamma         D = Zhat / eps, eps ~ Gamma(shape 1): the same plus the E-step's draw
Mean (bias of the log) and standard deviation over anchors and draws, per batch size;
and the spread of the weight w_k = Zb_k / D_k that multiplies the batch's negative
gradient (grad log Zb_k): 0 for InfoNCE (self-normalised), and for an unbiased estimator
at least the spread of Zb_k / Z_k, the price of its unbiasedness.
With --drift_from STEP it also measures what holding the embeddings fixed leaves out:
how far each anchor's log Z_k moves between checkpoint STEP and the last one (an entry
refreshed once an epoch is that stale), in all (mean, std) and after removing the shift
that all anchors share (what a running level could follow).

  python experiments/denominator_noise.py --workdir results/batch_size_ablation/runs/...
"""

import argparse
import json
import os

import numpy as np


def embeddings(workdir: str, step=None) -> tuple[np.ndarray, float]:
  """(L2-normalised projections z [N, d] of the train split, temperature) of a
  two-view checkpoint (default the newest), on clean (evaluation-transformed) images."""
  from contrastive_jax import eval_checkpoint, evaluate
  from contrastive_jax.data import augment, pipeline
  cfg, state, task = eval_checkpoint.load(workdir, step)
  transform = pipeline.EvalImage(task.size, task.channels)
  z = evaluate.in_batches(
      lambda p, x: task.model.apply(p, augment.to_float(x), train=False)[1],
      task.eval_variables(state),
      ((b["image"],) for b in pipeline.eval_batches(task.train_src, transform, 256, threads=1)))
  return z / np.linalg.norm(z, axis=1, keepdims=True), float(cfg.temperature)


def log_mean_exp(x: np.ndarray, axis: int = -1) -> np.ndarray:
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.mean(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def full_log_z(z: np.ndarray, temperature: float, ks: np.ndarray):
  """(log Z_k [A], similarities s [A, N] with -inf at s_kk) of anchors ks: Z_k is the
  mean of exp(s_kj) over the N - 1 other examples."""
  s = z[ks] @ z.T / temperature
  s[np.arange(len(ks)), ks] = -np.inf
  return log_mean_exp(s) + np.log(len(z) / (len(z) - 1)), s


def denominator_errors(z: np.ndarray, temperature: float, batch: int, visits: int,
                       rate: float = 0.5, sogclr_rate: float = 0.9, seed: int = 0,
                       anchors: int = 1000) -> dict:
  """{estimator: {"mean", "std" of log D_k - log Z_k, "weight_std": std of log Zb_k / D_k}}
  at the last of `visits` visits; "exact" divides by Z_k itself."""
  rng = np.random.default_rng(seed)
  n = len(z)
  ks = rng.choice(n, size=min(anchors, n), replace=False)
  log_z, s = full_log_z(z, temperature, ks)
  m = 2 * batch - 2
  zhat = u = None
  for _ in range(visits):
    idx = rng.integers(0, n, size=(len(ks), m))
    idx = np.where(idx == ks[:, None], (idx + 1) % n, idx)
    log_zb = log_mean_exp(np.take_along_axis(s, idx, axis=1))
    if zhat is None:  # first visit: every estimator has only this batch
      last = {"infonce": log_zb, "sogclr": log_zb, "gamma_inf": log_zb}
      zhat = u = log_zb
      continue
    last = {"infonce": log_zb,
            "sogclr": np.logaddexp(np.log1p(-sogclr_rate) + u, np.log(sogclr_rate) + log_zb),
            "gamma_inf": zhat}
    u = last["sogclr"]
    zhat = np.logaddexp(np.log1p(-rate) + zhat, np.log(rate) + log_zb)
  last["gamma"] = last["gamma_inf"] - np.log(rng.exponential(size=len(ks)))
  last["exact"] = log_z
  return {k: {"mean": float(np.mean(v - log_z)), "std": float(np.std(v - log_z)),
              "weight_std": float(np.std(log_zb - v))} for k, v in last.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a two-view run's workdir")
  parser.add_argument("--batch_sizes", default="16,64,512")
  parser.add_argument("--visits", type=int, default=5, help="epochs: visits per anchor")
  parser.add_argument("--drift_from", type=int, default=None,
                      help="an earlier checkpoint step: how far log Z_k moved since")
  parser.add_argument("--out", default=None, help="JSON file (default WORKDIR/denominators.json)")
  args = parser.parse_args()
  z, t = embeddings(args.workdir)
  result = {"workdir": args.workdir, "temperature": t, "visits": args.visits, "rows": []}
  if args.drift_from is not None:
    ks = np.random.default_rng(0).choice(len(z), size=min(1000, len(z)), replace=False)
    earlier = embeddings(args.workdir, args.drift_from)[0]
    change = full_log_z(z, t, ks)[0] - full_log_z(earlier, t, ks)[0]
    result["drift"] = {"from_step": args.drift_from, "mean": float(change.mean()),
                       "std": float(change.std()),
                       "rms": float(np.sqrt(np.mean(change ** 2)))}
    print(f"log Z_k(last) - log Z_k(step {args.drift_from}): mean {change.mean():+.3f}, "
          f"std around the common shift {change.std():.3f}, rms {result['drift']['rms']:.3f}")
  print(f"visit {args.visits}, 1000 anchors, t = {t:g}: log D - log Z (mean ± std); "
        "std of log w")
  for b in (int(x) for x in args.batch_sizes.split(",")):
    errors = denominator_errors(z, t, b, args.visits)
    result["rows"].append({"batch": b, **errors})
    print(f"b={b:<4} " + "  ".join(f"{k} {e['mean']:+.3f} ± {e['std']:.3f}; {e['weight_std']:.3f}"
                                   for k, e in errors.items()))
  out = args.out or os.path.join(args.workdir, "denominators.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps({"out": out}))


if __name__ == "__main__":
  main()
