"""One command that measures the project on an accelerator and writes one JSON.

  python benchmarks/accelerator.py --out $OUT/accelerator.json     # one H200: < 8 min
  python benchmarks/accelerator.py --smoke --out /tmp/acc.json     # tiny sizes, any CPU

Sections (docs/accelerators.md gives the device command and the JSON's schema):
  matmul     the chip's measured matmul rate per dtype (a square bf16 / f32 product): the
             bound the losses are compared with.
  losses     fwd + bwd of nt_xent, clip_loss and gamma_loss at B in --batches, D = 256, in
             float32 and bfloat16: median time, the time of their minimum similarity
             products at the measured rate (`bound_s`) and the ratio, XLA's memory
             analysis of the program and the device's peak memory so far.
  train_step cifar10_simclr (ResNet-18, 32 px, batch 512) and imagenet_resnet50 (224 px,
             batch 256) in both dtypes, on a device-resident synthetic batch:
             examples/s, XLA's flop count of one step and the model flop utilisation
             (flops / step time / the chip's peak bf16 rate; and against the measured
             matmul rate of the step's dtype).
  input      the host pipeline of imagenet_resnet50 on ImageNet-shaped JPEGs with grain
             worker processes on all cores, against the ResNet-50 step's rate.
  mnist      configs/mnist_gamma.py for --mnist_steps steps on the accelerator and on the
             host CPU (a subprocess with JAX_PLATFORMS=cpu): the logged losses agree
             within --curve_rtol (relative, at every logging step).
Each section records its own error and the others still run. The last line is JSON.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from contrastive_jax import losses as L  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Nominal dense peak (flop/s) of one chip at bfloat16, by jax's device_kind: the
# denominator of MFU. Unknown kinds report MFU against the measured matmul rate only.
PEAK_BF16 = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA A100-SXM4-80GB":
             312e12, "NVIDIA A100-SXM4-40GB": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
             "TPU v5": 459e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def timed(fn, args, repeats: int) -> float:
  """Median seconds of a compiled call after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def peak_mb() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def matmul_rate(n: int, dtype, repeats: int) -> float:
  """Flop/s of an n x n x n product in `dtype` (float32 accumulation for bfloat16)."""
  a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: jnp.einsum("ij,jk->ik", a, b, preferred_element_type=jnp.float32))
  return 2 * n**3 / timed(f, (a, b), repeats)


def loss_fn(name: str, b: int):
  """(fn(x, y) -> scalar, flops of the similarity products fwd + bwd per unit D)."""
  if name == "nt_xent":  # [2b, 2b]: S, and dZ from S's two sides
    return (lambda x, y: L.nt_xent(x, y, temperature=0.1)), 3 * 2 * (2 * b) ** 2
  if name == "clip_loss":  # [b, b]
    return (lambda x, y: L.clip_loss(x, y, temperature=0.1)), 3 * 2 * b**2
  if name == "gamma_loss":
    state, idx = L.init_gamma_state(b), jnp.arange(b)
    fn = lambda x, y: L.gamma_loss(x, y, state, idx, jax.random.key(1), temperature=0.1)[0]
    return fn, 3 * 2 * (2 * b) ** 2
  raise ValueError(name)


def losses_section(args, rates: dict) -> list:
  rows = []
  for b in args.batches:
    for name in args.losses:
      for dtype in DTYPES:
        fn, flops_per_d = loss_fn(name, b)
        x, y = jax.random.normal(jax.random.key(0), (2, b, args.dim), jnp.float32)
        x, y = x.astype(DTYPES[dtype]), y.astype(DTYPES[dtype])
        compiled = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(x, y).compile()
        mem = compiled.memory_analysis()
        seconds = timed(compiled, (x, y), args.repeats)
        bound = flops_per_d * args.dim / rates[dtype]
        rows.append({"loss": name, "batch": b, "dim": args.dim, "dtype": dtype,
                     "seconds": seconds, "bound_s": bound, "over_bound": seconds / bound,
                     "xla_memory_mb": (mem.temp_size_in_bytes + mem.argument_size_in_bytes +
                                       mem.output_size_in_bytes) / 2**20 if mem else None,
                     "device_peak_mb_so_far": peak_mb()})
        print(f"losses  {name:<10} B={b:<6} {dtype:<8} {1e3 * seconds:9.2f} ms "
              f"{rows[-1]['over_bound']:6.2f} x bound", flush=True)
  return rows


class SyntheticImages:
  """n records {"image": uint8 [size, size, 3], "label"}: a stand-in for CIFAR-10 or
  ImageNet where only the step's shapes matter."""

  def __init__(self, n: int, size: int):
    self.n, self.size = n, size
    self.image = np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": self.image, "label": np.int64(int(i) % 10)}


def step_rate(cfg, steps: int) -> dict:
  """Examples/s and XLA's flops of cfg's jitted train step on a device-resident batch."""
  from contrastive_jax import sharding, tasks
  from contrastive_jax import step as step_lib
  task = tasks.get(cfg, SyntheticImages(4 * cfg.batch_size, cfg.image_size))
  setup = step_lib.build(cfg, task)
  mesh = sharding.make_mesh(cfg)
  shardings = step_lib.shardings(setup, mesh)
  state = jax.jit(setup.init, out_shardings=shardings)()
  step = step_lib.make_step(setup, mesh, shardings)
  size = cfg.image_size
  rng = np.random.default_rng(1)
  batch = {"view1": rng.integers(0, 256, (cfg.batch_size, size, size, 3), np.uint8),
           "view2": rng.integers(0, 256, (cfg.batch_size, size, size, 3), np.uint8),
           "index": np.arange(cfg.batch_size, dtype=np.int32)}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  for _ in range(2):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(steps):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  seconds = (time.perf_counter() - t) / steps
  return {"examples_per_s": cfg.batch_size / seconds, "step_s": seconds,
          "flops": float(cost.get("flops", 0.0)) or None}


def train_step_section(args, rates: dict) -> list:
  from contrastive_jax.configs import cifar10_simclr, imagenet_resnet50
  rows = []
  peak = PEAK_BF16.get(jax.devices()[0].device_kind)
  for name, module in (("cifar10_simclr", cifar10_simclr),
                       ("imagenet_resnet50", imagenet_resnet50)):
    for dtype in DTYPES:
      cfg = module.get_config("smoke" if args.smoke else None)
      cfg.dtype = dtype
      if args.smoke:  # the recipe's layers at a size a CPU steps in a second
        cfg.batch_size, cfg.image_size = 8, 16
      else:
        cfg.batch_size = 512 if name == "cifar10_simclr" else 256
      r = step_rate(cfg, args.steps)
      flop_rate = r["flops"] / r["step_s"] if r["flops"] else None
      rows.append({"config": name, "dtype": dtype, "batch": cfg.batch_size,
                   "image_size": cfg.image_size, **r,
                   "mfu": flop_rate / peak if flop_rate and peak else None,
                   "of_measured_matmul_rate": flop_rate / rates[dtype] if flop_rate else None})
      print(f"step    {name:<18} {dtype:<8} b={cfg.batch_size:<4} "
            f"{r['examples_per_s']:10,.0f} ex/s  MFU {rows[-1]['mfu'] or float('nan'):.3f}",
            flush=True)
  return rows


def input_section(args, steps: list) -> dict:
  from benchmarks import input_pipeline
  from contrastive_jax.configs import imagenet_resnet50
  from contrastive_jax import step as step_lib
  from contrastive_jax.data import pipeline
  source = input_pipeline.JpegSource(32 if args.smoke else 1024)
  real = pipeline.get_source
  pipeline.get_source = lambda name, *a, **k: source if name == "jpeg" else real(name, *a, **k)
  try:
    cfg = imagenet_resnet50.get_config()
    workers = 2 if args.smoke else max(1, os.cpu_count() - 1)
    cfg.update(dict(dataset="jpeg", batch_size=8 if args.smoke else 256, data_workers=workers,
                    data_threads=2))
    task = step_lib.build(cfg).task
    host = input_pipeline.host_alone(cfg, task, 3 if args.smoke else 20)
  finally:
    pipeline.get_source = real
  step = max((s["examples_per_s"] for s in steps if s["config"] == "imagenet_resnet50"),
             default=None)
  out = {"workers": workers, "cpu_count": os.cpu_count(), "host_examples_per_s": host,
         "step_examples_per_s": step, "host_over_step": host / step if step else None}
  print(f"input   {workers} workers: host {host:,.0f} ex/s, ResNet-50 step "
        f"{step or float('nan'):,.0f} ex/s", flush=True)
  return out


def _mnist_losses(steps: int, smoke: bool, env: dict) -> tuple[list, float]:
  """Logged (step, loss) of a run of mnist_gamma in a subprocess, and its wall time."""
  with tempfile.TemporaryDirectory() as work:
    cmd = [sys.executable, "-m", "contrastive_jax.train", "--config",
           "mnist_gamma:smoke" if smoke else "mnist_gamma", "--workdir", work,
           f"--config.num_steps={steps}", f"--config.log_every={max(1, steps // 15)}",
           "--config.progress=False", "--config.evals.knn.at_init=False",
           "--config.evals.rank.at_init=False", "--config.evals.linear_probe.final=False"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": ROOT + os.pathsep +
                                         os.environ.get("PYTHONPATH", ""), **env},
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    records = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  return [(r["step"], r["loss"]) for r in records if r.get("phase") == "train"], wall


def mnist_section(args) -> dict:
  steps = 20 if args.smoke else args.mnist_steps
  device, device_s = _mnist_losses(steps, args.smoke, {})
  host, host_s = _mnist_losses(steps, args.smoke, {"JAX_PLATFORMS": "cpu"})
  rel = [abs(a - b) / max(abs(b), 1e-6) for (_, a), (_, b) in zip(device, host)]
  out = {"steps": steps, "device": device, "cpu": host, "device_wall_s": device_s,
         "cpu_wall_s": host_s, "max_rel_diff": max(rel), "rtol": args.curve_rtol,
         "agree": max(rel) <= args.curve_rtol}
  print(f"mnist   {steps} steps: max relative loss difference {max(rel):.4f} "
        f"(tolerance {args.curve_rtol}) -> {'agree' if out['agree'] else 'DIFFER'}", flush=True)
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--out", default="benchmarks/results/accelerator.json", help="the JSON")
  p.add_argument("--smoke", action="store_true", help="tiny sizes: the whole path on a CPU")
  p.add_argument("--batches", default="8192,32768,65536", help="losses: batch sizes")
  p.add_argument("--losses", default="nt_xent,clip_loss,gamma_loss")
  p.add_argument("--dim", type=int, default=256, help="losses: embedding width")
  p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
  p.add_argument("--steps", type=int, default=20, help="timed train steps per row")
  p.add_argument("--mnist_steps", type=int, default=300)
  p.add_argument("--curve_rtol", type=float, default=0.05,
                 help="mnist: largest relative difference of a logged loss")
  p.add_argument("--sections", default="losses,train_step,input,mnist")
  args = p.parse_args(argv)
  if args.smoke:
    args.batches, args.dim, args.repeats, args.steps = "64,128", 32, 2, 1
  args.batches = [int(b) for b in args.batches.split(",")]
  args.losses = args.losses.split(",")
  args.sections = args.sections.split(",")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  t0 = time.perf_counter()
  dev = jax.devices()[0]
  out = {"device_kind": dev.device_kind, "platform": dev.platform,
         "devices": jax.device_count(), "jax": jax.__version__, "python": platform.python_version(),
         "smoke": args.smoke, "date": time.strftime("%Y-%m-%d"), "errors": {}}
  n = 256 if args.smoke else 8192
  out["matmul"] = {d: {"n": n, "flops_per_s": matmul_rate(n, t, args.repeats)}
                   for d, t in DTYPES.items()}
  rates = {d: v["flops_per_s"] for d, v in out["matmul"].items()}
  print("matmul  " + ", ".join(f"{d} {r / 1e12:.1f} TFLOP/s" for d, r in rates.items()),
        flush=True)
  sections = {"losses": lambda: losses_section(args, rates),
              "train_step": lambda: train_step_section(args, rates),
              "input": lambda: input_section(args, out.get("train_step") or []),
              "mnist": lambda: mnist_section(args)}
  for name in args.sections:
    try:
      out[name] = sections[name]()
    except Exception as e:  # noqa: BLE001  (one section's failure must not cost the others)
      out["errors"][name] = f"{type(e).__name__}: {e}"
      traceback.print_exc()
  out["wall_s"] = time.perf_counter() - t0
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps({"out": args.out, "wall_s": round(out["wall_s"], 1),
                    "errors": out["errors"]}))
  return out


if __name__ == "__main__":
  main()
