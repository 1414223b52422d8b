"""The run configs (ml_collections), packaged so that they run from any directory.

  contrastive-jax-train --config mnist_gamma --workdir runs/x        (a name)
  contrastive-jax-train --config mnist_gamma:smoke --workdir runs/x  (a variant)
  contrastive-jax-train --config /any/path/my_config.py ...          (a file)

Each module's `get_config(arg=None)` returns a ConfigDict; `arg="smoke"` gives a
tiny variant of the same recipe (built-in data, a few steps) that the tests run.
The top-level `configs/` of a checkout holds one thin file per config.
"""

import importlib.util
import os

NAMES = sorted(f[:-3] for f in os.listdir(os.path.dirname(__file__))
               if f.endswith(".py") and f not in ("__init__.py", "base.py"))


def path(name: str) -> str:
  """The file of the packaged config `name` (ValueError naming the known ones)."""
  if name not in NAMES:
    raise ValueError(f"unknown config {name!r}: use a file path or one of {', '.join(NAMES)}")
  return os.path.join(os.path.dirname(__file__), f"{name}.py")


def load(spec: str):
  """The ConfigDict of `spec`: a packaged config's name or a config file's path, with an
  optional variant (`mnist_gamma:smoke`, `path/to/config.py:smoke`)."""
  name, _, arg = spec.partition(":")
  file = path(name) if name in NAMES and not os.path.exists(name) else name
  if not os.path.isfile(file):
    raise ValueError(f"no config {name!r}: use a file path or one of {', '.join(NAMES)}")
  module_name = "_config_" + os.path.splitext(os.path.basename(file))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def fields(cfg) -> list[str]:
  """`--config.FIELD=VALUE` of every leaf field of cfg, with its value: what --help lists."""
  out = []
  def walk(node, prefix):
    for key in sorted(node.keys()):
      value = node[key]
      if hasattr(value, "keys") and len(value.keys()):
        walk(value, f"{prefix}{key}.")
      else:
        out.append(f"--config.{prefix}{key}={value!r}")
  walk(cfg, "")
  return out
