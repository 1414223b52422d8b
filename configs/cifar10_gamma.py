"""The packaged config `contrastive_jax.configs.cifar10_gamma` (its docstring says what it runs and
what to expect). This thin file keeps `--config configs/cifar10_gamma.py` working in a checkout;
from anywhere else, `--config cifar10_gamma` names the same config."""

from contrastive_jax.configs.cifar10_gamma import get_config
