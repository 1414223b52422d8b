"""The trainer's command line.

  contrastive-jax-train --config mnist_gamma --workdir runs/x [--config.batch_size=64 ...]
  python -m contrastive_jax.train --config configs/mnist_gamma.py --workdir runs/x

--config takes a packaged config's name (`contrastive_jax.configs`, optionally with a
variant: `mnist_gamma:smoke`) or the path of any config file; --workdir may be
gs://bucket/run. The run itself is `contrastive_jax.train.train_and_evaluate`.
Errors are one line (`error: ...`, exit code 1); SIGTERM, SIGINT and SIGHUP save a
checkpoint and exit 0 (docs/tpu.md: faults and what to do).
"""

import json
import logging as pylogging
import math
import os
import re
import sys
import threading
from typing import Optional

_FLAGS = {}  # defined on first use: a plain install (no absl) can still import this module


def _define_flags() -> dict:
  if not _FLAGS:
    from absl import flags
    from ml_collections import config_flags
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "A config: a packaged one's name (mnist_gamma, mnist_gamma:smoke) or "
        "a config file's path.", lock_config=True)
    _FLAGS["workdir"] = flags.DEFINE_string(
        "workdir", None, "Directory for checkpoints and metrics: a local path or a remote one "
        "(gs://bucket/run).")
    _FLAGS["stop_at"] = flags.DEFINE_integer(
        "stop_at", None, "Checkpoint and exit after this step, as if preempted (time-boxed "
        "jobs, tests).")
  return _FLAGS


def resolve_config(argv: list[str]) -> list[str]:
  """argv with a packaged config's name after --config replaced by its file
  (`--config mnist_gamma:smoke` -> `--config .../configs/mnist_gamma.py:smoke`)."""
  from contrastive_jax import configs
  out = list(argv)
  for i, a in enumerate(out):
    if a == "--config" and i + 1 < len(out):
      j, value = i + 1, out[i + 1]
    elif a.startswith("--config="):
      j, value = i, a[len("--config="):]
    else:
      continue
    name, _, arg = value.partition(":")
    if name in configs.NAMES and not os.path.exists(name):
      resolved = configs.path(name) + (f":{arg}" if arg else "")
      out[j] = resolved if j == i + 1 else f"--config={resolved}"
  return out


class _NoOrbaxErrors(pylogging.Filter):
  """Drops Orbax's own error logs (tracebacks from its save threads): the trainer
  reports a failed save itself, in one line."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno < pylogging.ERROR or "orbax" not in record.pathname


class _NoThreadTracebacks:
  """sys.stderr of the CLI without the tracebacks that background threads print
  (Orbax's save threads and TensorStore's callbacks, dozens of them when a save
  fails on a full disk): the trainer reports such a failure itself, in one line.
  The main thread's output, and every other line, pass unchanged.
  CONTRASTIVE_JAX_DEBUG=1 keeps everything."""

  _INSIDE = ("Traceback (most recent call last):", "During handling of the above",
             "The above exception was", "Exception in thread")

  def __init__(self, stream):
    self.stream = stream
    self._state = threading.local()

  def write(self, text: str) -> int:
    if threading.current_thread() is threading.main_thread():
      return self.stream.write(text)
    st = self._state
    *lines, st.line = (getattr(st, "line", "") + text).split("\n")
    for line in lines:
      if getattr(st, "inside", False):
        # Frames are indented; the exception's own line ends the block (chains re-enter).
        st.inside = not line or line.startswith((" ", *self._INSIDE))
      elif line.startswith(self._INSIDE):
        st.inside = True
      else:
        self.stream.write(line + "\n")
    return len(text)

  def flush(self) -> None:
    self.stream.flush()

  def __getattr__(self, name):
    return getattr(self.stream, name)


def _quiet_background_failures() -> None:
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  logging.get_absl_logger().addFilter(_NoOrbaxErrors())
  pylogging.getLogger("asyncio").setLevel(pylogging.CRITICAL)  # Orbax's failed save tasks
  if not os.environ.get("CONTRASTIVE_JAX_DEBUG"):
    sys.stderr = _NoThreadTracebacks(sys.stderr)


def main(argv: list[str]) -> None:
  """Runs the trainer on the parsed flags; prints the final evaluation (process 0)."""
  del argv
  import jax
  from contrastive_jax import checkpointing, sharding, stopping, train
  from contrastive_jax.data import pipeline
  from contrastive_jax import workdir as workdir_lib
  _quiet_background_failures()
  sharding.use_compilation_cache()
  f = _define_flags()
  if f["config"].value is None or f["workdir"].value is None:
    sys.exit("error: --config and --workdir are required, e.g. "
             "--config mnist_gamma --workdir runs/mnist_gamma")
  try:
    result = train.train_and_evaluate(f["config"].value, f["workdir"].value,
                                      stop_at=f["stop_at"].value)
  except (ValueError, OSError, FloatingPointError, workdir_lib.WorkdirError,
          checkpointing.CheckpointError, pipeline.DataError, stopping.PeerFailed) as e:
    sharding.finish_peer_watchdog()
    sys.exit(f"error: {e}")
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    # A collective failed because a peer died: JAX's shutdown would then abort with a
    # thread dump while it waits for the dead peer at exit.
    sharding.exit_peer_lost(str(e))
  sharding.finish_peer_watchdog()
  if jax.process_index() != 0:
    return
  print(json.dumps(workdir_lib.finite_json(result)))
  line = result_line(result, f["config"].value.get("init_from"))
  if line:
    print(line)


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def result_line(result: dict, init_from: Optional[str] = None) -> Optional[str]:
  """A one-line summary of the probes in a final evaluation, naming only what was
  computed and finite (None when there is nothing to say); the evaluation at step 0 is
  of the random initialisation, or of the weights `init_from` gave."""
  parts = []
  if _finite(result.get("knn_top1")):
    init = result.get("random_init", {}).get("knn_top1")
    start = f"initialised from {init_from}:" if init_from else "random init"
    parts.append(f"kNN top-1 {100 * result['knn_top1']:.1f} %" +
                 (f" ({start} {100 * init:.1f} %)" if _finite(init) else ""))
  if _finite(result.get("linear_top1")):
    parts.append(f"linear probe {100 * result['linear_top1']:.1f} %")
  return ", ".join(parts) or None


def catalogue() -> str:
  """What a run can name: configs, tasks, losses, encoders and built-in datasets."""

  from contrastive_jax import configs, tasks
  from contrastive_jax.data import builders
  from contrastive_jax.losses import registry
  from contrastive_jax.models import encoders
  rows = [("configs (--config NAME[:smoke], or a config file)", configs.NAMES),
          ("tasks (--config.task)", list(tasks.TASKS)),
          ("losses (--config.loss)", list(registry.LOSSES)),
          ("encoders (--config.model)", list(encoders.ENCODERS)),
          ("datasets (--config.dataset)",
           sorted(builders.BUILDERS) + ["or any TFDS name prepared as array_record in "
                                        "--config.data_dir (docs/tpu.md)"])]
  return "\n".join(f"{title}:\n  {', '.join(names)}" for title, names in rows)


def _config_help(argv: list[str]) -> str:
  """With --help and --config NAME_OR_FILE: that config's fields with their values (what
  --config.FIELD=VALUE overrides); else a hint that they can be listed."""
  if not any(a in ("--help", "-h", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
    return ""
  from contrastive_jax import configs
  spec = next((a.split("=", 1)[1] if "=" in a else argv[i + 2] if i + 2 < len(argv) else None
               for i, a in enumerate(argv[1:]) if a == "--config" or a.startswith("--config=")),
              None)
  if not spec:
    return "fields: --help --config NAME lists a config's fields and their values\n"
  try:
    cfg = configs.load(spec)
  except Exception as e:  # noqa: BLE001  (a config file may raise anything)
    return f"fields: cannot load --config {spec}: {e}\n"
  return f"fields of {spec} (--config.FIELD=VALUE):\n  " + "\n  ".join(configs.fields(cfg)) + "\n"


def _renamed_options(argv: list[str]) -> list[str]:
  """argv with renamed loss options (--config.loss_options.gamma.rate_decay=...) under their
  new names, each with a warning: the old names work for one release."""
  from contrastive_jax.losses import registry
  out = []
  for a in argv:
    for loss, names in registry.renamed_options().items():
      for old, new in names.items():
        flag = f"--config.loss_options.{loss}.{old}"
        if a == flag or a.startswith(flag + "="):
          print(f"warning: {flag} is now --config.loss_options.{loss}.{new} (the old name "
                "will be removed in the next release)", file=sys.stderr)
          a = f"--config.loss_options.{loss}.{new}" + a[len(flag):]
    out.append(a)
  return out


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error (and the nearest name, which
  ml_collections suggests) for a bad --config override instead of a traceback."""
  from absl import flags
  try:
    return flags.FLAGS(resolve_config(argv))
  except SystemExit:  # absl exits 1 after printing --help; asking for help is no error
    if any(a in ("--help", "-h", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    if suggestion:
      sys.exit(f"error: the config has no field {suggestion.group(2)!r}: did you mean "
               f"--config.{suggestion.group(1)}?")
    sys.exit(f"error: bad flag: {' '.join(text.split())}")


def cli() -> None:
  """The console script `contrastive-jax-train` (and `python -m contrastive_jax.train`)."""
  try:
    from absl import app
    from contrastive_jax import train  # noqa: F401
  except ImportError as e:
    sys.exit(f"error: the trainer needs the 'train' extra ({e.name} is not installed): "
             "pip install '.[train]' from a checkout")
  # Before the flags exist: ml_collections finds the --config.* overrides in sys.argv.
  sys.argv = _renamed_options(sys.argv)
  _define_flags()
  # absl's --help prints the __main__ module's docstring: add what a run can name, and
  # with --config, that config's fields and their values.
  sys.modules["__main__"].__doc__ = f"{__doc__}\n{catalogue()}\n{_config_help(sys.argv)}"
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
