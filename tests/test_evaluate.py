"""Evaluation protocols on cases with known answers and against scikit-learn."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from contrastive_jax import evaluate as E


def blobs(n, dim, classes, sep, seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n)
  centers = rng.normal(size=(classes, dim)) * sep
  return (centers[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def test_separable_features_give_100_and_random_give_chance():
  x, y = blobs(600, 16, 5, sep=20.0, seed=0)
  assert E.knn_accuracy(x[:500], y[:500], x[500:], y[500:], num_classes=5) == 1.0
  assert E.linear_probe(x[:500], y[:500], x[500:], y[500:], num_classes=5)["top1"] == 1.0
  rng = np.random.default_rng(1)
  xr, yr = rng.normal(size=(3000, 16)), rng.integers(0, 5, 3000)
  knn = E.knn_accuracy(xr[:2000], yr[:2000], xr[2000:], yr[2000:], num_classes=5)
  lin = E.linear_probe(xr[:2000], yr[:2000], xr[2000:], yr[2000:], num_classes=5)["top1"]
  assert abs(knn - 0.2) < 0.05 and abs(lin - 0.2) < 0.05, (knn, lin)


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_probe_and_knn_agree_with_sklearn(seed):
  x, y = blobs(1200, 24, 6, sep=0.35, seed=seed)  # overlapping classes: accuracy well below 100
  tr, te = slice(0, 900), slice(900, None)
  ours = E.linear_probe(x[tr], y[tr], x[te], y[te], num_classes=6)
  scaler = StandardScaler().fit(x[tr])
  sk = LogisticRegression(C=1.0 / (ours["weight_decay"] * 900), max_iter=5000).fit(
      scaler.transform(x[tr]), y[tr]).score(scaler.transform(x[te]), y[te])
  assert abs(ours["top1"] - sk) <= 0.01, (ours, sk)
  assert 0.3 < sk < 0.95
  # Unweighted-limit kNN: a huge temperature makes votes equal; sklearn's cosine kNN.
  knn = E.knn_accuracy(x[tr], y[tr], x[te], y[te], num_classes=6, k=15, temperature=1e6)
  sk_knn = KNeighborsClassifier(15, metric="cosine").fit(x[tr], y[tr]).score(x[te], y[te])
  assert abs(knn - sk_knn) <= 0.01, (knn, sk_knn)


def test_retrieval_identical_embeddings_and_several_captions():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(50, 16))
  r = E.retrieval_recall(img, img)
  assert r["i2t_R@1"] == r["t2i_R@1"] == 1.0
  # Two captions per image (noisy copies): recall@1 still perfect both ways.
  txt = np.concatenate([img, img]) + 0.01 * rng.normal(size=(100, 16))
  r = E.retrieval_recall(img, txt, txt_to_img=np.tile(np.arange(50), 2))
  assert r["i2t_R@1"] == r["t2i_R@1"] == 1.0
  # Shuffled captions: chance level.
  r = E.retrieval_recall(img, rng.normal(size=(50, 16)))
  assert r["i2t_R@10"] < 0.5


def test_zero_shot_with_prompt_templates():
  rng = np.random.default_rng(0)
  classes = rng.normal(size=(10, 32))
  labels = rng.integers(0, 10, 200)
  img = classes[labels] + 0.3 * rng.normal(size=(200, 32))
  prompts = classes[:, None] + 0.1 * rng.normal(size=(10, 3, 32))
  out = E.zero_shot(img, prompts, labels)
  assert out["top1"] > 0.95 and out["top5"] >= out["top3"] >= out["top1"]


class GeneratedImages:
  """n records of 64 x 64 x 3 uint8 images made from their index on demand (nothing stored)."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    rng = np.random.default_rng(int(i))
    return {"image": rng.integers(0, 256, (64, 64, 3), np.uint8), "label": int(i) % 10}


def _traced_peak(fn) -> int:
  import tracemalloc
  tracemalloc.start()
  try:
    fn()
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_streaming_evaluation_memory_does_not_grow_with_the_split():
  import jax
  from contrastive_jax.data import pipeline
  params = {"w": np.random.default_rng(0).normal(size=(64 * 64 * 3, 16)).astype(np.float32)}
  apply_fn = lambda p, x: x.reshape(x.shape[0], -1).astype(jnp.float32) @ p["w"]
  transform = pipeline.EvalImage(None, 3)

  def stream(n):
    feats, labels = E.in_batches(lambda p, x, y: (apply_fn(p, x), y), params, (
        (b["image"], b["label"]) for b in pipeline.eval_batches(
            GeneratedImages(n), transform, batch_size=64, threads=1)))
    assert feats.shape == (n, 16) and labels.shape == (n,)
    np.testing.assert_array_equal(labels, np.arange(n) % 10)

  stream(64)  # compile outside the measurement
  small, big = 512, 4096
  grown = _traced_peak(lambda: stream(big)) - _traced_peak(lambda: stream(small))
  raw = (big - small) * 64 * 64 * 3  # what loading the split would add: 44 MB
  features = (big - small) * (16 * 4 + 4)  # what the kept features and labels add
  assert grown < features + 0.05 * raw, (grown, features, raw)
  # The measure sees a split loaded whole (the old way) grow with it.
  load = lambda n: np.stack([GeneratedImages(n)[i]["image"] for i in range(n)])
  assert _traced_peak(lambda: load(big)) - _traced_peak(lambda: load(small)) > 0.9 * raw
  # Features equal the unstreamed computation.
  src = GeneratedImages(100)
  feats = E.in_batches(apply_fn, params, ((b["image"],) for b in pipeline.eval_batches(
      src, transform, 64)))
  whole = np.stack([src[i]["image"] for i in range(100)])
  np.testing.assert_allclose(feats, jax.jit(apply_fn)(params, whole), rtol=1e-4, atol=1e-3)


def test_in_batches_over_arrays_equals_one_call_on_any_batch_size():
  import jax
  seed = 3
  rng = np.random.default_rng(seed)
  x, t = rng.normal(size=(37, 5)).astype(np.float32), rng.integers(0, 9, (37, 2))
  params = {"w": rng.normal(size=(5, 3)).astype(np.float32)}
  fn = lambda p, a, b: (a @ p["w"], b.sum(-1))
  want = jax.jit(fn)(params, x, t)
  for batch_size in (1, 8, 10, 37, 64):  # uneven last batches are padded, then cut
    got = E.in_batches(fn, params, E.batches_of(x, t, batch_size=batch_size))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(got[1], want[1])
  assert E.in_batches(fn, params, E.batches_of(x[:0], t[:0])) is None


def test_a_masked_logistic_fit_equals_the_fit_on_the_subset():
  """The probe fits its candidates on a 0/1 mask of the train set (one shape, one
  compilation): the same model as fitting the subset's rows alone."""
  seed = 5
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(300, 8)).astype(np.float32)
  y = (x[:, 0] + 0.5 * rng.normal(size=300) > 0).astype(np.int32) + 2 * (x[:, 1] > 0)
  mask = (rng.random(300) < 0.7).astype(np.float32)
  a = E.fit_logistic(x, y, num_classes=4, weight_decay=1e-3, sample_weight=mask)
  b = E.fit_logistic(x[mask > 0], y[mask > 0], num_classes=4, weight_decay=1e-3)
  for k in ("w", "b"):
    np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=1e-3, err_msg=f"seed {seed}")
  full = E.fit_logistic(x, y, num_classes=4, weight_decay=1e-3)
  assert np.abs(np.asarray(full["w"]) - np.asarray(a["w"])).max() > 1e-2  # the mask matters
