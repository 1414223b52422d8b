"""A TFDS dataset of JPEG images of varying size (the feature spec of imagenet2012:
`tfds.features.Image` with encoded JPEGs), generated offline for the tests."""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


class JpegImages(tfds.core.GeneratorBasedBuilder):
  """40 train / 10 test random JPEGs, 60-200 px a side, 10 classes."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(40, 0), "test": self._generate_examples(10, 1)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      h, w = rng.integers(60, 201, 2)
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(buf, format="JPEG")
      yield i, {"image": buf.getvalue(), "label": i % 10}
