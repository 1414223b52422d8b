"""Described digits: the captioned digits' images with captions that tell them apart.

Every caption of `captions.py` names only some of its image's attributes (and a writer
no image shows), so 3000 test captions fall into 215 groups that say the same thing, and
no model can retrieve above 10 % R@1 (experiments/caption_ceiling.py). Here every caption
names everything the image shows, at a finer grain:

  digit      the MNIST label
  thickness  ink mass, dataset quintiles: hairline / thin / regular / bold / heavy
  slant      shear, dataset quintiles: leaning-hard-left ... leaning-hard-right
  colour     random tint, one of 6
  position   random placement on a 3 x 3 grid of 2-pixel offsets (top-left ... bottom-right)

10 x 5 x 5 x 6 x 9 = 13,500 contents, so most test images have one of their own. Three
captions per image say the same content in different words. Zero-shot prompts are those
of `captions.PROMPTS`.
"""

from typing import Iterator

import numpy as np

from contrastive_jax.data import captions

ATTRIBUTES = {
    "thickness": ("hairline", "thin", "regular", "bold", "heavy"),
    "slant": ("leaning-hard-left", "leaning-left", "upright", "leaning-right",
              "leaning-hard-right"),
    "colour": ("red", "green", "blue", "yellow", "cyan", "magenta"),
    "position": ("top-left", "top", "top-right", "left", "centre", "right",
                 "bottom-left", "bottom", "bottom-right"),
}
_COLOURS = np.array([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.3, 0.4, 1.0],
                     [1.0, 1.0, 0.2], [0.2, 1.0, 1.0], [1.0, 0.3, 1.0]], np.float32)
TEMPLATES = (
    "a {thickness} {colour} {digit} {slant} at the {position}",
    "the digit {digit} in {colour} , {slant} , with {thickness} strokes , {position}",
    "{position} of the frame : a {slant} {digit} in {thickness} {colour} ink",
    "{colour} {digit} , {thickness} and {slant} , placed {position}",
)
CAPTIONS_PER_IMAGE = 3


def vocabulary() -> list[str]:
  """The special tokens, then every word of the grammar and of the zero-shot prompts."""
  words = set(captions.DIGITS)
  for values in ATTRIBUTES.values():
    words.update(values)
  for t in TEMPLATES + captions.PROMPTS:
    words.update(w for w in t.split() if not w.startswith("{"))
  return list(captions.SPECIALS) + sorted(words)


def tokenizer() -> captions.Tokenizer:
  """The word-level tokenizer over `vocabulary()`."""
  return captions.Tokenizer(vocabulary(), captions.MAX_LEN)


def render(image: np.ndarray, colour: int, position: int) -> np.ndarray:
  """Grey 28x28x1 uint8 -> tinted 32x32x3 uint8, offset (0, 2 or 4 px) down and across."""
  canvas = np.zeros((captions.CANVAS, captions.CANVAS, 3), np.float32)
  y0, x0 = 2 * (position // 3), 2 * (position % 3)
  canvas[y0:y0 + 28, x0:x0 + 28] = image.astype(np.float32) * _COLOURS[colour]
  return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def describe(template: str, attrs: dict) -> str:
  return template.format(digit=captions.DIGITS[attrs["digit"]],
                         **{k: ATTRIBUTES[k][attrs[k]] for k in ATTRIBUTES})


def generate(images: np.ndarray, labels: np.ndarray, seed: int,
             tokenizer: captions.Tokenizer) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
  """Yields (image uint8 [32, 32, 3], tokens int32 [CAPTIONS_PER_IMAGE, L], attributes)."""
  rng = np.random.default_rng(seed)
  derived = captions.image_attributes(images, levels=5)
  for i in range(len(images)):
    attrs = {"digit": int(labels[i]), "thickness": int(derived["thickness"][i]),
             "slant": int(derived["slant"][i]),
             "colour": int(rng.integers(len(ATTRIBUTES["colour"]))),
             "position": int(rng.integers(len(ATTRIBUTES["position"])))}
    chosen = rng.choice(len(TEMPLATES), CAPTIONS_PER_IMAGE, replace=False)
    tokens = np.stack([tokenizer.encode(describe(TEMPLATES[t], attrs), strict=True) for t in chosen])
    yield render(images[i], attrs["colour"], attrs["position"]), tokens, attrs
