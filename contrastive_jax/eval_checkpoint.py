"""Evaluates a workdir's checkpoint with its task's evaluators; writes eval_STEP.json.

  python -m contrastive_jax.eval_checkpoint --workdir DIR [--step K] [--evaluators knn,linear_probe]
"""

import argparse
import json
import sys

from contrastive_jax import checkpointing
from contrastive_jax import train
from contrastive_jax import workdir


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description="Evaluate a checkpoint of a workdir.")
  parser.add_argument("--workdir", required=True, help="local path or gs://bucket/run")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  parser.add_argument("--evaluators", default=None,
                      help="comma-separated evaluators (default: the config's final_evaluators)")
  args = parser.parse_args(argv)
  try:
    cfg, state, task = train.restore_for_eval(args.workdir, args.step)
  except (FileNotFoundError, ValueError, checkpointing.CheckpointError) as e:
    sys.exit(f"error: {e}")
  names = args.evaluators or cfg.final_evaluators
  result = {"step": int(state["step"]),
            **task.evaluate(state["params"], task.eval_data(cfg.eval_limit), names)}
  path = workdir.join(args.workdir, f"eval_{result['step']}.json")
  workdir.write_json(path, result)
  print(json.dumps(workdir.finite_json(result)))
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
