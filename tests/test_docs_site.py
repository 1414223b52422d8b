"""The API reference builds from the docstrings, offline, with warnings as errors, and
carries the losses table (every registered loss)."""

import os
import subprocess
import sys

import pytest

from contrastive_jax.losses import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_api_reference_builds_without_warnings(tmp_path):
  out = tmp_path / "html"
  proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                         os.path.join(ROOT, "docs", "api"), str(out)],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = (out / "losses.html").read_text()
  for name in registry.LOSSES:
    assert f"<code class=\"docutils literal notranslate\"><span class=\"pre\">{name}</span>" in losses, name
  assert "NeurIPS 2022" in losses and "gamma_loss" in losses
