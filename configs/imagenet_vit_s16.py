"""ImageNet, ViT-S/16 at 224 px: the recipe of imagenet_resnet50.py with a ViT-S/16
encoder (width 384, depth 12, 6 heads, 16 px patches), batch 4096, LARS.

  python -m contrastive_jax.train --config configs/imagenet_vit_s16.py \
      --workdir gs://B/runs/in_vits16 --config.data_dir=gs://B/tfds

LARS follows the ResNet recipe; MoCo v3 reports AdamW steadier for ViTs
(--config.optimizer=adamw --config.learning_rate=1.5e-4 --config.weight_decay=0.1).
"""

import ml_collections

from configs import imagenet_resnet50


def get_config() -> ml_collections.ConfigDict:
  c = imagenet_resnet50.get_config()
  c.model = "vit_s16"
  c.head_hidden = 4096
  c.proj_dim = 256
  c.temperature = 0.2
  c.learning_rate = 0.3
  return c
