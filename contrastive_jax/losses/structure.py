"""Latent modality structure regularisers (Jiang et al., "Understanding and
Constructing Latent Modality Structures in Multi-modal Representation Learning",
CVPR 2023).

Notation: img, txt [B, D] are the shared (ITC) embeddings of paired examples,
img_aug, txt_aug those of augmented views (CLIP) or momentum features (ALBEF),
img_ind, txt_ind the modality-specific ("independent") head outputs. All inputs
are raw; every function normalises them. Terms coupling examples (InfoNCE,
uniformity, similarity matrices) gather over `axis_name`, so the sharded value
equals the single-device one.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from contrastive_jax import metrics
from contrastive_jax.losses import common
from contrastive_jax.losses.common import Scalar
from contrastive_jax.losses import streamed
from contrastive_jax.losses.infonce import infonce


def _uniformity(z: jax.Array, t: float, axis_name: Optional[str],
                chunk_size: Optional[int]) -> jax.Array:
  """metrics.uniformity of the whole batch, from local rows z [b, D] against all rows,
  streamed: -t ||x_j - x_k||^2 = 2t cos_jk - 2t for unit rows."""
  z = metrics.l2_normalize(z)
  all_z, offset = common.gather_keys(z, axis_name)
  self_col = (jnp.arange(z.shape[0], dtype=jnp.int32) + offset)[:, None]
  rows, _ = streamed.logsumexp(z, all_z, 2.0 * t, self_col, chunk_size=chunk_size)
  n = all_z.shape[0]
  local = jax.nn.logsumexp(rows)
  return common.global_logsumexp(local, axis_name) - 2.0 * t - jnp.log(n * (n - 1.0))


def _cos_rows(a: jax.Array, b: jax.Array) -> jax.Array:
  """Row-wise cosine of a, b [B, D] -> float32 [B]."""
  a, b = metrics.l2_normalize(a), metrics.l2_normalize(b)
  return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), -1)


def feature_separation_loss(img: jax.Array, txt: jax.Array, img_ind: jax.Array,
                            txt_ind: jax.Array, img_ind_aug: jax.Array, txt_ind_aug: jax.Array,
                            *, temperature: Scalar, uniformity_t: float = 2.0,
                            chunk_size: Optional[int] = None,
                            axis_name: Optional[str] = None) -> jax.Array:
  """Deep feature separation: L_sep = L_ortho + L_icon + L_uni (unit weights).

    L_ortho = mean_j ( <img_j, img_ind_j>^2 + <txt_j, txt_ind_j>^2 ),
    L_icon  = InfoNCE(img_ind -> img_ind_aug) + InfoNCE(txt_ind -> txt_ind_aug),
    L_uni   = U(img_ind) + U(txt_ind),  U(x) = log mean_{j != k} exp(-t ||x_j - x_k||^2).
  The independent feature's positive is its augmented view (the paper's printed
  formula pairs a feature with itself, which is degenerate).

  Args:
    img, txt: [B, D] shared features; img_ind, txt_ind: [B, D] independent
      features; img_ind_aug, txt_ind_aug: [B, D] independent features of the
      augmented views. All raw.
    temperature: > 0 for L_icon. uniformity_t: t of U.
    chunk_size: None (automatic) or the key chunk L_icon and U stream over.
  Returns:
    float32 scalar.

  References:
    Q. Jiang, C. Chen, H. Zhao, L. Chen, Q. Ping, S. Tran, Y. Xu, B. Zeng, T. Chilimbi,
      "Understanding and Constructing Latent Modality Structures in Multi-modal
      Representation Learning", CVPR 2023 (deep feature separation).

  Examples:
    >>> import jax
    >>> from contrastive_jax import losses
    >>> xs = jax.random.normal(jax.random.key(0), (6, 8, 4))
    >>> losses.feature_separation_loss(*xs, temperature=0.1).shape
    ()
  """
  common.check_embeddings(("img", "txt", "img_ind", "txt_ind", "img_ind_aug", "txt_ind_aug"),
                          img, txt, img_ind, txt_ind, img_ind_aug, txt_ind_aug)
  common.check_positive("temperature", temperature)
  ortho = common.global_mean(
      jnp.mean(_cos_rows(img, img_ind) ** 2 + _cos_rows(txt, txt_ind) ** 2), axis_name)
  icon = sum(infonce(a, k, temperature=temperature, chunk_size=chunk_size, axis_name=axis_name)
             for a, k in ((img_ind, img_ind_aug), (txt_ind, txt_ind_aug)))
  uni = sum(_uniformity(x, uniformity_t, axis_name, chunk_size) for x in (img_ind, txt_ind))
  return ortho + icon + uni


def brownian_bridge_loss(img: jax.Array, txt: jax.Array, img_aug: jax.Array, *,
                         t: float = 0.25, key: Optional[jax.Array] = None,
                         txt_aug: Optional[jax.Array] = None,
                         axis_name: Optional[str] = None) -> jax.Array:
  """Brownian bridge: the augmented image lies on the bridge from img to txt.

    mu_j = normalise( t img_j + (1 - t) txt_j ),  L_br = mean_j || img_aug_j - mu_j ||^2
  over normalised vectors (= 2 - 2 <img_aug_j, mu_j>). With `key`, t_j ~ U(0, 1)
  per pair instead of the fixed t. With `txt_aug`, the symmetric text-side
  bridge (mu = normalise(t txt + (1 - t) img)) is added and the two averaged.

  Args:
    img, txt, img_aug (, txt_aug): [B, D] raw embeddings.
    t: bridge time in [0, 1] (0.25 in all the paper's experiments).
    key: optional PRNG key to sample t per pair.
  Returns:
    float32 scalar.

  References:
    Q. Jiang, C. Chen, H. Zhao, L. Chen, Q. Ping, S. Tran, Y. Xu, B. Zeng, T. Chilimbi,
      "Understanding and Constructing Latent Modality Structures in Multi-modal
      Representation Learning", CVPR 2023 (Brownian bridge).

  Examples:
    >>> import jax
    >>> from contrastive_jax import losses
    >>> img, txt, img_aug = jax.random.normal(jax.random.key(0), (3, 8, 4))
    >>> float(losses.brownian_bridge_loss(img, txt, img_aug)) >= 0
    True
  """
  names, arrays = ["img", "txt", "img_aug"], [img, txt, img_aug]
  if txt_aug is not None:
    names.append("txt_aug")
    arrays.append(txt_aug)
  common.check_embeddings(names, *arrays, min_batch=1)
  if not isinstance(t, jax.Array) and not 0.0 <= float(t) <= 1.0:
    raise ValueError(f"t must be in [0, 1], got {t}")
  if key is None:
    tt = jnp.full((img.shape[0], 1), t, jnp.float32)
  else:
    if axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    tt = jax.random.uniform(key, (img.shape[0], 1), jnp.float32)
  v = metrics.l2_normalize(img).astype(jnp.float32)
  w = metrics.l2_normalize(txt).astype(jnp.float32)

  def bridge(start, end, aug):
    mu = metrics.l2_normalize(tt * start + (1.0 - tt) * end)
    d = metrics.l2_normalize(aug).astype(jnp.float32) - mu
    return jnp.mean(jnp.sum(d * d, -1))

  loss = bridge(v, w, img_aug)
  if txt_aug is not None:
    loss = 0.5 * (loss + bridge(w, v, txt_aug))
  return common.global_mean(loss, axis_name)


def geometric_consistency_loss(img: jax.Array, txt: jax.Array, img_aug: jax.Array,
                               txt_aug: jax.Array, *,
                               axis_name: Optional[str] = None) -> jax.Array:
  """Geometric consistency L_gc + L_gca, squared differences of cosine matrices.

  With S_vt = img txt^T, S_vv = img img^T, S_tt = txt txt^T (normalised) and
  the same for the augmented views (subscript a):
    L_gc  = (1/B) sum_jk [ (S_vt[j,k] - S_vt[k,j])^2 + (S_vv[j,k] - S_tt[j,k])^2 ]  (CyCLIP)
    L_gca = (1/B) sum_jk [ (S_vv - S_vv_a)^2 + (S_tt - S_tt_a)^2 ][j,k]
            + mean_j ( <img_j, txt_j> - <img_aug_j, txt_aug_j> )^2.

  Args:
    img, txt, img_aug, txt_aug: [B, D] raw embeddings.
  Returns:
    float32 scalar.

  References:
    Q. Jiang, C. Chen, H. Zhao, L. Chen, Q. Ping, S. Tran, Y. Xu, B. Zeng, T. Chilimbi,
      "Understanding and Constructing Latent Modality Structures in Multi-modal
      Representation Learning", CVPR 2023 (geometric consistency).

  Examples:
    >>> import jax
    >>> from contrastive_jax import losses
    >>> img, txt = jax.random.normal(jax.random.key(0), (2, 8, 4))
    >>> float(losses.geometric_consistency_loss(img, txt, img, txt)) >= 0
    True
  """
  common.check_embeddings(("img", "txt", "img_aug", "txt_aug"), img, txt, img_aug, txt_aug,
                          min_batch=1)
  v, w, va, wa = (metrics.l2_normalize(x) for x in (img, txt, img_aug, txt_aug))
  # Local rows against all rows: [b, B] blocks of each matrix; S_vt[k, j] for the
  # local j rows is the local block of w @ v^T.
  (all_v, all_w, all_va, all_wa), _ = common.gather_keys(jnp.stack([v, w, va, wa]), axis_name,
                                                         axis=1)
  sim = lambda a, b: jnp.einsum("md,kd->mk", a, b, preferred_element_type=jnp.float32)
  s_vt, s_tv = sim(v, all_w), sim(w, all_v)
  s_vv, s_tt = sim(v, all_v), sim(w, all_w)
  s_vva, s_tta = sim(va, all_va), sim(wa, all_wa)
  gc = jnp.sum((s_vt - s_tv) ** 2 + (s_vv - s_tt) ** 2)
  gca = jnp.sum((s_vv - s_vva) ** 2 + (s_tt - s_tta) ** 2)
  paired = jnp.sum((_cos_rows(v, w) - _cos_rows(va, wa)) ** 2)
  b_global = common.global_sum(jnp.float32(img.shape[0]), axis_name)
  return common.global_sum(gc + gca + paired, axis_name) / b_global
