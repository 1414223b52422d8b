"""Faults as a pod or a failing machine delivers them, on real processes: signals to
several processes, full disks, paused trainers and lost locks, bad settings and
malformed files, blocked writes, orphaned workers. Each test names the fault;
every process is killed if it outlives its timeout."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import numpy as np
import pytest

from contrastive_jax import step as step_lib
from contrastive_jax import train
from contrastive_jax import workdir as workdir_lib
from tests.test_run_safety import _cli, _env, _free_port, _wait_for_steps, assert_same_state
from tests.test_run_safety import steps_of, strict_records
from tests.test_train import eval_flags, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from contrastive_jax.data import pipeline
  path = str(tmp_path_factory.mktemp("tfds"))
  pipeline.get_source("sklearn_digits", "train", path)  # prepared once, before the processes
  return path


@contextlib.contextmanager
def processes(*cmds, devices=2):
  procs = [subprocess.Popen(c, env=_env(devices), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for c in cmds]
  try:
    yield procs
  finally:
    for p in procs:  # bounded: nothing outlives the test
      if p.poll() is None:
        p.kill()
        p.wait()


def one_line_error(proc, err):
  lines = [l for l in err.splitlines() if l.strip()]
  assert proc.returncode == 1, err[-3000:]
  assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
  assert lines and lines[-1].startswith("error: "), err[-3000:]
  return lines[-1]


# ----------------------------------------------------------------------------
# Several processes: a stop that every process agrees on.


def _two_process_cli(work, data_dir, port, steps, *flags):
  return [_cli(work, data_dir, f"--config.num_steps={steps}", "--config.log_every=1",
               "--config.checkpoint_every=1000", *eval_flags("mnist_gamma"),
               "--config.distributed.initialize=True",
               f"--config.distributed.coordinator_address=127.0.0.1:{port}",
               "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
               "--config.distributed.timeout_s=60", *flags) for i in range(2)]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  work = str(tmp_path_factory.mktemp("mp") / "full")
  with processes(*_two_process_cli(work, data_dir, _free_port(), 60)) as procs:
    outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
  return work


@pytest.mark.parametrize("apart_s", [0.3, 0.0])
def test_sigterm_to_two_processes_saves_one_step_and_resumes_bitwise(apart_s, data_dir,
                                                                    uninterrupted, tmp_path):
  """SIGTERM to both processes (2 x 2 devices) at a moment drawn from a fixed seed, 0.3 s
  apart or at once: both exit 0 in bounded time having saved the same step, and the same
  command resumes to a state bitwise equal to an uninterrupted run's."""
  seed = 22 + int(apart_s * 10)
  rng = np.random.default_rng(seed)
  work = str(tmp_path / "w")
  with processes(*_two_process_cli(work, data_dir, _free_port(), 60)) as procs:
    _wait_for_steps(work, 4, procs[0])
    time.sleep(float(rng.uniform(0.0, 0.5)))
    t = time.monotonic()
    procs[0].send_signal(signal.SIGTERM)
    time.sleep(apart_s)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=90) for p in procs]
    took = time.monotonic() - t
  assert [p.returncode for p in procs] == [0, 0], (seed, outs[0][1][-2000:], outs[1][1][-2000:])
  assert took < 60, (seed, took)
  saved = steps_of(work)
  assert len(saved) == 1 and saved[0] < 60, (seed, saved)
  assert f"checkpoint saved at step {saved[0]}" in outs[0][0], (seed, outs[0][0])
  with processes(*_two_process_cli(work, data_dir, _free_port(), 60)) as procs:
    outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], (seed, outs[0][1][-2000:])
  assert f"resumed from {work} at step {saved[0]}" in outs[0][0]
  assert_same_state(work, uninterrupted)
  logged = [r["step"] for r in strict_records(work) if r.get("phase") == "train"]
  assert logged == list(range(1, 61)), seed


# ----------------------------------------------------------------------------
# Full disks and blocked writes.


@contextlib.contextmanager
def small_tmpfs(path, size="20m"):
  """A real tmpfs of `size` at path (root and mount needed), else None."""
  os.makedirs(path, exist_ok=True)
  ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode == 0
  try:
    yield path if ok else None
  finally:
    if ok:
      subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(directory):
  """Writes a file into directory until the filesystem is full (ENOSPC)."""
  with open(os.path.join(directory, "filler"), "wb") as f:
    try:
      while True:
        f.write(b"\0" * (1 << 20))
        f.flush()
    except OSError:
      pass


@pytest.mark.parametrize("when", ["between_saves", "during_saves"])
def test_a_full_disk_stops_the_run_with_one_line(when, data_dir, tmp_path):
  """The disk fills at a random step: between checkpoints (records are written every step)
  or while a checkpoint is saved every step. The trainer exits 1 with one line, no
  traceback, in bounded time, leaves no temporary file, and its lock is released or
  its process gone, so that once space is freed the same command resumes."""
  every = ["--config.checkpoint_every=1", "--config.log_every=1000"] if when == "during_saves" \
      else ["--config.checkpoint_every=100000", "--config.log_every=1"]
  with small_tmpfs(tmp_path / "disk") as disk:
    work = os.path.join(disk or str(tmp_path), "w")
    flags = ["--config.num_steps=100000", *eval_flags("mnist_gamma"), *every]
    with processes(_cli(work, data_dir, *flags)) as (proc,):
      deadline = time.time() + 120
      while not os.path.exists(os.path.join(work, "checkpoints", "3" if every[0].endswith("=1")
                                            else ".")) and time.time() < deadline:
        time.sleep(0.05)
      if when == "between_saves":
        _wait_for_steps(work, 5, proc)
      if disk is not None:
        _fill(disk)
      else:  # no mount here: the kernel's own ENOSPC, from /dev/full
        os.remove(os.path.join(work, "metrics.jsonl"))
        os.symlink("/dev/full", os.path.join(work, "metrics.jsonl"))
      t = time.monotonic()
      _, err = proc.communicate(timeout=120)
    line = one_line_error(proc, err)
    assert time.monotonic() - t < 60
    assert "No space left on device" in line, line
    assert len(err.splitlines()) < 10, err[-3000:]
    assert not [f for f in os.listdir(work) if ".tmp-" in f]
    if disk is not None:
      os.remove(os.path.join(disk, "filler"))
      out = subprocess.run(_cli(work, data_dir, "--config.num_steps=30", *flags[1:]),
                           env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
      assert out.returncode == 0, out.stderr[-2000:]


def test_sigterm_ends_a_run_whose_write_blocks_forever(data_dir, tmp_path):
  """metrics.jsonl becomes a FIFO nobody reads (a write that never returns, like a hung
  network filesystem): SIGTERM still ends the process within stop_timeout_s, one line."""
  work = str(tmp_path / "w")
  flags = ["--config.num_steps=100000", "--config.log_every=1", "--config.stop_timeout_s=5"]
  with processes(_cli(work, data_dir, *flags)) as (proc,):
    _wait_for_steps(work, 3, proc)
    path = os.path.join(work, "metrics.jsonl")
    os.remove(path)
    os.mkfifo(path)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    t = time.monotonic()
    _, err = proc.communicate(timeout=60)
  line = one_line_error(proc, err)
  assert time.monotonic() - t < 20
  assert "did not stop within 5 s" in line, line


# ----------------------------------------------------------------------------
# The workdir lock: fencing, takeover, removal, clocks.


def test_a_paused_trainer_writes_nothing_after_another_took_over(data_dir, tmp_path):
  """Trainer A is SIGSTOPped; B takes over its lock once A's heartbeat stops moving, and
  trains the run further to its end. A gets SIGCONT: it writes nothing (no record, no
  result, no deletion, no new save) and exits 1 with one line. A save that A had already
  handed to Orbax's background commit before the pause may still land (a step A had
  reached): only the storage could fence that (README, run safety)."""
  work = str(tmp_path / "w")
  flags = ["--config.log_every=1", "--config.checkpoint_every=5", "--config.keep_checkpoints=2",
           *eval_flags("mnist_gamma", final=("knn",)), "--config.eval_limit=300"]
  with processes(_cli(work, data_dir, "--config.num_steps=100000", *flags)) as (a,):
    _wait_for_steps(work, 8, a)
    a.send_signal(signal.SIGSTOP)
    reached = max(r["step"] for r in strict_records(work) if r.get("phase") == "train")
    b = subprocess.run(_cli(work, data_dir, "--config.num_steps=40", "--config.lock_stale_s=3",
                            *flags), env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert b.returncode == 0, b.stderr[-2000:]
    assert "dead, hung or paused" in b.stderr
    files = lambda: {f: open(os.path.join(work, f), "rb").read()
                     for f in ("metrics.jsonl", "final_eval.json", "config.json", "lock.json")}
    before, saved = files(), steps_of(work)
    assert saved == [35, 40], saved
    a.send_signal(signal.SIGCONT)
    _, err = a.communicate(timeout=60)
  line = one_line_error(a, err)
  assert "another trainer took the lock" in line, line
  assert files() == before
  stray = sorted(set(steps_of(work)) - set(saved))
  assert set(saved) <= set(steps_of(work)) and all(s <= reached for s in stray), (stray, reached)


def test_a_paused_final_evaluation_does_not_overwrite_the_newer_result(data_dir, tmp_path,
                                                                      monkeypatch):
  """Paused in its final evaluation while another trainer took the workdir, a trainer
  writes neither its record nor final_eval.json."""
  work = str(tmp_path / "w")
  build = step_lib.build

  def taken_during_final_eval(cfg, task=None):
    setup = build(cfg, task)
    evaluate = setup.task.evaluate

    def evaluate_then_lose(params, data, names):
      out = evaluate(params, data, names)
      if names == "knn":  # the final evaluation: what a takeover leaves in the file
        lock = os.path.join(work, workdir_lib.LOCK)
        json.dump({"host": "other", "pid": 1, "token": "theirs", "beat": 1}, open(lock, "w"))
        json.dump({"step": 99, "knn_top1": 0.5}, open(os.path.join(work, "final_eval.json"), "w"))
      return out
    setup.task.evaluate = evaluate_then_lose
    return setup
  monkeypatch.setattr(step_lib, "build", taken_during_final_eval)
  cfg = small_config(data_dir, num_steps=6, final=("knn",))
  with pytest.raises(workdir_lib.LockLost, match="final evaluation of step 6 was not written"):
    train.train_and_evaluate(cfg, work)
  assert json.load(open(os.path.join(work, "final_eval.json")))["step"] == 99
  assert [r for r in strict_records(work) if r.get("phase") == "final"] == []


def test_a_removed_lock_file_costs_no_steps(data_dir, tmp_path):
  work = str(tmp_path / "w")
  with processes(_cli(work, data_dir, "--config.num_steps=60", "--config.log_every=1",
                      *eval_flags("mnist_gamma"))) as (proc,):
    _wait_for_steps(work, 5, proc)
    os.remove(os.path.join(work, workdir_lib.LOCK))
    _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert "had been removed: wrote it again" in err
  assert steps_of(work) == [60]
  assert json.load(open(os.path.join(work, workdir_lib.LOCK)))["released"]


def test_a_heartbeat_from_the_future_does_not_block_the_workdir(tmp_path, capfd):
  """A lock written by a host whose clock runs an hour fast, and that never beats again,
  is stale once it has not changed for stale_s on this host's clock."""
  path = tmp_path / workdir_lib.LOCK
  json.dump({"host": "fast-clock", "pid": 1, "token": "theirs", "beat": 7,
             "time": time.time() + 3600, "heartbeat": time.time() + 3600}, open(path, "w"))
  lock = workdir_lib.Lock(str(tmp_path), stale_s=1.0)
  t = time.monotonic()
  lock.acquire()
  assert time.monotonic() - t < 5
  assert "did not change for 1 s" in capfd.readouterr().err
  lock.release()


def test_a_live_heartbeat_elsewhere_is_refused_whatever_its_clock(tmp_path):
  """A holder on another host whose clock runs an hour slow but whose heartbeat moves."""
  holder = workdir_lib.Lock(str(tmp_path), heartbeat_s=0.1)
  holder.acquire()
  record = json.load(open(holder.path))
  json.dump({**record, "host": "slow-clock", "time": time.time() - 3600}, open(holder.path, "w"))
  with pytest.raises(workdir_lib.WorkdirError, match="in use by another trainer.*moving"):
    workdir_lib.Lock(str(tmp_path), stale_s=5.0).acquire()
  holder.release()


def test_sighup_checkpoints_and_releases_the_lock(data_dir, tmp_path):
  work = str(tmp_path / "w")
  with processes(_cli(work, data_dir, "--config.num_steps=100000", "--config.log_every=1",
                      "--config.checkpoint_every=1000000")) as (proc,):
    _wait_for_steps(work, 3, proc)
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err[-2000:]
  step = steps_of(work)[-1]
  assert f"checkpoint saved at step {step}" in out
  assert json.load(open(os.path.join(work, workdir_lib.LOCK)))["released"]


def test_sigterm_during_the_final_evaluation_exits_0_and_the_same_command_evaluates(
    data_dir, tmp_path):
  work = str(tmp_path / "w")
  flags = ["--config.num_steps=20", "--config.log_every=1", "--config.checkpoint_every=1000",
           *eval_flags("mnist_gamma", final=("knn", "linear_probe", "rank"))]
  with processes(_cli(work, data_dir, *flags)) as (proc,):
    seen = []
    for line in proc.stdout:  # the trainer says when the final evaluation starts
      seen.append(line)
      if line.startswith("final evaluation of step 20"):
        break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    out = "".join(seen) + out
  assert proc.returncode == 0, err[-2000:]
  assert "stopped during the final evaluation: checkpoint saved at step 20" in out, out
  assert not os.path.exists(os.path.join(work, "final_eval.json"))
  again = subprocess.run(_cli(work, data_dir, *flags), env=_env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert json.load(open(os.path.join(work, "final_eval.json")))["step"] == 20


# ----------------------------------------------------------------------------
# Bad settings and malformed files: one line, nothing written.


@pytest.mark.parametrize("flags,message", [
    (["--workdir="], "--workdir is empty"),
    (["--config.knn_k=0"], "--config.knn_k=0: must be an integer in [1, "),
    (["--config.knn_k=100000"], "--config.knn_k=100000: must be an integer in [1, "),
    (["--config.eval_limit=1"], "--config.eval_limit=1: the probes need at least 10"),
    (["--config.eval_split=tset", "--config.evals.knn.at_init=False",
      "--config.evals.rank.at_init=False"],
     "--config.eval_split='tset': dataset 'sklearn_digits' has the splits test, train"),
    (["--config.stop_timeout_s=0"], "--config.stop_timeout_s=0.0: must be a number > 0"),
    (["--config.evals.knn.every=-1"], "--config.evals.knn.every=-1: must be an integer >= 0"),
])
def test_bad_settings_are_refused_before_anything_is_written(flags, message, data_dir, tmp_path):
  work = tmp_path / "w"
  proc = subprocess.run(_cli(work, data_dir, "--config.num_steps=3", *flags), env=_env(),
                        cwd=tmp_path, capture_output=True, text=True, timeout=120)
  line = one_line_error(proc, proc.stderr)
  assert message in line, line
  assert not os.path.exists(work) or os.listdir(work) == []
  for name in ("config.json", "checkpoints", "metrics.jsonl"):  # nor in the current directory
    assert not os.path.exists(tmp_path / name)


def test_a_workdir_too_long_for_its_checkpoints_fails_at_start_up(data_dir, tmp_path):
  work = str(tmp_path / "w")
  while len(work) < 3986:
    work = os.path.join(work, "d" * min(200, 3986 - len(work) - 1))
  proc = subprocess.run(_cli(work, data_dir, "--config.num_steps=3"), env=_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  line = one_line_error(proc, proc.stderr)
  assert "name too long" in line, line
  assert not os.path.exists(os.path.join(work, "config.json"))


@pytest.fixture(scope="module")
def stopped(data_dir, tmp_path_factory):
  """A workdir stopped at step 10 (checkpoints 5 and 10)."""
  work = str(tmp_path_factory.mktemp("stopped") / "w")
  cfg = small_config(data_dir, num_steps=20, checkpoint_every=5, final=())
  train.train_and_evaluate(cfg, work, stop_at=10)
  return cfg, work


def _copy(stopped, tmp_path):
  cfg, work = stopped
  new = str(tmp_path / str(uuid.uuid4()))
  shutil.copytree(work, new)
  return cfg, new


def test_checkpoints_without_their_config_are_refused(stopped, tmp_path):
  cfg, work = _copy(stopped, tmp_path)
  os.remove(os.path.join(work, "config.json"))
  changed = cfg.copy_and_resolve_references()
  changed.batch_size, changed.temperature = 64, 0.5
  with pytest.raises(ValueError, match=r"holds checkpoints \(steps \[5, 10\]\) but no config.json"):
    train.train_and_evaluate(changed, work)
  assert not os.path.exists(os.path.join(work, "config.json"))


@pytest.mark.parametrize("what,content,outcome", [
    ("lock.json", "[]", "trains"),
    ("metrics.jsonl", "[1, 2]\n", "trains"),
    ("config.json", "{not json", "config.json is not valid JSON"),
])
def test_malformed_files_give_one_line_or_a_warning(what, content, outcome, stopped, data_dir,
                                                    tmp_path):
  _, work = _copy(stopped, tmp_path)
  with open(os.path.join(work, what), "a" if what == "metrics.jsonl" else "w") as f:
    f.write(content)
  proc = subprocess.run(_cli(work, data_dir, "--config.num_steps=12", "--config.log_every=5",
                             "--config.checkpoint_every=5", *eval_flags("mnist_gamma"),
                             "--config.head_hidden=64", "--config.proj_dim=32",
                             "--config.eval_limit=300", "--config.warmup_steps=2",
                             "--config.lock_stale_s=1",
                             "--config.batch_size=64", "--config.data_threads=1"),
                        env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  if outcome == "trains":
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
  else:
    line = one_line_error(proc, proc.stderr)
    assert outcome in line and os.path.join(work, what) in line, line


@pytest.mark.parametrize("how", ["corrupt", "missing"])
def test_unreadable_data_is_one_line(how, data_dir, tmp_path):
  local = str(tmp_path / "tfds")
  shutil.copytree(data_dir, local)
  version = os.path.join(local, "sklearn_digits", "1.0.0")
  path = [os.path.join(version, f) for f in os.listdir(version) if "train.array_record" in f][0]
  if how == "missing":
    os.remove(path)
  else:
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 3, len(data) // 3 + 200):
      data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))
  proc = subprocess.run(_cli(tmp_path / "w", local, "--config.num_steps=3"), env=_env(),
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  line = one_line_error(proc, proc.stderr)
  assert "dataset 'sklearn_digits'" in line and "missing or corrupt" in line, line


# ----------------------------------------------------------------------------
# Leaks.


def _children(pid):
  out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
  return [int(p) for p in out.split()]


def test_no_grain_worker_outlives_a_killed_trainer(data_dir, tmp_path):
  work = str(tmp_path / "w")
  with processes(_cli(work, data_dir, "--config.num_steps=100000", "--config.log_every=1",
                      "--config.data_workers=2")) as (proc,):
    _wait_for_steps(work, 3, proc)
    workers = _children(proc.pid)
    assert len(workers) >= 2, workers
    proc.kill()
    proc.wait()
  deadline = time.time() + 20
  alive = lambda: [p for p in workers if os.path.exists(f"/proc/{p}") and
                   open(f"/proc/{p}/stat").read().split()[2] != "Z"]
  while alive() and time.time() < deadline:
    time.sleep(0.2)
  assert not alive(), alive()


def test_a_process_that_never_starts_is_one_line_not_a_crash(data_dir, tmp_path):
  """Only process 0 of 2 starts (the other's ssh dropped): it exits 1 with one line
  within distributed.timeout_s instead of JAX's fatal error and C++ trace."""
  cmd = _two_process_cli(str(tmp_path / "w"), data_dir, _free_port(), 10)[0]
  cmd = [c for c in cmd if not c.startswith("--config.distributed.timeout_s")]
  with processes([*cmd, "--config.distributed.timeout_s=5"]) as (proc,):
    t = time.monotonic()
    _, err = proc.communicate(timeout=60)
  line = one_line_error(proc, err)
  assert time.monotonic() - t < 30
  assert "not all 2 processes of this run joined" in line, line


def test_a_takeover_sets_aside_the_previous_trainers_unfinished_save(stopped, tmp_path, capfd):
  """An Orbax temporary directory left by a trainer that stopped mid-save is moved to
  checkpoints.broken/ by the trainer that takes the workdir over, so that the old one,
  if only paused, cannot complete that save under the new one."""
  cfg, work = _copy(stopped, tmp_path)
  unfinished = os.path.join(work, "checkpoints", "15.orbax-checkpoint-tmp")
  shutil.copytree(os.path.join(work, "checkpoints", "10"), unfinished)
  json.dump({"host": "paused-host", "pid": 1, "token": "theirs", "beat": 3},
            open(os.path.join(work, workdir_lib.LOCK), "w"))
  cfg = cfg.copy_and_resolve_references()
  cfg.lock_stale_s = 1.0
  assert train.train_and_evaluate(cfg, work)["step"] == 20
  assert "set aside the unfinished checkpoint(s) ['15.orbax-checkpoint-tmp']" in capfd.readouterr().err
  assert not os.path.exists(unfinished)
  assert [n for n in os.listdir(os.path.join(work, "checkpoints.broken")) if n.startswith("15.")]
