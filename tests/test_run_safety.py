"""A run never loses good state: non-finite guard, checked restore with fall-back,
workdir lock, config compared before anything is written, one-line errors,
multi-process exit, atomic strict-JSON files, kill -9 and double SIGTERM."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import step as step_lib
from contrastive_jax import checkpointing
from contrastive_jax import train
from contrastive_jax import workdir as workdir_lib
from contrastive_jax import losses as L
from tests.test_train import eval_flags, schedule, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "contrastive_jax.train",
       "--config", os.path.join(ROOT, "configs", "mnist_gamma.py")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def steps_of(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def strict_records(workdir):
  """metrics.jsonl parsed as strict JSON (a bare NaN raises)."""
  def refuse(name):
    raise ValueError(f"non-strict JSON constant {name}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def assert_same_state(a_dir, b_dir):
  a = checkpointing.read(a_dir)
  b = checkpointing.read(b_dir)
  assert int(a["step"]) == int(b["step"])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------
# Non-finite guard.


def test_a_diverging_run_stops_with_an_error_and_checkpoints_no_bad_state(data_dir, tmp_path):
  work = str(tmp_path / "w")
  cfg = small_config(data_dir, learning_rate=1e30, checkpoint_every=1, keep_checkpoints=100)
  with pytest.raises(step_lib.NonFiniteError,
                     match=r"step \d+: the loss or the gradient norm is NaN or inf") as error:
    train.train_and_evaluate(cfg, work)
  bad_step = int(str(error.value).split()[1].rstrip(":"))
  assert steps_of(work) == list(range(1, bad_step))  # every step before the first bad one
  for step in steps_of(work):  # each restores, finite and checked
    assert int(checkpointing.read(work, step)["step"]) == step
  assert not os.path.exists(tmp_path / "w" / "final_eval.json")


def _nan_from(step, monkeypatch):
  """Makes every task's loss NaN from `step` on."""
  build = step_lib.build

  def patched(cfg, task=None):
    setup = build(cfg, task)
    loss = setup.task.loss

    def nan_loss(params, state, batch, key, mesh):
      value, aux = loss(params, state, batch, key, mesh)
      return jnp.where(state["step"] >= step, jnp.nan, value), aux
    setup.task.loss = nan_loss
    return setup
  monkeypatch.setattr(step_lib, "build", patched)


def test_good_checkpoints_are_never_rotated_out_by_a_bad_state(data_dir, tmp_path, monkeypatch):
  _nan_from(12, monkeypatch)
  cfg = small_config(data_dir, num_steps=30, checkpoint_every=5, keep_checkpoints=2)
  with pytest.raises(step_lib.NonFiniteError, match="step 13: the loss or the gradient norm"):
    train.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert steps_of(str(tmp_path / "w")) == [5, 10]


def test_skip_nonfinite_keeps_the_state_and_counts_the_steps(data_dir, tmp_path, monkeypatch):
  _nan_from(12, monkeypatch)
  cfg = small_config(data_dir, num_steps=16, checkpoint_every=100, final=(),
                     skip_nonfinite=True)
  train.train_and_evaluate(cfg, str(tmp_path / "w"))
  records = strict_records(str(tmp_path / "w"))
  assert [r["skipped_steps"] for r in records if r.get("phase") == "train"] == [0, 0, 3, 4]  # steps 13-16
  state = checkpointing.read(str(tmp_path / "w"))
  assert int(state["step"]) == 16
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


# ----------------------------------------------------------------------------
# Checked restore.


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """(config, a workdir stopped at step 20 with checkpoints 10 and 20, the workdir
  of the same run trained to step 30 without a stop)."""
  root = tmp_path_factory.mktemp("trained")
  cfg = small_config(data_dir, num_steps=30, checkpoint_every=10, final=())
  train.train_and_evaluate(cfg, str(root / "full"))
  train.train_and_evaluate(cfg, str(root / "stopped"), stop_at=20)
  return cfg, str(root / "stopped"), str(root / "full")


def _flip_bytes(path, n=64):
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 2, len(data) // 2 + n):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _largest_file(root):
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  return max(files, key=os.path.getsize)


def _break(workdir, how):
  step20 = os.path.join(workdir, "checkpoints", "20")
  if how == "flipped_bytes":
    _flip_bytes(_largest_file(os.path.join(step20, "state")))
  elif how == "truncated_file":
    path = _largest_file(os.path.join(step20, "state"))
    open(path, "r+b").truncate(os.path.getsize(path) // 2)
  elif how == "missing_item":
    shutil.rmtree(os.path.join(step20, "data"))
  elif how == "empty_newest_dir":
    os.makedirs(os.path.join(workdir, "checkpoints", "25"))
  elif how == "changed_fingerprint":
    path = os.path.join(step20, "data", "metadata")
    meta = json.load(open(path))
    key = sorted(meta["fingerprints"])[0]
    meta["fingerprints"][key] ^= 1
    json.dump(meta, open(path, "w"))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flipped_bytes", "truncated_file", "missing_item",
                                 "empty_newest_dir", "changed_fingerprint"])
def test_a_broken_newest_checkpoint_falls_back_to_a_good_one(how, trained, tmp_path, capfd):
  cfg, stopped, full = trained
  work = str(tmp_path / "w")
  shutil.copytree(stopped, work)
  _break(work, how)
  train.train_and_evaluate(cfg, work)
  err = capfd.readouterr().err
  assert "trying an older checkpoint" in err, err
  broken = os.listdir(os.path.join(work, "checkpoints.broken"))
  assert len(broken) == 1 and broken[0].split("-")[0] in ("20", "25")
  assert_same_state(work, full)  # fell back (to 20 or 10), then retrained bitwise


def test_a_flipped_byte_is_caught_by_its_fingerprint(trained, tmp_path):
  """Corrupted array bytes that Orbax restores without complaint change the fingerprint."""
  cfg, stopped, _ = trained
  work = str(tmp_path / "w")
  shutil.copytree(stopped, work)
  _break(work, "flipped_bytes")
  setup = step_lib.build(cfg)
  abstract = jax.eval_shape(setup.init)
  mngr = checkpointing.manager(work)
  with pytest.raises(checkpointing.CheckpointError, match="step 20"):
    checkpointing.restore(mngr, abstract, 20, ("loss_state",))
  assert int(checkpointing.restore(mngr, abstract, 10, ("loss_state",))["state"]["step"]) == 10
  mngr.close()


def test_no_restorable_checkpoint_is_an_error_never_a_fresh_start(trained, tmp_path):
  cfg, stopped, _ = trained
  work = str(tmp_path / "w")
  shutil.copytree(stopped, work)
  for step in (10, 20):
    shutil.rmtree(os.path.join(work, "checkpoints", str(step), "data"))
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoint .* restores"):
    train.train_and_evaluate(cfg, work)
  assert steps_of(work) == [10, 20]  # left where they were


def test_fingerprints_do_not_depend_on_the_mesh(trained):
  cfg, _, full = trained
  state = checkpointing.read(full)
  one, _ = checkpointing.fingerprint(state)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
  sharded = jax.tree.map(
      lambda x: jax.device_put(x, jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec("d") if x.ndim and x.shape[0] % 8 == 0
          else jax.sharding.PartitionSpec())), state)
  eight, _ = checkpointing.fingerprint(sharded)
  assert one == eight
  changed = jax.tree.map(lambda x: x, state)
  changed["params"] = jax.tree.map(lambda x: x + np.float32(1e-3) * (np.arange(x.size) == 0).reshape(x.shape),
                                   state["params"])
  assert checkpointing.fingerprint(changed)[0] != one


# ----------------------------------------------------------------------------
# Config compared before anything is written.


@pytest.mark.slow
def test_an_incompatible_resume_is_refused_and_touches_nothing(trained, tmp_path):
  cfg, stopped, _ = trained
  work = str(tmp_path / "w")
  shutil.copytree(stopped, work)
  names = ("config.json", "metrics.jsonl")
  before = {f: open(os.path.join(work, f), "rb").read() for f in names}
  for change, message in [
      (dict(loss_options=dict(gamma=dict(estimator="global"))),
       r"loss_options.gamma.estimator: 'per_example' -> 'global'"),
      (dict(head_hidden=32), "head_hidden: 64 -> 32"),
      (dict(num_steps=15), r"num_steps=15 is below the step of the checkpoint .* \(20\)")]:
    changed = cfg.copy_and_resolve_references()
    changed.update(change)
    with pytest.raises(ValueError, match=message):
      train.train_and_evaluate(changed, work)
    assert {f: open(os.path.join(work, f), "rb").read() for f in names} == before
  assert steps_of(work) == [10, 20]
  assert json.load(open(os.path.join(work, workdir_lib.LOCK)))["released"]
  # Fields documented as mutable may change: more steps, other evaluation and logging.
  changed = cfg.copy_and_resolve_references()
  changed.update(dict(num_steps=22, log_every=1, keep_checkpoints=3))
  changed.evals = schedule(final=("knn",))
  assert train.train_and_evaluate(changed, work)["step"] == 22


# ----------------------------------------------------------------------------
# Metrics and result files.


def test_metrics_are_strict_json_without_duplicate_steps_after_a_resume(trained, tmp_path):
  cfg, stopped, _ = trained
  work = str(tmp_path / "w")
  shutil.copytree(stopped, work)
  with open(os.path.join(work, "metrics.jsonl"), "a") as f:  # a run killed after step 20
    f.write('{"step": 25, "phase": "train", "loss": NaN}\n{"step": 30, "pha')
  result = train.train_and_evaluate(cfg, work)
  records = strict_records(work)
  train_steps = [r["step"] for r in records if r.get("phase") == "train"]
  assert train_steps == sorted(set(train_steps)) == list(range(5, 31, 5))
  assert json.load(open(os.path.join(work, "final_eval.json"))) == json.loads(
      json.dumps(result))
  assert not [f for f in os.listdir(work) if ".tmp" in f]


def test_result_files_are_written_atomically_as_strict_json(tmp_path):
  path = str(tmp_path / "r.json")
  workdir_lib.write_json(path, {"a": float("nan"), "b": [1.0, float("inf")], "c": 2})
  assert json.loads(open(path).read(), parse_constant=float) == {"a": None, "b": [1.0, None],
                                                                 "c": 2}
  assert os.listdir(tmp_path) == ["r.json"]


# ----------------------------------------------------------------------------
# Workdir lock.


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_a_second_trainer_is_refused_and_a_stale_lock_is_taken_over(data_dir, tmp_path, capfd):
  work = str(tmp_path / "w")
  os.makedirs(work)
  held = workdir_lib.Lock(work, heartbeat_s=0.2)
  held.acquire()
  with pytest.raises(workdir_lib.WorkdirError, match=f"in use by another trainer, pid {os.getpid()}"):
    train.train_and_evaluate(small_config(data_dir, num_steps=2), work)
  assert not os.path.exists(os.path.join(work, "checkpoints"))
  held.release()
  lock_path = os.path.join(work, workdir_lib.LOCK)
  assert json.load(open(lock_path)) == {"released": True, "token": held.token,
                                        "host": socket.gethostname(), "pid": os.getpid()}

  for holder, warning in [
      ({"released": True, "token": "theirs"}, None),  # ended normally: taken at once
      (dict(host=socket.gethostname(), pid=_dead_pid(), beat=3), "taking over"),  # dead pid
      (dict(host="other-host", pid=1, beat=3), "did not change for 1 s")]:  # silent elsewhere
    json.dump({**holder, "token": "theirs"}, open(lock_path, "w"))
    lock = workdir_lib.Lock(work, stale_s=1.0)
    lock.acquire()
    err = capfd.readouterr().err
    assert (warning is None and "taking over" not in err) or (warning and warning in err), err
    assert json.load(open(lock_path))["token"] == lock.token
    lock.release()


def test_a_lock_taken_by_another_trainer_is_noticed(tmp_path):
  lock = workdir_lib.Lock(str(tmp_path), heartbeat_s=0.05)
  lock.acquire()
  json.dump({"host": "other-host", "pid": 1, "token": "theirs", "heartbeat": time.time()},
            open(lock.path, "w"))
  assert lock.lost.wait(5)
  lock.release()
  assert json.load(open(lock.path))["token"] == "theirs"  # not removed: it is not ours


# ----------------------------------------------------------------------------
# The command line: one-line errors, signals, kill -9, several processes.


def _cli(workdir, data_dir, *flags, env_devices=2):
  return [*CLI, "--workdir", str(workdir), "--config.dataset=sklearn_digits",
          f"--config.data_dir={data_dir}", "--config.batch_size=32", "--config.progress=False",
          *eval_flags("mnist_gamma", final=("knn", "rank", "linear_probe")), *flags]


def _env(devices=2):
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


@pytest.mark.parametrize("flags,message", [
    (["--config.bach_size=3"], "no field 'bach_size': did you mean --config.batch_size"),
    (["--config.log_every=0"], "--config.log_every=0: must be an integer >= 1"),
    (["--config.checkpoint_every=0"], "--config.checkpoint_every=0: must be an integer >= 1"),
    (["--config.keep_checkpoints=0"], "--config.keep_checkpoints=0: must be an integer >= 1"),
    (["--config.num_steps=0"], "--config.num_steps=0: must be an integer >= 1"),
    (["--stop_at=-1"], "--stop_at=-1: must be >= 0"),
    (["--config.learning_rate=nan"], "--config.learning_rate=nan: must be a finite number"),
    (["--config.loss=infonce2"], "unknown loss 'infonce2'"),
    (["--workdir=/proc/no/such"], "workdir /proc/no/such is not writable"),
    (["--config.loss=sogclr", "--config.loss_options.sogclr.rate=1.5"],
     "--config.loss_options.sogclr.rate: rate must be in (0, 1], got 1.5"),
    # the option's old name still works (with a warning) for one release
    (["--config.loss=sogclr", "--config.loss_options.sogclr.gamma=1.5"],
     "--config.loss_options.sogclr.rate: rate must be in (0, 1], got 1.5"),
])
def test_bad_settings_are_one_line_errors(flags, message, data_dir, tmp_path):
  proc = subprocess.run(_cli(tmp_path / "w", data_dir, "--config.num_steps=3", *flags),
                        env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
  for name in ("config.json", "metrics.jsonl", "final_eval.json"):  # nothing written
    assert not os.path.exists(tmp_path / "w" / name)


def test_a_short_run_with_a_long_warmup_trains(data_dir, tmp_path):
  cfg = small_config(data_dir, num_steps=3, warmup_steps=100, final=())
  assert train.train_and_evaluate(cfg, str(tmp_path / "w"))["step"] == 3


def _wait_for_steps(workdir, n, proc, timeout=120):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and len(open(path).readlines()) >= n:
      return
    time.sleep(0.05)
  raise AssertionError(f"no {n} records in {path}: {proc.poll()}")


@pytest.mark.slow
def test_kill_9_during_async_saves_resumes_bitwise(data_dir, tmp_path):
  """Checkpoints every step (an async save is nearly always in flight), SIGKILL at
  a moment drawn from a fixed seed, restart: the final state equals an
  uninterrupted run's, bit for bit."""
  steps = 40
  flags = [f"--config.num_steps={steps}", "--config.checkpoint_every=1", "--config.log_every=1",
           *eval_flags("mnist_gamma"), "--config.keep_checkpoints=3"]
  rng = np.random.default_rng(12)
  work = str(tmp_path / "killed")
  proc = subprocess.Popen(_cli(work, data_dir, *flags), env=_env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for_steps(work, 5, proc)
  time.sleep(float(rng.uniform(0.0, 0.5)))
  proc.kill()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = steps_of(work)[-1]
  assert os.path.exists(os.path.join(work, workdir_lib.LOCK))  # left by the dead process
  out = subprocess.run(_cli(work, data_dir, *flags), env=_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "taking over the lock of" in out.stderr
  assert killed_at < steps, killed_at
  full = str(tmp_path / "full")
  out = subprocess.run(_cli(full, data_dir, *flags), env=_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert_same_state(work, full)
  steps_logged = [r["step"] for r in strict_records(work) if r.get("phase") == "train"]
  assert steps_logged == list(range(1, steps + 1))


def test_a_second_sigterm_still_leaves_a_complete_checkpoint(data_dir, tmp_path):
  work = str(tmp_path / "w")
  proc = subprocess.Popen(_cli(work, data_dir, "--config.num_steps=100000", "--config.log_every=1",
                               "--config.checkpoint_every=1000000"),
                          env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  _wait_for_steps(work, 3, proc)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-2000:]
  step = steps_of(work)[-1]
  assert f"checkpoint saved at step {step}" in out
  state = checkpointing.read(work)
  assert int(state["step"]) == step


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_when_a_process_dies_the_other_exits_with_one_line(data_dir, tmp_path):
  port, work = _free_port(), str(tmp_path / "w")
  procs = [subprocess.Popen(
      _cli(work, data_dir, "--config.num_steps=100000", "--config.log_every=1",
           "--config.distributed.initialize=True",
           f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
           "--config.distributed.heartbeat_timeout_s=10"),
      env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    _wait_for_steps(work, 3, procs[0])
    procs[1].kill()
    t = time.time()
    _, err = procs[0].communicate(timeout=60)
    assert time.time() - t < 30
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert procs[0].returncode == 1, err[-3000:]
  assert "Fatal Python error" not in err and "Traceback" not in err, err[-3000:]
  assert [l for l in err.splitlines() if l.startswith("error: ")][-1].startswith(
      "error: process 0: another process of this run stopped")


def test_a_stored_config_with_the_old_option_names_resumes():
  """A config.json written before the options were renamed (rate_decay, shape, sogclr's
  gamma) compares equal to today's config with the same values."""
  from contrastive_jax import configs
  cfg = configs.load("mnist_gamma")
  old = json.loads(cfg.to_json())
  for loss, names in L.registry.renamed_options().items():
    for before, after in names.items():
      old["loss_options"][loss][before] = old["loss_options"][loss].pop(after)
  assert checkpointing.config_changes(old, cfg) != []  # without the map they differ
  assert checkpointing.config_changes(old, cfg, renamed=L.registry.renamed_config_fields()) == []
  old["loss_options"]["gamma"]["rate_decay"] = 0.25
  assert checkpointing.config_changes(old, cfg, renamed=L.registry.renamed_config_fields()) == [
      "loss_options.gamma.rate: 0.25 -> 0.5"]
