"""Described digits: every caption names every attribute its image shows, truly; the
image shows its colour and position where the caption says; captions tell images apart."""

import numpy as np
import pytest

from contrastive_jax.data import builders
from contrastive_jax.data import captions
from contrastive_jax.data import descriptions
from contrastive_jax.data import pipeline


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  src = pipeline.get_source("described_digits", "test", data_dir)
  records = [src[i] for i in range(len(src))]
  out = {k: np.stack([r[k] for r in records]) for k in records[0]}
  out["tokenizer"] = builders.tokenizer(builders.DescribedDigits(data_dir=data_dir))
  return out


def test_every_caption_names_every_attribute_of_its_image(test_split):
  d, tok = test_split, test_split["tokenizer"]
  assert tok.vocab == descriptions.vocabulary()
  for i in range(0, len(d["label"]), 7):
    for tokens in d["captions"][i]:
      words = tok.decode(tokens).split()
      assert captions.DIGITS[d["label"][i]] in words
      for name, values in descriptions.ATTRIBUTES.items():
        assert [v for v in values if v in words] == [values[d[name][i]]], (i, name, words)


def test_the_image_shows_its_colour_and_position(test_split):
  d = test_split
  ink = d["image"].astype(np.float32)  # [N, 32, 32, 3]
  for i in range(0, len(d["label"]), 11):
    rows, cols = np.nonzero(ink[i].max(-1))
    row, col = divmod(int(d["position"][i]), 3)
    # The 28 x 28 digit sits at offset (2 row, 2 col): ink never reaches the far margins.
    assert rows.min() >= 2 * row and rows.max() < 2 * row + 28
    assert cols.min() >= 2 * col and cols.max() < 2 * col + 28
    tint = ink[i].reshape(-1, 3).max(0)
    want = descriptions._COLOURS[d["colour"][i]]
    np.testing.assert_allclose(tint / tint.max(), want / want.max(), atol=0.02)


def test_captions_tell_the_test_images_apart(test_split):
  d = test_split
  content = {tuple(int(d[k][i]) for k in ("label", *descriptions.ATTRIBUTES))
             for i in range(len(d["label"]))}
  assert len(content) > 0.9 * len(d["label"])  # 928 of 1000 here
  # Five levels: each within a few points of a fifth of the images.
  for name in ("thickness", "slant"):
    share = np.bincount(d[name], minlength=5) / len(d[name])
    assert np.all(np.abs(share - 0.2) < 0.05), (name, share)


def test_five_levels_split_at_quintiles():
  rng = np.random.default_rng(0)
  images = (rng.random((200, 28, 28, 1)) * rng.random((200, 1, 1, 1)) * 255).astype(np.uint8)
  mass = images[..., 0].astype(np.float32).sum((1, 2))
  level = captions.image_attributes(images, levels=5)["thickness"]
  assert np.bincount(level).tolist() == [40] * 5
  assert np.all(np.diff([mass[level == k].max() for k in range(5)]) > 0)
  assert sorted(np.bincount(captions.image_attributes(images)["thickness"])) == [66, 67, 67]
