"""The CIFAR-10 and ImageNet configs train a few steps on TFDS mock data (the real
dataset names, random records of the real feature spec; ImageNet's images vary in
size), through the trainer's command line and the same data path a TPU run uses.

Each run is a process of one CPU device: the recipes' models compile about twice as
fast there as on the suite's 8 simulated devices (sharding is tested elsewhere)."""

import json
import os
import subprocess
import sys

import jax
import pytest
import tensorflow_datasets as tfds

from contrastive_jax.configs import cifar10_gamma, cifar10_simclr
from contrastive_jax import step as step_lib
from contrastive_jax import sharding
from tests.test_train import eval_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
# Keep the recipes; shrink only what a 2-core CPU cannot afford.
SMALL = dict(batch_size=16, num_steps=2, warmup_steps=1, log_every=1, checkpoint_every=2,
             eval_limit=32, eval_batch_size=16, knn_k=5, data_workers=0, data_threads=1,
             progress=False)
# Runs the trainer CLI with TFDS's mock data for the config's dataset.
RUN = ("import sys, tensorflow_datasets as tfds; from contrastive_jax import main\n"
       "src = None\n"
       "with tfds.testing.mock_data(num_examples=48):\n"
       "  if 'imagenet' in sys.argv[2]:\n"
       "    src = tfds.data_source('imagenet2012', split='train')\n"
       "    print('SHAPES', len({src[i]['image'].shape for i in range(8)}))\n"
       "  main.cli()\n")


@pytest.mark.parametrize("config,extra", [
    ("cifar10_simclr", eval_flags("cifar10_simclr", final=("knn",))),
    ("imagenet_resnet50", ["--config.image_size=32", *eval_flags("imagenet_resnet50")]),
    ("imagenet_vit_s16", ["--config.image_size=32", *eval_flags("imagenet_vit_s16")]),
])
def test_image_configs_train_a_few_steps_on_mock_data(config, extra, tmp_path):
  flags = [f"--config.{k}={v}" for k, v in SMALL.items()]
  out = subprocess.run(
      [sys.executable, "-c", RUN, "--config", os.path.join(ROOT, "configs", f"{config}.py"),
       "--workdir", str(tmp_path / "w"), f"--config.data_dir={tmp_path / 'tfds'}", *flags,
       *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  assert out.returncode == 0, out.stderr[-3000:]
  if "imagenet" in config:  # the mock's images vary in size, as ImageNet's do
    assert int(out.stdout.split("SHAPES ")[1].split()[0]) > 1
  result = json.loads((tmp_path / "w" / "final_eval.json").read_text())
  assert result["step"] == 2
  if "--config.evals.knn.final=True" in extra:
    assert 0.0 <= result["knn_top1"] <= 1.0


def test_cifar10_gamma_is_the_simclr_recipe_with_the_gamma_loss_and_traces():
  """cifar10_gamma differs from cifar10_simclr only in its loss, temperature, batch and
  steps (equal epochs); its step traces (the rest is the run above)."""
  simclr, gamma = cifar10_simclr.get_config(), cifar10_gamma.get_config()
  differ = {k for k in simclr if simclr[k] != gamma[k]}
  assert differ == {"loss", "temperature", "batch_size", "num_steps", "warmup_steps"}
  assert gamma.num_steps * gamma.batch_size == simclr.num_steps * simclr.batch_size
  with tfds.testing.mock_data(num_examples=48):
    gamma.update({**SMALL, "data_dir": "/nonexistent"})
    setup = step_lib.build(gamma)
    state = jax.eval_shape(setup.init)
    batch = {k: jax.ShapeDtypeStruct((16, 32, 32, 3), "uint8") for k in ("view1", "view2")}
    batch["index"] = jax.ShapeDtypeStruct((16,), "int32")
    mesh = sharding.make_mesh(gamma)
    new_state, logs = jax.eval_shape(
        lambda s, b: step_lib.train_step(s, b, task=setup.task, tx=setup.tx, mesh=mesh), state, batch)
  assert logs["loss"].shape == () and new_state["loss_state"]["log_z"].shape == (2, 48)
