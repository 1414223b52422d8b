"""Flax image encoders and the projection head, chosen by name.

Encoders map images [B, H, W, C] to features [B, F]. Normalisation is
GroupNorm/LayerNorm, not BatchNorm: no batch statistics to synchronise across
devices or carry in the train state, and nothing that leaks information between
the examples of a small contrastive batch.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Flatten, then Dense-ReLU layers: the CPU-friendly encoder for 8x8 / 28x28 digits."""
  hidden: Sequence[int] = (512, 256)

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden[:-1]:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.hidden[-1])(x)


class SmallCNN(nn.Module):
  """Three 3x3 conv blocks (stride 1, 2, 2) with GroupNorm, global average pool."""
  widths: Sequence[int] = (32, 64, 128)

  @nn.compact
  def __call__(self, x):
    for i, w in enumerate(self.widths):
      x = nn.Conv(w, (3, 3), strides=1 if i == 0 else 2)(x)
      x = nn.relu(nn.GroupNorm(num_groups=min(8, w))(x))
    return jnp.mean(x, axis=(1, 2))


class _Block(nn.Module):
  width: int
  stride: int
  bottleneck: bool

  @nn.compact
  def __call__(self, x):
    norm = lambda: nn.GroupNorm(num_groups=min(32, self.width))
    out_width = self.width * (4 if self.bottleneck else 1)
    if self.bottleneck:
      y = nn.relu(norm()(nn.Conv(self.width, (1, 1))(x)))
      y = nn.relu(norm()(nn.Conv(self.width, (3, 3), strides=self.stride)(y)))
      y = nn.GroupNorm(num_groups=32)(nn.Conv(out_width, (1, 1))(y))
    else:
      y = nn.relu(norm()(nn.Conv(self.width, (3, 3), strides=self.stride)(x)))
      y = norm()(nn.Conv(self.width, (3, 3))(y))
    if x.shape[-1] != out_width or self.stride != 1:
      x = nn.GroupNorm(num_groups=32)(nn.Conv(out_width, (1, 1), strides=self.stride)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet-18/50 with GroupNorm. `small_input` (CIFAR-style stem) for images <= 64 px."""
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  small_input: bool = True

  @nn.compact
  def __call__(self, x):
    if self.small_input:
      x = nn.relu(nn.GroupNorm(num_groups=32)(nn.Conv(64, (3, 3))(x)))
    else:
      x = nn.relu(nn.GroupNorm(num_groups=32)(nn.Conv(64, (7, 7), strides=2)(x)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        x = _Block(64 * 2**i, 2 if (i > 0 and j == 0) else 1, self.bottleneck)(x)
    return jnp.mean(x, axis=(1, 2))


class ViT(nn.Module):
  """Vision Transformer (pre-LN) with a class token; returns the token's final feature
  [B, width], or every token [B, 1 + patches, width] (class token first) when `sequence`."""
  patch: int = 4
  width: int = 192
  depth: int = 12
  heads: int = 3
  sequence: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID")(x)
    x = x.reshape(x.shape[0], -1, self.width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
    for _ in range(self.depth):
      y = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(y, y)
      y = nn.LayerNorm()(x)
      x = x + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(y)))
    x = nn.LayerNorm()(x)  # per token: the same as normalising the class token alone
    return x if self.sequence else x[:, 0]


class ContrastiveModel(nn.Module):
  """Encoder + MLP projection head: images [B, H, W, C] -> (features [B, F], z [B, P])."""
  encoder: nn.Module
  head_hidden: int = 256
  proj_dim: int = 128

  @nn.compact
  def __call__(self, x):
    features = self.encoder(x)
    z = nn.Dense(self.proj_dim)(nn.relu(nn.Dense(self.head_hidden)(features)))
    return features, z


ENCODERS = {
    "mlp": lambda: MLP(),
    "small_cnn": lambda: SmallCNN(),
    "resnet18": lambda: ResNet((2, 2, 2, 2), bottleneck=False),
    "resnet50": lambda: ResNet((3, 4, 6, 3), bottleneck=True, small_input=False),
    "vit_ti": lambda: ViT(width=192, depth=12, heads=3),
    "vit_s": lambda: ViT(width=384, depth=12, heads=6),
    "vit_s16": lambda: ViT(width=384, depth=12, heads=6, patch=16),  # ViT-S/16, 224 px
}


def get_model(name: str, head_hidden: int = 256, proj_dim: int = 128) -> ContrastiveModel:
  if name not in ENCODERS:
    raise ValueError(f"unknown model {name!r}: set --config.model to one of {sorted(ENCODERS)}")
  return ContrastiveModel(ENCODERS[name](), head_hidden=head_hidden, proj_dim=proj_dim)
