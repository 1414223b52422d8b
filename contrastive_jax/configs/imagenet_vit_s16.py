"""ImageNet, ViT-S/16 at 224 px: the recipe of imagenet_resnet50.py with a ViT-S/16
encoder (width 384, depth 12, 6 heads, 16 px patches), batch 4096, LARS.

  python -m contrastive_jax.train --config configs/imagenet_vit_s16.py \
      --workdir gs://B/runs/in_vits16 --config.data_dir=gs://B/tfds

LARS follows the ResNet recipe; MoCo v3 reports AdamW steadier for ViTs
(--config.optimizer=adamw --config.learning_rate=1.5e-4 --config.weight_decay=0.1).
"""

from typing import Optional

import ml_collections

from contrastive_jax.configs import base, imagenet_resnet50


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  c = imagenet_resnet50.get_config()
  c.model = "vit_s16"
  c.norm = "group"  # not a ResNet: the ViT's own LayerNorm (BatchNorm is for the ResNets)
  c.head_hidden = 4096
  c.proj_dim = 256
  c.temperature = 0.2
  c.learning_rate = 0.3
  return base.variant(c, arg, batch_size=16, num_steps=2, eval_limit=32, eval_batch_size=16, knn_k=5, log_every=1, checkpoint_every=2, warmup_steps=1, image_size=32)
