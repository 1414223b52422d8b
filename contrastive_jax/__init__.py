"""contrastive_jax: contrastive representation learning in JAX.

`contrastive_jax.losses` and `contrastive_jax.metrics` need jax alone; the trainer
(`contrastive_jax.train`, its command line `contrastive_jax.main`) needs the `train` extra.
"""

__version__ = "0.1.0"
