"""Float64 NumPy references of the losses, written independently of the library,
and a central-difference gradient for checking JAX's gradients."""

import numpy as np
from scipy.special import logsumexp


def normalize(x):
  n = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(n, 1e-6)


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def two_view(z1, z2, t):
  """[2B, 2B] logits with -inf diagonal and the positive column of each row."""
  z = normalize(np.concatenate([z1, z2]))
  b = len(z1)
  s = z @ z.T / t
  np.fill_diagonal(s, -np.inf)
  pos = np.concatenate([np.arange(b) + b, np.arange(b)])
  return s, pos


def nt_xent(z1, z2, t):
  s, pos = two_view(z1, z2, t)
  rows = np.arange(len(s))
  return np.mean(logsumexp(s, axis=1) - s[rows, pos])


def clip(img, txt, t):
  s = normalize(img) @ normalize(txt).T / t
  d = np.diag(s)
  return 0.5 * (np.mean(logsumexp(s, 1) - d) + np.mean(logsumexp(s, 0) - d))


def infonce(a, k, t):
  s = normalize(a) @ normalize(k).T / t
  return np.mean(logsumexp(s, 1) - np.diag(s))


def sigmoid(img, txt, t, bias):
  s = normalize(img) @ normalize(txt).T / t + bias
  y = 2 * np.eye(len(img)) - 1
  return -np.sum(log_sigmoid(y * s)) / len(img)


def dcl(z1, z2, t, weighted=False, sigma=0.5):
  s, pos = two_view(z1, z2, t)
  n = len(s)
  total = 0.0
  cos = np.sum(normalize(z1) * normalize(z2), 1)
  e = np.exp(cos / sigma)
  w = 2 - e / e.mean() if weighted else np.ones_like(cos)
  w = np.concatenate([w, w])
  for k in range(n):
    negs = [s[k, j] for j in range(n) if j not in (k, pos[k])]
    total += -w[k] * s[k, pos[k]] + logsumexp(negs)
  return total / n


def neg_log_mean(s, pos, include_positive=False):
  """log mean over the finite entries of each row, without (or with) the positive."""
  out = []
  for k in range(len(s)):
    vals = [s[k, j] for j in range(s.shape[1])
            if np.isfinite(s[k, j]) and (include_positive or j != pos[k])]
    out.append(logsumexp(vals) - np.log(len(vals)))
  return np.array(out)


def ema(old, new, rate):
  return np.where(np.isneginf(old), new,
                  np.log((1 - rate) * np.exp(old) + rate * np.exp(new)))


def sogclr(z1, z2, log_u, index, t, gamma, weights=None):
  """Returns (surrogate loss, new table, weights); `weights` fixed -> the stop-grad surrogate.

  Surrogate: mean_k [ -s+ + r_k log Zb_k ] with r_k = Zb_k / u_k held fixed, whose
  gradient is SogCLR's -grad s+ + mean_j exp(s_kj) / u_k grad s_kj.
  """
  s, pos = two_view(z1, z2, t)
  b = len(z1)
  log_zb = neg_log_mean(s, pos)
  table = log_u.copy()
  table[:, index] = ema(table[:, index], log_zb.reshape(2, b), gamma)
  lu = table[:, index].reshape(-1)
  if weights is None:
    weights = np.exp(log_zb - lu)
  n = len(s)
  total = sum(-s[k, pos[k]] + weights[k] * log_zb[k] for k in range(n))
  return total / n, table, weights


def sogclr_official(z1, z2, u, index, t, gamma):
  """The official SogCLR code's bookkeeping (Optimization-AI/SogCLR), float64: u [N] one entry
  per example for both views, 0 = unset; the rate is 1 when the whole batch is unset.
  Returns (new u [N], u of view-1 anchors [b], u of view-2 anchors [b], Zb [2, b])."""
  s, pos = two_view(z1, z2, t)
  b = len(z1)
  zb = np.exp(neg_log_mean(s, pos)).reshape(2, b)
  g = 1.0 if u[index].sum() == 0 else gamma
  u1 = (1 - g) * u[index] + g * zb[0]
  u2 = (1 - g) * u[index] + g * zb[1]
  new = u.copy()
  new[index] = (u1 + u2) / 2
  return new, u1, u2, zb


def gamma_em(logits, pos, log_state_rows, log_eps, include_positive=False):
  """-s+ + eps/Zhat * Zb per anchor, mean; log_state_rows [n] already updated."""
  log_zb = neg_log_mean(logits, pos, include_positive)
  rows = np.arange(len(logits))
  return np.mean(np.exp(log_eps - log_state_rows + log_zb) - logits[rows, pos]), log_zb


def _zhat(table, index, log_zb, rate, update_first, max_ratio=100.0):
  """(updated table, log Zhat the E-step uses [2b]): the pre-update rows (the batch's on a
  first visit), or with update_first the updated rows (SogCLR's order); never below
  Zb / max_ratio."""
  table = table.copy()
  old = table[:, index].copy()
  table[:, index] = ema(old, log_zb, rate)
  new = table[:, index]
  zhat = new if update_first else np.where(np.isfinite(old), old, new)
  zhat = np.maximum(zhat, log_zb - np.log(max_ratio))
  return table, zhat.reshape(-1)


def gamma_two_view(z1, z2, table, index, log_eps, t, rate, include_positive=False, zhat=None,
                   update_first=False, max_ratio=100.0):
  s, pos = two_view(z1, z2, t)
  b = len(z1)
  log_zb = neg_log_mean(s, pos, include_positive).reshape(2, b)
  table, used = _zhat(table, index, log_zb, rate, update_first, max_ratio)
  if zhat is None:
    zhat = used
  loss, _ = gamma_em(s, pos, zhat, log_eps, include_positive)
  return loss, table, zhat


def gamma_clip(img, txt, table, index, log_eps, t, rate, include_positive=False, zhat=None,
               update_first=False, max_ratio=100.0):
  s = normalize(img) @ normalize(txt).T / t
  b = len(img)
  logits = np.concatenate([s, s.T])
  pos = np.tile(np.arange(b), 2)
  log_zb = neg_log_mean(logits, pos, include_positive).reshape(2, b)
  table, used = _zhat(table, index, log_zb, rate, update_first, max_ratio)
  if zhat is None:
    zhat = used
  loss, _ = gamma_em(logits, pos, zhat, log_eps, include_positive)
  return loss, table, zhat


def uniformity(x, t=2.0):
  x = normalize(x)
  b = len(x)
  d2 = np.sum((x[:, None] - x[None]) ** 2, -1)
  vals = [-t * d2[j, k] for j in range(b) for k in range(b) if j != k]
  return logsumexp(vals) - np.log(len(vals))


def feature_separation(img, txt, img_i, txt_i, img_ia, txt_ia, t):
  cos = lambda a, b: np.sum(normalize(a) * normalize(b), 1)
  ortho = np.mean(cos(img, img_i) ** 2 + cos(txt, txt_i) ** 2)
  icon = infonce(img_i, img_ia, t) + infonce(txt_i, txt_ia, t)
  return ortho + icon + uniformity(img_i) + uniformity(txt_i)


def brownian(img, txt, img_a, t=0.25):
  mu = normalize(t * normalize(img) + (1 - t) * normalize(txt))
  return np.mean(np.sum((normalize(img_a) - mu) ** 2, 1))


def geometric(img, txt, img_a, txt_a):
  v, w, va, wa = map(normalize, (img, txt, img_a, txt_a))
  b = len(v)
  svt = v @ w.T
  gc = np.sum((svt - svt.T) ** 2 + (v @ v.T - w @ w.T) ** 2) / b
  gca = np.sum((v @ v.T - va @ va.T) ** 2 + (w @ w.T - wa @ wa.T) ** 2) / b
  gca += np.mean((np.sum(v * w, 1) - np.sum(va * wa, 1)) ** 2)
  return gc + gca


def modality_contrastive(img, txt, img_a, txt_a, t):
  return (2 * clip(img, txt, t) + infonce(img, img_a, t) + infonce(txt, txt_a, t)) / 4


def numerical_grad(f, args, h=1e-6):
  """Central differences of scalar f(*args) w.r.t. every element of every arg (float64)."""
  args = [np.array(a, np.float64) for a in args]
  grads = []
  for a in args:
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
      old = a[i]
      a[i] = old + h
      fp = f(*args)
      a[i] = old - h
      fm = f(*args)
      a[i] = old
      g[i] = (fp - fm) / (2 * h)
    grads.append(g)
  return grads


def momentum_distillation(img, txt, img_m, txt_m, t):
  """ALBEF's distillation term: CE of the online softmax against the momentum softmax,
  image->text and text->image, averaged."""
  s = normalize(img) @ normalize(txt).T / t
  s_m = normalize(img_m) @ normalize(txt_m).T / t
  total = 0.0
  for a, b in ((s, s_m), (s.T, s_m.T)):
    q = np.exp(b - logsumexp(b, axis=1, keepdims=True))
    log_p = a - logsumexp(a, axis=1, keepdims=True)
    total += -np.mean(np.sum(q * log_p, axis=1))
  return total / 2


def cosine_rate(progress, rate_min, fraction):
  """FastCLIP's rate: 1 -> rate_min along a half cosine over `fraction` of training."""
  t = min(max(progress / fraction, 0.0), 1.0)
  return rate_min + (1.0 - rate_min) * 0.5 * (1.0 + np.cos(np.pi * t))
