"""The packaged config `contrastive_jax.configs.cifar10_simclr` (its docstring says what it runs and
what to expect). This thin file keeps `--config configs/cifar10_simclr.py` working in a checkout;
from anywhere else, `--config cifar10_simclr` names the same config."""

from contrastive_jax.configs.cifar10_simclr import get_config
