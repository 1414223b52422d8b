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


def plot_curves(records: Sequence[dict], path: str,
                keys: Sequence[str] = ("loss", "nt_xent_local", "examples_per_s", "knn_top1")) -> str:
  """One panel per metric against step; train and eval records both."""
  keys = [k for k in keys if any(k in r for r in records)]
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
  for ax, key in zip(axes[0], keys):
    # null (a non-finite value) is drawn as a gap
    pts = [(r["step"], np.nan if r[key] is None else r[key])
           for r in records if key in r and "step" in r]
    ax.plot(*zip(*pts), marker="o" if key == "knn_top1" else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_title(key)
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
                    labels: Optional[np.ndarray] = None) -> str:
  """PCA of the normalised image and text embeddings [N, D] in one projection.

  Marker = modality (o image, x text), colour = class; the title gives the gap.
  """
  img = np.asarray(metrics.l2_normalize(np.asarray(img, np.float32)))
  txt = np.asarray(metrics.l2_normalize(np.asarray(txt, np.float32)))
  proj = pca_2d(np.concatenate([img, txt]))
  colours = None if labels is None else np.concatenate([labels, labels])
  fig, ax = plt.subplots(figsize=(5, 5))
  n = len(img)
  ax.scatter(*proj[:n].T, c=None if colours is None else colours[:n], marker="o", s=8,
             cmap="tab10", label="image")
  ax.scatter(*proj[n:].T, c=None if colours is None else colours[n:], marker="x", s=8,
             cmap="tab10", label="text")
  ax.legend()
  ax.set_title(f"modality gap {float(metrics.modality_gap(img, txt)):.3f}")
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return path


def main(argv: Optional[list[str]]=None) -> None:
  parser = argparse.ArgumentParser(description="Plot a workdir's training curves.")
  parser.add_argument("--workdir", required=True, help="local path or gs://bucket/run")
  args = parser.parse_args(argv)
  print(plot_curves(read_metrics(args.workdir), workdir_lib.join(args.workdir, "curves.png")))


if __name__ == "__main__":
  main()
