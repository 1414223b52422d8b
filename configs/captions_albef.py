"""The packaged config `contrastive_jax.configs.captions_albef` (its docstring says what it runs and
what to expect). This thin file keeps `--config configs/captions_albef.py` working in a checkout;
from anywhere else, `--config captions_albef` names the same config."""

from contrastive_jax.configs.captions_albef import get_config
