"""Image-text models: a CLIP-style two-tower model and an ALBEF-style fusion model.

TwoTower: image encoder + text transformer, projections, learnable temperature,
  optional modality-independent heads (feature separation).
Fusion (ALBEF-style): ViT image encoder (all tokens) and text transformer (the
  unimodal towers, as in TwoTower), plus a fusion encoder whose text tokens
  cross-attend to the image tokens, with an image-text-matching head and a
  masked-language-modelling head.
"""

from typing import Optional

import flax.linen as nn
import jax
from jax.typing import ArrayLike
import jax.numpy as jnp
import numpy as np

from contrastive_jax.models.encoders import ViT

PAD = 0  # token id of padding (data.captions.PAD)


class TextTransformer(nn.Module):
  """Tokens int32 [B, L] -> features [B, width] (the [CLS] position, pre-LayerNorm blocks)."""
  vocab_size: int
  max_len: int
  width: int = 64
  depth: int = 2
  heads: int = 4

  @nn.compact
  def __call__(self, tokens: jax.Array, sequence: bool = False) -> jax.Array:
    """[B, width] at [CLS], or the whole sequence [B, L, width] when `sequence`."""
    x = nn.Embed(self.vocab_size, self.width)(tokens)
    x = x + self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.width))
    mask = nn.make_attention_mask(tokens != PAD, tokens != PAD)  # padding is never attended
    for _ in range(self.depth):
      x = _Block(self.width, self.heads)(x, mask)
    x = nn.LayerNorm()(x)
    return x if sequence else x[:, 0]


class _Block(nn.Module):
  """Pre-LayerNorm transformer block; with `context`, a cross-attention sub-layer too."""
  width: int
  heads: int

  @nn.compact
  def __call__(self, x, mask=None, context=None):
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads)(y, y, mask=mask)
    if context is not None:
      y = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(self.heads)(y, context)
    y = nn.LayerNorm()(x)
    return x + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(y)))


class TwoTower(nn.Module):
  """(images [B, H, W, C], tokens [B, L]) -> dict of [B, proj_dim] embeddings.

  encode_image / encode_text: inputs -> (encoder features, embedding, independent
  embedding or None), the same triple as `Fusion`'s (whose features are sequences).

  img, txt: shared (contrastive) embeddings; img_ind, txt_ind: modality-independent
  embeddings from their own heads when `separate`; image_features: the encoder's
  features (linear probe); logit_scale: the learnable 1 / temperature (log).
  """
  image_encoder: nn.Module
  text_encoder: TextTransformer
  proj_dim: int = 64
  separate: bool = False
  init_temperature: float = 0.07

  def setup(self) -> None:
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

  def encode_text(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    f = self.text_encoder(tokens)
    return f, self.txt_proj(f), self.txt_ind(f) if self.separate else None

  def temperature(self) -> jax.Array:
    # CLIP clips the scale at 100 (temperature >= 0.01) for stability.
    return 1.0 / jnp.exp(jnp.minimum(self.log_scale, np.log(100.0)))

  def __call__(self, images: jax.Array, tokens: jax.Array) -> dict:
    features, img, img_ind = self.encode_image(images)
    _, txt, txt_ind = self.encode_text(tokens)
    out = {"img": img, "txt": txt, "image_features": features,
           "temperature": self.temperature()}
    if self.separate:
      out.update(img_ind=img_ind, txt_ind=txt_ind)
    return out


class Fusion(nn.Module):
  """ALBEF-style model: unimodal towers + cross-attention fusion encoder.

  encode_image: images -> (image tokens [B, T, W], img [B, P], img_ind or None)
  encode_text: tokens -> (text sequence [B, L, W], txt [B, P], txt_ind or None)
  fuse: (image tokens, text tokens int32 [B, L]) -> fused sequence [B, L, W]
  itm: fused [CLS] -> match logits [B, 2]; mlm: fused sequence -> vocab logits.
  """
  vocab_size: int
  max_len: int
  width: int = 64
  depth: int = 2
  fusion_depth: int = 2
  heads: int = 4
  proj_dim: int = 64
  separate: bool = False
  init_temperature: float = 0.07

  def setup(self) -> None:
    self.image_encoder = ViT(patch=8, width=self.width, depth=self.depth, heads=self.heads,
                             sequence=True)
    self.text_encoder = TextTransformer(self.vocab_size, self.max_len, self.width, self.depth,
                                        self.heads)
    self.fusion = [_Block(self.width, self.heads) for _ in range(self.fusion_depth)]
    self.fusion_norm = nn.LayerNorm()
    self.img_proj = nn.Dense(self.proj_dim)
    self.txt_proj = nn.Dense(self.proj_dim)
    if self.separate:
      self.img_ind = nn.Dense(self.proj_dim)
      self.txt_ind = nn.Dense(self.proj_dim)
    self.itm_head = nn.Dense(2)
    self.mlm_head = nn.Dense(self.vocab_size)
    self.log_scale = self.param("logit_scale", nn.initializers.constant(
        np.log(1.0 / self.init_temperature)), ())

  def encode_image(self, images: ArrayLike) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    t = self.image_encoder(images)
    return t, self.img_proj(t[:, 0]), self.img_ind(t[:, 0]) if self.separate else None

  def encode_text(self, tokens: ArrayLike) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    seq = self.text_encoder(tokens, sequence=True)
    return seq, self.txt_proj(seq[:, 0]), self.txt_ind(seq[:, 0]) if self.separate else None

  def fuse(self, image_tokens: jax.Array, text_seq: jax.Array, tokens: ArrayLike) -> jax.Array:
    """Text sequence [B, L, W] (from encode_text of `tokens`) cross-attending to the image."""
    x = text_seq
    mask = nn.make_attention_mask(tokens != PAD, tokens != PAD)
    for block in self.fusion:
      x = block(x, mask, context=image_tokens)
    return self.fusion_norm(x)

  def itm(self, fused: jax.Array) -> jax.Array:
    return self.itm_head(fused[:, 0])

  def mlm(self, fused: jax.Array) -> jax.Array:
    return self.mlm_head(fused)

  def temperature(self) -> jax.Array:
    return 1.0 / jnp.exp(jnp.minimum(self.log_scale, np.log(100.0)))

  def __call__(self, images, tokens):
    image_tokens, img, img_ind = self.encode_image(images)
    seq, txt, txt_ind = self.encode_text(tokens)
    fused = self.fuse(image_tokens, seq, tokens)
    out = {"img": img, "txt": txt, "image_features": image_tokens[:, 0],
           "temperature": self.temperature(), "itm": self.itm(fused), "mlm": self.mlm(fused)}
    if self.separate:
      out.update(img_ind=img_ind, txt_ind=txt_ind)
    return out
