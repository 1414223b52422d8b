"""Image-text two-tower model with the gamma ITC (`gamma_clip`): each device uses its
local negatives only, so no embedding crosses devices; regularisers off.

  python -m contrastive_jax.train --config configs/captions_gamma.py --workdir runs/gamma_clip
"""

from typing import Optional

import ml_collections

from contrastive_jax.configs import base, captions_clip


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  c = captions_clip.get_config()
  c.loss = "gamma_clip"  # uses the fixed temperature (its denominators depend on it)
  return base.variant(c, arg, batch_size=32, proj_dim=32, eval_limit=200, text=dict(width=32, depth=1))
