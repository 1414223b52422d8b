"""Image-text two-tower model with the gamma ITC (`gamma_clip`): each device uses its
local negatives only, so no embedding crosses devices; regularisers off.

  python -m contrastive_jax.train --config configs/captions_gamma.py --workdir runs/gamma_clip
"""

import ml_collections

from configs import captions_clip


def get_config() -> ml_collections.ConfigDict:
  c = captions_clip.get_config()
  c.loss = "gamma_clip"  # uses the fixed temperature (its denominators depend on it)
  return c
