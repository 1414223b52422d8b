"""Memory and time of the similarity losses' default call (fwd + bwd) against the
bare matmuls they need, from B = 1024 to 65536.

  python benchmarks/losses.py [--sizes 1024,4096,8192] [--losses nt_xent,gamma_loss]
                              [--time_up_to 16384] [--out benchmarks/results/losses.json]

For each loss and batch size B (D = 128, float32, one device):
  * memory: XLA's memory analysis of the compiled fwd + bwd (temp + output + arguments);
  * time: median wall time of fwd + bwd (jitted, after a warm-up);
  * bound: the three products a similarity loss cannot avoid at its sizes, timed
    in the same run: S = A K^T, dA = G K, dK = G^T A (A [M, D], K [K, D], G [M, K]);
    a streamed call also recomputes S, so its bound is four products, run over the
    same key chunks (no [M, K] matrix: at B = 65536 one would be 64 GiB).
The ratio is time / bound of the path the default call takes (direct while
M x K <= streamed.DIRECT_MAX_ELEMENTS, else streamed). Sizes above --time_up_to
are compiled for memory but not timed (a B = 65536 nt_xent step is ~10^13 flops).

Then, sharded over 8 (simulated) devices at --comm_batch, the bytes each loss's
compiled fwd + bwd moves between devices, per collective kind: all-gather of the
keys vs the ring (`ring=True`: key blocks passed with ppermute), and the gamma
losses (local negatives). The last line is JSON.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from contrastive_jax import hlo
from contrastive_jax import losses as L
from contrastive_jax.losses import streamed

D, T = 128, 0.1


def loss_and_args(name: str, b: int):
  """(fn(*args) -> scalar, args, (M, K) of its similarity matrix)."""
  key = jax.random.key(0)
  x, y = jax.random.normal(key, (2, b, D), jnp.float32)
  if name == "nt_xent":
    return (lambda x, y: L.nt_xent(x, y, temperature=T)), (x, y), (2 * b, 2 * b)
  if name == "clip_loss":
    return (lambda x, y: L.clip_loss(x, y, temperature=T)), (x, y), (b, b)
  if name == "sigmoid_loss":
    return (lambda x, y: L.sigmoid_loss(x, y, temperature=T, bias=-10.0)), (x, y), (b, b)
  if name == "gamma_loss":
    state, idx = L.init_gamma_state(b), jnp.arange(b)
    fn = lambda x, y: L.gamma_loss(x, y, state, idx, jax.random.key(1), temperature=T)[0]
    return fn, (x, y), (2 * b, 2 * b)
  raise ValueError(f"unknown loss {name!r}")


def timed(fn, args, repeats: int) -> float:
  """Median seconds of a call, compilation excluded (and a warm-up call when repeats > 1:
  at the largest sizes one call takes minutes on a CPU)."""
  fn = jax.jit(fn).lower(*args).compile()
  if repeats > 1:
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bound(m: int, k: int, repeats: int, chunk=None) -> float:
  """Seconds of the products alone: S = A K^T, dA = G K, dK = G^T A at once (direct
  path), or, over key chunks as the streamed path runs them, S_c twice (forward and
  recomputed), dA += G_c K_c and dK_c = G_c^T A, with one random G_c for every chunk."""
  key = jax.random.key(2)
  a, kk = jax.random.normal(key, (2, max(m, k), D), jnp.float32)
  a, kk = a[:m], kk[:k]
  if chunk is None:
    g = jax.random.normal(key, (m, k), jnp.float32)
    return timed(lambda a, kk, g: (a @ kk.T, g @ kk, g.T @ a), (a, kk, g), repeats)
  n = -(-k // chunk)
  kc = jnp.pad(kk, ((0, n * chunk - k), (0, 0))).reshape(n, chunk, D)
  g = jax.random.normal(key, (m, chunk), jnp.float32)

  def products(a, kc, g):
    def body(da, k_c):
      # Forward S and its recomputation; the barrier keeps XLA from computing only the
      # corner that the result reads.
      s1, s2 = jax.lax.optimization_barrier((a @ k_c.T, (a * 1.0001) @ k_c.T))
      return da + g @ k_c + 0.0 * (s1[0, 0] + s2[0, 0]), g.T @ a
    return jax.lax.scan(body, jnp.zeros_like(a), kc)
  return timed(products, (a, kc, g), repeats)


def communication(b: int) -> dict:
  """{loss: {collective kind: bytes}} of fwd + bwd sharded over all devices."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  x, y = jax.random.normal(jax.random.key(0), (2, b, D), jnp.float32)
  idx = jnp.arange(b)
  gam = L.init_gamma_state(b)
  fns = {
      "nt_xent": lambda x, y, i: L.nt_xent(x, y, temperature=T, axis_name="data"),
      "nt_xent ring": lambda x, y, i: L.nt_xent(x, y, temperature=T, ring=True,
                                                 axis_name="data"),
      "clip_loss": lambda x, y, i: L.clip_loss(x, y, temperature=T, axis_name="data"),
      "clip_loss ring": lambda x, y, i: L.clip_loss(x, y, temperature=T, ring=True,
                                                    axis_name="data"),
      "gamma_loss": lambda x, y, i: L.gamma_loss(x, y, gam, i, jax.random.key(1),
                                                 temperature=T, axis_name="data")[0],
  }
  out = {}
  for name, fn in fns.items():
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P())
    text = jax.jit(jax.grad(sharded, (0, 1))).lower(x, y, idx).compile().as_text()
    out[name] = hlo.collective_bytes(text)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="1024,4096,8192,16384,65536")
  p.add_argument("--losses", default="nt_xent,clip_loss,sigmoid_loss,gamma_loss")
  p.add_argument("--time_up_to", type=int, default=16384)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--comm_batch", type=int, default=4096)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                               "losses.json"))
  args = p.parse_args()
  rows = []
  print(f"{jax.devices()[0].device_kind}, D = {D}, fwd + bwd, default call")
  print(f"{'loss':>13} {'B':>6} {'path':>14} {'GiB':>7} {'time s':>8} {'bound s':>8} "
        f"{'ratio':>6}")
  for b in map(int, args.sizes.split(",")):
    for name in args.losses.split(","):
      fn, xs, (m, k) = loss_and_args(name, b)
      grad = jax.jit(jax.value_and_grad(fn, (0, 1)))
      mem = grad.lower(*xs).compile().memory_analysis()
      gib = (mem.temp_size_in_bytes + mem.output_size_in_bytes
             + mem.argument_size_in_bytes) / 2**30
      chunk = streamed.choose_chunk(m, k, None)
      path = "direct" if chunk is None else f"streamed/{chunk}"
      row = dict(loss=name, B=b, path=path, memory_gib=round(gib, 3))
      if b <= args.time_up_to:
        reps = args.repeats if b <= 8192 else 1
        row["time_s"] = timed(grad, xs, reps)
        print(f"  ({name} B={b}: {row['time_s']:.3f} s; timing its bound)", flush=True)
        row["bound_s"] = bound(m, k, reps, chunk)
        row["bound"] = "3 products" if chunk is None else "4 products, chunked"
        row["ratio"] = row["time_s"] / row["bound_s"]
      rows.append(row)
      t = (f"{row['time_s']:8.3f} {row['bound_s']:8.3f} {row['ratio']:6.2f}"
           if "time_s" in row else f"{'-':>8} {'-':>8} {'-':>6}")
      print(f"{name:>13} {b:>6} {path:>14} {gib:7.2f} {t}", flush=True)
  comm = communication(args.comm_batch)
  print(f"\nbytes between {jax.device_count()} devices per fwd + bwd, global B = "
        f"{args.comm_batch}, D = {D} (collective results in the compiled HLO)")
  kinds = sorted({k for moved in comm.values() for k in moved})
  print(f"{'loss':>15} " + " ".join(f"{k:>19}" for k in kinds))
  for name, moved in comm.items():
    print(f"{name:>15} " + " ".join(f"{moved.get(k, 0):>19,}" for k in kinds))
  result = {"rows": rows, "communication": comm,
            "max_memory_gib": max(r["memory_gib"] for r in rows)}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
