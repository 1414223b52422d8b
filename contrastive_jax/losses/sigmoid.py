"""Pairwise sigmoid loss of SigLIP (Zhai et al., "Sigmoid Loss for Language Image
Pre-Training", ICCV 2023)."""

from typing import Optional

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common
from contrastive_jax.losses.common import Scalar
from contrastive_jax.losses import streamed
from contrastive_jax.metrics import l2_normalize


def sigmoid_loss(img: jax.Array, txt: jax.Array, *, temperature: Scalar, bias: Scalar,
                 chunk_size: Optional[int] = None, axis_name: Optional[str] = None) -> jax.Array:
  """SigLIP: every (img_i, txt_j) pair is an independent binary classification.

    loss = -(1/B) sum_{i,j} log sigmoid( y_ij * (cos(img_i, txt_j) / temperature + bias) ),
  y_ij = +1 on the diagonal, -1 elsewhere. SigLIP's t = 10, b = -10 initialisation
  is temperature = 0.1, bias = -10.

  Args:
    img, txt: [B, D] raw embeddings of paired examples.
    temperature: > 0, may be traced (learnable). bias: scalar, may be traced.
    chunk_size: None (automatic) or the key chunk to stream over: see `streamed`.
    axis_name: mesh axis to gather the text keys over inside `shard_map`.
  Returns:
    float32 scalar: the mean over the global batch (already averaged over devices).

  References:
    X. Zhai, B. Mustafa, A. Kolesnikov, L. Beyer, "Sigmoid Loss for Language Image
      Pre-Training" (SigLIP), ICCV 2023.

  Examples:
    >>> import jax
    >>> from contrastive_jax import losses
    >>> img, txt = jax.random.normal(jax.random.key(0), (2, 8, 4))
    >>> float(losses.sigmoid_loss(img, txt, temperature=0.1, bias=-10.0)) > 0
    True
  """
  common.check_embeddings(("img", "txt"), img, txt)
  common.check_positive("temperature", temperature)
  # -log sigmoid(-x) = softplus(x) for every pair, and -log sigmoid(x) = softplus(x) - x:
  # the positives subtract their x.
  u_img, u_txt = l2_normalize(img), l2_normalize(txt)
  keys, _ = common.gather_keys(u_txt, axis_name)
  inv_t, bias = common.inverse_temperature(temperature), jnp.asarray(bias, jnp.float32)
  total = streamed.softplus_sum(u_img, keys, inv_t, bias, chunk_size=chunk_size)
  total -= jnp.sum(common.positive_scores(u_img, u_txt, inv_t) + bias)
  return common.global_sum(total, axis_name) / keys.shape[0]
