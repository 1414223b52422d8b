"""The device kit runs end to end on a CPU (`--smoke`) and writes its documented JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_accelerator_smoke_writes_every_section(tmp_path):
  out = tmp_path / "acc.json"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accelerator.py"), "--smoke",
                  "--out", str(out)], check=True, env=env, cwd=ROOT, timeout=900)
  result = json.loads(out.read_text())
  assert result["errors"] == {}
  assert set(result["matmul"]) == {"float32", "bfloat16"}
  assert {(r["loss"], r["dtype"]) for r in result["losses"]} == {
      (l, d) for l in ("nt_xent", "clip_loss", "gamma_loss") for d in ("float32", "bfloat16")}
  assert all(r["over_bound"] > 0 and r["xla_memory_mb"] > 0 for r in result["losses"])
  assert {(r["config"], r["dtype"]) for r in result["train_step"]} == {
      (c, d) for c in ("cifar10_simclr", "imagenet_resnet50") for d in ("float32", "bfloat16")}
  assert all(r["examples_per_s"] > 0 and r["flops"] > 0 for r in result["train_step"])
  assert result["input"]["host_examples_per_s"] > 0
  assert result["mnist"]["agree"] and len(result["mnist"]["device"]) >= 2
