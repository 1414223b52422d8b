"""InfoNCE family: NT-Xent (SimCLR), symmetric CLIP, DCL/DCLW and the 4-term L_con.

These estimate the denominator from the minibatch, so they need every negative:
with `axis_name` they all-gather the keys and equal the single-device loss on
the whole batch. Similarities are cosine / temperature.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common


def nt_xent(z1: jax.Array, z2: jax.Array, *, temperature: float,
            axis_name: Optional[str] = None) -> jax.Array:
  """NT-Xent (Chen et al., "A Simple Framework for Contrastive Learning", ICML 2020).

  For the 2B views z = [z1; z2] and anchor k with other view p(k):
    loss = mean_k [ -s_{k,p(k)} + log sum_{j != k} exp(s_kj) ],  s = cos / temperature,
  i.e. one positive and 2(B - 1) negatives per anchor, averaged over 2B anchors.

  Args:
    z1, z2: [B, D] raw embeddings of two views (local shard under `axis_name`).
    temperature: > 0.
    axis_name: mesh axis to gather negatives over inside `shard_map`.
  Returns:
    float32 scalar.
  """
  common.check_embeddings(("z1", "z2"), z1, z2)
  common.check_positive("temperature", temperature)
  logits, positive = common.two_view_logits(z1, z2, temperature, axis_name)
  total = common.global_sum(jnp.sum(common.cross_entropy(logits, positive)), axis_name)
  n = logits.shape[1]  # 2B keys = 2B anchors over all devices
  return total / n


def clip_loss(img: jax.Array, txt: jax.Array, *, temperature,
              axis_name: Optional[str] = None) -> jax.Array:
  """Symmetric InfoNCE of CLIP (Radford et al., ICML 2021).

    loss = ( CE(img -> txt) + CE(txt -> img) ) / 2,  logits s = cos(img_i, txt_j) / temperature,
  each direction averaged over its B anchors; the matched pair is the positive.

  Args:
    img, txt: [B, D] raw embeddings of paired examples.
    temperature: > 0; may be a traced (learnable) scalar.
    axis_name: mesh axis to gather negatives over inside `shard_map`.
  Returns:
    float32 scalar.
  """
  common.check_embeddings(("img", "txt"), img, txt)
  common.check_positive("temperature", temperature)
  return _directional_ce(img, txt, temperature, axis_name, both=True)


def _directional_ce(anchors, keys, temperature, axis_name, both: bool):
  """Mean CE of anchors [b, D] against all keys (and keys against anchors if both)."""
  pairs = [(anchors, keys), (keys, anchors)] if both else [(anchors, keys)]
  total = 0.0
  for a, k in pairs:
    all_k, offset = common.gather_keys(k, axis_name)
    logits = common.similarity(a, all_k, temperature)
    positive = (jnp.arange(a.shape[0]) + offset).astype(jnp.int32)
    total += jnp.sum(common.cross_entropy(logits, positive))
  b_global = common.global_sum(jnp.float32(anchors.shape[0]), axis_name)
  return common.global_sum(total, axis_name) / (b_global * len(pairs))


def dcl_loss(z1: jax.Array, z2: jax.Array, *, temperature: float, weighted: bool = False,
             sigma: float = 0.5, axis_name: Optional[str] = None) -> jax.Array:
  """Decoupled contrastive loss, DCL / DCLW (Yeh et al., ECCV 2022).

  NT-Xent with the positive removed from the denominator:
    l_k = -w_k s_{k,p(k)} + log sum_{j not in {k, p(k)}} exp(s_kj),  s = cos / temperature,
  averaged over the 2B anchors (both directions, as the authors train it).
  DCL: w = 1. DCLW (weighted=True): w_k = 2 - exp(c_k / sigma) / mean_j exp(c_j / sigma),
  with c_k the positive pair's cosine; the weight is differentiated through, as
  in the reference implementation.

  Args:
    z1, z2: [B, D] raw embeddings of two views.
    temperature: > 0. sigma: > 0, DCLW's von Mises-Fisher scale.
  Returns:
    float32 scalar.
  """
  common.check_embeddings(("z1", "z2"), z1, z2)
  common.check_positive("temperature", temperature)
  common.check_positive("sigma", sigma)
  logits, positive = common.two_view_logits(z1, z2, temperature, axis_name)
  pos = common.positive_logits(logits, positive)
  neg = jnp.where(jax.nn.one_hot(positive, logits.shape[1], dtype=bool), common.NEG_INF, logits)
  if weighted:
    cos = pos * jnp.asarray(temperature, jnp.float32)  # both directions share c_k
    e = jnp.exp(cos / sigma)
    mean_e = common.global_sum(jnp.sum(e), axis_name) / common.global_sum(
        jnp.float32(e.shape[0]), axis_name)
    pos = (2.0 - e / mean_e) * pos
  total = common.global_sum(jnp.sum(jax.nn.logsumexp(neg, axis=1) - pos), axis_name)
  return total / logits.shape[1]


def modality_contrastive_loss(img: jax.Array, txt: jax.Array, img_aug: jax.Array,
                              txt_aug: jax.Array, *, temperature,
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
  """
  common.check_embeddings(("img", "txt", "img_aug", "txt_aug"), img, txt, img_aug, txt_aug)
  common.check_positive("temperature", temperature)
  cross = _directional_ce(img, txt, temperature, axis_name, both=True)
  in_img = _directional_ce(img, img_aug, temperature, axis_name, both=False)
  in_txt = _directional_ce(txt, txt_aug, temperature, axis_name, both=False)
  return (2.0 * cross + in_img + in_txt) / 4.0


def infonce(anchors: jax.Array, keys: jax.Array, *, temperature,
            axis_name: Optional[str] = None) -> jax.Array:
  """One-directional InfoNCE: mean_i CE(anchors_i -> keys), keys_i positive. [B, D] each."""
  common.check_embeddings(("anchors", "keys"), anchors, keys)
  common.check_positive("temperature", temperature)
  return _directional_ce(anchors, keys, temperature, axis_name, both=False)


def momentum_distillation_loss(img: jax.Array, txt: jax.Array, img_m: jax.Array,
                               txt_m: jax.Array, *, temperature,
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
