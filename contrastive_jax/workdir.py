"""A run's directory: the lock that keeps one trainer per workdir, atomic result
files and the metrics log.

  workdir/lock.json      who trains here (host, pid, token, heartbeat time)
  workdir/config.json    the config of the run (written once it is known compatible)
  workdir/metrics.jsonl  one strict-JSON record a line, no step twice after a resume
  workdir/final_eval.json, eval_STEP.json
  workdir/checkpoints/STEP/  (`contrastive_jax.checkpointing`)
  workdir/events.out.tfevents.*  TensorBoard (`contrastive_jax.summary`)

Every path goes through `etils.epath`, so a workdir may be local or remote
(gs://, s3://): on a remote filesystem, where objects are written whole, a
write is atomic by itself and the metrics log is rewritten rather than appended.
"""

import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Optional, Union

from etils import epath

PathLike = Union[str, os.PathLike]

LOCK = "lock.json"
HEARTBEAT_S = 20.0  # the lock holder rewrites its heartbeat this often
STALE_S = 120.0  # a lock whose heartbeat is older is stale (its holder is dead)
SETTLE_S = 1.0  # after taking over a lock, wait this long and re-read it (see `Lock`)


class WorkdirError(RuntimeError):
  """A workdir that cannot be used (unwritable, or locked by another trainer)."""


def _warn(msg: str) -> None:
  print(f"warning: {msg}", file=sys.stderr, flush=True)


PROBE_TIMEOUT_S = 20.0  # a workdir that does not answer a write within this is unreachable
_FILESYSTEMS = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}  # fsspec backends of epath


def is_remote(path: PathLike) -> bool:
  """Whether path names a remote filesystem (gs://, s3://, ...), not a local one."""
  return "://" in os.fspath(path)


def join(workdir: PathLike, *parts: str) -> epath.Path:
  """workdir/parts... as an epath.Path (local paths made absolute; never os.path on a URI)."""
  root = epath.Path(workdir) if is_remote(workdir) else epath.Path(os.path.abspath(workdir))
  return root.joinpath(*parts)


def _probe(workdir: epath.Path) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  probe = workdir / f".write-test-{uuid.uuid4().hex}"
  probe.write_text("ok")
  probe.unlink()


def make(workdir: PathLike, timeout_s: Optional[float] = None) -> None:
  """Creates workdir, or fails with one line, within `timeout_s` (PROBE_TIMEOUT_S),
  if it cannot be written or does not answer. Nothing is created locally for a
  remote workdir."""
  timeout_s = PROBE_TIMEOUT_S if timeout_s is None else timeout_s
  scheme = os.fspath(workdir).split("://")[0] if is_remote(workdir) else None
  outcome = []

  def probe():
    try:
      _probe(join(workdir))
      outcome.append(None)
    except Exception as e:  # pylint: disable=broad-except  (reported below)
      outcome.append(e)

  # A daemon thread: a filesystem call that never returns must not hold the exit.
  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout_s)
  if not outcome:
    raise WorkdirError(f"workdir {workdir} did not answer a test write within {timeout_s:.0f} s: "
                       "is it reachable from this machine?")
  e = outcome[0]
  if e is None:
    return
  if isinstance(e, ImportError):
    raise WorkdirError(
        f"workdir {workdir}: {scheme}:// paths need the {_FILESYSTEMS.get(scheme, 'fsspec')} "
        f"package (pip install 'contrastive_jax[gcs]' for gs://): {e}")
  why = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
  raise WorkdirError(f"workdir {workdir} is not writable: {' '.join(str(why).split())}")


def finite_json(obj: Any) -> Any:
  """obj with every non-finite float replaced by None (strict JSON has no NaN)."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: finite_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_json(v) for v in obj]
  return obj


def write_text(path: PathLike, text: str) -> None:
  """Writes path atomically: a reader sees the old file or the new one, never a part.
  (A remote object store writes an object whole; locally: temporary file + rename.)"""
  if is_remote(path):
    epath.Path(path).write_text(text)
    return
  tmp = f"{os.fspath(path)}.tmp-{uuid.uuid4().hex[:8]}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(path: PathLike, obj: Any) -> None:
  write_text(path, json.dumps(finite_json(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: PathLike) -> Optional[Any]:
  try:
    return json.loads(epath.Path(path).read_text())
  except FileNotFoundError:
    return None


class MetricsLog:
  """Strict-JSON records, one a line, in workdir/metrics.jsonl.

  Opening it for a run that starts at step `start` keeps only the records written
  up to that step (records after the checkpoint were logged by a run that died
  before saving them, and will be logged again), and rewrites older bare NaN as null.
  Locally each record is appended at once. Object stores cannot append: there the
  whole file is rewritten, at most every `flush_s` seconds and at `flush()`.
  """

  def __init__(self, workdir: PathLike, start: int, enabled: bool = True,
               flush_s: float = 30.0):
    self.path = join(workdir, "metrics.jsonl")
    self.enabled, self.flush_s = enabled, flush_s
    self.remote = is_remote(workdir)
    self._lines, self._pending, self._flushed = [], False, time.monotonic()
    if not enabled or not self.path.exists():
      return
    for line in self.path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a kill
      if start > 0 and record.get("phase") != "final" and record.get("step", 0) <= start:
        self._lines.append(json.dumps(finite_json(record), allow_nan=False) + "\n")
    write_text(self.path, "".join(self._lines))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    line = json.dumps(finite_json(record), allow_nan=False) + "\n"
    if not self.remote:
      with open(self.path, "a") as f:
        f.write(line)
      return
    self._lines.append(line)
    self._pending = True
    if time.monotonic() - self._flushed >= self.flush_s:
      self.flush()

  def flush(self) -> None:
    """Writes what is not yet on the filesystem (remote workdirs; local ones always are)."""
    if self.enabled and self._pending:
      write_text(self.path, "".join(self._lines))
      self._pending, self._flushed = False, time.monotonic()


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


class Lock:
  """One trainer per workdir, also on shared filesystems (NFS, gcsfuse) where
  `flock` does not lock across hosts.

  The holder writes workdir/lock.json (host, pid, a random token) and refreshes
  its `heartbeat` time every HEARTBEAT_S from a thread. Another trainer refuses
  to start while the lock is live. A lock is stale when its holder is a dead pid
  on this host, or when its heartbeat is older than STALE_S (a dead host); a
  stale lock is taken over with a warning. Exclusive create settles a race on
  filesystems that honour it; on the others the taker re-reads the lock after
  SETTLE_S and only the trainer whose token is there goes on. The heartbeat
  thread notices a lock taken by someone else and sets `lost`.
  """

  def __init__(self, workdir: PathLike, stale_s: float = STALE_S,
               heartbeat_s: float = HEARTBEAT_S):
    self.workdir = workdir
    self.path = join(workdir, LOCK)
    self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
    self.token = uuid.uuid4().hex
    self.lost = threading.Event()
    self._stop = threading.Event()
    self._thread = None

  @property
  def held(self) -> bool:
    return self._thread is not None

  def _record(self) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
            "heartbeat": time.time()}

  def _why_live(self, holder: Optional[dict]) -> Optional[str]:
    """Why the lock held by `holder` is live, or None if it is stale."""
    if holder is None:
      return None
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > self.stale_s:
      return None
    same_host = holder.get("host") == socket.gethostname()
    if same_host and not _pid_alive(int(holder.get("pid", -1))):
      return None
    return (f"held by pid {holder.get('pid')} on {holder.get('host')} "
            f"(heartbeat {age:.0f} s ago)")

  def _read(self) -> Optional[dict]:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (json.JSONDecodeError, OSError, ValueError):  # half-written: judge by its age
      try:
        return {"heartbeat": self.path.stat().mtime}
      except (FileNotFoundError, OSError):
        return None

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirError with one line."""
    try:
      if is_remote(self.path):  # no exclusive create on object stores: settle by re-reading
        if self.path.exists():
          raise FileExistsError
        write_text(self.path, json.dumps(self._record()))
        time.sleep(SETTLE_S)
      else:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
          f.write(json.dumps(self._record()))
    except FileExistsError:
      holder = self._read()
      why = self._why_live(holder)
      if why is not None:
        raise WorkdirError(
            f"workdir {self.workdir} is in use by another trainer, {why}: "
            f"use another --workdir, or stop that run (if it is dead, its lock goes stale "
            f"{self.stale_s:.0f} s after its last heartbeat; or delete {self.path})") from None
      _warn(f"taking over the stale lock of a dead trainer ({holder}) on {self.path}")
      write_text(self.path, json.dumps(self._record()))
      time.sleep(SETTLE_S)
    if (self._read() or {}).get("token") != self.token:
      raise WorkdirError(f"workdir {self.workdir}: another trainer took the "
                         "lock at the same time: use another --workdir")
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      if (self._read() or {}).get("token") != self.token:
        self.lost.set()
        return
      try:
        write_text(self.path, json.dumps(self._record()))
      except OSError as e:  # a flaky network filesystem: try again at the next beat
        _warn(f"could not refresh {self.path}: {e}")

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      if (self._read() or {}).get("token") == self.token:
        self.path.unlink()
