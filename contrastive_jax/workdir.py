"""A run's directory: the lock that keeps one trainer per workdir, atomic result
files and the metrics log.

  workdir/lock.json      who trains here (host, pid, token, heartbeat time)
  workdir/config.json    the config of the run (written once it is known compatible)
  workdir/metrics.jsonl  one strict-JSON record a line, no step twice after a resume
  workdir/final_eval.json, eval_STEP.json
  workdir/checkpoints/STEP/  (`contrastive_jax.checkpointing`)
"""

import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Optional

LOCK = "lock.json"
HEARTBEAT_S = 20.0  # the lock holder rewrites its heartbeat this often
STALE_S = 120.0  # a lock whose heartbeat is older is stale (its holder is dead)
SETTLE_S = 1.0  # after taking over a lock, wait this long and re-read it (see `Lock`)


class WorkdirError(RuntimeError):
  """A workdir that cannot be used (unwritable, or locked by another trainer)."""


def _warn(msg: str) -> None:
  print(f"warning: {msg}", file=sys.stderr, flush=True)


def make(workdir: str) -> None:
  """Creates workdir, or fails with one line if it cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{uuid.uuid4().hex}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def finite_json(obj: Any) -> Any:
  """obj with every non-finite float replaced by None (strict JSON has no NaN)."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: finite_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_json(v) for v in obj]
  return obj


def write_text(path: str, text: str) -> None:
  """Writes path atomically: a reader sees the old file or the new one, never a part."""
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(finite_json(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: str) -> Optional[Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


class MetricsLog:
  """Appends strict-JSON records to workdir/metrics.jsonl.

  Opening it for a run that starts at step `start` keeps only the records written
  up to that step (records after the checkpoint were logged by a run that died
  before saving them, and will be logged again), and rewrites older bare NaN as null.
  """

  def __init__(self, workdir: str, start: int, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    if not enabled or not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut short by a kill
        if start > 0 and record.get("phase") != "final" and record.get("step", 0) <= start:
          kept.append(json.dumps(finite_json(record), allow_nan=False) + "\n")
    write_text(self.path, "".join(kept))

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(finite_json(record), allow_nan=False) + "\n")


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

  def __init__(self, workdir: str, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S):
    self.path = os.path.join(workdir, LOCK)
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
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (json.JSONDecodeError, OSError, ValueError):
      return {"heartbeat": os.path.getmtime(self.path)}  # half-written: judge by its age

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirError with one line."""
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = self._read()
      why = self._why_live(holder)
      if why is not None:
        raise WorkdirError(
            f"workdir {os.path.dirname(self.path)} is in use by another trainer, {why}: "
            f"use another --workdir, or stop that run (if it is dead, its lock goes stale "
            f"{self.stale_s:.0f} s after its last heartbeat; or delete {self.path})") from None
      _warn(f"taking over the stale lock of a dead trainer ({holder}) on {self.path}")
      write_text(self.path, json.dumps(self._record()))
      time.sleep(SETTLE_S)
    else:
      with os.fdopen(fd, "w") as f:
        f.write(json.dumps(self._record()))
    if (self._read() or {}).get("token") != self.token:
      raise WorkdirError(f"workdir {os.path.dirname(self.path)}: another trainer took the "
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
        os.remove(self.path)
