"""The packaged config `contrastive_jax.configs.imagenet_vit_s16` (its docstring says what it runs and
what to expect). This thin file keeps `--config configs/imagenet_vit_s16.py` working in a checkout;
from anywhere else, `--config imagenet_vit_s16` names the same config."""

from contrastive_jax.configs.imagenet_vit_s16 import get_config
