"""The packaged config `contrastive_jax.configs.mnist_gamma` (its docstring says what it runs and
what to expect). This thin file keeps `--config configs/mnist_gamma.py` working in a checkout;
from anywhere else, `--config mnist_gamma` names the same config."""

from contrastive_jax.configs.mnist_gamma import get_config
