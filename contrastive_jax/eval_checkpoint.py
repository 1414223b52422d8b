"""Evaluates a workdir's checkpoint with its task's evaluators; writes eval_STEP.json.

  contrastive-jax-evaluate --workdir DIR [--step K] [--evaluators knn,linear_probe]

Evaluation reads checkpoints, never the trainer: only the parameters are restored
(a partial Orbax restore), and neither the optimiser nor the training pipeline is
built.
"""

import argparse
import json
import sys
from typing import Optional

import ml_collections

from contrastive_jax import checkpointing
from contrastive_jax import sharding
from contrastive_jax import tasks
from contrastive_jax import workdir
from contrastive_jax.data import pipeline


def load(workdir_path: str, step: Optional[int] = None
         ) -> tuple[ml_collections.ConfigDict, dict, tasks.Task]:
  """(config, {"step", *task.eval_keys} as NumPy, task) of a workdir's checkpoint, on any
  process count or mesh. Without `step`, the newest checkpoint that reads and passes
  its checks. The task is built on the train split's records (its evaluators fit
  their probes there), read as the evaluators stream them, not cached."""
  cfg = checkpointing.load_config(workdir_path)
  task = tasks.get(cfg, *pipeline.open_splits(cfg.dataset, cfg.data_dir, cfg.eval_split))
  state = checkpointing.read(workdir_path, step, only=("step", *task.eval_keys))
  return cfg, state, task


def main(argv: Optional[list[str]] = None) -> None:
  """The console script `contrastive-jax-evaluate` (prints the result and the file written)."""
  parser = argparse.ArgumentParser(description="Evaluate a checkpoint of a workdir.")
  parser.add_argument("--workdir", required=True, help="local path or gs://bucket/run")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  parser.add_argument("--evaluators", default=None,
                      help="comma-separated evaluators (default: the config's evals with final=True)")
  args = parser.parse_args(argv)
  sharding.use_compilation_cache()
  try:
    cfg, state, task = load(args.workdir, args.step)
    names = args.evaluators or ",".join(n for n, e in cfg.get("evals", {}).items() if e.final)
    task.check_evaluators(names, field=None)
  except (FileNotFoundError, ValueError, checkpointing.CheckpointError, workdir.WorkdirError,
          pipeline.DataError) as e:
    sys.exit(f"error: {e}")
  result = {"step": int(state["step"]),
            **task.evaluate(task.eval_variables(state), task.eval_data(cfg.eval_limit), names)}
  path = workdir.join(args.workdir, f"eval_{result['step']}.json")
  workdir.write_json(path, result)
  print(json.dumps(workdir.finite_json(result)))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
