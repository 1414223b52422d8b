"""Checkpoints of a workdir: Orbax manager, save / restore, config compatibility.

A workdir holds `checkpoints/STEP/` (train state + data-iterator JSON) and
`config.json`, the config of the run that wrote them.
"""

import json
import os
from typing import Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

# Config fields that must match to resume from a workdir's checkpoint (the rest, e.g.
# num_steps or evaluation and logging fields, may change on resume).
RESUME_KEYS = ("task", "dataset", "model", "head_hidden", "text", "proj_dim", "vector_views",
               "loss", "loss_options", "temperature", "learn_temperature", "weights", "fusion",
               "batch_size", "seed", "optimizer")


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True))


def save(mngr: ocp.CheckpointManager, state: dict, data_state: dict) -> None:
  """Saves state at its step (asynchronously) unless that step is saved already."""
  step = int(state["step"])
  if step not in mngr.all_steps():
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=ocp.args.JsonSave(data_state)))


def restore(mngr: ocp.CheckpointManager, abstract_state, step: Optional[int] = None,
            with_data: bool = True) -> dict:
  """{"state": ..., "data": ...} of `step` (default latest) onto the shardings that
  `abstract_state` (a tree of jax.ShapeDtypeStruct) carries: a checkpoint written by
  any process count or mesh restores onto this one."""
  step = mngr.latest_step() if step is None else step
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if with_data:
    items["data"] = ocp.args.JsonRestore()
  return mngr.restore(step, args=ocp.args.Composite(**items))


def _plain(v):
  return v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v


def check_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json beside the checkpoints, or refuses an incompatible one."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = {k: (old.get(k), _plain(cfg.get(k))) for k in RESUME_KEYS
            if old.get(k) != _plain(cfg.get(k))}
    if diff and os.path.isdir(os.path.join(workdir, "checkpoints")):
      raise ValueError(
          f"workdir {workdir} holds a run with a different config "
          f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}): "
          "use a new --workdir or the original config")
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      f.write(cfg.to_json(indent=2))
    os.replace(path + ".tmp", path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))
