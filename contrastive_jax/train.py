"""A training run, for every task (two-view, image-text two-tower, fusion): start or
resume, the loop, checkpoints, the final evaluation.

  python -m contrastive_jax.train --config mnist_gamma --workdir runs/x   (main.py: the CLI)

The state and the jitted step are `contrastive_jax.step`; a task
(`contrastive_jax.tasks`) owns its model, objective and evaluation. Multi-process
runs call `jax.distributed.initialize` first (cfg.distributed); each process feeds
its slice of every global batch, and batch k is a pure function of (seed, k), so a
run resumed at step k continues exactly as if never stopped. Every process stops
at the same step (`contrastive_jax.stopping`), and every write is fenced by the
workdir lock (`contrastive_jax.workdir`).
"""

import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from contrastive_jax import checkpointing
from contrastive_jax import export
from contrastive_jax import sharding
from contrastive_jax import step as step_lib
from contrastive_jax import stopping
from contrastive_jax import summary
from contrastive_jax import workdir as workdir_lib
from contrastive_jax.data import pipeline
from contrastive_jax.losses import registry


def _print(*args):
  if jax.process_index() == 0:
    print(*args, flush=True)


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
  step_lib.validate(cfg)
  if stop_at is not None and stop_at < 0:
    raise ValueError(f"--stop_at={stop_at}: must be >= 0")
  sharding.initialize_distributed(cfg)
  n_dev = jax.device_count()
  if cfg.batch_size % n_dev:
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {n_dev} devices: "
                     f"set --config.batch_size to a multiple of {n_dev}")
  lead = jax.process_index() == 0
  workdir_lib.make(workdir)  # first: an unreachable workdir fails within seconds
  setup = step_lib.build(cfg)
  setup.task.check_eval()  # evaluation settings fail now, not after the run
  lock = workdir_lib.Lock(workdir, stale_s=cfg.get("lock_stale_s", workdir_lib.STALE_S))
  try:
    if lead:
      lock.acquire()
      if lock.took_over:
        checkpointing.set_aside_unfinished(workdir)
  finally:
    stopping.agree(lock.held or not lead, "take the workdir lock")
  mesh = sharding.make_mesh(cfg)
  stop = stopping.Stop(mesh, sharding.BATCH_AXES, cfg.get("stop_timeout_s", 300.0))
  stop.install()
  try:
    return _train(cfg, workdir, stop_at, setup, lock, mesh, stop)
  finally:
    stop.close()
    if lead:
      lock.release()


def _start(cfg, workdir, setup, mesh, shardings, mngr) -> tuple[dict, ocp.CheckpointManager]:
  """The state to start from: the newest good checkpoint, else a fresh one."""
  state = jax.jit(setup.init, out_shardings=shardings)()
  restored, mngr = checkpointing.restore_newest_good(
      workdir, mngr, jax.tree.map(ocp.utils.to_shape_dtype_struct, state), setup.task.neg_inf_ok)
  if restored is not None:
    state = restored["state"]
    _print(f"resumed from {workdir} at step {int(state['step'])} "
           f"(data iterator at batch {restored['data']['next_index']})")
  elif cfg.get("init_from"):
    state = export.initialise(state, cfg.init_from, cfg.get("init_head", True))
    _print(f"initialised the {'encoder and head' if cfg.get('init_head', True) else 'encoder'} "
           f"from {cfg.init_from}")
  if cfg.num_steps < int(state["step"]):
    raise ValueError(f"--config.num_steps={cfg.num_steps} is below the step of the checkpoint "
                     f"in {workdir} ({int(state['step'])}): set it to {int(state['step'])} or more")
  return state, mngr


def _open_writer(cfg, workdir, start, lock) -> summary.MetricWriter:
  """Writes config.json and opens the run's records (process 0), once the config is
  known compatible, the state restored and the step traced; all processes agree."""
  error = None
  try:
    writer = summary.MetricWriter.for_run(cfg, workdir, start, jax.process_index() == 0,
                                          lock.check)
  except (OSError, workdir_lib.WorkdirError) as e:
    error = e
  stopping.agree(error is None, "write the run's files")
  if error is not None:
    raise error
  return writer


def _train(cfg, workdir, stop_at, setup, lock, mesh, stop) -> dict:
  task = setup.task
  mngr = checkpointing.manager(workdir)
  checkpointing.check_resume(cfg, workdir, mngr, task.mutable_on_resume,
                             registry.renamed_config_fields())
  shardings = step_lib.shardings(setup, mesh)
  state, mngr = _start(cfg, workdir, setup, mesh, shardings, mngr)
  start = int(state["step"])
  step_fn = step_lib.make_step(setup, mesh, shardings, skip_nonfinite=cfg.get("skip_nonfinite", False))
  ds = task.train_dataset(cfg.batch_size, cfg.seed, jax.process_index(), jax.process_count())
  first = pipeline.read_or_fail(cfg.dataset, cfg.data_dir, lambda: ds[start])
  step_lib.trace_step(cfg, step_fn, state, {k: first[k] for k in task.batch_keys}, jax.process_count())
  writer = _open_writer(cfg, workdir, start, lock)
  loop = Loop(cfg, workdir, setup, mesh, mngr, writer, lock, stop, step_fn, ds)
  try:
    state, code = loop.run(state, start, stop_at)
    loop.finish()
    return _end(cfg, workdir, loop, state, code, start)
  finally:
    loop.finish()
    writer.close()


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
    # The lock's check again right before each save and deletion. With several processes
    # the agreement before a save decides for all (a check on process 0 alone would leave
    # the others in Orbax's barriers).
    self.fence = lock.check if jax.process_count() == 1 else (lambda: True)

  def _fenced(self) -> None:
    self.stop.request(stopping.FENCED, str(workdir_lib.lost_lock(self.workdir)))

  def record(self, step: int, phase: str, record: dict) -> None:
    """A record through the fenced writer; a failure becomes this process's stop vote."""
    try:
      self.writer.write(step, phase, record)
    except workdir_lib.LockLost as e:
      self.stop.request(stopping.FENCED, str(e))
    except OSError as e:
      self.stop.request(stopping.FAIL, str(e))

  def evaluate(self, state: dict, names: str) -> dict:
    if not names.strip():
      return {}
    entries = {k: state[k] for k in self.task.eval_keys}
    return self.task.evaluate(self.task.eval_variables(sharding.host_params(entries, self.mesh)),
                              self.eval_data(), names)

  def save(self, state: dict) -> None:
    """A checkpoint of state, if every process agrees that the run still owns the workdir."""
    self.skipped = step_lib.check_finite(self.tally, self.skip)
    if self.lead and not self.lock.check():
      self._fenced()
    if self.stop.now() == stopping.FENCED:
      return
    try:
      started = checkpointing.save(self.mngr, state, {"next_index": int(state["step"]),
                                                      "seed": self.cfg.seed},
                                   self.cfg.keep_checkpoints, self.task.neg_inf_ok, self.fence)
      self.completed = self.saved  # save() completed the previous save first
      if started:
        self.saved = int(state["step"])
      self.writer.flush()
    except (workdir_lib.LockLost, checkpointing.Fenced):
      self._fenced()
    except FloatingPointError:
      raise
    except Exception as e:  # noqa: BLE001  (Orbax and TensorStore raise many kinds)
      self.stop.request(stopping.FAIL, f"cannot write the run's files in {self.workdir}: "
                        f"{workdir_lib.describe_error(e)}")

  def run(self, state: dict, start: int, stop_at: Optional[int]) -> tuple[dict, int]:
    """Steps from `start` until num_steps, stop_at or an agreed stop -> (state, code)."""
    cfg = self.cfg
    at_init = self.task.due("at_init")
    if start == 0 and at_init:
      self.init_eval = self.evaluate(state, at_init)
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
        self._fenced()
      code = self.stop.poll()
      if code:
        break
      local = pipeline.read_or_fail(cfg.dataset, cfg.data_dir, lambda: next(batches))
      batch = {k: jax.make_array_from_process_local_data(self.data_sharding, local[k])
               for k in self.task.batch_keys}
      state, logs = self.step_fn(state, batch)
      done = step + 1
      self.tally = step_lib.track_nonfinite(self.tally, logs["finite"], jnp.int32(done))
      if done % cfg.log_every == 0 or done == cfg.num_steps:
        now = time.perf_counter()
        self.log_train(done, logs, (done - n_last) * cfg.batch_size / (now - t_last))
        t_last, n_last = now, done
      else:
        self.writer.progress.update(done)
      names = self.task.due(done) if done < cfg.num_steps else ""
      if names:
        self.record(done, "eval", self.evaluate(state, names))
        self.writer.progress.restart()
      if done % cfg.checkpoint_every == 0:
        self.save(state)
    else:
      code = self.stop.now()
    if code != stopping.FENCED:
      self.save(state)  # the last step (or where the run stopped)
      code = max(code, self.stop.now())
    return state, code

  def log_train(self, step: int, logs: dict, rate: float) -> None:
    self.skipped = step_lib.check_finite(self.tally, self.skip)
    logs = jax.device_get(logs)
    record = {"lr": float(self.setup.schedule(step)), "examples_per_s": rate,
              **{k: float(v) for k, v in logs.items() if k != "finite"}}
    if self.skip:
      record["skipped_steps"] = self.skipped
    self.record(step, "train", record)
    self.writer.progress.update(step, record["loss"], rate, record.get("nt_xent_local"))

  def finish(self) -> None:
    """Completes a good checkpoint in flight, whatever stopped the loop (once)."""
    if self._finished:
      return
    self._finished = True
    try:
      self.mngr.wait_until_finished()
      self.completed = self.saved
      if self.stop.code != stopping.FENCED:
        checkpointing.rotate(self.mngr, self.cfg.keep_checkpoints, self.fence)
    except checkpointing.Fenced:
      self._fenced()
    except Exception as e:  # noqa: BLE001  (Orbax and TensorStore raise many kinds)
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
  names = loop.task.due("final")
  try:
    if jax.process_count() == 1:
      loop.stop.interruptible = True
      if loop.stop.code:  # the signal came between the last save and here
        raise stopping.Interrupted(loop.stop.reason)
    if names:  # on a large split this takes minutes: say what runs
      _print(f"final evaluation of step {step}: {names}")
    result = {"step": step, **loop.evaluate(state, names)}
    loop.stop.interruptible = False
  except stopping.Interrupted:
    _print(f"stopped during the final evaluation: checkpoint saved at step {step} in {workdir}; "
           "run the same command to evaluate it")
    return {"preempted": True, "step": step}
  if loop.init_eval is not None:
    result["random_init"] = loop.init_eval
  loop.writer.write_final(result)
  return result


if __name__ == "__main__":  # python -m contrastive_jax.train: the command line (main.py)
  from contrastive_jax import main as main_lib
  main_lib.cli()
