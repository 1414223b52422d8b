"""Real multi-process training: 2 processes x 4 CPU devices == 1 process x 8 devices.

Each run is the trainer CLI in its own OS process; the 2-process run joins over
loopback through `jax.distributed` (gloo collectives). Every process is killed
if it outlives its timeout, and the coordinator port is checked free afterwards.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from contrastive_jax import checkpointing
from contrastive_jax.data import pipeline
from tests.test_train import eval_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
STEPS, STOP = 6, 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _nothing_listens_on(port: int) -> bool:
  try:
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    return False
  except OSError:  # refused: the coordinator has released its port
    return True


# Two-view runs: the default config on sklearn digits with a small MLP.
TWO_VIEW = ("configs/mnist_gamma.py", "--config.dataset=sklearn_digits",
            *eval_flags("mnist_gamma", final=("knn",)), "--config.head_hidden=64")
# Image-text runs: small towers on captioned digits, no evaluation (the states are compared).
# The gamma ITC alone: with the Brownian-bridge and separation terms on, a step over 2 CPU
# processes takes ~12 s through gloo (vs ~0.3 s without them), and those terms are checked
# 1 vs 8 devices in test_image_text.py.
IMAGE_TEXT = ("--config.text.width=32", "--config.text.depth=1",
              *eval_flags("captions_gamma"))


def _train(workdir, data_dir, config, *extra, processes, devices, stop_at=None, timeout=240):
  """Runs the trainer CLI (`config` file, then `extra` flags) as `processes` processes
  of `devices` CPU devices each."""
  port = _free_port()
  args = [f"--config.data_dir={data_dir}", "--config.batch_size=64",
          f"--config.num_steps={STEPS}", "--config.log_every=1",
          f"--config.checkpoint_every={STOP}", "--config.keep_checkpoints=5",
          "--config.eval_limit=200", "--config.progress=False",
          "--config.warmup_steps=2", "--config.proj_dim=32", "--config.data_threads=1", *extra]
  if stop_at is not None:
    args.append(f"--stop_at={stop_at}")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  procs = []
  try:
    for pid in range(processes):
      dist = [] if processes == 1 else [
          "--config.distributed.initialize=True",
          f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          f"--config.distributed.num_processes={processes}",
          f"--config.distributed.process_id={pid}", "--config.distributed.timeout_s=60"]
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "contrastive_jax.train", "--config", config,
           "--workdir", workdir, *args, *dist], cwd=ROOT, env=env, stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:  # bounded: nothing outlives the test
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert _nothing_listens_on(port)
  return outputs


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r.get("phase") == "train"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  for name in ("sklearn_digits", "captioned_digits"):  # prepare once, before the processes
    pipeline.get_source(name, "train", path)
  return path


def _same_states(one, two, steps, atol=1e-6):
  for step in steps:
    a = checkpointing.read(one, step)
    b = checkpointing.read(two, step)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
      if "['key']['bias']" in jax.tree_util.keystr(path):
        continue  # exactly zero gradient (softmax shift invariance): Adam amplifies rounding
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol,
                                 err_msg=f"step {step} {jax.tree_util.keystr(path)}")


# gamma: per-example state updated across processes, and a 2-process checkpoint resumed in
# 1 process. (Global negatives across devices: test_train.py and test_losses_sharded.py.)
@pytest.mark.parametrize("loss", ["gamma"])
def test_two_processes_match_one_and_resume_on_one(loss, data_dir, tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  run = lambda workdir, **kw: _train(workdir, data_dir, *TWO_VIEW, f"--config.loss={loss}",
                                     **kw)
  run(one, processes=1, devices=8)
  out = run(two, processes=2, devices=4, stop_at=STOP)
  assert "checkpoint saved at step 3" in out[0] and not out[1].strip().endswith("}")
  # The checkpoint written by 2 processes resumes in 1 process of 8 devices.
  resumed = run(two, processes=1, devices=8)
  assert f"resumed from {two} at step {STOP}" in resumed[0]

  l1, l2 = _losses(one), _losses(two)
  assert sorted(l1) == sorted(l2) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l2[s] for s in l1], [l1[s] for s in l1], rtol=1e-5)
  _same_states(one, two, (STOP, STEPS))  # after the 2-process part and the 1-process resume
  assert os.path.exists(os.path.join(two, "final_eval.json"))


@pytest.mark.parametrize("config", ["configs/captions_gamma.py"])
def test_image_text_two_processes_match_one(config, data_dir, tmp_path):
  """Two-tower with the gamma ITC: its per-example state is updated across processes.
  (The fusion task's global-batch terms are checked 1 vs 8 devices in
  test_image_text.py; its input path is this one. `--config configs/captions_albef.py`
  in benchmarks/multiprocess.py runs it over 2 processes.)"""
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  _train(one, data_dir, config, *IMAGE_TEXT, processes=1, devices=8)
  _train(two, data_dir, config, *IMAGE_TEXT, processes=2, devices=4)
  l1, l2 = _losses(one), _losses(two)
  assert sorted(l1) == sorted(l2) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l2[s] for s in l1], [l1[s] for s in l1], rtol=1e-5)
  _same_states(one, two, (STEPS,), atol=1e-5)
