"""CLIP-style two-tower model: image encoder + text transformer, projections,
learnable temperature, and optional modality-independent heads (feature separation).
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PAD = 0  # token id of padding (data.captions.PAD)


class TextTransformer(nn.Module):
  """Tokens int32 [B, L] -> features [B, width] (the [CLS] position, pre-LayerNorm blocks)."""
  vocab_size: int
  max_len: int
  width: int = 64
  depth: int = 2
  heads: int = 4

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab_size, self.width)(tokens)
    x = x + self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.width))
    mask = nn.make_attention_mask(tokens != PAD, tokens != PAD)  # padding is never attended
    for _ in range(self.depth):
      y = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(self.heads)(y, y, mask=mask)
      y = nn.LayerNorm()(x)
      x = x + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(y)))
    return nn.LayerNorm()(x[:, 0])


class TwoTower(nn.Module):
  """(images [B, H, W, C], tokens [B, L]) -> dict of [B, proj_dim] embeddings.

  img, txt: shared (contrastive) embeddings; img_ind, txt_ind: modality-independent
  embeddings from their own heads when `separate`; image_features: the encoder's
  features (linear probe); logit_scale: the learnable 1 / temperature (log).
  """
  image_encoder: nn.Module
  text_encoder: TextTransformer
  proj_dim: int = 64
  separate: bool = False
  init_temperature: float = 0.07

  def setup(self):
    self.img_proj = nn.Dense(self.proj_dim)
    self.txt_proj = nn.Dense(self.proj_dim)
    if self.separate:
      self.img_ind = nn.Dense(self.proj_dim)
      self.txt_ind = nn.Dense(self.proj_dim)
    self.log_scale = self.param("logit_scale", nn.initializers.constant(
        np.log(1.0 / self.init_temperature)), ())

  def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    f = self.image_encoder(images)
    return f, self.img_proj(f), self.img_ind(f) if self.separate else None

  def encode_text(self, tokens: jax.Array) -> tuple[jax.Array, Optional[jax.Array]]:
    f = self.text_encoder(tokens)
    return self.txt_proj(f), self.txt_ind(f) if self.separate else None

  def temperature(self) -> jax.Array:
    # CLIP clips the scale at 100 (temperature >= 0.01) for stability.
    return 1.0 / jnp.exp(jnp.minimum(self.log_scale, np.log(100.0)))

  def __call__(self, images: jax.Array, tokens: jax.Array) -> dict:
    features, img, img_ind = self.encode_image(images)
    txt, txt_ind = self.encode_text(tokens)
    out = {"img": img, "txt": txt, "image_features": features,
           "temperature": self.temperature()}
    if self.separate:
      out.update(img_ind=img_ind, txt_ind=txt_ind)
    return out
