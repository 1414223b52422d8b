"""InfoNCE family: NT-Xent (SimCLR), symmetric CLIP, DCL/DCLW and the 4-term L_con.

These estimate the denominator from the minibatch, so they need every negative:
with `axis_name` they all-gather the keys and equal the single-device loss on
the whole batch. Similarities are cosine / temperature.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common
from contrastive_jax.losses.common import Scalar
from contrastive_jax.losses import streamed
from contrastive_jax.metrics import l2_normalize


def nt_xent(z1: jax.Array, z2: jax.Array, *, temperature: float,
            chunk_size: Optional[int] = None, ring: bool = False,
            axis_name: Optional[str] = None) -> jax.Array:
  """NT-Xent (Chen et al., "A Simple Framework for Contrastive Learning", ICML 2020).

  For the 2B views z = [z1; z2] and anchor k with other view p(k):
    loss = mean_k [ -s_{k,p(k)} + log sum_{j != k} exp(s_kj) ],  s = cos / temperature,
  i.e. one positive and 2(B - 1) negatives per anchor, averaged over 2B anchors.

  Args:
    z1, z2: [B, D] raw embeddings of two views (local shard under `axis_name`).
    temperature: > 0.
    chunk_size: None (automatic) or the key chunk to stream over: see `streamed`.
    ring: inside `shard_map`, pass key blocks between neighbours (`ppermute`)
      instead of all-gathering them: a device never holds the [2B, D] keys.
    axis_name: mesh axis to gather negatives over inside `shard_map`.
  Returns:
    float32 scalar: the mean over the global batch (already averaged over devices).

  References:
    T. Chen, S. Kornblith, M. Norouzi, G. Hinton, "A Simple Framework for Contrastive
      Learning of Visual Representations" (SimCLR), ICML 2020.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from contrastive_jax import losses
    >>> z1, z2 = jax.random.normal(jax.random.key(0), (2, 8, 4))
    >>> loss = losses.nt_xent(z1, z2, temperature=0.1)
    >>> bool(jnp.isclose(loss, losses.nt_xent(z1, z2, temperature=0.1, chunk_size=3)))
    True
  """
  common.check_embeddings(("z1", "z2"), z1, z2)
  common.check_positive("temperature", temperature)
  lse, pos, n = common.two_view_lse(z1, z2, temperature, axis_name, exclude_positive=False,
                                    chunk_size=chunk_size, ring=ring)
  return common.global_sum(jnp.sum(lse - pos), axis_name) / n  # n = 2B anchors


def clip_loss(img: jax.Array, txt: jax.Array, *, temperature: Scalar,
              chunk_size: Optional[int] = None, ring: bool = False,
              axis_name: Optional[str] = None) -> jax.Array:
  """Symmetric InfoNCE of CLIP (Radford et al., ICML 2021).

    loss = ( CE(img -> txt) + CE(txt -> img) ) / 2,  logits s = cos(img_i, txt_j) / temperature,
  each direction averaged over its B anchors; the matched pair is the positive.

  Args:
    img, txt: [B, D] raw embeddings of paired examples.
    temperature: > 0; may be a traced (learnable) scalar.
    chunk_size: None (automatic) or the key chunk to stream over: see `streamed`.
    ring: inside `shard_map`, pass text-key blocks between neighbours instead of
      gathering them (each block's column sums travel with it).
    axis_name: mesh axis inside `shard_map`: the text keys are gathered; both
      directions come from the one [b, B] similarity block (the text anchors'
      log-sum-exps combine B partial sums over devices: 2B floats).
  Returns:
    float32 scalar: the mean over the global batch (already averaged over devices).

  References:
    A. Radford et al., "Learning Transferable Visual Models From Natural Language
      Supervision" (CLIP), ICML 2021.

  Examples:
    >>> import jax
    >>> from contrastive_jax import losses
    >>> img, txt = jax.random.normal(jax.random.key(0), (2, 8, 4))
    >>> losses.clip_loss(img, txt, temperature=0.07).shape
    ()
  """
  common.check_embeddings(("img", "txt"), img, txt)
  common.check_positive("temperature", temperature)
  return _directional_ce(img, txt, temperature, axis_name, both=True, chunk_size=chunk_size,
                         ring=ring)


def _directional_ce(anchors, keys, temperature, axis_name, both: bool, chunk_size=None,
                    ring: bool = False):
  """Mean CE of anchors [b, D] against all keys (and keys against all anchors if
  both), from one similarity block of the local anchors against every device's keys."""
  a, k = l2_normalize(anchors), l2_normalize(keys)
  inv_t = common.inverse_temperature(temperature)
  b = a.shape[0]
  pos = common.positive_scores(a, k, inv_t)
  if ring:  # each local key's column sum comes home complete
    common.check_ring(axis_name)
    rows, cols = streamed.ring_logsumexp(a, k, inv_t, None, axis_name=axis_name,
                                         block_cols=jnp.arange(b), stride=b, cols=both)
  else:
    all_k, offset = common.gather_keys(k, axis_name)
    rows, cols = streamed.logsumexp(a, all_k, inv_t, cols=both, chunk_size=chunk_size)
    if both:  # the local keys' columns, summed over every device's anchors
      cols = common.global_logsumexp(cols, axis_name)
      cols = jax.lax.dynamic_slice_in_dim(cols, offset, b)
  total = jnp.sum(rows - pos)
  if both:
    total += jnp.sum(cols - pos)
  b_global = common.global_sum(jnp.float32(b), axis_name)
  return common.global_sum(total, axis_name) / (b_global * (2 if both else 1))


def dcl_loss(z1: jax.Array, z2: jax.Array, *, temperature: float, weighted: bool = False,
             sigma: float = 0.5, chunk_size: Optional[int] = None, ring: bool = False,
             axis_name: Optional[str] = None) -> jax.Array:
  """Decoupled contrastive loss, DCL / DCLW (Yeh et al., ECCV 2022).

  NT-Xent with the positive removed from the denominator:
    l_k = -w_k s_{k,p(k)} + log sum_{j not in {k, p(k)}} exp(s_kj),  s = cos / temperature,
  averaged over the 2B anchors (both directions, as the authors train it).
  DCL: w = 1. DCLW (weighted=True): w_k = 2 - exp(c_k / sigma) / mean_j exp(c_j / sigma),
  with c_k the positive pair's cosine; the weight is differentiated through, as
  in the reference implementation (lightly's DCLW detaches it). Finite for any
  sigma > 0 (the ratio is computed shifted by its largest exponent).

  Args:
    z1, z2: [B, D] raw embeddings of two views.
    temperature: > 0. sigma: > 0, DCLW's von Mises-Fisher scale.
    axis_name: mesh axis to gather negatives over inside `shard_map`.
  Returns:
    float32 scalar.

  References:
    C.-H. Yeh, C.-Y. Hong, Y.-C. Hsu, T.-L. Liu, Y. Chen, Y. LeCun, "Decoupled
      Contrastive Learning", ECCV 2022.

  Examples:
    >>> import jax
    >>> from contrastive_jax import losses
    >>> z1, z2 = jax.random.normal(jax.random.key(0), (2, 8, 4))
    >>> losses.dcl_loss(z1, z2, temperature=0.1, weighted=True).shape
    ()
  """
  common.check_embeddings(("z1", "z2"), z1, z2)
  common.check_positive("temperature", temperature)
  common.check_positive("sigma", sigma)
  lse_neg, pos, n = common.two_view_lse(z1, z2, temperature, axis_name, exclude_positive=True,
                                        chunk_size=chunk_size, ring=ring)
  if weighted:
    cos = pos * jnp.asarray(temperature, jnp.float32)  # both directions share c_k
    # exp(c_k / sigma) / mean_j exp(c_j / sigma), shifted by the largest c / sigma (the
    # ratio does not change, so the shift carries no gradient): exp(1 / sigma) overflows
    # float32 for sigma below about 0.011.
    a = cos / sigma
    top = jax.lax.stop_gradient(jnp.max(a))
    if axis_name is not None:
      top = jax.lax.pmax(top, axis_name)
    e = jnp.exp(a - top)
    mean_e = common.global_sum(jnp.sum(e), axis_name) / common.global_sum(
        jnp.float32(e.shape[0]), axis_name)
    pos = (2.0 - e / mean_e) * pos
  return common.global_sum(jnp.sum(lse_neg - pos), axis_name) / n


def modality_contrastive_loss(img: jax.Array, txt: jax.Array, img_aug: jax.Array,
                              txt_aug: jax.Array, *, temperature: Scalar,
                              chunk_size: Optional[int] = None, ring: bool = False,
                              axis_name: Optional[str] = None) -> jax.Array:
  """L_con of Jiang et al. (CVPR 2023): cross-modal plus in-modal InfoNCE.

    L_con = ( CE(img -> txt) + CE(txt -> img) + CE(img -> img_aug) + CE(txt -> txt_aug) ) / 4,
  where CE(a -> k) is InfoNCE of anchors a against keys k (matched rows positive,
  the other keys of k negative), each averaged over B anchors. The in-modal terms
  use augmented keys, as in CyCLIP.

  Args:
    img, txt, img_aug, txt_aug: [B, D] raw embeddings.
  Returns:
    float32 scalar.

  References:
    Q. Jiang et al., "Understanding and Constructing Latent Modality Structures in
      Multi-modal Representation Learning", CVPR 2023 (L_con);
      S. Goel et al., "CyCLIP: Cyclic Contrastive Language-Image Pretraining", NeurIPS 2022.

  Examples:
    >>> import jax
    >>> from contrastive_jax import losses
    >>> img, txt, img_aug, txt_aug = jax.random.normal(jax.random.key(0), (4, 8, 4))
    >>> losses.modality_contrastive_loss(img, txt, img_aug, txt_aug, temperature=0.1).shape
    ()
  """
  common.check_embeddings(("img", "txt", "img_aug", "txt_aug"), img, txt, img_aug, txt_aug)
  common.check_positive("temperature", temperature)
  ce = lambda a, k, both: _directional_ce(a, k, temperature, axis_name, both, chunk_size, ring)
  cross, in_img, in_txt = ce(img, txt, True), ce(img, img_aug, False), ce(txt, txt_aug, False)
  return (2.0 * cross + in_img + in_txt) / 4.0


def infonce(anchors: jax.Array, keys: jax.Array, *, temperature: Scalar,
            chunk_size: Optional[int] = None, ring: bool = False,
            axis_name: Optional[str] = None) -> jax.Array:
  """One-directional InfoNCE: mean_i CE(anchors_i -> keys), keys_i positive. [B, D] each.

  References:
    A. van den Oord, Y. Li, O. Vinyals, "Representation Learning with Contrastive
      Predictive Coding", arXiv:1807.03748, 2018.

  Examples:
    >>> import jax
    >>> from contrastive_jax import losses
    >>> a, k = jax.random.normal(jax.random.key(0), (2, 8, 4))
    >>> float(losses.infonce(a, a, temperature=1e-3)) < 1e-3  # each key matches itself
    True
  """
  common.check_embeddings(("anchors", "keys"), anchors, keys)
  common.check_positive("temperature", temperature)
  return _directional_ce(anchors, keys, temperature, axis_name, both=False,
                         chunk_size=chunk_size, ring=ring)


def momentum_distillation_loss(img: jax.Array, txt: jax.Array, img_m: jax.Array,
                               txt_m: jax.Array, *, temperature: Scalar,
                               axis_name: Optional[str] = None) -> jax.Array:
  """ALBEF's momentum distillation term: cross-entropy of the online image-text
  similarities against the momentum model's softmax, both directions.

    q_i = softmax_j( cos(img_m_i, txt_m_j) / t ),   p_i = softmax_j( cos(img_i, txt_j) / t ),
    L = ( mean_i CE(q_i, p_i) + mean_j CE(q'_j, p'_j) ) / 2     (' : text anchors),
  with the targets q held constant (stop-gradient). ALBEF's ITC is
  (1 - alpha) ITC + alpha L (the KL differs from this CE by q's constant entropy).

  Args:
    img, txt: [B, D] raw online embeddings (local shard under `axis_name`).
    img_m, txt_m: [B, D] raw momentum-model embeddings of the same examples.
    temperature: > 0 (may be traced, e.g. learnable).
    axis_name: mesh axis to gather keys over inside `shard_map`.
  Returns:
    float32 scalar.

  References:
    J. Li, R. R. Selvaraju, A. D. Gotmare, S. Joty, C. Xiong, S. Hoi, "Align before
      Fuse: Vision and Language Representation Learning with Momentum Distillation"
      (ALBEF), NeurIPS 2021.

  Examples:
    >>> import jax
    >>> from contrastive_jax import losses
    >>> img, txt = jax.random.normal(jax.random.key(0), (2, 8, 4))
    >>> losses.momentum_distillation_loss(img, txt, img, txt, temperature=0.1).shape
    ()
  """
  common.check_embeddings(("img", "txt", "img_m", "txt_m"), img, txt, img_m, txt_m)
  common.check_positive("temperature", temperature)
  img_m, txt_m = jax.lax.stop_gradient(img_m), jax.lax.stop_gradient(txt_m)
  total = 0.0
  for a, k, a_m, k_m in ((img, txt, img_m, txt_m), (txt, img, txt_m, img_m)):
    keys, _ = common.gather_keys(jnp.stack([k, k_m]), axis_name, axis=1)  # one gather
    logp = jax.nn.log_softmax(common.similarity(a, keys[0], temperature), axis=1)
    q = jax.nn.softmax(common.similarity(a_m, keys[1], temperature), axis=1)
    total += -jnp.sum(q * logp)
  b_global = common.global_sum(jnp.float32(img.shape[0]), axis_name)
  return common.global_sum(total, axis_name) / (2.0 * b_global)
