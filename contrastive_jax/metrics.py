"""Geometry of embeddings: normalisation, modality gap, alignment, uniformity, rank.

All functions are pure JAX, take raw embeddings of shape [B, D] (they normalise
themselves unless told otherwise) and return scalars, so they run under `jit`
and inside a training step. References:
  Wang & Isola, "Understanding contrastive representation learning through
  alignment and uniformity on the hypersphere", ICML 2020.
  Liang et al., "Mind the Gap: understanding the modality gap in multi-modal
  contrastive representation learning", NeurIPS 2022.
  Roy & Vetterli, "The effective rank", EUSIPCO 2007.
"""

import functools

import jax
import jax.numpy as jnp

# Below this norm a vector is treated as zero: normalising it gives zero, not NaN.
_NORM_EPS = 1e-6


def l2_normalize(x: jax.Array, eps: float = _NORM_EPS) -> jax.Array:
  """Scales each row of `x` [..., D] to unit L2 norm; rows of norm < eps scale by 1/eps.

  The norm is computed in float32 (bfloat16 sums of squares lose precision) and
  the result is returned in the input dtype. A zero row stays zero and has a
  finite gradient.
  """
  x32 = x.astype(jnp.float32)
  sq = jnp.sum(x32 * x32, axis=-1, keepdims=True)
  return (x32 * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))).astype(x.dtype)


def modality_gap(img: jax.Array, txt: jax.Array) -> jax.Array:
  """|| mean(normalise(img)) - mean(normalise(txt)) ||, img [B, D], txt [B', D].

  Liang et al. (2022) measure 0.82 for pretrained CLIP.
  """
  return jnp.linalg.norm(
      jnp.mean(l2_normalize(img).astype(jnp.float32), 0)
      - jnp.mean(l2_normalize(txt).astype(jnp.float32), 0))


def paired_distance(img: jax.Array, txt: jax.Array) -> jax.Array:
  """mean_j || img_j - txt_j || over matched rows of normalised img, txt [B, D]."""
  d = l2_normalize(img).astype(jnp.float32) - l2_normalize(txt).astype(jnp.float32)
  return jnp.mean(jnp.sqrt(jnp.sum(d * d, -1) + 1e-12))


def alignment(z1: jax.Array, z2: jax.Array, alpha: float = 2.0) -> jax.Array:
  """mean_j || z1_j - z2_j ||^alpha over positive pairs z1, z2 [B, D] (normalised)."""
  d = l2_normalize(z1).astype(jnp.float32) - l2_normalize(z2).astype(jnp.float32)
  return jnp.mean(jnp.sum(d * d, -1) ** (alpha / 2))


def uniformity(z: jax.Array, t: float = 2.0) -> jax.Array:
  """log mean_{j != k} exp(-t || z_j - z_k ||^2) over normalised z [B, D], B >= 2.

  Uses ||a - b||^2 = 2 - 2 <a, b> for unit vectors, so no [B, B, D] tensor.
  """
  z = l2_normalize(z).astype(jnp.float32)
  b = z.shape[0]
  sq = jnp.maximum(2.0 - 2.0 * z @ z.T, 0.0)
  logits = jnp.where(jnp.eye(b, dtype=bool), -jnp.inf, -t * sq)
  return jax.nn.logsumexp(logits) - jnp.log(b * (b - 1.0))


@functools.partial(jax.jit, static_argnames="center")
def effective_rank(z: jax.Array, center: bool = True) -> jax.Array:
  """exp(entropy of the normalised singular values) of z [B, D]; in [1, min(B, D)].

  A collapse detector: near 1 when all embeddings lie on a line, near D when
  they fill the space evenly.
  """
  z = z.astype(jnp.float32)
  if center:
    z = z - jnp.mean(z, 0)
  s = jnp.linalg.svd(z, compute_uv=False)
  p = s / jnp.maximum(jnp.sum(s), 1e-12)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def rank(z: jax.Array, rtol: float = 1e-3) -> jax.Array:
  """Number of singular values of centred z [B, D] above rtol * the largest."""
  z = z.astype(jnp.float32)
  s = jnp.linalg.svd(z - jnp.mean(z, 0), compute_uv=False)
  return jnp.sum(s > rtol * s[0])
