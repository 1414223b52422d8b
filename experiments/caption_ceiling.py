"""How well can ANY model retrieve on the captioned digits? An oracle's retrieval R@1.

A caption names some of its image's attributes (digit, thickness, slant, colour) and a
writer that no image shows; the image shows its position, which no caption names. So a
model that knew everything could still only see an image's *content* (its four named
attributes) and a caption's *group* (which attributes it names, with which values), and
the examples that share a content or a group are interchangeable. The oracle answers
every query of a content (or group) with the group (or content) that holds the most of
its matches per member, a random member of it:
  image -> text:  R@1 = 1/N sum over contents x of max_G C[G, x] / |G|,
  text -> image:  R@1 = 1/M sum over groups G of max_x C[G, x] / |x|,
with C[G, x] the captions of group G whose image has content x, |G| the captions of a
group and |x| the images of a content (N images, M captions of the test split).
Also: the chance that an in-batch negative agrees with the anchor's caption (a false
negative for the contrastive loss), and how many a batch of b holds on average.

  python experiments/caption_ceiling.py --out results/caption_ceiling     # seconds
  python experiments/caption_ceiling.py --dataset described_digits --out results/described_ceiling
(the described digits' captions name every attribute their image shows: the same oracle).

Writes ceiling.json.
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from contrastive_jax.data import captions, descriptions, pipeline  # noqa: E402

# The attributes both a caption can name and its image shows, per dataset. The captioned
# digits' position is never captioned and their writer never shown.
VISIBLE = {"captioned_digits": ("digit", "thickness", "slant", "colour"),
           "described_digits": ("digit", "thickness", "slant", "colour", "position")}
GRAMMARS = {"captioned_digits": captions, "described_digits": descriptions}


def named_in(words: set[str], visible: tuple[str, ...], grammar) -> tuple[str, ...]:
  """The attributes of `visible` that a caption (its set of words) names: one of the
  attribute's values is among its words (no template's fixed words are a value, and no
  value of one visible attribute is a value of another)."""
  values = {"digit": captions.DIGITS, **grammar.ATTRIBUTES}
  return tuple(a for a in visible if words & set(values[a]))


def test_split(dataset: str) -> tuple[np.ndarray, list[list[tuple[str, ...]]], tuple]:
  """(attributes [N, A] of the stored test images, the attributes each caption names,
  the attribute names A) of a captioned dataset, read as the trainer reads it."""
  visible, grammar = VISIBLE[dataset], GRAMMARS[dataset]
  source = pipeline.open_splits(dataset, None, "test")[1]()
  records = [source[i] for i in range(len(source))]
  tok = grammar.tokenizer()
  attrs = np.array([[r["label"]] + [r[k] for k in visible[1:]] for r in records])
  named = [[named_in(set(tok.decode(t).split()), visible, grammar) for t in r["captions"]]
           for r in records]
  return attrs, named, visible


def ceiling(attrs: np.ndarray, named: list[list[tuple[str, ...]]],
            visible: tuple[str, ...] = VISIBLE["captioned_digits"]) -> dict:
  """The oracle's R@1 both ways and the false-negative rate of a random negative.

  attrs: [N, A] the images' values of the attributes `visible`; named: per image, the
  attributes each of its captions names."""
  n = len(attrs)
  contents = {}
  content = np.array([contents.setdefault(tuple(a), len(contents)) for a in attrs.tolist()])
  groups, group, owner = {}, [], []
  for i, names in enumerate(named):
    for ns in names:
      key = (ns, tuple(int(attrs[i, visible.index(a)]) for a in ns))
      group.append(groups.setdefault(key, len(groups)))
      owner.append(i)
  group, owner = np.asarray(group), np.asarray(owner)
  counts = np.zeros((len(groups), len(contents)))  # C[G, x]
  np.add.at(counts, (group, content[owner]), 1.0)
  size_g, size_x = counts.sum(1), np.bincount(content)
  i2t = float((counts / size_g[:, None]).max(0).sum() / n)
  t2i = float((counts / size_x[None, :]).max(1).sum() / len(owner))
  # A negative image j of caption m agrees with it when it shows every attribute m names.
  agree = np.zeros(len(owner))
  for m, (o, ns) in enumerate((o, ns) for o, names in enumerate(named) for ns in names):
    agree[m] = np.logical_and.reduce(
        [attrs[:, visible.index(a)] == attrs[o, visible.index(a)] for a in ns]).sum() - 1
  false_rate = float(np.mean(agree / (n - 1)))
  return {"test_images": n, "test_captions": int(len(owner)), "contents": len(contents),
          "caption_groups": len(groups),
          "oracle_i2t_R@1": i2t, "oracle_t2i_R@1": t2i, "oracle_mean_R@1": (t2i + i2t) / 2,
          "false_negative_rate": false_rate,
          "false_negatives_per_batch": {b: false_rate * (b - 1) for b in (16, 32, 64, 256)}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="results/caption_ceiling")
  parser.add_argument("--dataset", default="captioned_digits", choices=sorted(VISIBLE))
  args = parser.parse_args()
  result = ceiling(*test_split(args.dataset))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "ceiling.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
