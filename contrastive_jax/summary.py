"""A run's records: metrics.jsonl, TensorBoard event files and the console, behind
one fenced writer (`MetricWriter`).

Written with tensorboardX (no TensorFlow). Remote workdirs (gs://, s3://, az://)
go through `etils.epath` like every other file of the run: an object store cannot
append, so an event file there is buffered and rewritten whole at each flush
(tensorboardX flushes every `flush_secs`, and at checkpoints and the end).

  tensorboard --logdir WORKDIR    (a gs:// logdir needs TensorBoard's own GCS support)
"""

import datetime
import io
import math
import os
import secrets
import sys
import time
from typing import Any, Callable, Optional

from etils import epath
from tensorboardX import event_file_writer
from tensorboardX import record_writer
from tensorboardX import summary as tb_summary
from tensorboardX.proto import event_pb2
import tqdm

from contrastive_jax import workdir as workdir_lib


class _ObjectFile:
  """An event file on an object store: kept in memory, rewritten whole on flush."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _ObjectFactory:
  """tensorboardX writer factory for a URI scheme, through epath."""

  def open(self, path: str) -> _ObjectFile:
    return _ObjectFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


for _scheme in ("gs", "s3", "az"):  # tensorboardX's own need google-cloud-storage / boto3
  record_writer.register_writer_factory(_scheme, _ObjectFactory())


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
  """The finite numbers of a (nested) record as {"prefix/name": value}; nested dicts
  give "prefix/outer/inner". Booleans, strings and NaN/inf are left out."""
  out = {}
  for k, v in record.items():
    name = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(scalars(v, name))
    elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      out[name] = float(v)
  return out


class Writer:
  """Train and eval scalars of a run as TensorBoard events in `workdir`.

  Events are written synchronously from the caller's thread (tensorboardX's
  SummaryWriter queues them for a thread that, once dead on a full disk, lets
  the queue fill and every later write block): a failing write raises OSError
  where the trainer can stop on it. A run resumed at step `start` purges the
  events a dead run wrote after it (TensorBoard's purge_step), as metrics.jsonl
  drops its records.
  """

  def __init__(self, workdir: Any, start: int = 0, enabled: bool = True,
               flush_secs: float = 30.0):
    self.writer = None
    self.flush_secs = flush_secs
    self.remote = "://" in os.fspath(workdir)
    self._flushed = time.monotonic()
    if enabled:
      self.writer = event_file_writer.EventsWriter(os.path.join(os.fspath(workdir), "events"))
      if start:
        self.writer.write_event(event_pb2.Event(step=start, file_version="brain.Event:2"))
        self.writer.write_event(event_pb2.Event(
            step=start, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
      self.flush()

  def write(self, step: int, record: dict, prefix: str) -> None:
    """Adds every finite number of record (see `scalars`) under prefix/ at step."""
    if self.writer is None:
      return
    now = time.time()
    for name, value in scalars(record, prefix).items():
      self.writer.write_event(event_pb2.Event(
          wall_time=now, step=step, summary=tb_summary.scalar(name, value)))
    # Locally every record reaches the file at once (a full disk fails here, not later);
    # an object store rewrites the whole file at each flush, so only every flush_secs.
    if not self.remote or time.monotonic() - self._flushed >= self.flush_secs:
      self.flush()

  def flush(self) -> None:
    if self.writer is not None:
      self.writer.flush()
      self._flushed = time.monotonic()

  def close(self) -> None:
    if self.writer is not None:
      writer, self.writer = self.writer, None
      writer.close()


class Progress:
  """Progress of the loop: a tqdm bar on a terminal; otherwise (nohup, a log file,
  a batch job) one plain line every `every_s` seconds, since a bar's carriage-return
  updates would pile up on one line of the log:

    step 1200/5000 (24 %)  loss -7.4183 (nt_xent_local 2.4135)  1,450 examples/s  ETA 0:04:10

  The rate (and so the ETA) is measured over training steps only: a window starts
  after the first step (compilation) and again after each evaluation (`restart`).
  `monitor`, a loss a reader can compare across losses (the two-view task's
  nt_xent_local), is shown beside the training loss (the gamma loss's value means
  nothing to a reader).
  """

  def __init__(self, total: int, start: int, batch_size: int, *, enabled: bool,
               every_s: float, stream=None):
    self.stream = stream or sys.stdout
    self.total, self.batch_size, self.every_s = total, batch_size, every_s
    self.enabled = enabled
    self.tty = enabled and self.stream.isatty()
    self.bar = tqdm.tqdm(total=total, initial=start, desc="train", unit="step",
                         dynamic_ncols=True, file=self.stream) if self.tty else None
    self.loss = self.monitor = None
    self._t, self._step, self._fresh = time.monotonic(), start, True

  def restart(self) -> None:
    """What just happened (an evaluation) does not count in the rate."""
    self._fresh = True
    if self.bar is not None:
      self.bar.unpause()

  def update(self, step: int, loss: Optional[float] = None, rate: Optional[float] = None,
             monitor: Optional[float] = None) -> None:
    """Step `step` is done (loss, examples/s and the monitor when they were just logged)."""
    if loss is not None:
      self.loss, self.monitor = loss, monitor
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      if loss is not None:
        shown = {"loss": f"{loss:.4f}", "ex_s": f"{rate:.0f}"}
        if monitor is not None:
          shown["nt_xent_local"] = f"{monitor:.4f}"
        self.bar.set_postfix(**shown)
      return
    now = time.monotonic()
    if self._fresh:  # this step held compilation or followed an evaluation: start a window
      self._t, self._step, self._fresh = now, step, False
      if step < self.total:
        return
    if not self.enabled or (now - self._t < self.every_s and step < self.total):
      return
    steps_per_s = (step - self._step) / max(now - self._t, 1e-9)
    parts = [f"step {step}/{self.total} ({100 * step // self.total} %)"]
    if self.loss is not None and math.isfinite(self.loss):
      parts.append(f"loss {self.loss:.4f}" + (
          f" (nt_xent_local {self.monitor:.4f})" if self.monitor is not None and
          math.isfinite(self.monitor) else ""))
    if step > self._step:
      parts.append(f"{steps_per_s * self.batch_size:,.0f} examples/s")
      if step < self.total:
        eta = datetime.timedelta(seconds=round((self.total - step) / steps_per_s))
        parts.append(f"ETA {eta}")
    print("  ".join(parts), file=self.stream, flush=True)
    self._t, self._step = now, step

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class WriteError(OSError):
  """A file of the run could not be written (a full disk, a read-only workdir)."""


class WandbWriter:
  """Train and eval scalars of a run in Weights & Biases (the `wandb` extra), under the
  same names as TensorBoard's ("train/loss", "eval/knn_top1", "final/...").

  The W&B run's id is kept in the workdir (wandb_id), so a resumed run continues the
  same W&B run. W&B keeps a step's first value: steps that a preempted run logged after
  its last checkpoint are not logged again on resume (metrics.jsonl and TensorBoard drop
  and rewrite them). WANDB_MODE=offline writes the run locally, for `wandb sync`.
  """

  def __init__(self, workdir: Any, options: Any, config: dict):
    import wandb  # optional (the wandb extra): only runs that log to W&B import it
    id_file = workdir_lib.join(workdir, "wandb_id")
    run_id = (epath.Path(id_file).read_text().strip() if epath.Path(id_file).exists()
              else secrets.token_hex(6))
    workdir_lib.write_text(id_file, run_id)
    local = "://" not in os.fspath(workdir)
    try:
      self.run = wandb.init(
          project=options.project, entity=options.get("entity"), name=options.get("name"),
          id=run_id, resume="allow", config=config, mode=options.get("mode"),
          dir=options.get("dir") or (os.fspath(workdir) if local else None))
    except Exception as e:  # noqa: BLE001  (W&B raises many kinds: network, login, ...)
      raise WriteError(f"cannot start the W&B run {run_id}: {type(e).__name__}: {e}") from None

  def write(self, step: int, record: dict, prefix: str) -> None:
    self.run.log(scalars(record, prefix), step=step)

  def flush(self) -> None:
    pass  # W&B's own process writes and uploads in the background

  def close(self) -> None:
    if self.run is not None:
      run, self.run = self.run, None
      run.finish()


class MetricWriter:
  """The one place a run's records go: metrics.jsonl, TensorBoard, W&B (`wandb`: a
  WandbWriter, or None) and the console.

  Every write is fenced: `fence()` (the workdir lock's check) must hold first, or
  `workdir.LockLost` is raised and nothing is written. A sink that fails raises
  WriteError with one line, and the writer writes nothing more after a failure or
  a lost lock.
  """

  def __init__(self, workdir: Any, start: int, *, enabled: bool, tensorboard: bool,
               progress: Progress, fence: Callable[[], bool],
               wandb: Optional[Callable[[], Any]] = None):
    self.workdir, self.enabled, self.fence = workdir, enabled, fence
    self.progress = progress
    self.dead: Optional[str] = None
    self.log = None
    self.sinks = []  # what every record goes to besides metrics.jsonl
    if enabled:
      self.guarded(lambda: None)
      self.log = self._io(lambda: workdir_lib.MetricsLog(workdir, start))
      self.sinks = [self._io(lambda: Writer(workdir, start, enabled=tensorboard))]
      if wandb:
        self.sinks.append(self._io(wandb))

  @classmethod
  def for_run(cls, cfg: Any, workdir: Any, start: int, lead: bool,
              fence: Callable[[], bool]) -> "MetricWriter":
    """The writer of a training run from `start` (enabled on the lead process), its
    progress line, and config.json written beside the records."""
    progress = Progress(cfg.num_steps, start, cfg.batch_size, enabled=lead and cfg.progress,
                        every_s=cfg.get("progress_every_s", 60.0))
    options = cfg.get("wandb", {})
    wandb = (lambda: WandbWriter(workdir, options, cfg.to_dict())) if options.get(
        "project") else None
    writer = cls(workdir, start, enabled=lead, progress=progress,
                 tensorboard=cfg.get("tensorboard", True), fence=fence, wandb=wandb)
    if lead:
      writer.guarded(lambda: workdir_lib.write_text(
          workdir_lib.join(workdir, "config.json"), cfg.to_json(indent=2)))
    return writer

  def write_final(self, result: dict) -> None:
    """The final evaluation {"step", ...}: its record and final_eval.json.

    Raises:
      workdir.LockLost, workdir.WorkdirError: one line, saying it was not written.
    """
    step = result["step"]
    try:
      self.write(step, "final", {k: v for k, v in result.items() if k != "step"})
      if self.enabled:
        self.guarded(lambda: workdir_lib.write_json(
            workdir_lib.join(self.workdir, "final_eval.json"), result))
        self.flush()
    except workdir_lib.LockLost as e:
      raise workdir_lib.LockLost(
          f"{e}; the final evaluation of step {step} was not written") from None
    except OSError as e:
      raise workdir_lib.WorkdirError(f"cannot write the final evaluation in {self.workdir}: "
                                     f"{workdir_lib.describe_error(e)}") from None

  def _io(self, fn: Callable):
    try:
      return fn()
    except OSError as e:
      self.dead = f"cannot write the run's files in {self.workdir}: {workdir_lib.describe_error(e)}"
      raise WriteError(self.dead) from None

  def guarded(self, fn: Callable) -> None:
    """fn() (a write to the workdir) if the lock still holds and no sink failed."""
    if self.dead is not None:
      return
    if not self.fence():
      self.dead = "lost the workdir lock"
      raise workdir_lib.lost_lock(self.workdir)
    self._io(fn)

  def write(self, step: int, phase: str, record: dict) -> None:
    """Appends {"step", "phase", **record} to the log and record's numbers to TensorBoard."""
    if not self.enabled:
      return
    scalars_of = {k: v for k, v in record.items() if k != "random_init"}
    def every():
      self.log.write({"step": step, "phase": phase, **record})
      for sink in self.sinks:
        sink.write(step, scalars_of, phase)
    self.guarded(every)

  def flush(self) -> None:
    if self.enabled:
      self.guarded(lambda: (self.log.flush(), *(s.flush() for s in self.sinks)))

  def close(self) -> None:
    """Flushes and closes what still can be (never raises: the run is ending)."""
    self.progress.close()
    if self.enabled and self.dead is None:
      try:
        self.flush()
      except (OSError, workdir_lib.WorkdirError):
        pass
    for sink in self.sinks:
      try:
        sink.close()
      except Exception:  # noqa: BLE001  (the run is ending; W&B raises many kinds)
        pass
    self.sinks = []
