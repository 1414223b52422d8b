"""Image-text pretraining on captioned digits with the trainer (checkpoints, sharding,
multi-process): CLIP-style two-tower with learnable temperature; the latent-structure
regularisers are off (weights 0) unless set.

  python -m contrastive_jax.train --config configs/captions_clip.py --workdir runs/clip \
      [--config.multimodal.weights.br=1.0] [--config.multimodal.framework=albef \
       --config.multimodal.itc=l_con]
"""

import ml_collections

from configs import mnist_gamma
from contrastive_jax import multimodal


def get_config() -> ml_collections.ConfigDict:
  c = mnist_gamma.get_config()
  c.dataset = "captioned_digits"
  c.multimodal = multimodal.get_config()  # framework, itc, weights, towers, augmentation
  # The multimodal block's own seed / steps / batch / lr are those of its in-memory
  # `multimodal.train`; under the trainer the top-level fields below apply.
  c.batch_size = 128
  c.num_steps = 800
  c.learning_rate = 1e-3
  c.warmup_steps = 50
  c.knn_k = 20
  c.eval_limit = 2000  # probes fit on 2000 train captions/images; all 1000 test
  return c
