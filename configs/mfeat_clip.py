"""The packaged config `contrastive_jax.configs.mfeat_clip` (its docstring says what it runs and
what to expect). This thin file keeps `--config configs/mfeat_clip.py` working in a checkout;
from anywhere else, `--config mfeat_clip` names the same config."""

from contrastive_jax.configs.mfeat_clip import get_config
