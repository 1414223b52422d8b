"""What every task (training objective) provides to the one trainer.

A task owns its model, its state entries besides the optimiser's (params,
loss state, momentum params), the per-example transform of its data, its
objective and its evaluation. The trainer (`contrastive_jax.train`) owns the
optimiser, the mesh, the loop and the checkpoints, and calls

  task.init(key) -> {"params": ..., "loss_state": ..., ...}
  task.loss(params, state, batch, key, mesh) -> (loss, (state updates, logs))
  task.after_step(state) -> state              (e.g. momentum encoders)
  task.evaluate(params, data, names) -> dict   (evaluators named in the config)

Evaluators are methods `(ctx) -> dict`, where `ctx = task.prepare(params, data)` holds
what they share (embeddings are computed once per evaluation).

`loss` runs under `jit` on the global batch: the model applies under GSPMD, and the
contrastive terms run per device inside `shard_map` with `BATCH_AXES` as the
losses' `axis_name`, so a decomposable loss moves no embedding between devices.
"""

from typing import Any

import jax
import ml_collections

from contrastive_jax.data import pipeline


class Task:
  """Base class; subclasses set `model`, `batch_keys`, `evaluators` and the methods."""

  batch_keys: tuple = ()  # the batch fields the step reads (the rest stay on the host)
  evaluators: dict = {}  # name -> name of a method (ctx) -> dict

  def __init__(self, cfg: ml_collections.ConfigDict, train_src):
    self.cfg = cfg
    self.train_src = train_src
    self.image_shape = pipeline.image_shape(train_src)

  def transform(self):
    """grain RandomMap: record index -> one training example."""
    raise NotImplementedError

  def init(self, key: jax.Array) -> dict:
    raise NotImplementedError

  def loss(self, params, state: dict, batch: dict, key: jax.Array, mesh):
    raise NotImplementedError

  def after_step(self, state: dict) -> dict:
    return state

  def eval_data(self, limit=None) -> Any:
    """Evaluation inputs, loaded once per run (train and eval splits)."""
    raise NotImplementedError

  def prepare(self, params, data) -> dict:
    """What the evaluators share, computed once per evaluation."""
    return {"params": params, "data": data}

  def evaluate(self, params, data, names: str) -> dict:
    """Runs the comma-separated evaluators `names` -> merged result dict."""
    names = self.check_evaluators(names)
    if not names:
      return {}
    ctx = self.prepare(params, data)
    out = {}
    for name in names:
      out.update(getattr(self, self.evaluators[name])(ctx))
    return out

  def check_evaluators(self, names: str, field: str = "evaluators") -> list[str]:
    """The names of a comma-separated list; a one-line error for one the task lacks."""
    names = [n.strip() for n in names.split(",") if n.strip()]
    for name in names:
      if name not in self.evaluators:
        raise ValueError(f"unknown evaluator {name!r} in --config.{field}: task "
                         f"{self.cfg.task!r} has {', '.join(self.evaluators)}")
    return names
