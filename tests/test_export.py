"""Export a run's encoder as safetensors, load it into plain Flax, and start a new run from
it: the same embeddings as the checkpoint, and the new run starts at the exported kNN."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import eval_checkpoint
from contrastive_jax import export
from contrastive_jax import train
from contrastive_jax.data import augment
from tests.test_train import small_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
  """A trained two-view run (sklearn digits, MLP) and its export."""
  work = tmp_path_factory.mktemp("run")
  cfg = small_config(data_dir, final=("knn",), num_steps=30, learning_rate=3e-3)
  result = train.train_and_evaluate(cfg, str(work / "w"))
  export.main(["--workdir", str(work / "w"), "--out", str(work / "export")])
  return cfg, str(work / "w"), str(work / "export"), result


def test_export_load_apply_gives_the_checkpoints_features(run):
  cfg, workdir, out, _ = run
  meta = json.load(open(f"{out}/model.json"))
  assert meta["model"] == "mlp" and meta["source"]["step"] == 30
  assert meta["input"]["shape"] == [8, 8, 1] and meta["input"]["dtype"] == "uint8"
  module, variables = export.load_encoder(out)
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), np.uint8)
  features = module.apply(variables, images.astype(np.float32) / 255.0, train=False)
  _, state, task = eval_checkpoint.load(workdir)
  expected = task.model.apply(task.eval_variables(state), augment.to_float(jnp.asarray(images)),
                              train=False)[0]
  np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-6)
  assert features.shape == (5, 256)


def test_a_run_initialised_from_an_export_starts_at_the_exported_knn(run, tmp_path):
  cfg, _, out, result = run
  for source in (out, run[1]):  # an export, or the workdir itself
    new = small_config(cfg.data_dir, final=("knn",), at_init=("knn",), num_steps=2,
                       learning_rate=1e-9, seed=7)
    new.init_from = source
    started = train.train_and_evaluate(new, str(tmp_path / f"from_{len(source)}"))
    assert started["random_init"]["knn_top1"] == pytest.approx(result["knn_top1"], abs=1e-9)
  scratch = small_config(cfg.data_dir, final=("knn",), at_init=("knn",), num_steps=2, seed=7)
  fresh = train.train_and_evaluate(scratch, str(tmp_path / "scratch"))
  assert fresh["random_init"]["knn_top1"] != pytest.approx(result["knn_top1"], abs=1e-9)


def test_init_from_names_a_mismatch(run, tmp_path):
  cfg, _, out, _ = run
  bad = small_config(cfg.data_dir, final=(), num_steps=1, head_hidden=16)
  bad.init_from = out
  with pytest.raises(ValueError, match="init_from: head.*shape"):
    train.train_and_evaluate(bad, str(tmp_path / "bad"))
  with pytest.raises(FileNotFoundError, match="neither an export"):
    export.read(str(tmp_path))
  with pytest.raises(ValueError, match="one encoder and a projection head"):
    export._split({"params": {"image_tower": {}, "text_tower": {}}})  # an image-text model
