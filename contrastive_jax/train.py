"""Contrastive pretraining: train state, sharded step, loop, Orbax checkpoints.

  python -m contrastive_jax.train --config configs/mnist_gamma.py --workdir runs/x \
      [--config.batch_size=64 ...]

Mesh ("data", "fsdp") over every device of every process: the batch is sharded
over both axes; parameters and optimiser state are replicated (cfg.fsdp = 1, data
parallel) or sharded over "fsdp" (FSDP: GSPMD gathers them where the model needs
them). The model runs under plain jit; the loss runs in `shard_map` over both
axes, so global-negative losses gather keys and the gamma loss keeps its
negatives local. Multi-process (multi-host) runs call `jax.distributed.initialize`
first (cfg.distributed); each process feeds its slice of every global batch.
Batch k is a pure function of (seed, k), so a run resumed from a checkpoint at
step k continues exactly as if never stopped. With a `cfg.multimodal` block the
same loop trains the image-text models of `contrastive_jax.multimodal`.
SIGTERM (or Ctrl-C) saves a checkpoint and exits cleanly.
"""

import functools
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, Optional

from absl import app, flags, logging
import grain
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
import tqdm

from contrastive_jax import evaluate
from contrastive_jax import metrics
from contrastive_jax import multimodal
from contrastive_jax import losses as L
from contrastive_jax.data import augment as aug_lib
from contrastive_jax.data import builders
from contrastive_jax.data import pipeline
from contrastive_jax.models.encoders import get_model

# Config fields that must match to resume from a workdir's checkpoint.
_RESUME_KEYS = ("dataset", "model", "head_hidden", "proj_dim", "loss", "batch_size", "seed",
                "optimizer", "multimodal")


# ----------------------------------------------------------------------------
# Losses by name: fn(z1, z2, loss_state, index, key, axis_name) -> (loss, loss_state).


def make_loss(cfg: ml_collections.ConfigDict, num_examples: int) -> tuple[Callable, Any]:
  """Returns (loss fn, initial loss state) for cfg.loss."""
  t = cfg.temperature
  if cfg.loss == "nt_xent":
    return (lambda a, b, s, i, k, ax: (L.nt_xent(a, b, temperature=t, axis_name=ax), s)), {}
  if cfg.loss == "dcl":
    return (lambda a, b, s, i, k, ax: (L.dcl_loss(a, b, temperature=t, weighted=cfg.dcl_weighted,
                                                  axis_name=ax), s)), {}
  if cfg.loss == "clip":
    return (lambda a, b, s, i, k, ax: (L.clip_loss(a, b, temperature=t, axis_name=ax), s)), {}
  if cfg.loss == "sigmoid":
    return (lambda a, b, s, i, k, ax: (L.sigmoid_loss(a, b, temperature=t, bias=cfg.sigmoid_bias,
                                                      axis_name=ax), s)), {}
  if cfg.loss == "sogclr":
    return (lambda a, b, s, i, k, ax: L.sogclr_loss(a, b, s, i, temperature=t,
                                                    gamma=cfg.sogclr_gamma, axis_name=ax),
            L.init_sogclr_state(num_examples))
  if cfg.loss == "gamma":
    g = cfg.gamma
    return (lambda a, b, s, i, k, ax: L.gamma_loss(
        a, b, s, i, k, temperature=t, shape=g.shape, rate_decay=g.rate_decay,
        estimator=g.estimator, include_positive=g.include_positive, axis_name=ax),
            L.init_gamma_state(num_examples, g.estimator))
  raise ValueError(f"unknown loss {cfg.loss!r}: set --config.loss to one of "
                   "nt_xent, dcl, clip, sigmoid, sogclr, gamma")


def make_optimizer(cfg: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Callable]:
  """Optimiser and its schedule: warmup + cosine, peak lr scaled by batch size."""
  scale = {"none": 1.0, "linear": cfg.batch_size / 256, "sqrt": (cfg.batch_size / 256) ** 0.5}
  if cfg.lr_scaling not in scale:
    raise ValueError(f"unknown lr_scaling {cfg.lr_scaling!r}: use none, linear or sqrt")
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate * scale[cfg.lr_scaling], min(cfg.warmup_steps, cfg.num_steps),
      max(cfg.num_steps, 1))
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


# ----------------------------------------------------------------------------
# State and step.


class Setup(NamedTuple):
  """Everything a config determines before training starts."""
  model: Any
  train_src: Any
  loss_fn: Optional[Callable]  # None for image-text (cfg.multimodal) runs
  tx: optax.GradientTransformation
  schedule: Callable
  init: Callable  # () -> initial train state
  step: Callable  # mesh -> (state, batch) -> (state, logs)


def build(cfg: ml_collections.ConfigDict) -> Setup:
  """Model, data source, loss, optimiser and state initialiser of cfg (raises on bad names).

  With a `cfg.multimodal` block (see configs/captions_clip.py) the run is image-text
  training of `contrastive_jax.multimodal` (two-tower or fusion) on a captioned dataset.
  """
  train_src = pipeline.get_source(cfg.dataset, "train", cfg.data_dir)
  tx, schedule = make_optimizer(cfg)
  image_shape = pipeline.to_float(train_src[0]["image"]).shape
  if cfg.get("multimodal") is not None:
    mcfg = ml_collections.ConfigDict(cfg.multimodal.to_dict())
    mcfg.seed = cfg.seed
    vocab = len(builders.tokenizer(builders.BUILDERS[cfg.dataset](
        data_dir=cfg.data_dir or pipeline.DEFAULT_DATA_DIR)))
    model = multimodal.build(mcfg, vocab)
    init = functools.partial(multimodal.init, mcfg, model, tx, len(train_src), image_shape)
    step = lambda mesh: functools.partial(multimodal.train_step, model=model, tx=tx, cfg=mcfg)
    return Setup(model, train_src, None, tx, schedule, init, step)
  model = get_model(cfg.model, cfg.head_hidden, cfg.proj_dim)
  loss_fn, loss_state = make_loss(cfg, len(train_src))
  init = functools.partial(init_state, cfg, model, tx, loss_state, image_shape)
  step = lambda mesh: functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn,
                                        mesh=mesh)
  return Setup(model, train_src, loss_fn, tx, schedule, init, step)


def init_state(cfg, model, tx, loss_state, image_shape) -> dict:
  rng = jax.random.PRNGKey(cfg.seed)  # raw uint32[2]: checkpoints as a plain array
  init_rng, rng = jax.random.split(rng)
  params = model.init(init_rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
  return {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params),
          "loss_state": loss_state, "rng": rng}


def train_step(state: dict, batch: dict, *, model, tx, loss_fn, mesh) -> tuple[dict, dict]:
  """One optimiser step on a global batch sharded over the mesh's BATCH_AXES."""
  key = jax.random.fold_in(state["rng"], state["step"])

  def local_loss(z1, z2, s, i, k):
    loss, s = loss_fn(z1, z2, s, i, k, BATCH_AXES)
    # Monitoring metric: InfoNCE (t = 0.1) over each device's own rows, averaged; a
    # global one would gather the keys that the gamma loss never moves.
    local_infonce = jax.lax.pmean(
        L.nt_xent(jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2), temperature=0.1),
        BATCH_AXES)
    return loss, s, local_infonce

  sharded_loss = jax.shard_map(
      local_loss, mesh=mesh, in_specs=(P(BATCH_AXES), P(BATCH_AXES), P(), P(BATCH_AXES), P()),
      out_specs=(P(), P(), P()))

  def objective(params):
    # Both views in one apply, mapped over a new leading axis: every device keeps its own
    # rows (concatenating two batch-sharded arrays is not batch-sharded, and GSPMD would
    # gather them), and the weight gradient is one all-reduce, not one per view.
    views = jnp.stack([batch["view1"], batch["view2"]])  # [2, b, ...]
    _, z = jax.vmap(model.apply, in_axes=(None, 0))(params, views)
    z1, z2 = z[0], z[1]
    loss, loss_state, local_infonce = sharded_loss(z1, z2, state["loss_state"],
                                                   batch["index"], key)
    return loss, (loss_state, local_infonce)

  (loss, (loss_state, local_infonce)), grads = jax.value_and_grad(objective, has_aux=True)(
      state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "opt_state": opt_state, "loss_state": loss_state, "rng": state["rng"]}
  logs = {"loss": loss, "nt_xent_local": local_infonce, "grad_norm": optax.tree.norm(grads)}
  return new_state, logs


# ----------------------------------------------------------------------------
# Processes, mesh and shardings.

BATCH_AXES = ("data", "fsdp")  # the batch (and the loss's axis_name) spans both mesh axes


def initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
  """Joins a multi-process run when cfg.distributed.initialize is set.

  Arguments left unset come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID, else from JAX's cluster auto-detection (Cloud TPU, SLURM, ...).
  CPU processes exchange collectives over gloo.
  """
  d = cfg.get("distributed")
  if d is None or not d.initialize or jax.distributed.is_initialized():
    return
  env = lambda name: int(os.environ[name]) if name in os.environ else None
  num = d.num_processes if d.num_processes is not None else env("JAX_NUM_PROCESSES")
  pid = d.process_id if d.process_id is not None else env("JAX_PROCESS_ID")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only
  jax.distributed.initialize(d.coordinator_address, num, pid,
                             initialization_timeout=d.timeout_s)


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """("data", "fsdp") mesh over `devices` (default: all devices of all processes)."""
  devices = np.array(jax.devices() if devices is None else devices)
  fsdp = cfg.get("fsdp", 1)
  if fsdp < 1 or devices.size % fsdp:
    raise ValueError(f"fsdp={fsdp} must divide the {devices.size} devices")
  return jax.sharding.Mesh(devices.reshape(-1, fsdp), ("data", "fsdp"))


def _fsdp_spec(shape, n: int, min_size: int) -> P:
  """Shards the largest dimension divisible by n over "fsdp"; small arrays stay replicated."""
  if n == 1 or int(np.prod(shape)) < min_size:
    return P()
  dims = sorted((d for d in range(len(shape)) if shape[d] % n == 0), key=lambda d: -shape[d])
  if not dims:
    return P()
  spec = [None] * len(shape)
  spec[dims[0]] = "fsdp"
  return P(*spec)


def state_shardings(abstract_state: dict, mesh: jax.sharding.Mesh,
                    min_size: int = 2**14) -> dict:
  """NamedShardings of a train state: params and optimiser state FSDP-sharded when the
  mesh's "fsdp" axis is > 1; loss state, step and rng replicated."""
  n = mesh.shape["fsdp"]
  shard = lambda x: NamedSharding(mesh, _fsdp_spec(x.shape, n, min_size))
  rep = lambda x: NamedSharding(mesh, P())
  return {k: jax.tree.map(shard if k in ("params", "opt_state") else rep, v)
          for k, v in abstract_state.items()}


def make_step(setup: "Setup", mesh: jax.sharding.Mesh, shardings: dict) -> Callable:
  """jit-compiled train_step with the state's shardings and a batch-sharded input."""
  batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
  return jax.jit(setup.step(mesh), in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, None), donate_argnums=0)


def host_params(params, mesh: jax.sharding.Mesh):
  """Full parameters as NumPy on this host (gathered first if FSDP-sharded)."""
  params = jax.jit(lambda p: p, out_shardings=NamedSharding(mesh, P()))(params)
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), params)


# ----------------------------------------------------------------------------
# Checkpoints.


def _manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True))


def _save(mngr, state, data_state):
  step = int(state["step"])
  if step not in mngr.all_steps():
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=ocp.args.JsonSave(data_state)))


def _check_workdir_config(cfg, workdir) -> None:
  """Writes config.json beside the checkpoints, or refuses an incompatible one."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    plain = lambda v: v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v
    diff = {k: (old.get(k), plain(cfg.get(k))) for k in _RESUME_KEYS
            if old.get(k) != plain(cfg.get(k))}
    if diff and os.path.isdir(os.path.join(workdir, "checkpoints")):
      raise ValueError(
          f"workdir {workdir} holds a run with a different config ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}): "
          "use a new --workdir or the original config")
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      f.write(cfg.to_json(indent=2))
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------
# Evaluation hooks.


def eval_data(cfg, limit=None):
  if cfg.get("multimodal") is not None:
    return tuple(multimodal.load_captioned(split, cfg.data_dir, limit)
                 for split in ("train", cfg.eval_split))
  train_src = pipeline.get_source(cfg.dataset, "train", cfg.data_dir)
  test_src = pipeline.get_source(cfg.dataset, cfg.eval_split, cfg.data_dir)
  return pipeline.load_arrays(train_src, limit), pipeline.load_arrays(test_src, limit)


def evaluate_state(cfg, model, params, *, linear: bool = False, data=None) -> dict:
  """kNN (and optionally linear-probe) top-1 of the encoder features, plus geometry;
  image-text runs: zero-shot, retrieval, probes, gap (and fusion tasks for albef)."""
  data = data or eval_data(cfg)
  if cfg.get("multimodal") is not None:
    tok = builders.tokenizer(builders.BUILDERS[cfg.dataset](
        data_dir=cfg.data_dir or pipeline.DEFAULT_DATA_DIR))
    out = multimodal.evaluate_clip(model, params, *data, tok)
    if cfg.multimodal.framework == "albef" and linear:
      out["fusion"] = multimodal.evaluate_fusion(model, params, *data, tok)
    return out
  (tr_x, tr_y), (te_x, te_y) = data
  features = jax.jit(lambda x: model.apply(params, x)[0])
  tr_f, te_f = evaluate.embed(features, tr_x), evaluate.embed(features, te_x)
  n_cls = int(max(tr_y.max(), te_y.max()) + 1)
  out = {"knn_top1": evaluate.knn_accuracy(tr_f, tr_y, te_f, te_y, num_classes=n_cls,
                                           k=cfg.knn_k),
         "effective_rank": float(metrics.effective_rank(jnp.asarray(te_f)))}
  if linear:
    out["linear_top1"] = evaluate.linear_probe(tr_f, tr_y, te_f, te_y, num_classes=n_cls)["top1"]
  return out


# ----------------------------------------------------------------------------
# Loop.


def _print(*args):
  if jax.process_index() == 0:
    print(*args, flush=True)


def _log(workdir, record):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(record) + "\n")


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       stop_at: Optional[int] = None) -> dict:
  """Trains cfg.num_steps steps (resuming from workdir if it holds a checkpoint).

  Args:
    stop_at: stop after this step as if preempted (checkpoint, no final eval).
  Returns:
    the final evaluation dict (also written to workdir/final_eval.json), or
    {"preempted": True, "step": k} when stopped early.
  """
  initialize_distributed(cfg)
  n_dev = jax.device_count()
  if cfg.batch_size % n_dev:
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {n_dev} devices: "
                     f"set --config.batch_size to a multiple of {n_dev}")
  setup = build(cfg)
  model, train_src = setup.model, setup.train_src
  _check_workdir_config(cfg, workdir)

  mesh = make_mesh(cfg)
  shardings = state_shardings(jax.eval_shape(setup.init), mesh)
  data_sharding = NamedSharding(mesh, P(BATCH_AXES))
  state = jax.jit(setup.init, out_shardings=shardings)()

  mngr = _manager(workdir, cfg.keep_checkpoints)
  if mngr.latest_step() is not None:
    # Abstract state with this run's shardings: a checkpoint written by any process count
    # or mesh restores onto this one.
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    state = restored["state"]
    _print(f"resumed from {workdir} at step {int(state['step'])} "
           f"(data iterator at batch {restored['data']['next_index']})")

  step_fn = make_step(setup, mesh, shardings)
  ds = pipeline.train_dataset(
      train_src, batch_size=cfg.batch_size, seed=cfg.seed,
      augment=aug_lib.AugmentConfig(**cfg.augment.to_dict()),
      process_index=jax.process_index(), process_count=jax.process_count())
  start = int(state["step"])
  batches = iter(ds[start:].to_iter_dataset(
      grain.ReadOptions(num_threads=cfg.data_threads, prefetch_buffer_size=4)))

  # SIGTERM (preemption) or a first Ctrl-C: checkpoint and exit at the next step; a second
  # Ctrl-C interrupts at once.
  preempted = threading.Event()

  def on_signal(signum, _):
    preempted.set()
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)

  old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  data = eval_data(cfg, cfg.eval_limit)
  if start == 0 and cfg.eval_at_init:
    init_eval = evaluate_state(cfg, model, host_params(state["params"], mesh), data=data)
    _log(workdir, {"step": 0, "phase": "eval", **init_eval})
  bar = tqdm.tqdm(total=cfg.num_steps, initial=start, desc="train", unit="step",
                  disable=jax.process_index() != 0 or not cfg.progress, dynamic_ncols=True)
  t_last, n_last = time.perf_counter(), start
  try:
    for step in range(start, cfg.num_steps):
      if stop_at is not None and step >= stop_at:
        preempted.set()
      if preempted.is_set():
        break
      local = next(batches)
      batch = {k: jax.make_array_from_process_local_data(data_sharding, local[k])
               for k in local if k != "label"}
      state, logs = step_fn(state, batch)
      done = step + 1
      if done % cfg.log_every == 0 or done == cfg.num_steps:
        logs = jax.device_get(logs)
        now = time.perf_counter()
        rate = (done - n_last) * cfg.batch_size / (now - t_last)
        t_last, n_last = now, done
        record = {"step": done, "phase": "train", "lr": float(setup.schedule(done)),
                  "examples_per_s": rate, **{k: float(v) for k, v in logs.items()}}
        _log(workdir, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{rate:.0f}")
      bar.update(1)
      if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.num_steps:
        _log(workdir, {"step": done, "phase": "eval",
                       **evaluate_state(cfg, model, host_params(state["params"], mesh),
                                        data=data)})
      if done % cfg.checkpoint_every == 0:
        _save(mngr, state, {"next_index": done, "seed": cfg.seed})
  finally:
    bar.close()
    for signum, handler in old_handlers.items():
      signal.signal(signum, handler)
  _save(mngr, state, {"next_index": int(state["step"]), "seed": cfg.seed})
  mngr.wait_until_finished()
  mngr.close()
  if preempted.is_set():
    _print(f"stopped: checkpoint saved at step {int(state['step'])} in {workdir}; "
           "run the same command to resume")
    return {"preempted": True, "step": int(state["step"])}

  result = {"step": int(state["step"]),
            **evaluate_state(cfg, model, host_params(state["params"], mesh),
                             linear=cfg.final_linear_probe, data=data)}
  if start == 0 and cfg.eval_at_init:
    result["random_init"] = init_eval
  _log(workdir, {"phase": "final", **result})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_eval.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result


def restore_for_eval(workdir: str, step=None):
  """(config, restored state, model) of a workdir, for `contrastive_jax.evaluate`."""
  with open(os.path.join(workdir, "config.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  setup = build(cfg)
  # Onto this host's first device, whatever process count or mesh wrote the checkpoint.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(setup.init))
  mngr = _manager(workdir, cfg.keep_checkpoints)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return cfg, state["state"], setup.model


_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_STOP_AT = flags.DEFINE_integer("stop_at", None, "Checkpoint and exit after this step, as if "
                                "preempted (time-boxed jobs, tests).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if _CONFIG.value is None or _WORKDIR.value is None:
    sys.exit("error: --config and --workdir are required, e.g. "
             "--config configs/mnist_gamma.py --workdir runs/mnist_gamma")
  try:
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value, stop_at=_STOP_AT.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  if jax.process_index() != 0:
    return
  print(json.dumps(result))
  if "knn_top1" in result and "random_init" in result:
    print(f"kNN top-1: trained {100 * result['knn_top1']:.1f} % vs random init "
          f"{100 * result['random_init']['knn_top1']:.1f} % "
          f"(linear probe: {100 * result.get('linear_top1', float('nan')):.1f} %)")


def cli():
  app.run(main)


if __name__ == "__main__":
  cli()
