"""Every config: the trainer's CLI overrides work, and the task it names accepts it."""

import glob
import importlib
import os
import subprocess
import sys

import pytest

from contrastive_jax import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith("base.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_names_a_task_and_takes_the_common_overrides(name):
  cfg = importlib.import_module(f"configs.{name}").get_config()
  assert cfg.task in tasks.TASKS, (name, cfg.task)
  cfg.update_from_flattened_dict({"num_steps": 7, "warmup_steps": 3, "batch_size": 16})
  assert (cfg.num_steps, cfg.warmup_steps, cfg.batch_size) == (7, 3, 16)
  # The config holds every field its task requires (the task's section builds).
  section = tasks.base.section(cfg, tasks.TASKS[cfg.task].fields)
  assert section.num_steps == 7


def test_a_task_section_holds_what_the_task_declares_and_nothing_else():
  cfg = importlib.import_module("configs.mnist_gamma").get_config()
  section = tasks.base.section(cfg, tasks.TASKS["two_view"].fields)
  assert set(section) == set(tasks.base.SHARED) | set(tasks.TwoViewTask.fields)
  assert section.knn_k == cfg.knn_k and section.eval_batch_size == 256  # the task's default
  with pytest.raises(AttributeError):
    section.learning_rate  # the optimiser's, not the task's  # noqa: B018
  del cfg.temperature
  with pytest.raises(ValueError, match=r"the 'two_view' task needs --config.temperature"):
    tasks.base.section(cfg, tasks.TASKS["two_view"].fields)


def test_tasks_take_every_default_from_their_declaration():
  """No task reads the config with a default of its own (`cfg.get(name, default)`): a
  default lives in the task's `fields` or in configs/base.py, once."""
  for name in ("base", "two_view", "image_text", "fusion"):
    source = open(os.path.join(ROOT, "contrastive_jax", "tasks", f"{name}.py")).read()
    assert "cfg.get(" not in source, name


@pytest.mark.slow
def test_cli_overrides_reach_the_trainer(tmp_path):
  """--config.num_steps / warmup_steps / batch_size on the command line, for every config,
  parsed by the trainer's own flags."""
  code = ("import sys; from absl import flags; from contrastive_jax import main; "
          "main._define_flags(); flags.FLAGS(main.resolve_config(sys.argv)); c = main._FLAGS['config'].value; "
          "print(c.task, c.num_steps, c.warmup_steps, c.batch_size)")
  for name in CONFIGS:
    out = subprocess.run(
        [sys.executable, "-c", code, "--config", f"configs/{name}.py", "--workdir",
         str(tmp_path), "--config.num_steps=11", "--config.warmup_steps=2",
         "--config.batch_size=24"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[1:] == ["11", "2", "24"], (name, out.stdout)
