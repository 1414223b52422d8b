"""Pairwise sigmoid loss of SigLIP (Zhai et al., "Sigmoid Loss for Language Image
Pre-Training", ICCV 2023)."""

from typing import Optional

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common


def sigmoid_loss(img: jax.Array, txt: jax.Array, *, temperature, bias,
                 axis_name: Optional[str] = None) -> jax.Array:
  """SigLIP: every (img_i, txt_j) pair is an independent binary classification.

    loss = -(1/B) sum_{i,j} log sigmoid( y_ij * (cos(img_i, txt_j) / temperature + bias) ),
  y_ij = +1 on the diagonal, -1 elsewhere. SigLIP's t = 10, b = -10 initialisation
  is temperature = 0.1, bias = -10.

  Args:
    img, txt: [B, D] raw embeddings of paired examples.
    temperature: > 0, may be traced (learnable). bias: scalar, may be traced.
    axis_name: mesh axis to gather the text keys over inside `shard_map`.
  Returns:
    float32 scalar.
  """
  common.check_embeddings(("img", "txt"), img, txt)
  common.check_positive("temperature", temperature)
  keys, offset = common.gather_keys(txt, axis_name)
  logits = common.similarity(img, keys, temperature) + jnp.asarray(bias, jnp.float32)
  rows = jnp.arange(img.shape[0]) + offset
  labels = 2.0 * jax.nn.one_hot(rows, keys.shape[0], dtype=jnp.float32) - 1.0
  total = common.global_sum(-jnp.sum(jax.nn.log_sigmoid(labels * logits)), axis_name)
  return total / keys.shape[0]
