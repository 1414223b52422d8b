"""Evaluation protocols on frozen features: weighted kNN, linear probe, retrieval,
zero-shot; and the one helper that embeds in batches (`in_batches`, over a streamed
split or arrays in memory).

Features are computed once, then every protocol is a small pure-JAX program. To
evaluate a workdir's checkpoint: `python -m contrastive_jax.eval_checkpoint`.
"""

import functools
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jax
from jax.typing import ArrayLike
import jax.numpy as jnp
import numpy as np
import optax

from contrastive_jax import metrics


def batches_of(*arrays: ArrayLike, batch_size: int = 500) -> Iterator[tuple]:
  """Aligned slices (arrays[0][i:i+b], arrays[1][i:i+b], ...) of in-memory arrays [N, ...]:
  the stream `in_batches` takes."""
  for i in range(0, len(arrays[0]), batch_size):
    yield tuple(a[i:i + batch_size] for a in arrays)


def in_batches(fn: Callable, params: Any, batches: Iterable[Sequence[ArrayLike]],
               devices: Optional[Sequence[jax.Device]] = None) -> Any:
  """``fn(params, *arrays)`` over a stream of batches -> its outputs concatenated [N, ...].

  The one helper that embeds in batches, for a streamed split (`pipeline.eval_batches`)
  and arrays in memory (`batches_of`) alike. Each batch, a tuple of aligned arrays
  [b, ...], is padded to the first batch's rows (rounded up to a multiple of the
  devices: one compilation) and sharded over `devices` (default: this host's); params
  are replicated once. Only the outputs come back to the host, so memory is one batch
  plus the outputs, whatever the split's size.

  Args:
    fn: ``(params, *arrays)``, each array [b, ...] -> any tree of [b, ...] arrays.
  Returns:
    the tree of outputs [N, ...] as NumPy; None for an empty stream.
  """
  devices = list(devices or jax.local_devices())
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put(params, replicated)
  step = jax.jit(fn)
  outs, size = [], None
  for batch in batches:
    n = len(batch[0])
    if size is None:
      size = -(-n // len(devices)) * len(devices)
    pad = lambda a: np.concatenate([a, np.zeros((size - n, *a.shape[1:]), a.dtype)])
    arrays = [jax.device_put(pad(np.asarray(a)) if n < size else np.asarray(a), rows)
              for a in batch]
    outs.append(jax.tree.map(lambda y: np.asarray(y)[:n], step(params, *arrays)))
  if not outs:
    return None
  return jax.tree.map(lambda *ys: np.concatenate(ys), *outs)


def knn_accuracy(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, test_y: ArrayLike, *, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 1024) -> float:
  """Top-1 of temperature-weighted cosine kNN (Wu et al., 2018), as used for SimCLR-style probes.

  Each test point votes sum_{top-k neighbours} exp(cos / temperature) per class.
  Test points are processed in chunks so the [chunk, N_train] similarity fits in memory.
  """
  bank = metrics.l2_normalize(jnp.asarray(train_x, jnp.float32))
  labels = jax.nn.one_hot(jnp.asarray(train_y), num_classes)
  k = min(k, bank.shape[0])

  @jax.jit
  def predict(x):
    sim = metrics.l2_normalize(x) @ bank.T
    top, idx = jax.lax.top_k(sim, k)
    votes = jnp.einsum("tk,tkc->tc", jnp.exp(top / temperature), labels[idx])
    return jnp.argmax(votes, -1)

  test_x = np.asarray(test_x, np.float32)
  preds = np.concatenate([np.asarray(predict(test_x[i:i + chunk]))
                          for i in range(0, len(test_x), chunk)])
  return float(np.mean(preds == np.asarray(test_y)))


def _standardize(train_x, *others):
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  return [(x - mean) / std for x in (train_x,) + others]


@functools.partial(jax.jit, static_argnames=("num_classes", "max_steps"))
def _lbfgs_logistic(x, y, sample_weight, weight_decay, tol, params, *, num_classes: int,
                    max_steps: int):
  def loss(params):
    logits = x @ params["w"] + params["b"]
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, y)
    return (jnp.sum(sample_weight * ce) / jnp.sum(sample_weight)
            + 0.5 * weight_decay * jnp.sum(params["w"] ** 2))

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  def going(carry):
    count = optax.tree.get(carry[1], "count")
    grad_norm = optax.tree.norm(optax.tree.get(carry[1], "grad"))
    return (count == 0) | ((count < max_steps) & (grad_norm >= tol))

  params, _ = jax.lax.while_loop(going, step, (params, opt.init(params)))
  return params


def fit_logistic(x: ArrayLike, y: ArrayLike, *, num_classes: int, weight_decay: float,
                 sample_weight: Optional[ArrayLike] = None, init: Optional[dict] = None,
                 max_steps: int = 300, tol: float = 1e-4) -> dict:
  """Multinomial logistic regression, L2 penalty weight_decay/2 ||W||^2, full-batch L-BFGS
  until the gradient norm is below `tol` (at most max_steps).

  x [N, F], y [N], sample_weight [N] (default ones: a 0/1 mask fits a subset at the same
  shape, so every fit of a probe shares one compilation), init (default zeros: a
  neighbouring solution starts closer) -> {"w": [F, C], "b": [C]}.
  """
  w = np.ones(len(x), np.float32) if sample_weight is None else sample_weight
  init = init or {"w": jnp.zeros((np.shape(x)[1], num_classes)), "b": jnp.zeros((num_classes,))}
  return _lbfgs_logistic(jnp.asarray(x, jnp.float32), jnp.asarray(y), jnp.asarray(w, jnp.float32),
                         jnp.float32(weight_decay), jnp.float32(tol), init,
                         num_classes=num_classes, max_steps=max_steps)


def _accuracy(params: dict, x, y) -> float:
  """Top-1 of a fitted logistic probe on features x [N, F], labels y [N]."""
  return float(np.mean(np.argmax(np.asarray(x @ params["w"] + params["b"]), -1) == np.asarray(y)))


def linear_probe(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, test_y: ArrayLike, *, num_classes: int,
                 weight_decays: Sequence[float] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
                 val_fraction: float = 0.2, seed: int = 0) -> dict:
  """Top-1 of a logistic-regression probe on standardised frozen features.

  The weight decay is chosen on a held-out `val_fraction` of the training set,
  then the probe is refit on the whole training set and scored on the test set.
  """
  train_x, test_x = _standardize(np.asarray(train_x, np.float32), np.asarray(test_x, np.float32))
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  order = np.random.default_rng(seed).permutation(len(train_x))
  n_val = max(1, int(val_fraction * len(train_x)))
  val = order[:n_val]
  fit = np.ones(len(train_x), np.float32)
  fit[val] = 0.0  # the candidates fit on the rest, at the whole set's shape

  # The regularisation path, strongest first, each fit starting from the previous one's
  # solution (the optimum moves little between neighbours, so each fit takes fewer steps).
  scores, fits, params = {}, {}, None
  for wd in sorted(weight_decays, reverse=True):
    params = fits[wd] = fit_logistic(train_x, train_y, num_classes=num_classes,
                                     weight_decay=wd, sample_weight=fit, init=params)
    scores[wd] = _accuracy(params, train_x[val], train_y[val])
  best = max(scores, key=lambda wd: (scores[wd], wd))
  params = fit_logistic(train_x, train_y, num_classes=num_classes, weight_decay=best,
                        init=fits[best])
  return {"top1": _accuracy(params, test_x, test_y), "weight_decay": best,
          "val_top1": scores[best]}


def retrieval_recall(img: ArrayLike, txt: ArrayLike, txt_to_img: Optional[np.ndarray] = None,
                     ks: Sequence[int]=(1, 5, 10)) -> dict:
  """Image->text and text->image Recall@k by cosine similarity.

  img [N, D], txt [M, D]; txt_to_img [M] gives each caption's image (default:
  caption j belongs to image j, M = N). An image query hits if any of its
  captions is in the top k.
  """
  img, txt = metrics.l2_normalize(jnp.asarray(img)), metrics.l2_normalize(jnp.asarray(txt))
  owner = np.arange(len(txt)) if txt_to_img is None else np.asarray(txt_to_img)
  sim = np.asarray(img @ txt.T)  # [N, M]
  out = {}
  order_i2t = np.argsort(-sim, axis=1)
  order_t2i = np.argsort(-sim.T, axis=1)
  for k in ks:
    hits_i2t = (owner[order_i2t[:, :k]] == np.arange(len(img))[:, None]).any(1)
    hits_t2i = (order_t2i[:, :k] == owner[:, None]).any(1)
    out[f"i2t_R@{k}"] = float(hits_i2t.mean())
    out[f"t2i_R@{k}"] = float(hits_t2i.mean())
  return out


def zero_shot(img: ArrayLike, class_txt: ArrayLike, labels: ArrayLike, ks: Sequence[int]=(1, 3, 5)) -> dict:
  """Top-k accuracy classifying img [N, D] by cosine to class text embeddings [C, D]
  (or [C, P, D] for P prompt templates, averaged after normalisation)."""
  class_txt = jnp.asarray(class_txt)
  if class_txt.ndim == 3:
    class_txt = jnp.mean(metrics.l2_normalize(class_txt), axis=1)
  sim = np.asarray(metrics.l2_normalize(jnp.asarray(img)) @ metrics.l2_normalize(class_txt).T)
  order = np.argsort(-sim, axis=1)
  labels = np.asarray(labels)
  return {f"top{k}": float((order[:, :k] == labels[:, None]).any(1).mean()) for k in ks}


