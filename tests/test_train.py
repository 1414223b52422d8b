"""Trainer: every loss trains, 1 vs 8 devices, exact resume, SIGTERM, bad input."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax.configs import base, mnist_gamma
from contrastive_jax import step as step_lib
from contrastive_jax import checkpointing
from contrastive_jax import eval_checkpoint
from contrastive_jax import hlo
from contrastive_jax import losses as L
from contrastive_jax import sharding
from contrastive_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def schedule(final=(), at_init=(), every=None) -> ml_collections.ConfigDict:
  """config.evals that runs `final` at the end, `at_init` before the first step and
  each evaluator of `every` ({name: steps}) during training."""
  every = every or {}
  return base.evals(**{n: dict(final=n in final, at_init=n in at_init, every=every.get(n, 0))
                       for n in {*final, *at_init, *every}})


def eval_flags(config: str, final=(), at_init=()) -> list[str]:
  """--config.evals.* flags that leave exactly `final` at the end and `at_init` before the
  first step, for the packaged config named `config`."""
  evals = importlib.import_module(f"contrastive_jax.configs.{config}").get_config().evals
  return ([f"--config.evals.{n}.final={n in final}" for n in evals] +
          [f"--config.evals.{n}.at_init={n in at_init}" for n in evals])


def small_config(data_dir, final=("knn", "rank"), at_init=(), every=None, **overrides):
  """The default config's smoke variant (sklearn digits, a small MLP, 20 steps)."""
  cfg = mnist_gamma.get_config("smoke")
  cfg.data_dir = data_dir
  cfg.evals = schedule(final, at_init, every)
  cfg.update(overrides)
  return cfg


def setup_step(cfg, devices):
  """(jitted step, initial state, batch fn, model) for cfg on a mesh of `devices`."""
  mesh = sharding.make_mesh(cfg, devices)
  setup = step_lib.build(cfg)
  shardings = step_lib.shardings(setup, mesh)
  state = jax.jit(setup.init, out_shardings=shardings)()
  step = step_lib.make_step(setup, mesh, shardings)
  task = setup.task
  ds = task.train_dataset(cfg.batch_size, cfg.seed)
  batch = lambda k: {key: jax.device_put(ds[k][key], sharding.batch_sharding(mesh))
                     for key in task.batch_keys}
  return step, state, batch, task.model


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["nt_xent", "dcl", "clip", "sigmoid", "sogclr", "gamma"])
def test_a_few_steps_lower_the_loss(loss, data_dir):
  cfg = small_config(data_dir, loss=loss, learning_rate=3e-3, num_steps=40)
  step, state, batch, model = setup_step(cfg, jax.devices())
  fixed = batch(1000)

  def infonce(params):  # the common objective, on a fixed held-aside batch
    z1 = model.apply(params, fixed["view1"])[1]
    z2 = model.apply(params, fixed["view2"])[1]
    return float(L.nt_xent(z1, z2, temperature=0.2))

  before = infonce(state["params"])
  losses = []
  for k in range(40):
    state, logs = step(state, batch(k))
    losses.append(float(logs["loss"]))
  assert all(np.isfinite(losses))
  assert infonce(state["params"]) < before - 0.1, (before, infonce(state["params"]))
  if loss != "gamma":  # the gamma loss value is not InfoNCE and is noisy (random eps)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["nt_xent", "sogclr"])
def test_one_vs_eight_devices_same_step(loss, data_dir):
  cfg = small_config(data_dir, loss=loss)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    step, state, batch, _ = setup_step(cfg, devices)
    for k in range(3):
      state, logs = step(state, batch(k))
    results.append((jax.device_get(state["params"]), float(logs["loss"])))
  (p1, l1), (p8, l8) = results
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_train_step_communication(data_dir):
  """Compiled step on 8 devices: data parallel (one gradient all-reduce, inputs never
  gathered); gamma gathers only (index, log-denominator) pairs, nt_xent gathers keys."""
  moved = {}
  for loss in ("gamma", "nt_xent"):
    cfg = small_config(data_dir, loss=loss, proj_dim=16)
    step, state, batch, _ = setup_step(cfg, jax.devices())
    moved[loss] = hlo.collectives(step.lower(state, batch(0)).compile().as_text())
  b, p = 64, 16  # global batch, projection dim; one view of images is b x 64 floats
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  for loss, ops in moved.items():
    reduced = sum(n for kind, n in ops if kind == "all-reduce")
    assert 4 * n_params <= reduced < 4 * n_params + 1024, (loss, reduced, n_params)
    assert all(n < b * 64 * 4 for kind, n in ops if kind == "all-gather"), ops  # no images
  gathered = lambda loss: sum(n for kind, n in moved[loss] if kind == "all-gather")
  assert gathered("gamma") == 4 * 3 * b  # b indices + 2 b log-denominators
  assert gathered("nt_xent") >= 4 * 2 * b * p  # both views' keys


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [2, 8])
def test_fsdp_shards_parameters_and_matches_data_parallel(fsdp, data_dir):
  cfg = small_config(data_dir, loss="gamma", head_hidden=128)
  results = []
  for f in (1, fsdp):
    cfg.fsdp = f
    step, state, batch, _ = setup_step(cfg, jax.devices())
    for k in range(3):
      state, logs = step(state, batch(k))
    results.append((state, float(logs["loss"])))
  (dp, l1), (sharded, lf) = results
  kernel = sharded["params"]["params"]["encoder"]["Dense_0"]["kernel"]  # [64, 512]
  assert kernel.sharding.spec == P(None, "fsdp"), kernel.sharding
  assert kernel.addressable_shards[0].data.shape == (64, 512 // fsdp)
  mu = sharded["opt_state"][0].mu["params"]["encoder"]["Dense_0"]["kernel"]
  assert mu.addressable_shards[0].data.shape == (64, 512 // fsdp)  # optimiser state too
  np.testing.assert_allclose(lf, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(sharded["params"])),
                  jax.tree.leaves(jax.device_get(dp["params"]))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_resume_gives_the_same_parameters(data_dir, tmp_path):
  cfg = small_config(data_dir, num_steps=16, checkpoint_every=100)
  train.train_and_evaluate(cfg, str(tmp_path / "full"))
  stopped = train.train_and_evaluate(cfg, str(tmp_path / "resumed"), stop_at=7)
  assert stopped == {"preempted": True, "step": 7}
  train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
  full = checkpointing.read(str(tmp_path / "full"))
  resumed = checkpointing.read(str(tmp_path / "resumed"))
  assert int(full["step"]) == int(resumed["step"]) == 16
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)  # bitwise, loss state and optimiser state included
  lines = [json.loads(l) for l in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert lines[-1]["phase"] == "final" and "knn_top1" in lines[-1]
  # The standalone evaluation command reads the checkpoint and writes JSON.
  eval_checkpoint.main(["--workdir", str(tmp_path / "full")])
  result = json.load(open(tmp_path / "full" / "eval_16.json"))
  assert result["step"] == 16 and 0.0 < result["knn_top1"] <= 1.0


@pytest.mark.slow
def test_sigterm_checkpoints_and_next_start_resumes(data_dir, tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "contrastive_jax.train",
         "--config", os.path.join(ROOT, "configs", "mnist_gamma.py"), "--workdir", str(workdir),
         "--config.dataset=sklearn_digits", f"--config.data_dir={data_dir}",
         "--config.batch_size=32", "--config.num_steps=100000", "--config.log_every=1",
         "--config.checkpoint_every=1000000", *eval_flags("mnist_gamma", final=("knn", "rank")),
         "--config.progress=False"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")

  def run_until_training():
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    metrics = workdir / "metrics.jsonl"
    start = len(open(metrics).readlines()) if metrics.exists() else 0
    while time.time() < deadline and proc.poll() is None:
      if metrics.exists() and len(open(metrics).readlines()) > start + 2:
        break
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out

  code, out = run_until_training()
  assert code == 0, out
  assert "checkpoint saved at step" in out
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps and steps[-1] > 0
  code, out = run_until_training()
  assert code == 0, out
  assert f"resumed from {workdir} at step {steps[-1]}" in out


@pytest.mark.slow
def test_bad_input_is_a_clear_error_and_loses_nothing(data_dir, tmp_path):
  with pytest.raises(ValueError, match="unknown loss 'infonce2'.*--config.loss"):
    train.train_and_evaluate(small_config(data_dir, loss="infonce2"), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="unknown model 'resnet7'"):
    train.train_and_evaluate(small_config(data_dir, model="resnet7"), str(tmp_path / "a"))
  with pytest.raises(FileNotFoundError, match="dataset 'no_such_data'"):
    train.train_and_evaluate(small_config(data_dir, dataset="no_such_data"), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="batch_size 60 is not divisible by the 8 devices"):
    train.train_and_evaluate(small_config(data_dir, batch_size=60), str(tmp_path / "a"))
  # A workdir holding another config's checkpoint is refused and left as it was.
  work = str(tmp_path / "b")
  train.train_and_evaluate(small_config(data_dir, num_steps=4), work)
  before = {f: open(os.path.join(work, f), "rb").read() for f in ("config.json", "metrics.jsonl")}
  with pytest.raises(ValueError, match="different config.*loss: 'gamma' -> 'nt_xent'"):
    train.train_and_evaluate(small_config(data_dir, num_steps=4, loss="nt_xent"), work)
  after = {f: open(os.path.join(work, f), "rb").read() for f in before}
  assert before == after
  assert os.listdir(os.path.join(work, "checkpoints"))


def test_each_evaluation_runs_on_its_own_schedule(data_dir, tmp_path):
  """config.evals: kNN every 5 steps, rank every 10, both at init, the probe only at the end."""
  cfg = small_config(data_dir, num_steps=20, final=("linear_probe",), at_init=("knn", "rank"),
                     every={"knn": 5, "rank": 10})
  result = train.train_and_evaluate(cfg, str(tmp_path / "w"))
  evals = [json.loads(l) for l in open(tmp_path / "w" / "metrics.jsonl")]
  got = {r["step"]: sorted(k for k in r if k in ("knn_top1", "effective_rank", "linear_top1"))
         for r in evals if r["phase"] == "eval"}
  assert got == {0: ["effective_rank", "knn_top1"], 5: ["knn_top1"],
                 10: ["effective_rank", "knn_top1"], 15: ["knn_top1"]}, got
  assert set(result) == {"step", "linear_top1", "random_init"}, result
