"""The packaged config `contrastive_jax.configs.imagenet_resnet50` (its docstring says what it runs and
what to expect). This thin file keeps `--config configs/imagenet_resnet50.py` working in a checkout;
from anywhere else, `--config imagenet_resnet50` names the same config."""

from contrastive_jax.configs.imagenet_resnet50 import get_config
