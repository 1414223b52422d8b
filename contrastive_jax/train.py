"""The one trainer: every task (two-view, image-text two-tower, fusion) trains
through the same sharded step and loop, with Orbax checkpoints.

  python -m contrastive_jax.train --config configs/mnist_gamma.py --workdir runs/x \
      [--config.batch_size=64 ...]

A task (`contrastive_jax.tasks`) owns its model, objective and evaluation; this
module owns the optimiser, the step, the loop and the run's files. The step runs
under `jit` on a ("data", "fsdp") mesh (`contrastive_jax.sharding`): the model
applies under GSPMD and the task's contrastive terms run per device in
`shard_map`, so global-negative losses gather keys and the gamma loss keeps its
negatives local. Multi-process (multi-host) runs call `jax.distributed.initialize`
first (cfg.distributed); each process feeds its slice of every global batch.
Batch k is a pure function of (seed, k), so a run resumed from a checkpoint at
step k continues exactly as if never stopped. SIGTERM (or Ctrl-C) saves a
checkpoint and exits cleanly.
"""

import functools
import json
import os
import signal
import sys
import threading
import time
from typing import Callable, NamedTuple, Optional

from absl import app, flags, logging
import grain
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import optax
import orbax.checkpoint as ocp
import tqdm

from contrastive_jax import checkpointing
from contrastive_jax import sharding
from contrastive_jax import tasks
from contrastive_jax.data import pipeline


def make_optimizer(cfg: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Callable]:
  """Optimiser and its schedule: warmup + cosine, peak lr scaled by batch size."""
  scale = {"none": 1.0, "linear": cfg.batch_size / 256, "sqrt": (cfg.batch_size / 256) ** 0.5}
  if cfg.lr_scaling not in scale:
    raise ValueError(f"unknown lr_scaling {cfg.lr_scaling!r}: use none, linear or sqrt")
  # A run shorter than its warm-up warms up over all but its last step.
  warmup = min(cfg.warmup_steps, max(cfg.num_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate * scale[cfg.lr_scaling], warmup, max(cfg.num_steps, warmup + 1))
  if cfg.optimizer == "adamw":
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  elif cfg.optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(schedule, momentum=0.9))
  elif cfg.optimizer == "lars":
    tx = optax.lars(schedule, weight_decay=cfg.weight_decay, momentum=0.9)
  else:
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use adamw, sgd or lars")
  return tx, schedule


# ----------------------------------------------------------------------------
# State and step.


class Setup(NamedTuple):
  """Everything a config determines before training starts."""
  task: tasks.Task
  tx: optax.GradientTransformation
  schedule: Callable
  init: Callable  # () -> initial train state


def build(cfg: ml_collections.ConfigDict, task: Optional[tasks.Task] = None) -> Setup:
  """Task (default: cfg.task on cfg.dataset's train split), optimiser and state
  initialiser of cfg (raises on bad names)."""
  if task is None:
    task = tasks.get(cfg, pipeline.get_source(cfg.dataset, "train", cfg.data_dir))
  task.check_evaluators(cfg.evaluators, "evaluators")
  task.check_evaluators(cfg.final_evaluators, "final_evaluators")
  tx, schedule = make_optimizer(cfg)

  def init() -> dict:
    rng = jax.random.PRNGKey(cfg.seed)  # raw uint32[2]: checkpoints as a plain array
    init_rng, rng = jax.random.split(rng)
    state = task.init(init_rng)
    return {"step": jnp.int32(0), **state, "opt_state": tx.init(state["params"]), "rng": rng}

  return Setup(task, tx, schedule, init)


def train_step(state: dict, batch: dict, *, task: tasks.Task, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh) -> tuple[dict, dict]:
  """One optimiser step of `task` on a global batch sharded over the mesh's BATCH_AXES."""
  key = jax.random.fold_in(state["rng"], state["step"])
  (loss, (updates, logs)), grads = jax.value_and_grad(task.loss, has_aux=True)(
      state["params"], state, batch, key, mesh)
  param_updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_state = {**state, **updates, "step": state["step"] + 1, "opt_state": opt_state,
               "params": optax.apply_updates(state["params"], param_updates)}
  return task.after_step(new_state), {"loss": loss, **logs, "grad_norm": optax.tree.norm(grads)}


def make_step(setup: Setup, mesh: jax.sharding.Mesh, shardings: dict) -> Callable:
  """jit-compiled train_step with the state's shardings and a batch-sharded input."""
  step = lambda state, batch: train_step(state, batch, task=setup.task, tx=setup.tx, mesh=mesh)
  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, None), donate_argnums=0)


# ----------------------------------------------------------------------------
# Loop.


def _print(*args):
  if jax.process_index() == 0:
    print(*args, flush=True)


def _log(workdir, record):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(record) + "\n")


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       stop_at: Optional[int] = None) -> dict:
  """Trains cfg.num_steps steps (resuming from workdir if it holds a checkpoint).

  Args:
    stop_at: stop after this step as if preempted (checkpoint, no final eval).
  Returns:
    the final evaluation dict (also written to workdir/final_eval.json), or
    {"preempted": True, "step": k} when stopped early.
  """
  sharding.initialize_distributed(cfg)
  n_dev = jax.device_count()
  if cfg.batch_size % n_dev:
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {n_dev} devices: "
                     f"set --config.batch_size to a multiple of {n_dev}")
  setup = build(cfg)
  task = setup.task
  checkpointing.check_config(cfg, workdir)

  mesh = sharding.make_mesh(cfg)
  shardings = sharding.state_shardings(jax.eval_shape(setup.init), mesh)
  data_sharding = sharding.batch_sharding(mesh)
  state = jax.jit(setup.init, out_shardings=shardings)()

  mngr = checkpointing.manager(workdir, cfg.keep_checkpoints)
  if mngr.latest_step() is not None:
    restored = checkpointing.restore(mngr, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    state = restored["state"]
    _print(f"resumed from {workdir} at step {int(state['step'])} "
           f"(data iterator at batch {restored['data']['next_index']})")

  step_fn = make_step(setup, mesh, shardings)
  ds = pipeline.train_dataset(
      task.train_src, batch_size=cfg.batch_size, seed=cfg.seed, transform=task.transform(),
      process_index=jax.process_index(), process_count=jax.process_count())
  start = int(state["step"])
  batches = iter(ds[start:].to_iter_dataset(
      grain.ReadOptions(num_threads=cfg.data_threads, prefetch_buffer_size=4)))

  # SIGTERM (preemption) or a first Ctrl-C: checkpoint and exit at the next step; a second
  # Ctrl-C interrupts at once.
  preempted = threading.Event()

  def on_signal(signum, _):
    preempted.set()
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)

  old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  eval_data = functools.cache(lambda: task.eval_data(cfg.eval_limit))  # at the first use

  def evaluate(names: str) -> dict:
    if not names.strip():
      return {}
    return task.evaluate(sharding.host_params(state["params"], mesh), eval_data(), names)

  if start == 0 and cfg.eval_at_init:
    init_eval = evaluate(cfg.evaluators)
    _log(workdir, {"step": 0, "phase": "eval", **init_eval})
  bar = tqdm.tqdm(total=cfg.num_steps, initial=start, desc="train", unit="step",
                  disable=jax.process_index() != 0 or not cfg.progress, dynamic_ncols=True)
  t_last, n_last = time.perf_counter(), start
  try:
    for step in range(start, cfg.num_steps):
      if stop_at is not None and step >= stop_at:
        preempted.set()
      if preempted.is_set():
        break
      local = next(batches)
      batch = {k: jax.make_array_from_process_local_data(data_sharding, local[k])
               for k in task.batch_keys}
      state, logs = step_fn(state, batch)
      done = step + 1
      if done % cfg.log_every == 0 or done == cfg.num_steps:
        logs = jax.device_get(logs)
        now = time.perf_counter()
        rate = (done - n_last) * cfg.batch_size / (now - t_last)
        t_last, n_last = now, done
        record = {"step": done, "phase": "train", "lr": float(setup.schedule(done)),
                  "examples_per_s": rate, **{k: float(v) for k, v in logs.items()}}
        _log(workdir, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{rate:.0f}")
      bar.update(1)
      if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.num_steps:
        _log(workdir, {"step": done, "phase": "eval", **evaluate(cfg.evaluators)})
      if done % cfg.checkpoint_every == 0:
        checkpointing.save(mngr, state, {"next_index": done, "seed": cfg.seed})
  finally:
    bar.close()
    for signum, handler in old_handlers.items():
      signal.signal(signum, handler)
  checkpointing.save(mngr, state, {"next_index": int(state["step"]), "seed": cfg.seed})
  mngr.wait_until_finished()
  mngr.close()
  if preempted.is_set():
    _print(f"stopped: checkpoint saved at step {int(state['step'])} in {workdir}; "
           "run the same command to resume")
    return {"preempted": True, "step": int(state["step"])}

  result = {"step": int(state["step"]), **evaluate(cfg.final_evaluators)}
  if start == 0 and cfg.eval_at_init:
    result["random_init"] = init_eval
  _log(workdir, {"phase": "final", **result})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_eval.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result


def restore_for_eval(workdir: str, step: Optional[int] = None):
  """(config, restored state, task) of a workdir, onto this host's first device,
  whatever process count or mesh wrote the checkpoint."""
  cfg = checkpointing.load_config(workdir)
  setup = build(cfg)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(setup.init))
  mngr = checkpointing.manager(workdir, cfg.keep_checkpoints)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  state = checkpointing.restore(mngr, abstract, step, with_data=False)["state"]
  return cfg, state, setup.task


_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_STOP_AT = flags.DEFINE_integer("stop_at", None, "Checkpoint and exit after this step, as if "
                                "preempted (time-boxed jobs, tests).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if _CONFIG.value is None or _WORKDIR.value is None:
    sys.exit("error: --config and --workdir are required, e.g. "
             "--config configs/mnist_gamma.py --workdir runs/mnist_gamma")
  try:
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value, stop_at=_STOP_AT.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  if jax.process_index() != 0:
    return
  print(json.dumps(result))
  if "knn_top1" in result and "knn_top1" in result.get("random_init", {}):
    linear = (f" (linear probe: {100 * result['linear_top1']:.1f} %)"
              if "linear_top1" in result else "")
    print(f"kNN top-1: trained {100 * result['knn_top1']:.1f} % vs random init "
          f"{100 * result['random_init']['knn_top1']:.1f} %{linear}")


def cli():
  app.run(main)


if __name__ == "__main__":
  cli()
