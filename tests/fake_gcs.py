"""An offline stand-in for Google Cloud Storage, for the gs:// workdir tests.

`install(root)` registers it as fsspec's "gs"/"gcs" filesystem, which is what
`etils.epath` uses for gs:// paths when TensorFlow is absent: gs://bucket/key
lives in root/bucket/key. Like GCS it cannot append to an object. With
`hang=True` every call blocks, as an unreachable bucket does.
"""

import os
import time

import fsspec
from fsspec.implementations import local


class FakeGCS(local.LocalFileSystem):
  protocol = ("gs", "gcs")
  root = "/nonexistent"
  hang = False
  cachable = False

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    if path.startswith(cls.root):
      return path.rstrip("/")
    return os.path.join(cls.root, path.lstrip("/")).rstrip("/")

  def _check(self):
    if FakeGCS.hang:
      time.sleep(3600)

  def _open(self, path, mode="rb", **kwargs):
    self._check()
    if "a" in mode:
      raise NotImplementedError("GCS objects cannot be appended to")
    return super()._open(path, mode=mode, **kwargs)

  def makedirs(self, path, exist_ok=False):
    self._check()
    return super().makedirs(path, exist_ok=exist_ok)

  def mkdir(self, path, create_parents=True, **kwargs):
    self._check()
    return super().mkdir(path, create_parents=create_parents, **kwargs)

  def info(self, path, **kwargs):
    self._check()
    return super().info(path, **kwargs)


def install(root: str, hang: bool = False) -> None:
  """gs://... now reads and writes under root (or hangs)."""
  FakeGCS.root, FakeGCS.hang = os.path.abspath(root), hang
  for name in FakeGCS.protocol:
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  from etils.epath import backend  # epath caches the filesystem it made
  backend.fsspec_backend._get_filesystem.cache_clear()
