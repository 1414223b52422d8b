"""Parity with peer libraries: each loss against its counterpart on identical inputs.

  pip install -c constraints.txt '.[parity]' --extra-index-url https://download.pytorch.org/whl/cpu
  python benchmarks/parity.py          # writes benchmarks/results/parity.json, prints a table

Counterparts: open_clip's ClipLoss and SigLipLoss, lightly's NTXentLoss, DCLLoss and
DCLWLoss, optax's ntxent. Inputs are the same float32 raw embeddings (seeded); where the
peer expects normalised features, they are normalised in its own framework, so every
gradient is d loss / d raw input on both sides. Differences are relative to the peer:
|ours - theirs| / |theirs| for values, max |ours - theirs| / max |theirs| for gradients.
Run on CPU; the test suite needs none of these packages (docs/porting.md cites the output).
"""

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax import losses as L

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "parity.json")


def _ours(fn, *xs):
  """(value, gradients) of a JAX loss of raw float32 inputs."""
  value, grads = jax.value_and_grad(fn, argnums=tuple(range(len(xs))))(
      *(jnp.asarray(x) for x in xs))
  return float(value), [np.asarray(g, np.float64) for g in grads]


def _theirs(fn, *xs):
  """(value, gradients) of a torch loss of raw float32 inputs."""
  import torch
  ts = [torch.tensor(x, requires_grad=True) for x in xs]
  value = fn(*ts)
  value.backward()
  return float(value), [t.grad.numpy().astype(np.float64) for t in ts]


def cases(t: float, b: int, d: int, seed: int) -> dict:
  """{name: (ours (value, grads), theirs (value, grads), what differs by design)}."""
  import torch
  import torch.nn.functional as F
  import optax
  from lightly import loss as lightly_loss
  from open_clip import loss as open_clip_loss

  rng = np.random.default_rng(seed)
  a, p = (rng.normal(size=(b, d)).astype(np.float32) for _ in range(2))
  p = (a + 0.5 * p).astype(np.float32)  # positives near their anchors
  scale = torch.tensor(1.0 / t)
  out = {}
  out["clip_loss vs open_clip ClipLoss"] = (
      _ours(lambda x, y: L.clip_loss(x, y, temperature=t), a, p),
      _theirs(lambda x, y: open_clip_loss.ClipLoss()(F.normalize(x, dim=-1),
                                                    F.normalize(y, dim=-1), scale), a, p), "")
  bias = -5.0
  out["sigmoid_loss vs open_clip SigLipLoss"] = (
      _ours(lambda x, y: L.sigmoid_loss(x, y, temperature=t, bias=bias), a, p),
      _theirs(lambda x, y: open_clip_loss.SigLipLoss()(
          F.normalize(x, dim=-1), F.normalize(y, dim=-1), scale, torch.tensor(bias)), a, p), "")
  out["nt_xent vs lightly NTXentLoss"] = (
      _ours(lambda x, y: L.nt_xent(x, y, temperature=t), a, p),
      _theirs(lambda x, y: lightly_loss.NTXentLoss(temperature=t)(x, y), a, p), "")
  out["dcl_loss vs lightly DCLLoss"] = (
      _ours(lambda x, y: L.dcl_loss(x, y, temperature=t), a, p),
      _theirs(lambda x, y: lightly_loss.DCLLoss(temperature=t)(x, y), a, p), "")
  out["dcl_loss(weighted) vs lightly DCLWLoss"] = (
      _ours(lambda x, y: L.dcl_loss(x, y, temperature=t, weighted=True, sigma=0.5), a, p),
      _theirs(lambda x, y: lightly_loss.DCLWLoss(temperature=t, sigma=0.5)(x, y), a, p),
      "gradient: lightly detaches the von Mises-Fisher weight, ours differentiates it")
  labels = jnp.concatenate([jnp.arange(b), jnp.arange(b)])
  ours = _ours(lambda x, y: L.nt_xent(x, y, temperature=t), a, p)
  value, grad = jax.value_and_grad(
      lambda x, y: optax.losses.ntxent(jnp.concatenate([x, y]), labels, temperature=t),
      argnums=(0, 1))(jnp.asarray(a), jnp.asarray(p))
  out["nt_xent vs optax ntxent"] = (ours, (float(value), [np.asarray(g, np.float64)
                                                          for g in grad]), "")
  return out


def relative(ours, theirs) -> tuple[float, float]:
  (v, gs), (w, hs) = ours, theirs
  grad = max(float(np.max(np.abs(g - h)) / max(np.max(np.abs(h)), 1e-12))
             for g, h in zip(gs, hs))
  return abs(v - w) / max(abs(w), 1e-12), grad


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--temperatures", default="0.1,0.5", help="comma-separated")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--dim", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=OUT)
  args = parser.parse_args(argv)
  import lightly
  import open_clip
  import torch
  rows = []
  for t in (float(x) for x in args.temperatures.split(",")):
    for name, (ours, theirs, note) in cases(t, args.batch, args.dim, args.seed).items():
      dv, dg = relative(ours, theirs)
      rows.append({"comparison": name, "temperature": t, "ours": ours[0], "theirs": theirs[0],
                   "value_rel_diff": dv, "grad_rel_diff": dg, "note": note})
  versions = {"jax": jax.__version__, "torch": torch.__version__,
              "open_clip": open_clip.__version__, "lightly": lightly.__version__,
              "python": platform.python_version()}
  result = {"batch": args.batch, "dim": args.dim, "seed": args.seed, "versions": versions,
            "rows": rows}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"B = {args.batch}, D = {args.dim}, seed {args.seed}, float32 on CPU; {versions}")
  print("| comparison | t | ours | theirs | value rel. diff | grad rel. diff | note |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['comparison']} | {r['temperature']} | {r['ours']:.6f} | {r['theirs']:.6f} | "
          f"{r['value_rel_diff']:.1e} | {r['grad_rel_diff']:.1e} | {r['note']} |")
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
