"""ImageNet, ResNet-50 at 224 px, NT-Xent, batch 4096, LARS (SimCLR's ImageNet recipe).

  python -m contrastive_jax.train --config configs/imagenet_resnet50.py \
      --workdir gs://B/runs/in_r50 --config.data_dir=gs://B/tfds

Needs `imagenet2012` prepared as TFDS array_record in data_dir (docs/tpu.md); its JPEGs
vary in size. Each host decodes (at a reduced DCT scale when the crop allows) and crops
to 224 in 32 grain worker processes; flip, colour jitter (strength 1.0, p 0.8),
grayscale (0.2), blur (0.5) and solarize (0.1) run on the accelerators. 100 epochs,
temperature 0.1, LARS lr 0.3 x batch / 256 with 10 warm-up epochs, weight decay 1e-6.
Evaluation: the central 87.5 % crop; kNN and linear probe on a 100k-image subset of
train. Not trained here (no accelerator): tests/test_configs_images.py trains it a few
steps on mock ImageNet images of varying size.
"""

from typing import Optional

import ml_collections

from contrastive_jax.configs import base

TRAIN_SIZE = 1_281_167


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  c = base.get_config()
  c.task = "two_view"
  c.dataset = "imagenet2012"
  c.eval_split = "validation"
  c.image_size = 224
  c.eval_crop_fraction = 0.875
  c.augment = ml_collections.ConfigDict(dict(
      crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True, jitter_prob=0.8,
      jitter=(0.8, 0.8, 0.8, 0.2), grayscale_prob=0.2, blur_prob=0.5, blur_sigma=2.0,
      solarize_prob=0.1, noise_std=0.0))
  c.model = "resnet50"
  # The recipe's BatchNorm: statistics of the global batch (both views), running averages
  # in the state for evaluation.
  c.norm = "batch"
  c.dtype = "bfloat16"
  c.head_hidden = 2048
  c.proj_dim = 128
  base.add_loss(c, "nt_xent", temperature=0.1)
  c.batch_size = 4096
  epochs = 100
  c.num_steps = epochs * TRAIN_SIZE // c.batch_size
  c.warmup_steps = 10 * TRAIN_SIZE // c.batch_size
  c.optimizer = "lars"
  c.learning_rate = 0.3
  c.lr_scaling = "linear"  # 0.3 x 4096 / 256 = 4.8
  c.weight_decay = 1e-6
  c.data_threads = 8
  c.data_workers = 32
  c.data_cache = False  # 140 GB of JPEGs: read from array_record
  c.log_every = 100
  c.checkpoint_every = 1000
  c.eval_limit = 100_000
  c.eval_batch_size = 1024
  c.knn_k = 20
  c.evals = base.evals(knn=dict(final=True), linear_probe=dict(final=True),
                       rank=dict(final=True))
  return base.variant(c, arg, batch_size=16, num_steps=2, eval_limit=32, eval_batch_size=16, knn_k=5, log_every=1, checkpoint_every=2, warmup_steps=1, image_size=32)
