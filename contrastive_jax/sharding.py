"""Processes, mesh and shardings of a training run.

Mesh ("data", "fsdp") over every device of every process: the batch is sharded
over both axes (`BATCH_AXES`, also the losses' `axis_name` inside `shard_map`);
parameters and optimiser state are replicated (fsdp = 1, data parallel) or
sharded over "fsdp" (GSPMD gathers them where the model needs them).
"""

import os
import sys
import threading
import time
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # the batch (and the loss's axis_name) spans both mesh axes


COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "contrastive_jax", "jax")


def use_compilation_cache() -> None:
  """Turns on XLA's persistent compilation cache for the command-line tools: a program
  compiled once (a run's step, its evaluation's embedding, kNN and probe) is read back
  by the next run or evaluation of the same shapes, e.g. `contrastive-jax-evaluate` after
  the training run. $JAX_COMPILATION_CACHE_DIR, when set, is JAX's own choice of place."""
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)


def initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
  """Joins a multi-process run when cfg.distributed.initialize is set.

  Arguments left unset come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID, else from JAX's cluster auto-detection (Cloud TPU, SLURM, ...).
  CPU processes exchange collectives over gloo.
  """
  d = cfg.get("distributed")
  if d is None or not d.initialize or jax.distributed.is_initialized():
    return
  env = lambda name: int(os.environ[name]) if name in os.environ else None
  num = d.num_processes if d.num_processes is not None else env("JAX_NUM_PROCESSES")
  pid = d.process_id if d.process_id is not None else env("JAX_PROCESS_ID")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only
  # A dead peer fails the next collective of the others (`train.main` reports it in one
  # line), and the watchdog catches the rest, both before JAX's own heartbeat check
  # would abort the process with a thread dump.
  # A process that never starts (its ssh dropped) would make JAX abort the others with a
  # C++ trace once initialization_timeout passes: exit with one line a little before.
  joined = threading.Event()

  def give_up():
    if not joined.wait(d.timeout_s):
      print(f"error: process {pid}: not all {num or 'the'} processes of this run joined "
            f"(coordinator {d.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', 'auto')}) "
            f"within {d.timeout_s} s (--config.distributed.timeout_s): is the trainer started "
            "on every host? (scripts/launch_tpu.sh --action status)", file=sys.stderr, flush=True)
      os._exit(1)

  threading.Thread(target=give_up, daemon=True, name="join-timeout").start()
  jax.distributed.initialize(d.coordinator_address, num, pid,
                             initialization_timeout=d.timeout_s + 60,
                             heartbeat_timeout_seconds=d.get("heartbeat_timeout_s", 100))
  joined.set()
  _start_peer_watchdog(max(1.0, d.get("heartbeat_timeout_s", 100) / 2))


_WATCHDOG_DONE = threading.Event()
_finish_watchdog = lambda: None


def finish_peer_watchdog() -> None:
  """Tells the other processes' watchdogs that this one ends normally."""
  _finish_watchdog()


def _start_peer_watchdog(timeout_s: float, beat_s: float = 0.5) -> None:
  """Each process bumps a counter in JAX's distributed key-value store every beat_s
  and watches the others'; a counter that stops moving for timeout_s means its
  process died: exit with one line (`exit_peer_lost`). Counters, not clocks, so
  hosts' clock skew does not matter. Uses JAX's (private) distributed client; if
  that changes, there is no watchdog and JAX's own heartbeat check remains."""
  try:
    from jax._src import distributed as jax_distributed
    client = jax_distributed.global_state.client
    client.key_value_set, client.key_value_try_get  # noqa: B018 (API check)
  except (ImportError, AttributeError):
    return
  me, n = jax.process_index(), jax.process_count()
  global _finish_watchdog

  def finish():  # a process that ends normally says so: its silence is not a death
    _WATCHDOG_DONE.set()
    client.key_value_set(f"contrastive_jax/alive/{me}", "done", allow_overwrite=True)
  _finish_watchdog = finish

  def run():
    last = {p: (None, time.monotonic()) for p in range(n) if p != me}
    beat = 0
    while not _WATCHDOG_DONE.is_set():
      beat += 1
      try:
        client.key_value_set(f"contrastive_jax/alive/{me}", str(beat), allow_overwrite=True)
        for p, (seen, since) in last.items():
          try:
            value = client.key_value_try_get(f"contrastive_jax/alive/{p}")
          except Exception:  # noqa: BLE001  (not written yet)
            value = None
          now = time.monotonic()
          if value == "done" or _WATCHDOG_DONE.is_set():
            continue
          if value != seen:
            last[p] = (value, now)
          elif now - since > timeout_s:
            exit_peer_lost(f"process {p} gave no sign of life for {timeout_s:.0f} s")
      except Exception as e:  # noqa: BLE001  (the coordination service, process 0, is gone)
        exit_peer_lost(f"the coordinator cannot be reached: {e}")
      time.sleep(beat_s)

  threading.Thread(target=run, daemon=True, name="peer-watchdog").start()


def exit_peer_lost(reason: str) -> None:
  """Exits this process at once (code 1) with one line: another process of the run
  died, so collectives fail or never complete."""
  print(f"error: process {jax.process_index()}: another process of this run stopped or cannot "
        f"be reached ({reason.splitlines()[0][:200]}); exiting. Its log says why; run the same "
        "command to resume from the last checkpoint.", file=sys.stderr, flush=True)
  os._exit(1)  # not sys.exit: JAX's shutdown would wait for the dead peer


def make_mesh(cfg: ml_collections.ConfigDict,
              devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """("data", "fsdp") mesh over `devices` (default: all devices of all processes)."""
  devices = np.array(jax.devices() if devices is None else devices)
  fsdp = cfg.get("fsdp", 1)
  if fsdp < 1 or devices.size % fsdp:
    raise ValueError(f"fsdp={fsdp} must divide the {devices.size} devices")
  return jax.sharding.Mesh(devices.reshape(-1, fsdp), ("data", "fsdp"))


def _fsdp_spec(shape, n: int, min_size: int) -> P:
  """Shards the largest dimension divisible by n over "fsdp"; small arrays stay replicated."""
  if n == 1 or int(np.prod(shape)) < min_size:
    return P()
  dims = sorted((d for d in range(len(shape)) if shape[d] % n == 0), key=lambda d: -shape[d])
  if not dims:
    return P()
  spec = [None] * len(shape)
  spec[dims[0]] = "fsdp"
  return P(*spec)


def state_shardings(abstract_state: dict, mesh: jax.sharding.Mesh,
                    model_sized: Sequence[str] = ("params", "opt_state"),
                    min_size: int = 2**14) -> dict:
  """NamedShardings of a train state: the entries in `model_sized` (trees as large as
  the model; a task adds its own, e.g. momentum parameters) FSDP-sharded when the
  mesh's "fsdp" axis is > 1; every other entry (step, rng, loss state) replicated."""
  n = mesh.shape["fsdp"]
  shard = lambda x: NamedSharding(mesh, _fsdp_spec(x.shape, n, min_size))
  rep = lambda x: NamedSharding(mesh, P())
  return {k: jax.tree.map(shard if k in model_sized else rep, v)
          for k, v in abstract_state.items()}


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def host_params(params: Any, mesh: jax.sharding.Mesh) -> Any:
  """Full parameters as NumPy on this host (gathered first if FSDP-sharded)."""
  params = jax.jit(lambda p: p, out_shardings=NamedSharding(mesh, P()))(params)
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), params)
