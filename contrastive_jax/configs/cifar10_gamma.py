"""CIFAR-10, the SimCLR recipe of cifar10_simclr.py with the gamma loss in place of
NT-Xent, at a quarter of the batch (128): the small-batch setting the loss is for.

  python -m contrastive_jax.train --config configs/cifar10_gamma.py --workdir gs://B/runs/c10g \
      --config.data_dir=gs://B/tfds
"""

from typing import Optional

import ml_collections

from contrastive_jax.configs import base, cifar10_simclr


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  c = cifar10_simclr.get_config()
  c.loss = "gamma"
  c.temperature = 0.2
  c.batch_size = 128
  c.num_steps = 800 * cifar10_simclr.TRAIN_SIZE // c.batch_size  # equal epochs
  c.warmup_steps = 10 * cifar10_simclr.TRAIN_SIZE // c.batch_size
  return base.variant(c, arg, batch_size=16, num_steps=2, eval_limit=32, eval_batch_size=16, knn_k=5, log_every=1, checkpoint_every=2, warmup_steps=1)
