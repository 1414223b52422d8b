"""The run configs (ml_collections), packaged so that they run from any directory.

  contrastive-jax-train --config mnist_gamma --workdir runs/x        (a name)
  contrastive-jax-train --config mnist_gamma:smoke --workdir runs/x  (a variant)
  contrastive-jax-train --config /any/path/my_config.py ...          (a file)

Each module's `get_config(arg=None)` returns a ConfigDict; `arg="smoke"` gives a
tiny variant of the same recipe (built-in data, a few steps) that the tests run.
The top-level `configs/` of a checkout holds one thin file per config.
"""

import os

NAMES = sorted(f[:-3] for f in os.listdir(os.path.dirname(__file__))
               if f.endswith(".py") and f not in ("__init__.py", "base.py"))


def path(name: str) -> str:
  """The file of the packaged config `name` (ValueError naming the known ones)."""
  if name not in NAMES:
    raise ValueError(f"unknown config {name!r}: use a file path or one of {', '.join(NAMES)}")
  return os.path.join(os.path.dirname(__file__), f"{name}.py")
