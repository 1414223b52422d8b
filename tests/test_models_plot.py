"""Encoders' output shapes, and the plot command's files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import plot
from contrastive_jax.models.encoders import get_model


@pytest.mark.parametrize("name,feat", [("mlp", 256), ("small_cnn", 128), ("resnet18", 512),
                                       ("resnet50", 2048), ("vit_ti", 192)])
def test_encoder_shapes(name, feat):
  model = get_model(name, head_hidden=32, proj_dim=16)
  x = jnp.zeros((2, 32, 32, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes only: fast on CPU
  f, z = jax.eval_shape(model.apply, params, x)
  assert f.shape == (2, feat) and z.shape == (2, 16)


def test_unknown_model_names_the_choices():
  with pytest.raises(ValueError, match="unknown model 'vgg'.*resnet18"):
    get_model("vgg")


def test_plots_are_written(tmp_path):
  records = [{"step": s, "phase": "train", "loss": 1.0 / s, "nt_xent": 2.0 / s} for s in (1, 2, 3)]
  records.append({"step": 3, "phase": "eval", "knn_top1": 0.5})
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
  plot.main(["--workdir", str(tmp_path)])
  assert (tmp_path / "curves.png").stat().st_size > 1000
  # With the run's config.json, the loss panel names the loss and its temperature.
  (tmp_path / "config.json").write_text(json.dumps({"loss": "gamma", "temperature": 0.1}))
  drawn = {}
  real = plot.plot_curves
  plot.plot_curves = lambda records, path, config=None: drawn.update(config=config) or real(
      records, path, config=config)
  try:
    plot.main(["--workdir", str(tmp_path)])
  finally:
    plot.plot_curves = real
  assert plot.titles(drawn["config"])["loss"][0] == "training loss: gamma (t = 0.1)"
  rng = np.random.default_rng(0)
  out = plot.plot_modalities(rng.normal(size=(20, 4)), rng.normal(size=(20, 4)),
                             str(tmp_path / "gap.png"), labels=rng.integers(0, 3, 20))
  assert (tmp_path / "gap.png").stat().st_size > 1000 and out.endswith("gap.png")


def test_parameter_layout_is_stable():
  """Checkpoints name the head's layers Dense_0 (projection) and Dense_1 (hidden): a change
  of creation order would swap them, break every resume and change every seed's init."""
  model = get_model("mlp", head_hidden=48, proj_dim=16)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 8, 8, 1)))["params"]
  assert params["Dense_0"]["kernel"].shape == (48, 16)
  assert params["Dense_1"]["kernel"].shape == (256, 48)
  assert params["encoder"]["Dense_0"]["kernel"].shape == (64, 512)
