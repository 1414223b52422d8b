"""Contrastive losses: pure functions `(embeddings..., *, options) -> scalar`.

Stateful losses take their state and return `(loss, new_state)`. Every loss
normalises its raw inputs, works under jit/grad/vmap, and inside `shard_map`
when given `axis_name` (see `common` for the sharding convention). `registry`
maps names to losses for trainers.
"""

from contrastive_jax.losses import registry
from contrastive_jax.losses.common import OptionError, Scalar
from contrastive_jax.losses.gamma import (
    decomposable_loss, gamma_clip_loss, gamma_loss, init_gamma_state)
from contrastive_jax.losses.infonce import (
    clip_loss, dcl_loss, infonce, modality_contrastive_loss, momentum_distillation_loss,
    nt_xent)
from contrastive_jax.losses.sigmoid import sigmoid_loss
from contrastive_jax.losses.sogclr import init_sogclr_state, sogclr_loss
from contrastive_jax.losses.structure import (
    brownian_bridge_loss, feature_separation_loss, geometric_consistency_loss)

__all__ = [
    "brownian_bridge_loss", "clip_loss", "dcl_loss", "decomposable_loss", "feature_separation_loss",
    "gamma_clip_loss", "gamma_loss", "geometric_consistency_loss", "infonce",
    "init_gamma_state", "init_sogclr_state", "modality_contrastive_loss",
    "momentum_distillation_loss", "nt_xent", "OptionError", "registry", "Scalar", "sigmoid_loss",
    "sogclr_loss",
]
