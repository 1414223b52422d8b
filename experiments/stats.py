"""Seed statistics shared by the experiments: 95 % t-intervals, paired by seed.

A difference counts as a win (or a loss) only when its interval excludes zero.
"""

import numpy as np


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high) of the mean of `values` [n] with a Student-t interval; n = 1 gives
  an infinite interval (one seed says nothing about the spread)."""
  from scipy import stats
  v = np.asarray(values, np.float64)
  if v.size == 0:
    raise ValueError("no values")
  mean = float(v.mean())
  if v.size < 2:
    return mean, -np.inf, np.inf
  half = stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
  return mean, mean - half, mean + half


def paired(a: dict, b: dict) -> dict:
  """a - b over the seeds both have ({seed: value} each): mean, 95 % interval, n and the
  verdict: "win" (interval above 0), "loss" (below 0) or "tie" (contains 0)."""
  seeds = sorted(set(a) & set(b))
  if not seeds:
    raise ValueError("no seed in common")
  mean, lo, hi = t_interval([a[s] - b[s] for s in seeds])
  verdict = "win" if lo > 0 else "loss" if hi < 0 else "tie"
  return {"mean": mean, "low": lo, "high": hi, "n": len(seeds), "verdict": verdict}


def fmt(d: dict, scale: float = 100.0) -> str:
  """'+0.53 [+0.12, +0.94]' (scaled, e.g. to percentage points)."""
  return f"{scale * d['mean']:+.2f} [{scale * d['low']:+.2f}, {scale * d['high']:+.2f}]"
