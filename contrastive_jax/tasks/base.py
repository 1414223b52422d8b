"""What every task (training objective) provides to the one trainer.

A task owns its config section (`fields`), its model, its state entries besides
the optimiser's (params, loss state, momentum params), its data pipeline (built
from the train and eval sources `pipeline.open_splits` hands it), its objective
and its evaluation with its schedule. The trainer (`contrastive_jax.train`) owns
the optimiser, the mesh, the loop and the checkpoints, and calls

  task.train_dataset(batch_size, seed, process_index, process_count) -> batches
  task.init(key) -> {"params": ..., "loss_state": ..., ...}
  task.loss(params, state, batch, key, mesh) -> (loss, (state updates, logs))
  task.after_step(state) -> state              (e.g. momentum encoders)
  task.evaluate(params, data, names) -> dict   (evaluators named in the config)
  task.due(step | "at_init" | "final") -> names  (config.evals' schedules)

Evaluators are methods `(ctx) -> dict`, where `ctx = task.prepare(params, data)` holds
what they share (embeddings are computed once per evaluation).

`loss` runs under `jit` on the global batch: the model applies under GSPMD, and the
contrastive terms run per device inside `shard_map` with `BATCH_AXES` as the
losses' `axis_name`, so a decomposable loss moves no embedding between devices.
"""

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from contrastive_jax.data import pipeline


REQUIRED = object()  # a task field without a default: every config of the task sets it

# The trainer's fields that every task reads; their defaults are configs/base.py's.
SHARED = ("task", "dataset", "data_dir", "eval_split", "eval_limit", "evals", "num_steps",
          "data_threads", "dtype")


def section(cfg: ml_collections.ConfigDict, fields: dict) -> ml_collections.ConfigDict:
  """The task's config section: SHARED and its own `fields` (name -> default or
  REQUIRED) read from cfg, defaults filled in. Nothing else is in it, so a task reads
  only what it declares, and each default has one place.

  Raises:
    ValueError: naming a field the task needs that cfg lacks.
  """
  fields = {**{name: REQUIRED for name in SHARED}, **fields}
  task = cfg["task"] if "task" in cfg else None
  for name, default in fields.items():
    if default is REQUIRED and name not in cfg:
      raise ValueError(f"the {task!r} task needs --config.{name}, which this config lacks "
                       "(see configs/)")
  return ml_collections.ConfigDict({name: cfg[name] if name in cfg else default
                                    for name, default in fields.items()})


def progress(state: dict, cfg: ml_collections.ConfigDict) -> jax.Array:
  """The fraction of training done at this step, float32 in [0, 1]: what the rate
  schedules of stateful losses follow."""
  return jnp.minimum(state["step"].astype(jnp.float32) / cfg.num_steps, 1.0)


class Task:
  """Base class; subclasses set `fields`, `model`, `batch_keys`, `evaluators` and the
  methods. `self.cfg` is the task's section of the config (`section`)."""

  # The config fields the task reads besides SHARED: name -> default (or REQUIRED).
  fields: dict = {}
  batch_keys: tuple = ()  # the batch fields the step reads (the rest stay on the host)
  evaluators: dict = {}  # name -> name of a method (ctx) -> dict
  # State entries as large as the model, FSDP-sharded with the optimiser state.
  model_sized: tuple = ("params",)
  # State entries where -inf is a value: the loss state marks unvisited examples with it.
  neg_inf_ok: tuple = ("loss_state",)
  # Config fields of the task's own that may change when a run resumes (evaluation only).
  mutable_on_resume: tuple = ()
  # The state entries evaluation reads: "params" (the model's variables) and any other
  # collection of the model's, stored under its own name (`eval_variables` merges them).
  eval_keys: tuple = ("params",)

  def __init__(self, cfg: ml_collections.ConfigDict, train_src: Any,
               eval_src: Optional[Callable[[], Any]] = None):
    """Args:
      train_src: the train split's records (a random-access source of dicts).
      eval_src: () -> the eval split's source, called once, when an evaluation first
        reads it (`pipeline.open_splits`); default: cfg.eval_split of cfg.dataset.
    """
    self.cfg = section(cfg, self.fields)
    self.train_src = train_src
    self._eval_src = eval_src or (lambda: pipeline.get_source(
        self.cfg.dataset, self.cfg.eval_split, self.cfg.data_dir))
    self.image_shape = pipeline.image_shape(train_src)

  @functools.cached_property
  def eval_src(self) -> Any:
    """The eval split's source, opened on first use."""
    return self._eval_src()

  def transform(self) -> Any:
    """grain RandomMap: record index -> one training example."""
    raise NotImplementedError

  def train_dataset(self, batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1) -> Any:
    """This process's training batches (`pipeline.train_dataset` of the task's transform):
    batch k is a pure function of (seed, k)."""
    return pipeline.train_dataset(self.train_src, batch_size=batch_size, seed=seed,
                                  transform=self.transform(), process_index=process_index,
                                  process_count=process_count)

  def init(self, key: jax.Array) -> dict:
    raise NotImplementedError

  def loss(self, params: Any, state: dict, batch: dict, key: jax.Array, mesh: jax.sharding.Mesh) -> tuple[jax.Array, tuple[dict, dict]]:
    raise NotImplementedError

  def after_step(self, state: dict) -> dict:
    return state

  def eval_variables(self, state: dict) -> Any:
    """What `evaluate` takes, from the state entries `eval_keys`: the model's variables,
    the parameters and any other collection (e.g. BatchNorm's `batch_stats`)."""
    return {**state["params"], **{k: state[k] for k in self.eval_keys if k != "params"}}

  def eval_data(self, limit: Optional[int]=None) -> Any:
    """Evaluation inputs, loaded once per run (train and eval splits)."""
    raise NotImplementedError

  def prepare(self, params: Any, data: Any) -> dict:
    """What the evaluators share, computed once per evaluation."""
    return {"params": params, "data": data}

  def evaluate(self, params: Any, data: Any, names: str) -> dict:
    """Runs the comma-separated evaluators `names` -> merged result dict."""
    names = self.check_evaluators(names)
    if not names:
      return {}
    ctx = self.prepare(params, data)
    out = {}
    for name in names:
      out.update(getattr(self, self.evaluators[name])(ctx))
    return out

  def due(self, when: Any) -> str:
    """The evaluators of cfg.evals due `when` ("at_init", "final" or a step), comma-separated
    (what `evaluate` takes; evaluators due together share their embeddings)."""
    evals = self.cfg.evals
    if isinstance(when, str):
      return ",".join(n for n, e in evals.items() if e.get(when, False))
    return ",".join(n for n, e in evals.items() if e.get("every", 0) and when % e.every == 0)

  min_eval_examples = 10  # fewer cannot give an accuracy worth printing

  def check_evals(self, evals: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field for a bad config.evals: an evaluator the task
    lacks, or a schedule other than {every: int >= 0, at_init: bool, final: bool}."""
    self.check_evaluators(",".join(evals), "evals")
    for name, schedule in evals.items():
      every = schedule.get("every", 0)
      if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ValueError(f"--config.evals.{name}.every={every!r}: must be an integer >= 0 "
                         "(0: not during training)")
      for when in ("at_init", "final"):
        if not isinstance(schedule.get(when, False), bool):
          raise ValueError(f"--config.evals.{name}.{when}={schedule.get(when)!r}: must be "
                           "True or False")
      unknown = set(schedule) - {"every", "at_init", "final"}
      if unknown:
        raise ValueError(f"--config.evals.{name} has no field {sorted(unknown)[0]!r}: its "
                         "fields are every, at_init and final")

  def check_eval(self) -> None:
    """Raises ValueError naming the field for evaluation settings that would fail or
    mislead only after training: an unknown eval split, too small an eval_limit."""
    cfg = self.cfg
    if not cfg.evals:
      return
    splits = pipeline.split_names(self.train_src)
    if splits is not None and cfg.eval_split not in splits:
      raise ValueError(f"--config.eval_split={cfg.eval_split!r}: dataset "
                       f"{cfg.dataset!r} has the splits {', '.join(splits)}")
    limit = cfg.eval_limit
    if limit is not None and limit < self.min_eval_examples:
      raise ValueError(f"--config.eval_limit={limit}: the probes need at least "
                       f"{self.min_eval_examples} examples (or None: all)")

  def check_evaluators(self, names: str, field: Optional[str] = "evaluators") -> list[str]:
    """The names of a comma-separated list; a one-line error for one the task lacks,
    naming the flag: --config.FIELD, or --evaluators (field None: eval_checkpoint)."""
    names = [n.strip() for n in names.split(",") if n.strip()]
    flag = f"--config.{field}" if field else "--evaluators"
    for name in names:
      if name not in self.evaluators:
        raise ValueError(f"unknown evaluator {name!r} in {flag}: task "
                         f"{self.cfg.task!r} has {', '.join(self.evaluators)}")
    return names
