"""A run's state and its one optimiser step, for every task.

`build(cfg)` gives the task, the optimiser and the state initialiser;
`make_step` jit-compiles `train_step` on the run's mesh: the model applies under
GSPMD and the task's contrastive terms run per device in `shard_map`. The loop
around them is `contrastive_jax.train`.
"""

import importlib.util
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from contrastive_jax import sharding
from contrastive_jax import tasks
from contrastive_jax.data import pipeline
from contrastive_jax.losses import common


def _positive_int(cfg, name, minimum=1):
  v = cfg.get(name)
  if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
    raise ValueError(f"--config.{name}={v!r}: must be an integer >= {minimum}")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field and what is allowed for a bad trainer setting."""
  for name in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    _positive_int(cfg, name)
  for name in ("warmup_steps", "data_threads", "data_workers"):
    _positive_int(cfg, name, minimum=0)
  for name, default in (("progress_every_s", 60.0), ("stop_timeout_s", 300.0),
                        ("lock_stale_s", 120.0)):
    v = cfg.get(name, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
      raise ValueError(f"--config.{name}={v!r}: must be a number > 0")
  if cfg.get("wandb", {}).get("project") and importlib.util.find_spec("wandb") is None:
    raise ValueError(f"--config.wandb.project={cfg.wandb.project!r} needs the wandb package: "
                     "pip install 'contrastive_jax[wandb]'")
  if cfg.get("eval_limit") is not None:
    _positive_int(cfg, "eval_limit")
  for name in ("learning_rate", "weight_decay"):
    v = cfg.get(name)
    if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
        name == "learning_rate" and v == 0):
      raise ValueError(f"--config.{name}={v!r}: must be a finite number "
                       f"{'> 0' if name == 'learning_rate' else '>= 0'}")


def make_optimizer(cfg: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Callable]:
  """Optimiser and its schedule: warmup + cosine, peak lr scaled by batch size."""
  scale = {"none": 1.0, "linear": cfg.batch_size / 256, "sqrt": (cfg.batch_size / 256) ** 0.5}
  if cfg.lr_scaling not in scale:
    raise ValueError(f"unknown lr_scaling {cfg.lr_scaling!r}: use none, linear or sqrt")
  # A run shorter than its warm-up warms up over all but its last step.
  warmup = min(cfg.warmup_steps, max(cfg.num_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate * scale[cfg.lr_scaling], warmup, max(cfg.num_steps, warmup + 1))
  if cfg.optimizer == "adamw":
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  elif cfg.optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(schedule, momentum=0.9))
  elif cfg.optimizer == "lars":
    tx = optax.lars(schedule, weight_decay=cfg.weight_decay, momentum=0.9)
  else:
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use adamw, sgd or lars")
  return tx, schedule


class Setup(NamedTuple):
  """Everything a config determines before training starts."""
  task: tasks.Task
  tx: optax.GradientTransformation
  schedule: Callable
  init: Callable  # () -> initial train state


def build(cfg: ml_collections.ConfigDict, task: Optional[tasks.Task] = None) -> Setup:
  """Task (default: cfg.task on cfg.dataset's train split), optimiser and state
  initialiser of cfg (raises on bad names)."""
  if task is None:
    task = tasks.get(cfg, *pipeline.open_splits(cfg.dataset, cfg.data_dir, cfg.eval_split,
                                                cfg.get("data_cache", False)))
  task.check_evals(cfg.get("evals", {}))
  tx, schedule = make_optimizer(cfg)

  def init() -> dict:
    rng = jax.random.PRNGKey(cfg.seed)  # raw uint32[2]: checkpoints as a plain array
    init_rng, rng = jax.random.split(rng)
    state = task.init(init_rng)
    return {"step": jnp.int32(0), **state, "opt_state": tx.init(state["params"]), "rng": rng}

  return Setup(task, tx, schedule, init)


def train_step(state: dict, batch: dict, *, task: tasks.Task, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh, skip_nonfinite: bool = False) -> tuple[dict, dict]:
  """One optimiser step of `task` on a global batch sharded over the mesh's BATCH_AXES.

  logs["finite"] says whether the loss and the gradient norm were finite. With
  skip_nonfinite, a step where they are not leaves the state as it was (but for
  the step counter, so that the next batch comes).
  """
  key = jax.random.fold_in(state["rng"], state["step"])
  (loss, (updates, logs)), grads = jax.value_and_grad(task.loss, has_aux=True)(
      state["params"], state, batch, key, mesh)
  param_updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_state = {**state, **updates, "step": state["step"] + 1, "opt_state": opt_state,
               "params": optax.apply_updates(state["params"], param_updates)}
  new_state = task.after_step(new_state)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state = {**kept, "step": state["step"] + 1}
  return new_state, {"loss": loss, **logs, "grad_norm": grad_norm, "finite": finite}


def shardings(setup: Setup, mesh: jax.sharding.Mesh) -> dict:
  """The state's shardings on mesh: the optimiser state and the task's model-sized
  entries FSDP-sharded (when the mesh has an "fsdp" axis > 1), the rest replicated."""
  return sharding.state_shardings(jax.eval_shape(setup.init), mesh,
                                  ("opt_state", *setup.task.model_sized))


def make_step(setup: Setup, mesh: jax.sharding.Mesh, shardings: dict,
              skip_nonfinite: bool = False) -> Callable:
  """jit-compiled train_step with the state's shardings and a batch-sharded input."""
  step = lambda state, batch: train_step(state, batch, task=setup.task, tx=setup.tx, mesh=mesh,
                                         skip_nonfinite=skip_nonfinite)
  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, None), donate_argnums=0)


class NonFiniteError(FloatingPointError):
  """The loss or the gradient norm of a step is NaN or inf."""


@jax.jit
def track_nonfinite(tally: jax.Array, finite: jax.Array, step: jax.Array) -> jax.Array:
  """[first non-finite step or -1, count of non-finite steps], updated on the device so
  that the loop never waits for a step to finish just to check it."""
  first = jnp.where((tally[0] < 0) & ~finite, step, tally[0])
  return jnp.stack([first, tally[1] + (~finite).astype(jnp.int32)])


def check_finite(tally: jax.Array, skip: bool) -> int:
  """Raises NonFiniteError if a step was not finite (unless skipped); returns the count."""
  first, count = (int(v) for v in jax.device_get(tally))
  if count and not skip:
    raise NonFiniteError(
        f"step {first}: the loss or the gradient norm is NaN or inf; stopped without "
        "checkpointing (the last good checkpoint is kept). Lower --config.learning_rate, check "
        "the loss options, or set --config.skip_nonfinite=True to skip such steps")
  return count


def trace_step(cfg: ml_collections.ConfigDict, step_fn: Callable, state: dict,
               local_batch: dict, process_count: int) -> None:
  """Traces the step (no compilation) so that a bad loss option fails before the
  workdir is written, naming its config field (the loss's typed OptionError)."""
  spec = {k: jax.ShapeDtypeStruct((v.shape[0] * process_count, *v.shape[1:]), v.dtype)
          for k, v in local_batch.items()}
  try:
    jax.eval_shape(step_fn, state, spec)
  except common.OptionError as e:
    options = cfg.get("loss_options", {}).get(cfg.get("loss"), {}) or {}
    field = (f"loss_options.{cfg.loss}.{e.option}" if e.option in options else
             e.option if e.option in cfg else None)
    raise ValueError(f"--config.{field}: {e}" if field else str(e)) from None
