"""Captioned digits: tokenizer, grammar, and where each attribute lives."""

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from contrastive_jax.data import builders
from contrastive_jax.data import captions
from contrastive_jax.data import pipeline


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  out = {}
  for split in ("train", "test"):
    src = pipeline.get_source("captioned_digits", split, data_dir)
    records = [src[i] for i in range(len(src))]
    out[split] = {k: np.stack([r[k] for r in records]) for k in records[0]}
  out["tokenizer"] = builders.tokenizer(builders.CaptionedDigits(data_dir=data_dir))
  return out


def test_tokenizer_round_trip_and_saved_with_the_dataset(data):
  tok = data["tokenizer"]
  assert tok.vocab == captions.Tokenizer.from_grammar().vocab
  rng = np.random.default_rng(0)
  for tokens in data["train"]["captions"][rng.choice(4000, 20)].reshape(-1, captions.MAX_LEN):
    assert tokens[0] == captions.CLS
    np.testing.assert_array_equal(tok.encode(tok.decode(tokens), strict=True), tokens)
  assert captions.Tokenizer.from_json(tok.to_json()).vocab == tok.vocab


def test_tokenizer_bad_input():
  tok = captions.Tokenizer.from_grammar(max_len=6)
  ids = tok.encode("a purple seven")
  assert ids[2] == captions.UNK and tok.decode(ids) == "a [UNK] seven"
  with pytest.raises(ValueError, match="unknown words \\['purple'\\]"):
    tok.encode("a purple seven", strict=True)
  for empty in ("", "   "):
    with pytest.raises(ValueError, match="empty"):
      tok.encode(empty)
  with pytest.warns(UserWarning, match="truncated to 5"):
    ids = tok.encode("a bold red seven written by a child")
  assert tok.decode(ids) == "a bold red seven written"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tok.encode("a bold red seven written")  # exactly max_len - 1 words: no warning
  with pytest.raises(ValueError, match="special tokens"):
    captions.Tokenizer(["a", "b"])


def test_every_caption_is_true_of_its_image(data):
  tok, d = data["tokenizer"], data["test"]
  for i in range(50):
    for tokens in d["captions"][i]:
      words = tok.decode(tokens).split()
      assert captions.DIGITS[d["label"][i]] in words
      assert captions.ATTRIBUTES["writer"][d["writer"][i]] in words
      assert "centre" not in words  # position is never captioned
      for name in ("colour", "thickness"):
        present = [v for v in captions.ATTRIBUTES[name] if v in words]
        assert present in ([], [captions.ATTRIBUTES[name][d[name][i]]])


def _image_features(images):
  x = images.astype(np.float32) / 255.0
  return np.concatenate([x.mean((1, 3)), x.mean((2, 3)), x.mean((1, 2))], 1)  # rows, cols, rgb


def _caption_features(tokens, vocab_size):
  bag = np.zeros((len(tokens), vocab_size), np.float32)
  for i, caps in enumerate(tokens):
    np.add.at(bag[i], caps.ravel(), 1.0)
  return bag


@pytest.mark.parametrize("attribute, in_image, in_text", [
    ("position", True, False), ("writer", False, True), ("colour", True, True)])
def test_attributes_are_recoverable_from_the_right_modality_only(data, attribute, in_image,
                                                                 in_text):
  vocab = len(data["tokenizer"])
  accuracy = {}
  for name, feats in (("image", lambda d: _image_features(d["image"])),
                      ("text", lambda d: _caption_features(d["captions"], vocab))):
    clf = LogisticRegression(max_iter=2000).fit(feats(data["train"]), data["train"][attribute])
    accuracy[name] = clf.score(feats(data["test"]), data["test"][attribute])
  for name, present in (("image", in_image), ("text", in_text)):
    if present:
      assert accuracy[name] > 0.95, accuracy
    else:
      assert accuracy[name] < 0.40, accuracy  # chance is 1/3
