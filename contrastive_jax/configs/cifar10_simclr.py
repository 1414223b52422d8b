"""CIFAR-10, SimCLR recipe: ResNet-18 with the CIFAR stem, NT-Xent, batch 512, LARS.

  python -m contrastive_jax.train --config configs/cifar10_simclr.py --workdir gs://B/runs/c10 \
      --config.data_dir=gs://B/tfds

Needs CIFAR-10 prepared as TFDS array_record in data_dir (docs/tpu.md). Recipe (Chen et
al. 2020, appendix B.9): 800 epochs, temperature 0.5, LARS with lr 0.3 x batch / 256 and
10 warm-up epochs, crops of 8-100 % of the image, flip, colour jitter of strength 0.5
(p 0.8), grayscale (p 0.2), no blur at 32 px. The host decodes and crops (4 grain worker
processes a host); the photometric augmentation runs on the accelerators.
Not trained to completion here (no accelerator): tests/test_configs_images.py trains it
a few steps on mock CIFAR-10.
"""

from typing import Optional

import ml_collections

from contrastive_jax.configs import base

TRAIN_SIZE = 50_000


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  c = base.get_config()
  c.task = "two_view"
  c.dataset = "cifar10"
  c.image_size = 32
  c.augment = ml_collections.ConfigDict(dict(
      crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True, jitter_prob=0.8,
      jitter=(0.4, 0.4, 0.4, 0.1), grayscale_prob=0.2, blur_prob=0.0, blur_sigma=1.0,
      solarize_prob=0.0, noise_std=0.0))
  c.model = "resnet18"  # CIFAR stem: 3x3 conv, no max-pool
  # The recipe's BatchNorm: statistics of the global batch (both views), running averages
  # in the state for evaluation.
  c.norm = "batch"
  c.dtype = "bfloat16"
  c.head_hidden = 2048
  c.proj_dim = 128
  base.add_loss(c, "nt_xent", temperature=0.5)
  c.batch_size = 512
  epochs = 800
  c.num_steps = epochs * TRAIN_SIZE // c.batch_size
  c.warmup_steps = 10 * TRAIN_SIZE // c.batch_size
  c.optimizer = "lars"
  c.learning_rate = 0.3
  c.lr_scaling = "linear"  # 0.3 x 512 / 256 = 0.6
  c.weight_decay = 1e-6
  c.data_threads = 4
  c.data_workers = 4
  c.log_every = 100
  c.checkpoint_every = 2000
  c.eval_batch_size = 1024
  c.knn_k = 200
  c.evals = base.evals(knn=dict(every=20_000, final=True), linear_probe=dict(final=True),
                       rank=dict(final=True))
  return base.variant(c, arg, batch_size=16, num_steps=2, eval_limit=32, eval_batch_size=16, knn_k=5, log_every=1, checkpoint_every=2, warmup_steps=1)
