"""The one trainer: every task (two-view, image-text two-tower, fusion) trains
through the same sharded step and loop, with Orbax checkpoints.

  python -m contrastive_jax.train --config configs/mnist_gamma.py --workdir runs/x
      [--config.batch_size=64 ...]    (--workdir may be gs://bucket/run)

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

import errno
import functools
import json
import logging as pylogging
import math
import os
import re
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
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from contrastive_jax import checkpointing
from contrastive_jax import sharding
from contrastive_jax import stopping
from contrastive_jax import summary
from contrastive_jax import tasks
from contrastive_jax import workdir as workdir_lib
from contrastive_jax.data import pipeline


def _positive_int(cfg, name, minimum=1):
  v = cfg.get(name)
  if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
    raise ValueError(f"--config.{name}={v!r}: must be an integer >= {minimum}")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field and what is allowed for a bad trainer setting."""
  for name in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    _positive_int(cfg, name)
  for name in ("warmup_steps", "eval_every", "data_threads", "data_workers"):
    _positive_int(cfg, name, minimum=0)
  for name, default in (("progress_every_s", 60.0), ("stop_timeout_s", 300.0),
                        ("lock_stale_s", 120.0)):
    v = cfg.get(name, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
      raise ValueError(f"--config.{name}={v!r}: must be a number > 0")
  if cfg.get("eval_limit") is not None:
    _positive_int(cfg, "eval_limit")
  for name in ("learning_rate", "weight_decay"):
    v = cfg.get(name)
    if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
        name == "learning_rate" and v == 0):
      raise ValueError(f"--config.{name}={v!r}: must be a finite number "
                       f"{'> 0' if name == 'learning_rate' else '>= 0'}")


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
    def load():
      source = pipeline.get_source(cfg.dataset, "train", cfg.data_dir)
      return pipeline.InMemory(source) if cfg.get("data_cache", False) else source
    task = tasks.get(cfg, _read_data(cfg, load))
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
               mesh: jax.sharding.Mesh, skip_nonfinite: bool = False) -> tuple[dict, dict]:
  """One optimiser step of `task` on a global batch sharded over the mesh's BATCH_AXES.

  logs["finite"] says whether the loss and the gradient norm were finite. With
  skip_nonfinite, a step where they are not leaves the state as it was (but for
  the step counter, so that the next batch comes).
  """
  key = jax.random.fold_in(state["rng"], state["step"])
  (loss, (updates, logs)), grads = jax.value_and_grad(task.loss, has_aux=True)(
      state["params"], state, batch, key, mesh)
  param_updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_state = {**state, **updates, "step": state["step"] + 1, "opt_state": opt_state,
               "params": optax.apply_updates(state["params"], param_updates)}
  new_state = task.after_step(new_state)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state = {**kept, "step": state["step"] + 1}
  return new_state, {"loss": loss, **logs, "grad_norm": grad_norm, "finite": finite}


def make_step(setup: Setup, mesh: jax.sharding.Mesh, shardings: dict,
              skip_nonfinite: bool = False) -> Callable:
  """jit-compiled train_step with the state's shardings and a batch-sharded input."""
  step = lambda state, batch: train_step(state, batch, task=setup.task, tx=setup.tx, mesh=mesh,
                                         skip_nonfinite=skip_nonfinite)
  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, None), donate_argnums=0)


# ----------------------------------------------------------------------------
# Loop.


def _print(*args):
  if jax.process_index() == 0:
    print(*args, flush=True)


class NonFiniteError(FloatingPointError):
  """The loss or the gradient norm of a step is NaN or inf."""


@jax.jit
def _track_nonfinite(tally: jax.Array, finite: jax.Array, step: jax.Array) -> jax.Array:
  """[first non-finite step or -1, count of non-finite steps], updated on the device so
  that the loop never waits for a step to finish just to check it."""
  first = jnp.where((tally[0] < 0) & ~finite, step, tally[0])
  return jnp.stack([first, tally[1] + (~finite).astype(jnp.int32)])


def _check_finite(tally: jax.Array, skip: bool) -> int:
  """Raises NonFiniteError if a step was not finite (unless skipped); returns the count."""
  first, count = (int(v) for v in jax.device_get(tally))
  if count and not skip:
    raise NonFiniteError(
        f"step {first}: the loss or the gradient norm is NaN or inf; stopped without "
        "checkpointing (the last good checkpoint is kept). Lower --config.learning_rate, check "
        "the loss options, or set --config.skip_nonfinite=True to skip such steps")
  return count


def _agree(ok: bool, what: str) -> None:
  """Multi-process: every process stops when one of them failed `what` (it said why)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if not np.all(multihost_utils.process_allgather(np.int32(ok))) and ok:
      raise workdir_lib.WorkdirError(f"another process failed to {what} (see its log)")


def _trace_step(cfg, step_fn, state, local_batch: dict, process_count: int) -> None:
  """Traces the step (no compilation) so that a bad loss option fails before the
  workdir is written, naming the config field when the message names an option."""
  spec = {k: jax.ShapeDtypeStruct((v.shape[0] * process_count, *v.shape[1:]), v.dtype)
          for k, v in local_batch.items()}
  try:
    jax.eval_shape(step_fn, state, spec)
  except (ValueError, TypeError) as e:
    options = cfg.get("loss_options", {}).get(cfg.get("loss"), {}) or {}
    named = [k for k in options if str(e).startswith(f"{k} ")]
    where = f"--config.loss_options.{cfg.loss}.{named[0]}: " if named else ""
    raise ValueError(f"{where}{e}") from None


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: workdir_lib.PathLike,
                       stop_at: Optional[int] = None) -> dict:
  """Trains cfg.num_steps steps (resuming from workdir if it holds a checkpoint).

  Nothing in the workdir is written before the config is known to be compatible
  with its checkpoints, the newest checkpoint that passes its checks is restored,
  a non-finite step stops the run before it is checkpointed, and one trainer at a
  time holds the workdir (`workdir.Lock`): every write is fenced by that lock.
  All processes stop at the same step (`stopping.Stop`).

  Args:
    stop_at: stop after this step as if preempted (checkpoint, no final eval).
  Returns:
    the final evaluation dict (also written to workdir/final_eval.json), or
    {"preempted": True, "step": k} when stopped early.
  Raises:
    ValueError (bad setting), NonFiniteError, workdir.WorkdirError (also a lost
    lock or a failed write), checkpointing.CheckpointError: each with a one-line message.
  """
  if not str(workdir).strip():
    raise ValueError("--workdir is empty (an unset $WORKDIR?): give the run's directory")
  validate(cfg)
  if stop_at is not None and stop_at < 0:
    raise ValueError(f"--stop_at={stop_at}: must be >= 0")
  sharding.initialize_distributed(cfg)
  n_dev = jax.device_count()
  if cfg.batch_size % n_dev:
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {n_dev} devices: "
                     f"set --config.batch_size to a multiple of {n_dev}")
  lead = jax.process_index() == 0
  workdir_lib.make(workdir)  # first: an unreachable workdir fails within seconds
  setup = build(cfg)
  setup.task.check_eval(cfg)  # evaluation settings fail now, not after the run
  lock = workdir_lib.Lock(workdir, stale_s=cfg.get("lock_stale_s", workdir_lib.STALE_S))
  try:
    if lead:
      lock.acquire()
  finally:
    _agree(lock.held or not lead, "take the workdir lock")
  mesh = sharding.make_mesh(cfg)
  stop = stopping.Stop(mesh, sharding.BATCH_AXES, cfg.get("stop_timeout_s", 300.0))
  stop.install()
  try:
    return _train(cfg, workdir, stop_at, setup, lock, mesh, stop)
  finally:
    stop.close()
    if lead:
      lock.release()


def _check_resume(cfg, workdir, mngr) -> None:
  """Refuses a config that differs from the stored one where it may not."""
  if not mngr.all_steps():
    return
  old = checkpointing.stored_config(workdir)
  if old is None:
    raise ValueError(
        f"workdir {workdir} holds checkpoints (steps {sorted(mngr.all_steps())}) but no "
        "config.json, so this config cannot be checked against theirs: put the run's "
        "config.json back, or use a new --workdir")
  changes = checkpointing.config_changes(old, cfg)
  if changes:
    raise ValueError(
        f"workdir {workdir} holds a run with a different config ({'; '.join(changes)}); "
        f"only {', '.join(checkpointing.MUTABLE_ON_RESUME)} may change on resume: use a "
        "new --workdir or the original config")


def _start(cfg, workdir, setup, mesh, shardings, mngr) -> tuple[dict, ocp.CheckpointManager]:
  """The state to start from: the newest good checkpoint, else a fresh one."""
  state = jax.jit(setup.init, out_shardings=shardings)()
  restored, mngr = checkpointing.restore_newest_good(
      workdir, mngr, jax.tree.map(ocp.utils.to_shape_dtype_struct, state), cfg.keep_checkpoints)
  if restored is not None:
    state = restored["state"]
    _print(f"resumed from {workdir} at step {int(state['step'])} "
           f"(data iterator at batch {restored['data']['next_index']})")
  if cfg.num_steps < int(state["step"]):
    raise ValueError(f"--config.num_steps={cfg.num_steps} is below the step of the checkpoint "
                     f"in {workdir} ({int(state['step'])}): set it to {int(state['step'])} or more")
  return state, mngr


def _open_writer(cfg, workdir, start, lock) -> summary.MetricWriter:
  """Writes config.json and opens the run's records (process 0), once the config is
  known compatible, the state restored and the step traced; all processes agree."""
  lead = jax.process_index() == 0
  progress = summary.Progress(cfg.num_steps, start, cfg.batch_size, enabled=lead and cfg.progress,
                              every_s=cfg.get("progress_every_s", 60.0))
  error = None
  try:
    writer = summary.MetricWriter(workdir, start, enabled=lead, progress=progress,
                                  tensorboard=cfg.get("tensorboard", True), fence=lock.check)
    if lead:
      writer._guard(lambda: workdir_lib.write_text(  # pylint: disable=protected-access
          workdir_lib.join(workdir, "config.json"), cfg.to_json(indent=2)))
  except (OSError, workdir_lib.WorkdirError) as e:
    error = e
  _agree(error is None, "write the run's files")
  if error is not None:
    raise error
  return writer


def _train(cfg, workdir, stop_at, setup, lock, mesh, stop) -> dict:
  task = setup.task
  mngr = checkpointing.manager(workdir)
  _check_resume(cfg, workdir, mngr)
  shardings = sharding.state_shardings(jax.eval_shape(setup.init), mesh)
  state, mngr = _start(cfg, workdir, setup, mesh, shardings, mngr)
  start = int(state["step"])
  step_fn = make_step(setup, mesh, shardings, skip_nonfinite=cfg.get("skip_nonfinite", False))
  ds = pipeline.train_dataset(
      task.train_src, batch_size=cfg.batch_size, seed=cfg.seed, transform=task.transform(),
      process_index=jax.process_index(), process_count=jax.process_count())
  first = _read_data(cfg, lambda: ds[start])
  _trace_step(cfg, step_fn, state, {k: first[k] for k in task.batch_keys}, jax.process_count())
  writer = _open_writer(cfg, workdir, start, lock)
  loop = Loop(cfg, workdir, setup, mesh, mngr, writer, lock, stop, step_fn, ds)
  try:
    state, code = loop.run(state, start, stop_at)
    loop.finish()
    return _end(cfg, workdir, loop, state, code, start)
  finally:
    loop.finish()
    writer.close()


def _read_data(cfg, fn: Callable):
  """fn() (a read of the training data), with one line for unreadable data files."""
  try:
    return fn()
  except (StopIteration, FileNotFoundError, stopping.Interrupted):
    raise  # FileNotFoundError: get_source's own line (a dataset that is not prepared)
  except Exception as e:  # array_record / tfds / grain raise many kinds
    if isinstance(e, OSError) and getattr(e, "errno", None) == errno.ENOSPC:
      raise
    raise DataError(
        f"dataset {cfg.dataset!r} in {cfg.data_dir or pipeline.DEFAULT_DATA_DIR} cannot be read "
        f"({type(e).__name__}: {' '.join(str(e).split())[:200]}): its files are missing or "
        "corrupt; delete that dataset's folder there and run again to prepare it (built-in "
        "datasets), or prepare it again (docs/tpu.md)") from None


class DataError(RuntimeError):
  """The training or evaluation data cannot be read."""


class Loop:
  """The training loop of one run: steps, records, evaluations and checkpoints.

  Every process runs the same loop and stops at the same step: writes happen on
  process 0 behind the workdir lock's fence, and their failures become a vote
  (`stopping.Stop`) instead of an exception on one process only.
  """

  def __init__(self, cfg, workdir, setup, mesh, mngr, writer, lock, stop, step_fn, ds):
    self.cfg, self.workdir, self.setup, self.mesh = cfg, workdir, setup, mesh
    self.mngr, self.writer, self.lock, self.stop = mngr, writer, lock, stop
    self.step_fn, self.ds = step_fn, ds
    self._finished = False
    self.task = setup.task
    self.lead = jax.process_index() == 0
    self.skip = cfg.get("skip_nonfinite", False)
    self.eval_data = functools.cache(lambda: self.task.eval_data(cfg.eval_limit))
    self.init_eval = None
    self.saved = None  # the step of the newest save this run started
    self.completed = None  # the step of the newest save known complete
    self.data_sharding = sharding.batch_sharding(mesh)
    # [first non-finite step or -1, count]: replicated, one per process too.
    self.tally = jax.device_put(np.array([-1, 0], np.int32),
                                jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    self.skipped = 0

  def record(self, step: int, phase: str, record: dict) -> None:
    """A record through the fenced writer; a failure becomes this process's stop vote."""
    try:
      self.writer.write(step, phase, record)
    except workdir_lib.LockLost as e:
      self.stop.request(stopping.FENCED, str(e))
    except OSError as e:
      self.stop.request(stopping.FAIL, str(e))

  def evaluate(self, state, names: str) -> dict:
    if not names.strip():
      return {}
    return self.task.evaluate(sharding.host_params(state["params"], self.mesh),
                              self.eval_data(), names)

  def save(self, state) -> None:
    """A checkpoint of state, if every process agrees that the run still owns the workdir."""
    self.skipped = _check_finite(self.tally, self.skip)
    if self.lead and not self.lock.check():
      self.stop.request(stopping.FENCED, f"another trainer took the lock of {self.workdir}: "
                        "this trainer writes nothing more")
    if self.stop.now() == stopping.FENCED:
      return
    try:
      started = checkpointing.save(self.mngr, state, {"next_index": int(state["step"]),
                                                      "seed": self.cfg.seed},
                                   self.cfg.keep_checkpoints)
      self.completed = self.saved  # save() completed the previous save first
      if started:
        self.saved = int(state["step"])
      self.writer.flush()
    except workdir_lib.LockLost as e:
      self.stop.request(stopping.FENCED, str(e))
    except FloatingPointError:
      raise
    except Exception as e:  # Orbax and TensorStore raise many kinds for a failed write
      self.stop.request(stopping.FAIL, f"cannot write the run's files in {self.workdir}: "
                        f"{workdir_lib.describe_error(e)}")

  def run(self, state, start: int, stop_at: Optional[int]) -> tuple[dict, int]:
    """Steps from `start` until num_steps, stop_at or an agreed stop -> (state, code)."""
    cfg = self.cfg
    if start == 0 and cfg.eval_at_init:
      self.init_eval = self.evaluate(state, cfg.evaluators)
      self.record(0, "eval", self.init_eval)
    batches = iter(pipeline.read(self.ds[start:], cfg.data_threads, cfg.get("data_workers", 0)))
    t_last, n_last = time.perf_counter(), start
    code = stopping.CONTINUE
    for step in range(start, cfg.num_steps):
      if stop_at is not None and step >= stop_at:  # the same step on every process
        self.stop.request(stopping.PREEMPT, f"--stop_at={stop_at}")
        code = stopping.PREEMPT
        break
      if self.lead and self.lock.lost.is_set():
        self.stop.request(stopping.FENCED, f"another trainer took the lock of {self.workdir}: "
                          "this trainer writes nothing more")
      code = self.stop.poll()
      if code:
        break
      local = _read_data(cfg, lambda: next(batches))
      batch = {k: jax.make_array_from_process_local_data(self.data_sharding, local[k])
               for k in self.task.batch_keys}
      state, logs = self.step_fn(state, batch)
      done = step + 1
      self.tally = _track_nonfinite(self.tally, logs["finite"], jnp.int32(done))
      if done % cfg.log_every == 0 or done == cfg.num_steps:
        now = time.perf_counter()
        self.log_train(done, logs, (done - n_last) * cfg.batch_size / (now - t_last))
        t_last, n_last = now, done
      else:
        self.writer.progress.update(done)
      if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.num_steps:
        self.record(done, "eval", self.evaluate(state, cfg.evaluators))
      if done % cfg.checkpoint_every == 0:
        self.save(state)
    else:
      code = self.stop.now()
    if code != stopping.FENCED:
      self.save(state)  # the last step (or where the run stopped)
      code = max(code, self.stop.now())
    return state, code

  def log_train(self, step: int, logs: dict, rate: float) -> None:
    self.skipped = _check_finite(self.tally, self.skip)
    logs = jax.device_get(logs)
    record = {"lr": float(self.setup.schedule(step)), "examples_per_s": rate,
              **{k: float(v) for k, v in logs.items() if k != "finite"}}
    if self.skip:
      record["skipped_steps"] = self.skipped
    self.record(step, "train", record)
    self.writer.progress.update(step, record["loss"], rate)

  def finish(self) -> None:
    """Completes a good checkpoint in flight, whatever stopped the loop (once)."""
    if self._finished:
      return
    self._finished = True
    try:
      self.mngr.wait_until_finished()
      self.completed = self.saved
      if self.stop.code != stopping.FENCED:
        checkpointing.rotate(self.mngr, self.cfg.keep_checkpoints)
    except Exception as e:  # Orbax and TensorStore raise many kinds for a failed write
      self.stop.request(stopping.FAIL, f"cannot write the checkpoint in {self.workdir}: "
                        f"{workdir_lib.describe_error(e)}")
    finally:
      try:
        self.mngr.close()
      except Exception:  # the failure above already said why  # noqa: BLE001
        pass


def _end(cfg, workdir, loop: Loop, state, code: int, start: int) -> dict:
  """What the agreed stop means: an error, a preempted run, or the final evaluation."""
  step = int(state["step"])
  if loop.skipped:
    _print(f"warning: skipped {loop.skipped} non-finite step(s), the first at step "
           f"{int(jax.device_get(loop.tally)[0])}")
  if loop.stop.code == stopping.FAIL:  # completing the last save failed
    code = max(code, stopping.FAIL)
  if code >= stopping.FAIL:
    why = loop.stop.reason or ("another process of the run stopped it: it could not write the "
                               "workdir or lost its lock (see process 0's log)")
    if code == stopping.FENCED:
      raise workdir_lib.LockLost(f"{why}; stopped at step {step}")
    newest = loop.completed if loop.completed is not None else (start or None)
    saved = (f"the newest complete checkpoint is step {newest}" if newest is not None else
             "there is no complete checkpoint")
    raise workdir_lib.WorkdirError(f"{why}; stopped at step {step}, {saved}")
  if code == stopping.PREEMPT:
    _print(f"stopped: checkpoint saved at step {step} in {workdir}; run the same command to resume")
    return {"preempted": True, "step": step}
  return _final_eval(cfg, workdir, loop, state, start)


def _final_eval(cfg, workdir, loop: Loop, state, start: int) -> dict:
  """The final evaluation, written (fenced) to metrics.jsonl and final_eval.json. A stop
  signal abandons it in a single process (the checkpoint is saved: the same command
  evaluates it); several processes finish it, since it runs collectives."""
  step = int(state["step"])
  try:
    if jax.process_count() == 1:
      loop.stop.interruptible = True
      if loop.stop.code:  # the signal came between the last save and here
        raise stopping.Interrupted(loop.stop.reason)
    result = {"step": step, **loop.evaluate(state, cfg.final_evaluators)}
    loop.stop.interruptible = False
  except stopping.Interrupted:
    _print(f"stopped during the final evaluation: checkpoint saved at step {step} in {workdir}; "
           "run the same command to evaluate it")
    return {"preempted": True, "step": step}
  if start == 0 and cfg.eval_at_init:
    result["random_init"] = loop.init_eval
  writer = loop.writer
  lead = jax.process_index() == 0
  try:
    writer.write(step, "final", {k: v for k, v in result.items() if k != "step"})
    if lead:
      writer._guard(lambda: workdir_lib.write_json(  # pylint: disable=protected-access
          workdir_lib.join(workdir, "final_eval.json"), result))
      writer.flush()
  except workdir_lib.LockLost as e:
    raise workdir_lib.LockLost(f"{e}; the final evaluation of step {step} was not written")
  except OSError as e:
    raise workdir_lib.WorkdirError(f"cannot write the final evaluation in {workdir}: "
                                   f"{workdir_lib.describe_error(e)}")
  return result


def restore_for_eval(workdir: str, step: Optional[int] = None):
  """(config, restored state, task) of a workdir, onto this host's first device,
  whatever process count or mesh wrote the checkpoint. Without `step`, the newest
  checkpoint that passes the restore checks (others are reported, not moved)."""
  cfg = checkpointing.load_config(workdir)
  setup = build(cfg)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(setup.init))
  mngr = checkpointing.manager(workdir, cfg.keep_checkpoints)
  steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  errors = []
  for s in steps:
    try:
      return cfg, checkpointing.restore(mngr, abstract, s)["state"], setup.task
    except checkpointing.CheckpointError as e:
      errors.append(str(e))
      if s != steps[-1]:
        print(f"warning: {e}: trying an older checkpoint", file=sys.stderr)
  raise checkpointing.CheckpointError("; ".join(errors))


_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics: a "
                                "local path or a remote one (gs://bucket/run).")
_STOP_AT = flags.DEFINE_integer("stop_at", None, "Checkpoint and exit after this step, as if "
                                "preempted (time-boxed jobs, tests).")


class _NoOrbaxErrors(pylogging.Filter):
  """Drops Orbax's own error logs (tracebacks from its save threads): the trainer
  reports a failed save itself, in one line."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno < pylogging.ERROR or "orbax" not in record.pathname


class _NoThreadTracebacks:
  """sys.stderr of the CLI without the tracebacks that background threads print
  (Orbax's save threads and TensorStore's callbacks, dozens of them when a save
  fails on a full disk): the trainer reports such a failure itself, in one line.
  The main thread's output, and every other line, pass unchanged.
  CONTRASTIVE_JAX_DEBUG=1 keeps everything."""

  _INSIDE = ("Traceback (most recent call last):", "During handling of the above",
             "The above exception was", "Exception in thread")

  def __init__(self, stream):
    self.stream = stream
    self._state = threading.local()

  def write(self, text: str) -> int:
    if threading.current_thread() is threading.main_thread():
      return self.stream.write(text)
    st = self._state
    buffered = getattr(st, "line", "") + text
    *lines, st.line = buffered.split("\n")
    for line in lines:
      if getattr(st, "inside", False):
        # Frames are indented; the exception's own line ends the block (chains re-enter).
        st.inside = not line or line.startswith((" ", *self._INSIDE))
      elif line.startswith(self._INSIDE):
        st.inside = True
      else:
        self.stream.write(line + "\n")
    return len(text)

  def flush(self) -> None:
    self.stream.flush()

  def __getattr__(self, name):
    return getattr(self.stream, name)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  logging.get_absl_logger().addFilter(_NoOrbaxErrors())
  pylogging.getLogger("asyncio").setLevel(pylogging.CRITICAL)  # Orbax's failed save tasks
  if not os.environ.get("CONTRASTIVE_JAX_DEBUG"):
    sys.stderr = _NoThreadTracebacks(sys.stderr)
  if _CONFIG.value is None or _WORKDIR.value is None:
    sys.exit("error: --config and --workdir are required, e.g. "
             "--config configs/mnist_gamma.py --workdir runs/mnist_gamma")
  try:
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value, stop_at=_STOP_AT.value)
  except (ValueError, OSError, FloatingPointError, workdir_lib.WorkdirError,
          checkpointing.CheckpointError, DataError) as e:
    sharding.finish_peer_watchdog()
    sys.exit(f"error: {e}")
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    # A collective failed because a peer died: JAX's shutdown would then abort with a
    # thread dump while it waits for the dead peer at exit.
    sharding.exit_peer_lost(str(e))
  sharding.finish_peer_watchdog()
  if jax.process_index() != 0:
    return
  print(json.dumps(workdir_lib.finite_json(result)))
  line = result_line(result)
  if line:
    print(line)


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def result_line(result: dict) -> Optional[str]:
  """A one-line summary of the probes in a final evaluation, naming only what was
  computed and finite (None when there is nothing to say)."""
  parts = []
  if _finite(result.get("knn_top1")):
    init = result.get("random_init", {}).get("knn_top1")
    parts.append(f"kNN top-1 {100 * result['knn_top1']:.1f} %" +
                 (f" (random init {100 * init:.1f} %)" if _finite(init) else ""))
  if _finite(result.get("linear_top1")):
    parts.append(f"linear probe {100 * result['linear_top1']:.1f} %")
  return ", ".join(parts) or None


def catalogue() -> str:
  """What a run can name: configs, tasks, losses, encoders and built-in datasets."""
  from contrastive_jax.data import builders  # pylint: disable=g-import-not-at-top
  from contrastive_jax.losses import registry  # pylint: disable=g-import-not-at-top
  from contrastive_jax.models import encoders  # pylint: disable=g-import-not-at-top
  root = epath.Path(__file__).parent.parent / "configs"
  configs = sorted(f"configs/{p.name}" for p in root.glob("*.py")
                   if p.name != "base.py") if root.exists() else []
  rows = [("configs (--config)", configs or ["(none found beside the package)"]),
          ("tasks (--config.task)", list(tasks.TASKS)),
          ("losses (--config.loss)", list(registry.LOSSES)),
          ("encoders (--config.model)", list(encoders.ENCODERS)),
          ("datasets (--config.dataset)",
           sorted(builders.BUILDERS) + ["or any TFDS name prepared as array_record in "
                                        "--config.data_dir (docs/tpu.md)"])]
  return "\n".join(f"{title}:\n  {', '.join(names)}" for title, names in rows)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error (and the nearest name, which
  ml_collections suggests) for a bad --config override instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl exits 1 after printing --help; asking for help is no error
    if any(a in ("--help", "-h", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    if suggestion:
      sys.exit(f"error: the config has no field {suggestion.group(2)!r}: did you mean "
               f"--config.{suggestion.group(1)}?")
    sys.exit(f"error: bad flag: {' '.join(text.split())}")


def cli():
  # absl's --help prints the __main__ module's docstring: add what a run can name.
  main_module = sys.modules["__main__"]
  main_module.__doc__ = f"{__doc__}\n{catalogue()}\n"
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
