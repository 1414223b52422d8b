"""Image-text pretraining on captioned digits: ALBEF-style fusion model (cross-attention
fusion encoder, ITM on hard negatives, MLM, momentum encoders, momentum distillation)
with the 4-term L_con ITC; the latent-structure regularisers are off unless set.

  python -m contrastive_jax.train --config configs/captions_albef.py --workdir runs/albef
"""

from typing import Optional

import ml_collections

from contrastive_jax.configs import base, captions_clip


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  c = captions_clip.get_config()
  c.task = "fusion"
  c.loss = "l_con"
  c.fusion = ml_collections.ConfigDict(dict(
      momentum=0.995,  # EMA of the momentum encoders
      itm_weight=1.0, mlm_weight=1.0, mlm_prob=0.15,
      distill_alpha=0.4))  # ALBEF's: ITC targets (1 - a) one-hot + a momentum softmax
  c.num_steps = 600  # 2 CPU cores: zero-shot still rises here (docs/results.md section 4)
  c.evals.fusion = dict(every=0, at_init=False, final=True)
  return base.variant(c, arg, batch_size=32, proj_dim=32, eval_limit=200, text=dict(width=32, depth=1))
