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
HEARTBEAT_S = 10.0  # the lock holder bumps its heartbeat this often
STALE_S = 120.0  # a lock whose heartbeat does not change for this long is stale
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


# As long a path below the workdir as a checkpoint writes (Orbax's OCDBT files), so a
# workdir whose name leaves no room for them fails at start-up, not at the first save.
_DEEPEST = ("checkpoints", "100000000.orbax-checkpoint-tmp-1700000000000000", "state",
            "ocdbt.process_0", "d", "0123456789abcdef0123456789abcdef")


def _probe(workdir: epath.Path) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  probe = workdir / f".write-test-{uuid.uuid4().hex}"
  probe.write_text("ok")
  probe.unlink()
  if not is_remote(workdir):
    top = workdir / f".write-test-{uuid.uuid4().hex}"
    deep = top.joinpath(*_DEEPEST[1:])
    try:
      deep.parent.mkdir(parents=True)
      deep.write_text("ok")
    finally:
      for p in [deep, *deep.parents]:
        if p == workdir:
          break
        try:
          p.unlink() if p == deep else p.rmdir()
        except OSError:
          pass


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
    except Exception as e:  # noqa: BLE001  (reported below, in one line)
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
        f"package (the 'gcs' extra: pip install '.[train,gcs]' from a checkout): {e}")
  why = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
  raise WorkdirError(f"workdir {workdir} is not writable: {' '.join(str(why).split())}")


# What a storage failure says, found in the long messages of Orbax and TensorStore too.
_CAUSES = ("No space left on device", "Read-only file system", "Permission denied",
           "Disk quota exceeded", "File name too long", "Input/output error")


def describe_error(e: BaseException) -> str:
  """One line saying why a write failed: an OSError's strerror (and file), else the
  known cause inside a library's message, else its first 200 characters."""
  if isinstance(e, OSError) and e.strerror:
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return f"{e.strerror}{where}"
  text = " ".join(str(e).split())
  for cause in _CAUSES:
    if cause in text:
      return cause
  return f"{type(e).__name__}: {text[:200]}"


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
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:  # a full disk: leave no partial temporary file behind
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def write_json(path: PathLike, obj: Any) -> None:
  write_text(path, json.dumps(finite_json(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: PathLike) -> Optional[Any]:
  """The JSON in path (None if there is no such file); WorkdirError naming the
  file if it holds something else."""
  try:
    text = epath.Path(path).read_text()
  except FileNotFoundError:
    return None
  try:
    return json.loads(text)
  except ValueError as e:
    raise WorkdirError(f"{path} is not valid JSON ({e}): repair or remove it") from None


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
    for n, line in enumerate(self.path.read_text().splitlines(), 1):
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a kill
      if not isinstance(record, dict):
        _warn(f"{self.path} line {n} is not a record (a JSON object): dropped")
        continue
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


class LockLost(WorkdirError):
  """This trainer no longer holds the workdir lock: it must write nothing more."""


def lost_lock(workdir: PathLike) -> LockLost:
  """The one-line error of a trainer whose workdir lock another trainer took."""
  return LockLost(f"another trainer took the lock of {workdir}: this trainer writes nothing more")


class Lock:
  """One trainer per workdir, also on shared filesystems (NFS, gcsfuse, gs://)
  where `flock` does not lock across hosts.

  The holder writes workdir/lock.json (host, pid, a random token and a beat
  counter) and bumps the counter every `heartbeat_s` from a thread. Staleness is
  judged on the reader's own clock, never by comparing two hosts' clocks: a lock
  whose holder is a dead pid on this host is stale at once; otherwise the reader
  watches the record, and it is live if it changes within `stale_s`, stale if it
  does not (the holder is dead, hung or paused). A stale lock is taken over with a
  warning; exclusive create settles a race where the filesystem honours it, and
  elsewhere the taker re-reads the lock after SETTLE_S.

  Fencing: `check()` compares the token in the file with ours, synchronously; the
  trainer calls it before every write to the workdir, so a trainer that was paused
  while another took over writes nothing more. A lock file that merely vanished
  (deleted by hand) is re-created, since no other trainer holds it. Releasing
  leaves the file, marked released under the releaser's token, which the next
  trainer takes at once and a paused old holder sees as not its own.
  """

  def __init__(self, workdir: PathLike, stale_s: float = STALE_S,
               heartbeat_s: float = HEARTBEAT_S):
    self.workdir = workdir
    self.path = join(workdir, LOCK)
    self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
    self.token = uuid.uuid4().hex
    self.took_over = False  # acquired from a trainer whose heartbeat stopped
    self.lost = threading.Event()
    self._beats = 0
    self._mutex = threading.Lock()  # check/refresh from the loop and the heartbeat thread
    self._stop = threading.Event()
    self._thread = None

  @property
  def held(self) -> bool:
    return self._thread is not None

  def _record(self) -> str:
    self._beats += 1
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                       "beat": self._beats, "time": time.time()})

  def _read(self) -> Optional[dict]:
    """The lock record; None when there is none; {"unreadable": text} when the file
    holds something else (half written, or not a JSON object)."""
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    except OSError as e:
      return {"unreadable": str(e)}
    try:
      record = json.loads(text)
    except ValueError:
      record = None
    return record if isinstance(record, dict) else {"unreadable": text[:40]}

  def _create(self) -> bool:
    """Writes our record where there is none: False when someone else's appeared."""
    if is_remote(self.path):  # no exclusive create on object stores: settle by re-reading
      if self.path.exists():
        return False
      write_text(self.path, self._record())
      time.sleep(SETTLE_S)
      return (self._read() or {}).get("token") == self.token
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(self._record())
    return True

  def _describe(self, holder: dict) -> str:
    if holder.get("released"):
      return f"pid {holder.get('pid')} on {holder.get('host')} (released)"
    if "unreadable" in holder:
      return f"an unreadable lock file ({holder['unreadable']!r})"
    return f"pid {holder.get('pid')} on {holder.get('host')}"

  def _watch(self, holder: dict) -> bool:
    """Whether `holder`'s lock is live: its record changes within stale_s (our clock)."""
    if (holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
        and not _pid_alive(holder["pid"])):
      return False
    _warn(f"{self.path} is held by {self._describe(holder)}: watching its heartbeat for up "
          f"to {self.stale_s:.0f} s to tell whether that trainer is alive")
    deadline = time.monotonic() + self.stale_s
    poll = min(1.0, self.heartbeat_s / 4)
    while time.monotonic() < deadline:
      time.sleep(poll)
      now = self._read()
      if now != holder:
        return now is not None  # changed: live (or released, then we may take it)
    return False

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirError with one line."""
    while not self._create():
      holder = self._read()
      if holder is None:
        continue  # removed meanwhile: try again
      if holder.get("released"):  # the last trainer ended: take it, settle any race
        write_text(self.path, self._record())
        time.sleep(SETTLE_S)
        break
      if self._watch(holder):
        holder = self._read() or holder
        raise WorkdirError(
            f"workdir {self.workdir} is in use by another trainer, {self._describe(holder)} "
            f"(its heartbeat is moving): use another --workdir, or stop that run (a lock "
            f"whose heartbeat stops for {self.stale_s:.0f} s is taken over)")
      _warn(f"taking over the lock of {self.path} from {self._describe(holder)}: its heartbeat "
            f"did not change for {self.stale_s:.0f} s (that trainer is dead, hung or paused; "
            f"if it comes back, it will find the lock taken and write nothing more)")
      write_text(self.path, self._record())
      time.sleep(SETTLE_S)
      self.took_over = True
      break
    if (self._read() or {}).get("token") != self.token:
      raise WorkdirError(f"workdir {self.workdir}: another trainer took the "
                         "lock at the same time: use another --workdir")
    self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
    self._thread.start()

  def check(self) -> bool:
    """Whether this process still holds the lock (the fence before every write).

    Compares the file's token with ours now. A lock file that vanished is written
    again (no one else holds it); one that holds another token, or garbage, means
    the lock is lost: `lost` is set and stays set.
    """
    if self.lost.is_set():
      return False
    with self._mutex:
      holder = self._read()
      if holder is None:
        if self._create():
          _warn(f"{self.path} had been removed: wrote it again (this trainer still holds it)")
          return True
      elif holder.get("token") == self.token:
        return True
      self.lost.set()
      return False

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      if not self.check():
        return
      with self._mutex:
        try:
          write_text(self.path, self._record())
        except OSError as e:  # a full disk or a flaky network filesystem: try again later
          _warn(f"could not refresh {self.path}: {e}")

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      # The lock stays, marked released under our token: a trainer that was paused while
      # we took over must find a token not its own, never an empty place to take again.
      with self._mutex:
        if not self.lost.is_set() and (self._read() or {}).get("token") == self.token:
          try:
            write_text(self.path, json.dumps({"released": True, "token": self.token,
                                              "host": socket.gethostname(), "pid": os.getpid()}))
          except OSError:  # a full disk: removing needs no room
            try:
              self.path.unlink()
            except OSError as e:
              _warn(f"could not release {self.path} ({e}): the next trainer waits until it "
                    "is stale")
