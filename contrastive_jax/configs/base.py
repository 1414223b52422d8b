"""Fields of the trainer that every config shares (data location, optimisation,
devices, logging, checkpoints). Task configs start from `get_config()` and add
the fields their task reads."""

from typing import Any, Optional

import ml_collections
from ml_collections import config_dict

from contrastive_jax.losses import registry


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data_dir = config_dict.placeholder(str)  # default ~/.cache/contrastive_jax/tfds
  c.eval_split = "test"
  # Threads reading and transforming records in each process. One is best for small
  # images on few cores (benchmarks/input_pipeline.py: 2 threads halve the host's rate
  # on 2 cores, the GIL); large images want more, or data_workers.
  c.data_threads = 1
  c.data_workers = 0  # > 0: grain worker processes for the host's decode + crop
  c.data_cache = True  # hold the train split in host memory (small datasets; not ImageNet)
  # Compute dtype of the model's activations and matmuls: float32 | bfloat16 (TPU and
  # recent GPUs: twice the matmul rate, half the activation memory). Parameters, the
  # optimiser state, the losses' reductions and their state and the metrics stay float32.
  c.dtype = "float32"
  # Start a new run from an exported encoder (contrastive-jax-export) or another run's
  # workdir, with a fresh optimiser; init_head=False keeps this run's random projection head.
  c.init_from = config_dict.placeholder(str)
  c.init_head = True
  # Optimisation.
  c.batch_size = 128
  c.num_steps = 1500
  c.optimizer = "adamw"  # adamw | sgd | lars
  c.learning_rate = 1e-3
  c.lr_scaling = "none"  # none | linear | sqrt (of batch_size / 256)
  c.warmup_steps = 100
  c.weight_decay = 1e-4
  # Devices and processes.
  c.fsdp = 1  # > 1: shard parameters and optimiser state over this many devices (FSDP)
  c.distributed = ml_collections.ConfigDict(dict(
      initialize=False,  # True: jax.distributed.initialize (multi-process / multi-host)
      # Unset: JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else
      # auto-detected (Cloud TPU, SLURM).
      coordinator_address=config_dict.placeholder(str),
      num_processes=config_dict.placeholder(int),
      process_id=config_dict.placeholder(int),
      timeout_s=300,
      # A process that has not been heard from for this long is dead: the others exit.
      heartbeat_timeout_s=100))
  # Logging, evaluation (evaluator names are the task's), checkpoints.
  c.log_every = 50
  # Evaluations, each with its own schedule (as big_vision's config.evals): the task's
  # evaluator name -> {every: steps (0: not during training), at_init, final}; `evals()`.
  c.evals = ml_collections.ConfigDict()
  c.eval_limit = config_dict.placeholder(int)  # train examples the probes fit on
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  # A step with a non-finite loss or gradient norm stops the run (nothing is checkpointed).
  # True: such a step leaves the state unchanged and the run goes on (counted in the log).
  c.skip_nonfinite = False
  c.progress = True  # a bar on a terminal; otherwise a plain line every progress_every_s
  c.progress_every_s = 60.0
  c.tensorboard = True  # event files (train/*, eval/*) beside metrics.jsonl
  # Weights & Biases (the wandb extra): set project to log the same records there. mode:
  # None (W&B's default, or $WANDB_MODE), online, offline or disabled; dir: where W&B keeps
  # its files (default: the workdir when local).
  c.wandb = ml_collections.ConfigDict(dict(
      project=config_dict.placeholder(str), entity=config_dict.placeholder(str),
      name=config_dict.placeholder(str), mode=config_dict.placeholder(str),
      dir=config_dict.placeholder(str)))
  # Once asked to stop (a signal, a failed write, a lost lock), exit within this many
  # seconds even if a write or another process blocks (code 1, one line).
  c.stop_timeout_s = 300.0
  # Another trainer's workdir lock is stale (taken over) when its heartbeat does not change
  # for this many seconds, as seen from this host's clock.
  c.lock_stale_s = 120.0
  return c


def add_loss(c: ml_collections.ConfigDict, name: str, temperature: float) -> None:
  """The loss fields: its name, temperature and every registered loss's options
  (`--config.loss=sogclr --config.loss_options.sogclr.rate=0.5` switches losses)."""
  c.loss = name
  c.temperature = temperature
  c.loss_options = ml_collections.ConfigDict(registry.all_options())


# What every smoke variant shrinks (a config adds its own: a small dataset, a small model).
SMOKE = dict(batch_size=64, num_steps=20, warmup_steps=2, log_every=5, checkpoint_every=10,
             progress=False, eval_limit=300, data_threads=1, data_workers=0)


def evals(**schedules: dict) -> ml_collections.ConfigDict:
  """config.evals from {evaluator: {"every": steps, "at_init": bool, "final": bool}}; unset
  keys are every=0 (not during training), at_init=False, final=False."""
  return ml_collections.ConfigDict({
      name: {"every": 0, "at_init": False, "final": False, **schedule}
      for name, schedule in schedules.items()})


def variant(c: ml_collections.ConfigDict, arg: Optional[str],
            **smoke: Any) -> ml_collections.ConfigDict:
  """c itself (arg None or ""), or its "smoke" variant: the same recipe at a size the
  tests and a 2-core CPU afford (SMOKE, then the config's own `smoke` overrides)."""
  if not arg:
    return c
  if arg != "smoke":
    raise ValueError(f"unknown config variant {arg!r}: use none or 'smoke'")
  for key, value in {**SMOKE, **smoke}.items():
    if isinstance(value, dict):
      c[key].update(value)
    else:
      c[key] = value
  for schedule in c.evals.values():  # no evaluation of the random initialisation
    schedule.at_init = False
  return c
