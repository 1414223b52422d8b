"""Contrastive losses: pure functions `(embeddings..., *, options) -> scalar`.

Stateful losses take their state and return `(loss, new_state)`. Every loss
normalises its raw inputs, works under jit/grad/vmap, and inside `shard_map`
when given `axis_name` (see `common` for the sharding convention). `registry`
maps names to losses for trainers.

Dtypes. Inputs may be any floating dtype. Norms, log-sum-exps, the running estimates of
the stateful losses and every output are float32. The similarity products take their
operands in the input's dtype and accumulate in float32 (`preferred_element_type`), so
bfloat16 embeddings keep bfloat16 matmuls. float64 inputs (under `jax_enable_x64`) are
computed in float32 too and return float32: the references in tests/ are where float64
lives.
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
