"""Views: host decode + crop (uint8), device photometric augmentation (dm_pix)."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from contrastive_jax.data import augment as aug_lib
from contrastive_jax.data import pipeline

SEED = 20261125
FULL = aug_lib.AugmentConfig(crop_scale=(0.08, 1.0), flip=True, jitter_prob=0.8,
                             jitter=(0.8, 0.8, 0.8, 0.2), grayscale_prob=0.2, blur_prob=0.5,
                             blur_sigma=2.0, solarize_prob=0.2, noise_std=0.05)


def images(b, size, channels, seed=SEED):
  return np.random.default_rng(seed).integers(0, 256, (b, size, size, channels), np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_photometric_keeps_shape_dtype_and_range(channels):
  x = images(16, 24, channels)
  out = jax.jit(lambda k, x, i: aug_lib.photometric(k, x, i, FULL))(
      jax.random.key(SEED), x, jnp.arange(16))
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  assert not np.allclose(out, x / 255.0, atol=1e-3)  # it did something
  # Identity config: exactly the input in [0, 1].
  none = aug_lib.AugmentConfig(flip=False, jitter_prob=0.0, grayscale_prob=0.0)
  same = aug_lib.photometric(jax.random.key(0), x, jnp.arange(16), none)
  np.testing.assert_allclose(same, x / 255.0, atol=1e-6)


def test_photometric_is_a_function_of_key_and_index_not_of_position():
  """Example i's view depends on (key, index[i]) only: the same inside any batch, any
  order, any mesh; another key (step) or index gives another view."""
  x = images(8, 16, 3)
  idx = jnp.array([5, 9, 1, 7, 3, 0, 2, 4])
  f = jax.jit(lambda k, x, i: aug_lib.photometric(k, x, i, FULL))
  key = jax.random.key(SEED)
  a = f(key, x, idx)
  perm = np.array([3, 0, 7, 1, 6, 2, 5, 4])
  b = f(key, x[perm], idx[perm])
  np.testing.assert_array_equal(a[perm], b)
  np.testing.assert_array_equal(a, f(key, x, idx))  # deterministic
  assert not np.allclose(a, f(jax.random.key(SEED + 1), x, idx))
  assert not np.allclose(a, f(key, x, idx + 100))
  # Sharded over 8 devices: the same views.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  c = f(key, jax.device_put(x, sh), jax.device_put(idx, sh))
  np.testing.assert_allclose(a, c, atol=1e-6)


def test_grayscale_and_flip_do_what_they_say():
  x = images(1, 8, 3)
  gray = aug_lib.AugmentConfig(flip=False, jitter_prob=0.0, grayscale_prob=1.0)
  out = np.asarray(aug_lib.photometric(jax.random.key(0), x, jnp.arange(1), gray))
  np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)
  lum = (x[0].astype(np.float64) / 255) @ np.array([0.2989, 0.5870, 0.1140])
  np.testing.assert_allclose(out[0, ..., 0], lum, atol=2e-3)
  flip = aug_lib.AugmentConfig(flip=True, jitter_prob=0.0, grayscale_prob=0.0)
  outs = [np.asarray(aug_lib.photometric(jax.random.key(k), x, jnp.arange(1), flip))[0]
          for k in range(16)]
  flipped = [np.allclose(o, x[0, :, ::-1] / 255.0, atol=1e-6) for o in outs]
  kept = [np.allclose(o, x[0] / 255.0, atol=1e-6) for o in outs]
  assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_host_crop_is_uint8_at_the_configured_size_for_any_input_size():
  rng = np.random.default_rng(SEED)
  for h, w in [(17, 45), (224, 224), (375, 500), (9, 9)]:
    im = aug_lib.decode(rng.integers(0, 256, (h, w, 3), np.uint8), 3)
    box = aug_lib.random_crop_box(rng, h, w, (0.08, 1.0))
    out = aug_lib.crop(im, box, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    left, top, right, bottom = box
    assert 0 <= left < right <= w + 1e-6 and 0 <= top < bottom <= h + 1e-6


def test_jpeg_is_decoded_at_a_reduced_scale_when_the_crop_allows():
  rng = np.random.default_rng(SEED)
  big = np.repeat(np.repeat(rng.integers(0, 256, (60, 80, 3), np.uint8), 8, 0), 8, 1)
  buf = io.BytesIO()
  Image.fromarray(big).save(buf, format="JPEG", quality=95)
  full = aug_lib.decode(buf.getvalue(), 3)
  assert full.size == (640, 480)
  im, boxes = aug_lib.decode_for_crops(buf.getvalue(), 3, [(0, 0, 640, 480)], 64)
  assert im.size[0] < 640 and min(im.size) >= 64  # decoded at 1/2 .. 1/8 scale
  scale = im.size[0] / 640
  assert boxes[0] == pytest.approx((0, 0, 640 * scale, 480 * scale))
  small = aug_lib.crop(im, boxes[0], 64).astype(float)
  ref = aug_lib.crop(full, (0, 0, 640, 480), 64).astype(float)
  assert np.abs(small - ref).mean() < 6  # the same picture


def test_two_views_emit_uint8_crops_deterministic_per_seed(tmp_path):
  src = pipeline.get_source("sklearn_digits", "train", str(tmp_path))
  cfg = aug_lib.AugmentConfig(crop_scale=(0.3, 1.0))
  t = pipeline.TwoViews(src, cfg, size=16, channels=1)
  ds = pipeline.train_dataset(src, batch_size=32, seed=SEED, transform=t)
  a, b = ds[3], ds[3]
  assert a["view1"].shape == (32, 16, 16, 1) and a["view1"].dtype == np.uint8
  np.testing.assert_array_equal(a["view1"], b["view1"])
  assert not np.array_equal(a["view1"], a["view2"])


def test_a_tfds_jpeg_dataset_reaches_the_host_encoded_and_trains(tmp_path):
  """Image features come as JPEG bytes (TFDS's decoding skipped), so the host decodes
  them at a reduced scale; the two-view task trains on them at a fixed size."""
  from contrastive_jax.configs import base, imagenet_resnet50
  from contrastive_jax import train
  from tests import jpeg_dataset
  data_dir = str(tmp_path / "tfds")
  jpeg_dataset.JpegImages(data_dir=data_dir).download_and_prepare(file_format="array_record")
  src = pipeline.get_source("jpeg_images", "train", data_dir)
  record = src[0]
  assert isinstance(record["image"], bytes) and record["image"][:2] == b"\xff\xd8"
  assert pipeline.channels_of(src) == 3
  cfg = imagenet_resnet50.get_config()
  cfg.update(dict(dataset="jpeg_images", data_dir=data_dir, eval_split="test", image_size=24,
                  model="small_cnn", norm="group", head_hidden=32, proj_dim=16, batch_size=16,
                  num_steps=2,
                  warmup_steps=1, log_every=1, checkpoint_every=2, eval_limit=None,
                  eval_batch_size=8, knn_k=3, data_workers=0, data_threads=1, progress=False))
  cfg.evals = base.evals(knn=dict(final=True))
  result = train.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert result["step"] == 2 and 0.0 <= result["knn_top1"] <= 1.0
