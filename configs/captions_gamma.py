"""The packaged config `contrastive_jax.configs.captions_gamma` (its docstring says what it runs and
what to expect). This thin file keeps `--config configs/captions_gamma.py` working in a checkout;
from anywhere else, `--config captions_gamma` names the same config."""

from contrastive_jax.configs.captions_gamma import get_config
