"""TensorBoard event files of a run, beside its metrics.jsonl.

Written with tensorboardX (no TensorFlow). Remote workdirs (gs://, s3://, az://)
go through `etils.epath` like every other file of the run: an object store cannot
append, so an event file there is buffered and rewritten whole at each flush
(tensorboardX flushes every `flush_secs`, and at checkpoints and the end).

  tensorboard --logdir WORKDIR    (a gs:// logdir needs TensorBoard's own GCS support)
"""

import io
import math
import os
from typing import Any, Optional

from etils import epath
import tensorboardX
from tensorboardX import record_writer


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

  A run resumed at step `start` purges the events a dead run wrote after it
  (TensorBoard's purge_step), as metrics.jsonl drops its records.
  """

  def __init__(self, workdir: Any, start: int = 0, enabled: bool = True,
               flush_secs: int = 30):
    self.writer: Optional[tensorboardX.SummaryWriter] = None
    if enabled:
      self.writer = tensorboardX.SummaryWriter(
          logdir=os.fspath(workdir), purge_step=start or None, flush_secs=flush_secs)

  def write(self, step: int, record: dict, prefix: str) -> None:
    """Adds every finite number of record (see `scalars`) under prefix/ at step."""
    if self.writer is not None:
      for name, value in scalars(record, prefix).items():
        self.writer.add_scalar(name, value, step)

  def flush(self) -> None:
    if self.writer is not None:
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.writer = None
