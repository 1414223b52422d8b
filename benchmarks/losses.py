"""Loss speed and communication benchmark (not a test).

For B in {256, 1024, 4096} and D = 128 it times fwd+bwd of every loss on one
device, divides by a matmul lower bound (the two similarity-sized products the
loss cannot avoid: S = A K^T and dA = G K, with A, K of the loss's anchor/key
sizes) and by optax.losses.ntxent on the same inputs, all measured in this run.
It then compiles each loss sharded over 8 devices and reads the bytes its
collectives move per step off the HLO. The last line printed is JSON.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/losses.py [--sizes 256,1024]
"""

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from contrastive_jax import losses as L  # noqa: E402
from contrastive_jax.hlo import collective_bytes as hlo_collective_bytes  # noqa: E402

D, T = 128, 0.1


def loss_fns(n_examples):
  """name -> (fn(z1, z2, idx, key) -> scalar, rows of the similarity matrix per side)."""
  sog, gam = L.init_sogclr_state(n_examples), L.init_gamma_state(n_examples)
  return {
      "nt_xent": (lambda a, b, i, k, ax=None: L.nt_xent(a, b, temperature=T, axis_name=ax), 2),
      "clip": (lambda a, b, i, k, ax=None: L.clip_loss(a, b, temperature=T, axis_name=ax), 1),
      "sigmoid": (lambda a, b, i, k, ax=None: L.sigmoid_loss(
          a, b, temperature=T, bias=-10.0, axis_name=ax), 1),
      "dcl": (lambda a, b, i, k, ax=None: L.dcl_loss(a, b, temperature=T, axis_name=ax), 2),
      "sogclr": (lambda a, b, i, k, ax=None: L.sogclr_loss(
          a, b, sog, i, temperature=T, axis_name=ax)[0], 2),
      "gamma": (lambda a, b, i, k, ax=None: L.gamma_loss(
          a, b, gam, i, k, temperature=T, axis_name=ax)[0], 2),
      "gamma_global": (lambda a, b, i, k, ax=None: L.gamma_loss(
          a, b, L.init_gamma_state(estimator="global"), i, k, temperature=T, estimator="global",
          axis_name=ax)[0], 2),
      "gamma_clip": (lambda a, b, i, k, ax=None: L.gamma_clip_loss(
          a, b, gam, i, k, temperature=T, axis_name=ax)[0], 1),
  }


def timeit(f, *args, reps=5):
  jax.block_until_ready(f(*args))  # compile + warm up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def matmul_bound(rows, reps):
  """Seconds for S = A K^T and dA = S K with A, K [rows, D]."""
  a, k = jax.random.normal(jax.random.key(0), (2, rows, D))
  f = jax.jit(lambda a, k: (a @ k.T) @ k)
  return timeit(f, a, k, reps=reps)


def collective_bytes(fn, b, n_examples):
  """Bytes in the results of each collective kind of fwd+bwd sharded over all devices."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  f = jax.shard_map(lambda a, c, i, k: fn(a, c, i, k, "data"), mesh=mesh,
                    in_specs=(P("data"), P("data"), P("data"), P()), out_specs=P())
  g = jax.grad(f, (0, 1))
  z = jnp.zeros((b, D))
  hlo = jax.jit(g).lower(z, z, jnp.arange(b) % n_examples, jax.random.key(0)).compile().as_text()
  return hlo_collective_bytes(hlo)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="256,1024,4096")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--optax_max_gb", type=float, default=4.0)
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  n_examples = 100_000
  results = {"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
             "D": D, "timing": {}, "bytes_8_devices": {}}
  print(f"fwd+bwd on one {results['device']} device, D = {D}; ratios measured in this run")
  print(f"{'B':>6} {'loss':>13} {'ms':>9} {'/ matmul':>9} {'/ optax':>8}")
  for b in sizes:
    key = jax.random.key(b)
    z1, z2 = jax.random.normal(key, (2, b, D))
    idx = jnp.arange(b)
    labels = jnp.concatenate([idx, idx])
    bounds = {1: matmul_bound(b, args.reps), 2: matmul_bound(2 * b, args.reps)}
    # optax's cosine similarity broadcasts to a [2B, 2B, D] tensor: skip it where that
    # alone would exceed the memory limit.
    optax_bytes = (2 * b) ** 2 * D * 4
    if optax_bytes <= args.optax_max_gb * 2**30:
      optax_t = timeit(jax.jit(jax.grad(lambda a, c: optax.losses.ntxent(
          jnp.concatenate([a, c]), labels, T), (0, 1))), z1, z2, reps=args.reps)
      print(f"{b:>6} {'optax.ntxent':>13} {1e3 * optax_t:>9.2f} {optax_t / bounds[2]:>9.2f} "
            f"{1.0:>8.2f}")
    else:
      optax_t = float("nan")
      print(f"{b:>6} {'optax.ntxent':>13}   skipped: its [2B, 2B, D] intermediate needs "
            f"{optax_bytes / 2**30:.0f} GiB")
    row = {"optax_ntxent_ms": 1e3 * optax_t, "matmul_bound_ms": 1e3 * bounds[2]}
    for name, (fn, side) in loss_fns(n_examples).items():
      t = timeit(jax.jit(jax.grad(lambda a, c: fn(a, c, idx, key), (0, 1))), z1, z2,
                 reps=args.reps)
      row[name] = {"ms": 1e3 * t, "vs_matmul": t / bounds[side], "vs_optax": t / optax_t}
      print(f"{b:>6} {name:>13} {1e3 * t:>9.2f} {t / bounds[side]:>9.2f} {t / optax_t:>8.2f}")
    results["timing"][b] = row
  b = 1024
  print(f"\nbytes moved between {jax.device_count()} devices per fwd+bwd step, global B = {b}, "
        f"D = {D} (sum of collective result sizes in the compiled HLO)")
  print(f"{'loss':>13} {'all-gather':>11} {'all-reduce':>11} {'other':>8}")
  for name, (fn, _) in loss_fns(n_examples).items():
    moved = collective_bytes(fn, b, n_examples)
    results["bytes_8_devices"][name] = moved
    other = sum(v for k, v in moved.items() if k not in ("all-gather", "all-reduce"))
    print(f"{name:>13} {moved.get('all-gather', 0):>11} {moved.get('all-reduce', 0):>11} "
          f"{other:>8}")
  print(json.dumps(results, allow_nan=True))


if __name__ == "__main__":
  main()
