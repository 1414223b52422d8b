"""Is the input ever the bottleneck? The host pipeline alone, the train step alone and
the real training loop, measured in one run on this machine.

  python benchmarks/input_pipeline.py [--quick]

Rows:
  default      configs/mnist_gamma.py as the quick start runs it (MLP, 28 px, batch 128).
  jpeg224      configs/imagenet_resnet50.py's pipeline on ImageNet-shaped JPEGs (random
               sizes 250-500 px, decoded and cropped to 224 on the host), with the
               small_cnn encoder at batch 32 so that a CPU can run the step.
Columns: host pipeline alone (examples/s, and per worker), the step alone on a
device-resident uint8 batch (photometric augmentation included), the real loop
(`train.train_and_evaluate`, evaluation off; median over its logging windows after the
first, which holds the compilation), and loop / step. The last line is JSON with
`min_loop_over_step`. Results: benchmarks/results/input_pipeline[_quick].json.
"""

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from contrastive_jax.configs import imagenet_resnet50, mnist_gamma  # noqa: E402
from contrastive_jax import sharding  # noqa: E402
from contrastive_jax import step as step_lib  # noqa: E402
from contrastive_jax import train  # noqa: E402
from contrastive_jax.data import pipeline  # noqa: E402


class JpegSource:
  """n ImageNet-shaped records {"image": JPEG bytes, "label"}: random sizes 250-500 px,
  smooth random content (so the JPEGs are photo-sized, ~20-60 KB)."""

  def __init__(self, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.records = []
    for i in range(n):
      h, w = rng.integers(250, 501, 2)
      coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), np.uint8)
      im = Image.fromarray(coarse).resize((int(w), int(h)), Image.BICUBIC)
      noise = rng.integers(-12, 13, (h, w, 3))
      im = Image.fromarray(np.clip(np.asarray(im, int) + noise, 0, 255).astype(np.uint8))
      buf = io.BytesIO()
      im.save(buf, format="JPEG", quality=90)
      self.records.append({"image": buf.getvalue(), "label": np.int64(i % 1000)})

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[int(i)]


def host_alone(cfg, task, batches: int) -> float:
  """Examples/s of the host pipeline alone, read as the trainer reads it."""
  ds = task.train_dataset(cfg.batch_size, cfg.seed)
  it = iter(pipeline.read(ds, cfg.data_threads, cfg.data_workers))
  for _ in range(2):  # start-up (worker processes, first reads)
    next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * cfg.batch_size / (time.perf_counter() - t)


def step_alone(cfg, steps: int) -> float:
  """Examples/s of the jitted train step on one device-resident uint8 batch."""
  setup = step_lib.build(cfg)
  mesh = sharding.make_mesh(cfg)
  shardings = step_lib.shardings(setup, mesh)
  state = jax.jit(setup.init, out_shardings=shardings)()
  step = step_lib.make_step(setup, mesh, shardings)
  ds = setup.task.train_dataset(cfg.batch_size, cfg.seed)
  batch = {k: jax.device_put(v, sharding.batch_sharding(mesh))
           for k, v in ds[0].items() if k in setup.task.batch_keys}
  for _ in range(3):  # compile, warm up
    state, logs = step(state, batch)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(steps):
    state, logs = step(state, batch)
  jax.block_until_ready(state)
  return steps * cfg.batch_size / (time.perf_counter() - t)


def loop(cfg, steps: int, windows: int = 5) -> float:
  """Examples/s of the real training loop (median of its logging windows after the first)."""
  cfg = cfg.copy_and_resolve_references()
  cfg.log_every = max(1, steps // windows)
  cfg.num_steps = cfg.log_every * (windows + 1)
  cfg.evals = type(cfg.evals)()  # no evaluation
  cfg.update(dict(progress=False,
                  checkpoint_every=10 ** 9, tensorboard=False))
  with tempfile.TemporaryDirectory() as work:
    train.train_and_evaluate(cfg, work)
    records = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  rates = [r["examples_per_s"] for r in records if r.get("phase") == "train"]
  return statistics.median(rates[1:])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer steps (under 8 minutes)")
  parser.add_argument("--rows", default="default,jpeg224", help="comma-separated rows")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  quick = args.quick
  out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                 f"input_pipeline{'_quick' if quick else ''}.json")
  rows = []
  names = args.rows.split(",")
  if "default" in names:
    cfg = mnist_gamma.get_config()
    task = step_lib.build(cfg).task
    rows.append(dict(row="default", size=28, batch=cfg.batch_size, workers=cfg.data_workers,
                     threads=cfg.data_threads,
                     host=host_alone(cfg, task, 40 if quick else 150),
                     step=step_alone(cfg, 100 if quick else 400),
                     loop=loop(cfg, 250 if quick else 1000)))
  if "jpeg224" in names:
    rows.append(jpeg_row(quick))
  report(rows, quick, out)


def jpeg_row(quick: bool) -> dict:
  source = JpegSource(128 if quick else 512)
  real_get_source = pipeline.get_source
  pipeline.get_source = lambda name, *a, **k: (source if name == "jpeg224"
                                               else real_get_source(name, *a, **k))
  cfg = imagenet_resnet50.get_config()
  cfg.update(dict(dataset="jpeg224", model="small_cnn", norm="group", head_hidden=512,
                  batch_size=32, data_threads=2, data_workers=0))
  task = step_lib.build(cfg).task
  per_worker = {}
  for workers in (1, 2):  # grain worker processes
    c = cfg.copy_and_resolve_references()
    c.data_workers = workers
    per_worker[workers] = host_alone(c, task, 4 if quick else 12) / workers
  return dict(row="jpeg224", size=224, batch=cfg.batch_size, workers=0,
              threads=cfg.data_threads, host=host_alone(cfg, task, 4 if quick else 12),
              host_per_worker={str(k): v for k, v in per_worker.items()},
              step=step_alone(cfg, 4 if quick else 10),
              loop=loop(cfg, 10 if quick else 30))


def report(rows: list, quick: bool, out: str) -> None:
  for r in rows:
    r["loop_over_step"] = r["loop"] / r["step"]
  print(f"{'row':<9} {'px':>4} {'batch':>5} {'host ex/s':>10} {'step ex/s':>10} "
        f"{'loop ex/s':>10} {'loop/step':>9}")
  for r in rows:
    print(f"{r['row']:<9} {r['size']:>4} {r['batch']:>5} {r['host']:>10,.0f} {r['step']:>10,.0f} "
          f"{r['loop']:>10,.0f} {r['loop_over_step']:>9.2f}")
  for k, v in next((r["host_per_worker"] for r in rows if "host_per_worker" in r), {}).items():
    print(f"jpeg224 host, {k} worker process(es): {v:,.0f} examples/s per worker "
          "(each: one JPEG decode + two 224 px crops)")
  summary = {"devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
             "quick": quick, "rows": rows,
             "min_loop_over_step": min(r["loop_over_step"] for r in rows)}
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(summary, f, indent=2)
  print(json.dumps({"min_loop_over_step": summary["min_loop_over_step"], "out": out}))


if __name__ == "__main__":
  main()
