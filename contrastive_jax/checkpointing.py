"""Checkpoints of a workdir: Orbax manager, checked save / restore, config compatibility.

A workdir holds `checkpoints/STEP/` (train state + a JSON item with the data
iterator's position and a fingerprint of every state array) and `config.json`,
the config of the run that wrote them.

A state is saved only when it is finite. A restore checks the tree, the shapes,
finiteness and the fingerprints; a step that fails any check is moved to
`checkpoints.broken/` with a warning and the next newest one is tried.
"""

import json
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from contrastive_jax import workdir as workdir_lib

# The trainer's config fields that may change when a run resumes (prefixes of dotted
# paths; a task adds its own); every other field must equal the stored config's.
# num_steps may not go below the checkpoint.
MUTABLE_ON_RESUME = (
    "num_steps", "log_every", "progress", "evals", "eval_limit", "eval_split",
    "checkpoint_every",
    "keep_checkpoints", "data_dir", "data_threads", "data_workers", "data_cache", "distributed", "fsdp", "skip_nonfinite",
    "progress_every_s", "tensorboard", "wandb", "stop_timeout_s",
    "lock_stale_s")


class CheckpointError(RuntimeError):
  """No checkpoint of a workdir that has some can be restored."""


def _warn(msg: str) -> None:
  print(f"warning: {msg}", file=sys.stderr, flush=True)


def manager(workdir: workdir_lib.PathLike) -> ocp.CheckpointManager:
  """Orbax manager of workdir/checkpoints (Orbax writes gs:// itself, through tensorstore).

  Orbax deletes nothing by itself: old steps are removed by `save` / `rotate`, after
  the trainer's fence, so a trainer that lost its workdir deletes nothing.
  """
  return ocp.CheckpointManager(
      workdir_lib.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                           enable_async_checkpointing=True))


# ----------------------------------------------------------------------------
# Fingerprints: catch flipped bytes in any array, whatever mesh wrote or reads it.


def _mix(x: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser, elementwise on uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """uint32 hash of an array's bits and positions: a sum of per-element hashes, so
  it does not depend on how the array is sharded or in which order it is reduced."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.bool_:
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    x = jax.lax.bitcast_convert_type(x, bits) if x.dtype != jnp.bool_ else x
  words = x.astype(jnp.uint32).ravel()
  position = jnp.arange(words.size, dtype=jnp.uint32)
  return jnp.sum(_mix(words ^ _mix(position + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)


def _bad_values(x: jax.Array) -> jax.Array:
  """[any NaN or +inf, any -inf] of an array."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros((2,), bool)
  return jnp.stack([jnp.any(jnp.isnan(x) | jnp.isposinf(x)), jnp.any(jnp.isneginf(x))])


@jax.jit
def _check(state: Any) -> tuple[Any, Any]:
  return jax.tree.map(_leaf_fingerprint, state), jax.tree.map(_bad_values, state)


def fingerprint(state: Any, neg_inf_ok: Sequence[str] = ()) -> tuple[dict[str, int], list[str]]:
  """({path: fingerprint}, [paths of leaves holding NaN or inf]) of a state.

  -inf is allowed in the top-level entries `neg_inf_ok` (a task's loss state marks
  the examples not yet visited with it).
  """
  fingerprints, bad = jax.device_get(_check(state))
  fp = {jax.tree_util.keystr(p): int(v)
        for p, v in jax.tree_util.tree_leaves_with_path(fingerprints)}
  paths = [jax.tree_util.keystr(p) for p, (nan_or_inf, neg_inf)
           in jax.tree_util.tree_leaves_with_path(bad, is_leaf=lambda x: isinstance(x, np.ndarray))
           if nan_or_inf or (neg_inf and p[0].key not in neg_inf_ok)]
  return fp, paths


# ----------------------------------------------------------------------------
# Save and restore.


class Fenced(RuntimeError):
  """The fence failed just before a write: another trainer holds the workdir."""


def rotate(mngr: ocp.CheckpointManager, keep: int, fence: Callable[[], bool] = lambda: True
           ) -> None:
  """Waits for the save in flight, then deletes all but the newest `keep` steps, if
  `fence()` still holds after the wait (raises Fenced otherwise). (All processes call
  it: Orbax's delete is collective.)"""
  mngr.wait_until_finished()
  old = sorted(mngr.all_steps())[:-keep]
  if old and not fence():
    raise Fenced("the workdir lock was lost: nothing deleted")
  for step in old:
    mngr.delete(step)


def save(mngr: ocp.CheckpointManager, state: dict, data_state: dict, keep: int,
         neg_inf_ok: Sequence[str] = (), fence: Callable[[], bool] = lambda: True) -> bool:
  """Saves a finite state at its step (asynchronously) unless that step is saved,
  after completing the previous save and deleting steps beyond the newest `keep`
  (so a good checkpoint is never deleted before a newer one is complete).

  `fence()` is checked again right before each deletion and the save (a trainer paused
  in here while another took over must not write); Fenced is raised if it fails.
  Returns whether a save started. Raises FloatingPointError (nothing written) if
  any array holds a NaN or inf.
  """
  step = int(state["step"])
  fingerprints, bad = fingerprint(state, neg_inf_ok)
  if bad:
    raise FloatingPointError(f"the state at step {step} is not finite in {', '.join(bad[:3])}"
                             f"{' ...' if len(bad) > 3 else ''}: not checkpointed")
  rotate(mngr, keep, fence)
  if step in mngr.all_steps():
    return False
  if not fence():
    raise Fenced(f"the workdir lock was lost: step {step} not saved")
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave({**data_state, "fingerprints": fingerprints})))
  return True


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: Optional[int] = None,
            neg_inf_ok: Sequence[str] = ()) -> dict:
  """{"state": ..., "data": ...} of `step` (default latest) onto the shardings that
  `abstract_state` (a tree of jax.ShapeDtypeStruct) carries: a checkpoint written by
  any process count or mesh restores onto this one. Raises CheckpointError unless
  the restored state has the expected tree and shapes, is finite and matches the
  fingerprints recorded when it was saved."""
  step = mngr.latest_step() if step is None else step
  items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore()}
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # noqa: BLE001  (Orbax raises many kinds: KeyError, ValueError, OSError)
    raise CheckpointError(f"step {step} does not restore ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})") from None
  state, data = restored["state"], restored["data"] or {}
  if jax.tree.structure(state) != jax.tree.structure(abstract_state):
    raise CheckpointError(f"step {step} holds another state tree")
  for (path, x), want in zip(jax.tree_util.tree_leaves_with_path(state),
                             jax.tree.leaves(abstract_state)):
    if x.shape != want.shape or x.dtype != want.dtype:
      raise CheckpointError(f"step {step}: {jax.tree_util.keystr(path)} is {x.dtype}{x.shape}, "
                            f"expected {want.dtype}{want.shape}")
  fingerprints, bad = fingerprint(state, neg_inf_ok)
  if bad:
    raise CheckpointError(f"step {step} holds NaN or inf in {', '.join(bad[:3])}")
  recorded = data.get("fingerprints")
  if recorded is None:
    _warn(f"checkpoint step {step} has no recorded fingerprints (older version): not verified")
  elif recorded != fingerprints:
    changed = [k for k in fingerprints if recorded.get(k) != fingerprints[k]]
    raise CheckpointError(f"step {step}: the bytes of {', '.join(changed[:3])}"
                          f"{' ...' if len(changed) > 3 else ''} changed since they were saved")
  return {"state": state, "data": data}


def read(workdir: workdir_lib.PathLike, step: Optional[int] = None,
         only: Optional[tuple[str, ...]] = None) -> dict:
  """A checkpoint's state as NumPy arrays, from the checkpoint's own metadata: no
  model, optimiser or data needs to be built (evaluation, tests, tools).

  Args:
    step: the step to read (default: the newest that reads and passes its checks;
      broken newer ones are reported, not moved).
    only: the top-level state entries to read, e.g. ("params", "step"): a partial
      restore, so the optimiser state is never read.
  Returns:
    {entry: tree of np.ndarray}; optimiser states come back as nested dicts/lists.
  Raises:
    FileNotFoundError (no checkpoint), CheckpointError (none reads).
  """
  handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
  mngr = ocp.CheckpointManager(workdir_lib.join(workdir, "checkpoints"), item_handlers=handlers)
  try:
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    errors = []
    for s in steps:
      try:
        return _read(mngr, s, only)
      except CheckpointError as e:
        errors.append(str(e))
        if s != steps[-1]:
          _warn(f"{e}: trying an older checkpoint")
    raise CheckpointError("; ".join(errors))
  finally:
    mngr.close()


def _read(mngr: ocp.CheckpointManager, step: int, only: Optional[tuple[str, ...]]) -> dict:
  try:
    tree = mngr.item_metadata(step)["state"].tree
    if only is not None:
      tree = {k: tree[k] for k in only}
    as_numpy = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=as_numpy,
                                     partial_restore=only is not None),
        data=ocp.args.JsonRestore()))
  except Exception as e:  # noqa: BLE001  (Orbax raises many kinds)
    raise CheckpointError(f"step {step} does not read ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
  state, recorded = restored["state"], (restored["data"] or {}).get("fingerprints") or {}
  fingerprints, bad = fingerprint(state, neg_inf_ok=tuple(state))  # -inf: the reader's call
  # Entries read back under the names they were saved with (params, loss state, step) are
  # checked; optimiser states come back as dicts, under other names.
  changed = [k for k, v in fingerprints.items() if k in recorded and recorded[k] != v]
  if changed or bad:
    raise CheckpointError(f"step {step}: {', '.join((changed or bad)[:3])} "
                          f"{'changed since they were saved' if changed else 'hold NaN or inf'}")
  return state


def set_aside_unfinished(workdir: workdir_lib.PathLike) -> list[str]:
  """Moves the checkpoints that were being written when their trainer stopped (Orbax's
  temporary directories) to workdir/checkpoints.broken/. A trainer that takes over the
  workdir does this first, so that a paused previous holder cannot complete such a save
  under it. Returns the names moved."""
  root = workdir_lib.join(workdir, "checkpoints")
  if not root.exists():
    return []
  moved = []
  for path in root.iterdir():
    if ".orbax-checkpoint-tmp" in path.name:
      target = workdir_lib.join(workdir, "checkpoints.broken")
      target.mkdir(parents=True, exist_ok=True)
      path.rename(target / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
      moved.append(path.name)
  if moved:
    _warn(f"set aside the unfinished checkpoint(s) {moved} of the previous trainer")
  return moved


def restore_newest_good(workdir: workdir_lib.PathLike, mngr: ocp.CheckpointManager,
                        abstract_state: Any, neg_inf_ok: Sequence[str] = ()
                        ) -> tuple[Optional[dict], ocp.CheckpointManager]:
  """Restores the newest step that passes `restore`'s checks. Each newer step that
  fails gives a warning and, once an older one restores, is moved to
  workdir/checkpoints.broken/ (kept, and out of the way of the next save of that step).

  Returns (restored or None when there is no checkpoint, the manager to go on with).
  Raises CheckpointError when checkpoints exist but none restores: the trainer never
  silently starts again from scratch.
  """
  errors, broken = [], []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored, why = restore(mngr, abstract_state, step, neg_inf_ok), None
    except CheckpointError as e:
      restored, why = None, str(e)
    if jax.process_count() > 1:  # a shard may fail on one process only: all agree
      fails = multihost_utils.process_allgather(np.int32(why is not None))
      if why is None and np.any(fails):
        restored, why = None, f"step {step} fails to restore on another process"
    if why is None:
      break
    errors.append(why)
    broken.append(step)
    _warn(f"{why}: trying an older checkpoint")
  else:
    if errors:  # nothing moved: the trainer never starts again from scratch over them
      raise CheckpointError(f"no checkpoint in {workdir}/checkpoints restores: "
                            f"{'; '.join(errors)}")
    return None, mngr
  if broken:  # out of the manager's way, so that these steps can be saved again
    if jax.process_index() == 0:
      target = workdir_lib.join(workdir, "checkpoints.broken")
      target.mkdir(parents=True, exist_ok=True)
      for step in broken:
        workdir_lib.join(workdir, "checkpoints", str(step)).rename(
            target / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
      _warn(f"resuming from step {int(restored['state']['step'])}; moved the broken "
            f"step(s) {broken} to {target}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("moved broken checkpoints")
    mngr.close()
    mngr = manager(workdir)
  return restored, mngr


# ----------------------------------------------------------------------------
# Config compatibility.


def _flat(d: Any, prefix: str = "") -> dict:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out or {prefix[:-1]: {}}
  return {prefix[:-1]: d}


def config_changes(old: dict, cfg: ml_collections.ConfigDict,
                   mutable_fields: Sequence[str] = MUTABLE_ON_RESUME,
                   renamed: Optional[dict] = None) -> list[str]:
  """Dotted fields that differ between a stored config and cfg, except those that
  may change on resume (`mutable_fields`, prefixes of dotted paths); `renamed` maps a
  stored field's old dotted name to its new one."""
  new = json.loads(cfg.to_json())  # tuples -> lists, as stored
  a, b = _flat(old), _flat(new)
  a = {(renamed or {}).get(k, k): v for k, v in a.items()}
  mutable = lambda k: any(k == m or k.startswith(m + ".") for m in mutable_fields)
  return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if not mutable(k) and a.get(k) != b.get(k)]


def check_resume(cfg: ml_collections.ConfigDict, workdir: workdir_lib.PathLike,
                 mngr: ocp.CheckpointManager, task_mutable: Sequence[str] = (),
                 renamed: Optional[dict] = None) -> None:
  """Raises ValueError (one line) for a config that differs from the workdir's stored one
  in a field other than MUTABLE_ON_RESUME and the task's own `task_mutable` (`renamed`:
  old dotted names of fields the stored config may still use -> new)."""
  if not mngr.all_steps():
    return
  old = stored_config(workdir)
  if old is None:
    raise ValueError(
        f"workdir {workdir} holds checkpoints (steps {sorted(mngr.all_steps())}) but no "
        "config.json, so this config cannot be checked against theirs: put the run's "
        "config.json back, or use a new --workdir")
  mutable = (*MUTABLE_ON_RESUME, *task_mutable)
  changes = config_changes(old, cfg, mutable, renamed)
  if changes:
    raise ValueError(
        f"workdir {workdir} holds a run with a different config ({'; '.join(changes)}); "
        f"only {', '.join(mutable)} may change on resume: use a "
        "new --workdir or the original config")


def stored_config(workdir: workdir_lib.PathLike) -> Optional[dict]:
  return workdir_lib.read_json(workdir_lib.join(workdir, "config.json"))


def load_config(workdir: workdir_lib.PathLike) -> ml_collections.ConfigDict:
  old = stored_config(workdir)
  if old is None:
    raise FileNotFoundError(f"no config.json in {workdir}: is it a training workdir?")
  return ml_collections.ConfigDict(old)
