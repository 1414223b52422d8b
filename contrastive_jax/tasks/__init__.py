"""Tasks: one training objective each, all driven by the one trainer (`train.py`).

  two_view   self-supervised, two augmented views of an image (`two_view.TwoViewTask`)
  two_tower  image-text, CLIP-style two towers (`image_text.TwoTowerTask`)
  fusion     image-text, ALBEF-style fusion model (`fusion.FusionTask`)
"""

from typing import Any

import ml_collections

from contrastive_jax.tasks.base import Task
from contrastive_jax.tasks.fusion import FusionTask
from contrastive_jax.tasks.image_text import TwoTowerTask
from contrastive_jax.tasks.two_view import TwoViewTask

TASKS = {"two_view": TwoViewTask, "two_tower": TwoTowerTask, "fusion": FusionTask}


def get(cfg: ml_collections.ConfigDict, train_src: Any, eval_src: Any = None, **kwargs) -> Task:
  """The task of cfg.task on the training records `train_src` (a random-access
  sequence of dicts) and the eval split (`eval_src`: a function opening it; default
  cfg.eval_split). kwargs, e.g. an image-text task's tokenizer, go to the task."""
  if cfg.task not in TASKS:
    raise ValueError(f"unknown task {cfg.task!r}: set --config.task to one of "
                     f"{', '.join(TASKS)}")
  return TASKS[cfg.task](cfg, train_src, eval_src, **kwargs)
