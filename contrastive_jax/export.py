"""A trained encoder out of a workdir, in a format others read, and back in.

  contrastive-jax-export --workdir runs/x [--step K] --out encoders/x

writes, for a two-view run (an encoder and its projection head):
  encoder.safetensors  the encoder's variables: "params/<module>/<name>" (and
                       "batch_stats/..." for BatchNorm), float32
  head.safetensors     the projection head's: "params/Dense_0/kernel", ...
  model.json           what rebuilds the model and feeds it: the encoder's name, dtype and
                       norm, the head's sizes, and the input (uint8 images of a shape,
                       scaled by 1/255, the evaluation's centre-crop fraction)

`load_encoder(DIR)` gives a Flax module and its variables, ready for
`module.apply(variables, images / 255.0, train=False)` -> features [B, F].
`--config.init_from=DIR_or_WORKDIR` starts a new run from those weights with a fresh
optimiser (`--config.init_head=False` keeps the new run's own random head).
"""

import argparse
import json
import os
import sys
from typing import Any, Optional

import numpy as np

from contrastive_jax import workdir as workdir_lib

FORMAT = 1
MODEL_JSON = "model.json"


def _split(variables: dict) -> tuple[dict, dict]:
  """(encoder variables, head variables) of an encoder-and-head model's variables
  (`models.encoders.ContrastiveModel`); ValueError for another model."""
  params = dict(variables["params"])
  if "encoder" not in params:
    raise ValueError("export and --config.init_from take a model of one encoder and a "
                     f"projection head (the two-view task's); this one has {sorted(params)}")
  encoder = {"params": params.pop("encoder")}
  if "batch_stats" in variables:
    encoder["batch_stats"] = variables["batch_stats"]["encoder"]
  return encoder, {"params": params}


def from_workdir(workdir: str, step: Optional[int] = None) -> tuple[dict, dict, dict]:
  """(model description, encoder variables, head variables) of a two-view run's
  checkpoint, as NumPy."""
  from contrastive_jax import eval_checkpoint
  cfg, state, task = eval_checkpoint.load(workdir, step)
  encoder, head = _split(task.eval_variables(state))
  meta = {"format": FORMAT, "model": cfg.model, "dtype": cfg.get("dtype", "float32"),
          "norm": cfg.get("norm", "group"), "head_hidden": cfg.head_hidden,
          "proj_dim": cfg.proj_dim,
          "input": {"shape": list(task.image_shape), "dtype": "uint8", "scale": 1 / 255,
                    "eval_crop_fraction": cfg.get("eval_crop_fraction", 1.0)},
          "source": {"workdir": str(workdir), "step": int(state["step"]),
                     "dataset": cfg.dataset, "loss": cfg.loss}}
  return meta, encoder, head


def export(workdir: str, out: str, step: Optional[int] = None) -> dict:
  """Writes the encoder, the head and model.json of a run's checkpoint to `out`."""
  from flax import traverse_util
  from safetensors.numpy import save_file
  meta, encoder, head = from_workdir(workdir, step)
  os.makedirs(out, exist_ok=True)
  for name, variables in (("encoder", encoder), ("head", head)):
    flat = traverse_util.flatten_dict(variables, sep="/")
    save_file({k: np.asarray(v, np.float32) for k, v in flat.items()},
              os.path.join(out, f"{name}.safetensors"),
              metadata={"format": str(FORMAT), "model": meta["model"]})
  with open(os.path.join(out, MODEL_JSON), "w") as f:
    json.dump(meta, f, indent=2)
  return meta


def read(path: str) -> tuple[dict, dict, dict]:
  """(model description, encoder variables, head variables) of an export directory or,
  for a workdir, of its newest good checkpoint."""
  if os.path.exists(os.path.join(path, MODEL_JSON)):
    from flax import traverse_util
    from safetensors.numpy import load_file
    with open(os.path.join(path, MODEL_JSON)) as f:
      meta = json.load(f)
    if meta.get("format") != FORMAT:
      raise ValueError(f"{path}: export format {meta.get('format')!r}, this version reads "
                       f"{FORMAT}")
    load = lambda name: traverse_util.unflatten_dict(
        load_file(os.path.join(path, f"{name}.safetensors")), sep="/")
    return meta, load("encoder"), load("head")
  if workdir_lib.join(path, "checkpoints").exists():
    return from_workdir(path)
  raise FileNotFoundError(f"{path} is neither an export (no {MODEL_JSON}) nor a workdir (no "
                          "checkpoints/)")


def load_encoder(path: str) -> tuple[Any, dict]:
  """(Flax encoder module, its variables) from an export directory (or a workdir):
  `module.apply(variables, images.astype(float32) / 255, train=False)` -> features [B, F]."""
  from contrastive_jax.models import encoders
  meta, encoder, _ = read(path)
  module = encoders.ENCODERS[meta["model"]](encoders.compute_dtype(meta["dtype"]),
                                            meta["norm"], None)
  return module, encoder


def _replace(tree: Any, new: Any, where: str) -> Any:
  """`tree` (jax arrays) with every leaf from `new` (NumPy) placed like the old leaf;
  ValueError naming the first path whose structure or shape differs."""
  import jax
  old_paths = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_leaves_with_path(tree)}
  new_paths = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_leaves_with_path(new)}
  if old_paths.keys() != new_paths.keys():
    diff = sorted(old_paths.keys() ^ new_paths.keys())
    raise ValueError(f"--config.init_from: the {where} differs from this run's at {diff[0]} "
                     f"({len(diff)} paths): use the same model")
  for p, a in old_paths.items():
    if tuple(a.shape) != tuple(new_paths[p].shape):
      raise ValueError(f"--config.init_from: {where}{p} has shape {new_paths[p].shape}, this "
                       f"run's is {tuple(a.shape)}: use the same model and sizes")
  return jax.tree.map(lambda a, b: jax.device_put(np.asarray(b, a.dtype), a.sharding), tree, new)


def initialise(state: dict, path: str, head: bool = True) -> dict:
  """A fresh two-view train state with the encoder (and, with `head`, the projection head)
  of `path`; the optimiser state stays fresh."""
  _, encoder, head_vars = read(path)
  own_encoder, own_head = _split(state["params"])
  params = {"encoder": _replace(own_encoder["params"], encoder["params"], "encoder"),
            **(_replace(own_head["params"], head_vars["params"], "head") if head else
               own_head["params"])}
  new = {**state, "params": {**state["params"], "params": params}}
  if "batch_stats" in state:
    if "batch_stats" not in encoder:
      raise ValueError("--config.init_from: this run uses BatchNorm, the export has no "
                       "running averages (norm=group): use the same norm")
    new["batch_stats"] = {**state["batch_stats"],
                          "encoder": _replace(state["batch_stats"]["encoder"],
                                              encoder["batch_stats"], "encoder's batch_stats")}
  elif "batch_stats" in encoder:
    raise ValueError("--config.init_from: the export uses BatchNorm, this run does not: set "
                     "--config.norm=batch")
  return new


def main(argv: Optional[list[str]] = None) -> None:
  """The console script `contrastive-jax-export`."""
  parser = argparse.ArgumentParser(description="Export a two-view run's encoder and head as "
                                   "safetensors, with the model and input description.")
  parser.add_argument("--workdir", required=True, help="the run (local path or gs://)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
  parser.add_argument("--out", required=True, help="directory to write")
  args = parser.parse_args(argv)
  from contrastive_jax import checkpointing
  from contrastive_jax.data import pipeline
  try:
    meta = export(args.workdir, args.out, args.step)
  except (FileNotFoundError, ValueError, OSError, checkpointing.CheckpointError,
          workdir_lib.WorkdirError, pipeline.DataError) as e:
    sys.exit(f"error: {e}")
  print(json.dumps({"out": args.out, "model": meta["model"], "step": meta["source"]["step"]}))


if __name__ == "__main__":
  main()
