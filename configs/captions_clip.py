"""The packaged config `contrastive_jax.configs.captions_clip` (its docstring says what it runs and
what to expect). This thin file keeps `--config configs/captions_clip.py` working in a checkout;
from anywhere else, `--config captions_clip` names the same config."""

from contrastive_jax.configs.captions_clip import get_config
