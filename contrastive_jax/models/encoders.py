"""Flax image encoders and the projection head, chosen by name.

Encoders map images [B, H, W, C] to features [B, F]. Parameters are float32; `dtype` is
the compute dtype of activations and matmuls (bfloat16 on TPU and recent GPUs). The
ResNets normalise with GroupNorm (default: no batch statistics to synchronise or carry,
nothing shared between the examples of a small contrastive batch) or BatchNorm (the
SimCLR / SogCLR recipes), whose statistics are the batch the model is applied to: under
`jit` on a batch-sharded global array that is the global batch, on any mesh and process
count. BatchNorm's running averages live in the `batch_stats` collection; `train=False`
normalises with them.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

NORMS = ("group", "batch")
# Under the two-view task's vmap over the two views: BatchNorm averages its statistics
# over both views, as one batch of 2B (SimCLR's concatenated views).
VIEWS_AXIS = "views"


def _norm(kind: str, groups: int, train: bool, dtype: Any, axis_name: Optional[str]
          ) -> nn.Module:
  """GroupNorm(groups), or BatchNorm with momentum 0.9 (the flax ImageNet example's),
  batch statistics when training and the running averages otherwise."""
  if kind == "group":
    return nn.GroupNorm(num_groups=groups, dtype=dtype)
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, axis_name=axis_name)
  raise ValueError(f"unknown norm {kind!r}: set --config.norm to one of {NORMS}")


class MLP(nn.Module):
  """Flatten, then Dense-ReLU layers: the CPU-friendly encoder for 8x8 / 28x28 digits."""
  hidden: Sequence[int] = (512, 256)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden[:-1]:
      x = nn.relu(nn.Dense(h, dtype=self.dtype)(x))
    return nn.Dense(self.hidden[-1], dtype=self.dtype)(x)


class SmallCNN(nn.Module):
  """Three 3x3 conv blocks (stride 1, 2, 2) with GroupNorm, global average pool."""
  widths: Sequence[int] = (32, 64, 128)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    for i, w in enumerate(self.widths):
      x = nn.Conv(w, (3, 3), strides=1 if i == 0 else 2, dtype=self.dtype)(x)
      x = nn.relu(nn.GroupNorm(num_groups=min(8, w), dtype=self.dtype)(x))
    return jnp.mean(x, axis=(1, 2))


class _Block(nn.Module):
  width: int
  stride: int
  bottleneck: bool
  norm: str = "group"
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = lambda groups=min(32, self.width): _norm(self.norm, groups, train, self.dtype,
                                                    self.axis_name)
    conv = lambda *a, **k: nn.Conv(*a, use_bias=self.norm != "batch", dtype=self.dtype, **k)
    out_width = self.width * (4 if self.bottleneck else 1)
    if self.bottleneck:
      y = nn.relu(norm()(conv(self.width, (1, 1))(x)))
      y = nn.relu(norm()(conv(self.width, (3, 3), strides=self.stride)(y)))
      y = norm(32)(conv(out_width, (1, 1))(y))
    else:
      y = nn.relu(norm()(conv(self.width, (3, 3), strides=self.stride)(x)))
      y = norm()(conv(self.width, (3, 3))(y))
    if x.shape[-1] != out_width or self.stride != 1:
      x = norm(32)(conv(out_width, (1, 1), strides=self.stride)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet-18/50 with GroupNorm or BatchNorm (`norm`). `small_input` (CIFAR-style stem)
  for images <= 64 px. With BatchNorm the convolutions have no bias (the norm's shift
  replaces it) and `axis_name` names a vmapped axis whose statistics are shared."""
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  small_input: bool = True
  norm: str = "group"
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = lambda: _norm(self.norm, 32, train, self.dtype, self.axis_name)
    stem = (nn.Conv(64, (3, 3), use_bias=self.norm != "batch", dtype=self.dtype)
            if self.small_input else
            nn.Conv(64, (7, 7), strides=2, use_bias=self.norm != "batch", dtype=self.dtype))
    x = nn.relu(norm()(stem(x)))
    if not self.small_input:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        x = _Block(64 * 2**i, 2 if (i > 0 and j == 0) else 1, self.bottleneck, self.norm,
                   self.dtype, self.axis_name)(x, train)
    return jnp.mean(x, axis=(1, 2))


class ViT(nn.Module):
  """Vision Transformer (pre-LN) with a class token; returns the token's final feature
  [B, width], or every token [B, 1 + patches, width] (class token first) when `sequence`."""
  patch: int = 4
  width: int = 192
  depth: int = 12
  heads: int = 3
  sequence: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    dt = self.dtype
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID",
                dtype=dt)(x)
    x = x.reshape(x.shape[0], -1, self.width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width)).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.width)
                       ).astype(x.dtype)
    for _ in range(self.depth):
      y = nn.LayerNorm(dtype=dt)(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=dt)(y, y)
      y = nn.LayerNorm(dtype=dt)(x)
      x = x + nn.Dense(self.width, dtype=dt)(nn.gelu(nn.Dense(4 * self.width, dtype=dt)(y)))
    x = nn.LayerNorm(dtype=dt)(x)  # per token: the same as normalising the class token alone
    return x if self.sequence else x[:, 0]


class ContrastiveModel(nn.Module):
  """Encoder + MLP projection head: images [B, H, W, C] -> (features [B, F], z [B, P]),
  both in the compute dtype."""
  encoder: nn.Module
  head_hidden: int = 256
  proj_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    features = self.encoder(x.astype(self.dtype), train)
    # The projection is created first, so it is Dense_0 and the hidden layer Dense_1: the
    # names (and so the initialisation) that every checkpoint so far holds.
    projection = nn.Dense(self.proj_dim, dtype=self.dtype)
    hidden = nn.relu(nn.Dense(self.head_hidden, dtype=self.dtype)(features))
    return features, projection(hidden)


# name -> (dtype, norm, axis_name) -> encoder; only the ResNets take a norm.
ENCODERS = {
    "mlp": lambda dt, norm, ax: MLP(dtype=dt),
    "small_cnn": lambda dt, norm, ax: SmallCNN(dtype=dt),
    "resnet18": lambda dt, norm, ax: ResNet((2, 2, 2, 2), False, True, norm, dt, ax),
    "resnet50": lambda dt, norm, ax: ResNet((3, 4, 6, 3), True, False, norm, dt, ax),
    "vit_ti": lambda dt, norm, ax: ViT(width=192, depth=12, heads=3, dtype=dt),
    "vit_s": lambda dt, norm, ax: ViT(width=384, depth=12, heads=6, dtype=dt),
    "vit_s16": lambda dt, norm, ax: ViT(width=384, depth=12, heads=6, patch=16, dtype=dt),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """The jnp dtype of a config's `dtype` name (float32 | bfloat16)."""
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}: set --config.dtype to one of {sorted(DTYPES)}")
  return DTYPES[name]


def get_model(name: str, head_hidden: int = 256, proj_dim: int = 128, *,
              dtype: str = "float32", norm: str = "group",
              axis_name: Optional[str] = None) -> ContrastiveModel:
  """The encoder `name` with a projection head. dtype: compute dtype (parameters stay
  float32). norm: "group" or "batch", for the ResNets (the others have their own).
  axis_name: a vmapped axis that BatchNorm's statistics also average over."""
  if name not in ENCODERS:
    raise ValueError(f"unknown model {name!r}: set --config.model to one of {sorted(ENCODERS)}")
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}: set --config.norm to one of {NORMS}")
  if norm == "batch" and not name.startswith("resnet"):
    raise ValueError(f"--config.norm=batch is for the ResNets; model {name!r} has its own "
                     "normalisation: use norm=group")
  dt = compute_dtype(dtype)
  return ContrastiveModel(ENCODERS[name](dt, norm, axis_name), head_hidden=head_hidden,
                          proj_dim=proj_dim, dtype=dt)
