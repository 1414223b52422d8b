"""Train-step communication and time: 2 processes x 4 CPU devices vs 1 x 8 (not a test).

For each loss it starts the processes on loopback (jax.distributed, gloo), builds
the trainer's step for a config (default: the two-view default), reads the bytes
each collective kind moves per step off the compiled HLO, and times steps. The
gradient all-reduce is the same for every loss; the all-gather column is the
loss's own traffic.

  python benchmarks/multiprocess.py [--losses nt_xent,gamma --batch 256 --steps 20]
  python benchmarks/multiprocess.py --config configs/captions_clip.py --losses clip,gamma_clip
The last line printed is JSON.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args):
  sys.path.insert(0, ROOT)
  import importlib.util
  import jax
  from contrastive_jax import sharding
  from contrastive_jax import step as step_lib
  from contrastive_jax.hlo import collective_bytes

  spec = importlib.util.spec_from_file_location("config", os.path.join(ROOT, args.config))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.loss, cfg.batch_size = args.loss, args.batch
  if args.processes > 1:
    cfg.distributed.update(dict(initialize=True, coordinator_address=f"127.0.0.1:{args.port}",
                                num_processes=args.processes, process_id=args.process_id))
  sharding.initialize_distributed(cfg)
  setup = step_lib.build(cfg)
  task = setup.task
  mesh = sharding.make_mesh(cfg)
  shardings = step_lib.shardings(setup, mesh)
  state = jax.jit(setup.init, out_shardings=shardings)()
  step = step_lib.make_step(setup, mesh, shardings)
  ds = task.train_dataset(cfg.batch_size, 0, jax.process_index(), jax.process_count())
  batches = [{k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), ds[i][k])
              for k in task.batch_keys} for i in range(args.steps + 3)]
  moved = collective_bytes(step.lower(state, batches[0]).compile().as_text())
  for b in batches[:3]:  # compile and warm up
    state, logs = step(state, b)
  jax.block_until_ready(logs)
  t0 = time.perf_counter()
  for b in batches[3:]:
    state, logs = step(state, b)
  jax.block_until_ready(logs)
  ms = (time.perf_counter() - t0) / args.steps * 1e3
  if jax.process_index() == 0:
    print("RESULT", json.dumps({"loss": args.loss, "processes": args.processes,
                                "devices": jax.device_count(), "step_ms": ms, "bytes": moved}))


def launch(loss, processes, devices, args):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  procs = [subprocess.Popen(
      [sys.executable, __file__, "--child", "--config", args.config, "--loss", loss,
       "--processes", str(processes),
       "--process_id", str(i), "--port", str(port), "--batch", str(args.batch),
       "--steps", str(args.steps)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(processes)]
  try:
    outs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(out[-2000:])
  return next(json.loads(l[7:]) for l in outs[0].splitlines() if l.startswith("RESULT "))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/mnist_gamma.py")
  parser.add_argument("--losses", default="nt_xent,gamma")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--child", action="store_true")
  parser.add_argument("--loss", default="gamma")
  parser.add_argument("--processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  args = parser.parse_args()
  if args.child:
    return child(args)
  rows = [launch(loss, p, 8 // p, args) for loss in args.losses.split(",") for p in (1, 2)]
  print(f"train step of {args.config}, global batch {args.batch}, 8 CPU devices")
  print(f"{'loss':>10} {'procs':>5} {'all-gather B':>13} {'all-reduce B':>13} {'other B':>9} "
        f"{'step ms':>8}")
  for r in rows:
    b = dict(r["bytes"])
    ag, ar = b.pop("all-gather", 0), b.pop("all-reduce", 0)
    print(f"{r['loss']:>10} {r['processes']:>5} {ag:>13} {ar:>13} {sum(b.values()):>9} "
          f"{r['step_ms']:>8.2f}")
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
