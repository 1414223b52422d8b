"""Plots: training curves from a workdir's metrics.jsonl, and a 2-D PCA of two
modalities' embeddings coloured by modality and class (the modality gap made visible).

  python -m contrastive_jax.plot --workdir DIR            # writes DIR/curves.png
"""

import argparse
import io
import json
from typing import Optional, Sequence

from etils import epath

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import numpy as np

from contrastive_jax import metrics
from contrastive_jax import workdir as workdir_lib


def read_metrics(workdir: workdir_lib.PathLike) -> list[dict]:
  """The records of workdir/metrics.jsonl (local or remote workdir)."""
  path = workdir_lib.join(workdir, "metrics.jsonl")
  if not path.exists():
    raise FileNotFoundError(f"no metrics.jsonl in {workdir}: is it a training workdir?")
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save(fig, path: workdir_lib.PathLike) -> None:
  """fig as a PNG at path, local or remote (matplotlib writes local files only)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=120, format="png")
  epath.Path(path).write_bytes(buffer.getvalue())


def titles(config: Optional[dict] = None) -> dict:
  """{metric: (panel title, y label)}; the training loss's title names the run's loss
  and temperature when its config is known."""
  config = config or {}
  loss = config.get("loss", "training loss")
  t = config.get("temperature")
  named = f"{loss} (t = {t})" if t is not None else loss
  return {"loss": (f"training loss: {named}", "loss (the objective's own scale)"),
          "nt_xent_local": ("nt_xent on each device's rows (t = 0.1)",
                            "InfoNCE, comparable across losses"),
          "examples_per_s": ("training throughput", "examples / s"),
          "knn_top1": ("kNN top-1 on the eval split", "accuracy")}


def plot_curves(records: Sequence[dict], path: str,
                keys: Sequence[str] = ("loss", "nt_xent_local", "examples_per_s", "knn_top1"),
                config: Optional[dict] = None) -> str:
  """One panel per metric against step, train and eval records both; `config` (the
  run's config.json) names the loss."""
  keys = [k for k in keys if any(k in r for r in records)]
  names = titles(config)
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
  for ax, key in zip(axes[0], keys):
    # null (a non-finite value) is drawn as a gap
    pts = [(r["step"], np.nan if r[key] is None else r[key])
           for r in records if key in r and "step" in r]
    ax.plot(*zip(*pts), marker="o" if key == "knn_top1" else None, markersize=3)
    ax.set_xlabel("step")
    title, ylabel = names.get(key, (key, key))
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return path


def pca_2d(x: np.ndarray) -> np.ndarray:
  """Top-2 principal components of x [N, D] -> [N, 2]."""
  x = x - x.mean(0)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  return x @ vt[:2].T


def plot_modalities(img: np.ndarray, txt: np.ndarray, path: str,
                    labels: Optional[np.ndarray] = None, title: str = "",
                    class_name: str = "class") -> str:
  """PCA of the normalised image and text embeddings [N, D] in one projection.

  Marker = modality (o image, x text), colour = class (a legend entry per class); the
  title gives `title` (e.g. the variant and seed) and the modality gap of these N pairs.
  """
  img = np.asarray(metrics.l2_normalize(np.asarray(img, np.float32)))
  txt = np.asarray(metrics.l2_normalize(np.asarray(txt, np.float32)))
  proj = pca_2d(np.concatenate([img, txt]))
  colours = None if labels is None else np.concatenate([labels, labels])
  fig, ax = plt.subplots(figsize=(6, 5))
  n = len(img)
  ax.scatter(*proj[:n].T, c=None if colours is None else colours[:n], marker="o", s=8,
             cmap="tab10", label="image")
  ax.scatter(*proj[n:].T, c=None if colours is None else colours[n:], marker="x", s=8,
             cmap="tab10", label="text")
  handles = [plt.Line2D([], [], marker="o", ls="", color="grey", label="image"),
             plt.Line2D([], [], marker="x", ls="", color="grey", label="text")]
  if labels is not None:
    cmap = plt.get_cmap("tab10")
    handles += [plt.Line2D([], [], marker="s", ls="", color=cmap(int(c) % 10),
                           label=f"{class_name} {c}") for c in np.unique(labels)]
  ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  gap = float(metrics.modality_gap(img, txt))
  ax.set_title(f"{title + ': ' if title else ''}modality gap {gap:.3f} (n = {n} pairs)",
               fontsize=9)
  ax.set_xlabel("PC 1")
  ax.set_ylabel("PC 2")
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return path


def main(argv: Optional[list[str]]=None) -> None:
  parser = argparse.ArgumentParser(description="Plot a workdir's training curves.")
  parser.add_argument("--workdir", required=True, help="local path or gs://bucket/run")
  args = parser.parse_args(argv)
  config = workdir_lib.join(args.workdir, "config.json")
  config = json.loads(config.read_text()) if config.exists() else None
  print(plot_curves(read_metrics(args.workdir), workdir_lib.join(args.workdir, "curves.png"),
                    config=config))


if __name__ == "__main__":
  main()
