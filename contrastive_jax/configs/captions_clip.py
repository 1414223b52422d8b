"""Image-text pretraining on captioned digits: CLIP-style two-tower model with a
learnable temperature, symmetric InfoNCE; the latent-structure regularisers are
off (weight 0) unless set.

  python -m contrastive_jax.train --config configs/captions_clip.py --workdir runs/clip \\
      [--config.weights.br=1.0] [--config.loss=l_con]
"""

from typing import Optional

import ml_collections

from contrastive_jax.configs import base


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  c = base.get_config()
  c.task = "two_tower"
  c.dataset = "captioned_digits"
  c.model = "mlp"  # image encoder
  c.text = ml_collections.ConfigDict(dict(width=64, depth=2))  # text transformer
  c.proj_dim = 64
  base.add_loss(c, "clip", temperature=0.1)  # fixed t: stateful ITCs, learn_temperature=False
  c.learn_temperature = True
  c.weights = ml_collections.ConfigDict(dict(sep=0.0, br=0.0, gc=0.0, align=0.0))
  c.bridge_t = 0.25
  c.noise_std = 0.1  # augmented image: pixel noise and brightness jitter, on device
  c.num_steps = 800
  c.warmup_steps = 50
  c.eval_limit = 2000  # probes fit on 2000 train images / captions; all 1000 test
  c.evals = base.evals(zero_shot=dict(at_init=True, final=True),
                       retrieval=dict(at_init=True, final=True),
                       gap=dict(at_init=True, final=True), probes=dict(final=True))
  return base.variant(c, arg, batch_size=32, proj_dim=32, eval_limit=200, text=dict(width=32, depth=1))
