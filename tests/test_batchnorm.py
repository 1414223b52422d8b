"""BatchNorm for the ResNets: global-batch statistics on any mesh, running averages that
are checkpointed, resumed and used by evaluation; and the bfloat16 compute dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import checkpointing
from contrastive_jax import eval_checkpoint
from contrastive_jax import hlo
from contrastive_jax import sharding
from contrastive_jax import step as step_lib
from contrastive_jax import train
from contrastive_jax.models import encoders
from tests.test_train import setup_step, small_config

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def tiny_resnet(monkeypatch):
  """A one-stage ResNet (one basic block, width 64) under a ResNet name: the recipe's
  layers at a size the CPU trains in seconds."""
  monkeypatch.setitem(encoders.ENCODERS, "resnet_test",
                      lambda dt, norm, ax: encoders.ResNet((1,), False, True, norm, dt, ax))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def bn_config(data_dir, **overrides):
  cfg = small_config(data_dir, final=("knn",), model="resnet_test", head_hidden=32,
                     proj_dim=16, **overrides)
  cfg.norm = "batch"
  return cfg


def test_statistics_are_the_global_batch_on_any_mesh(data_dir):
  # SGD: updates proportional to the gradients (Adam's first steps are about sign(g), which
  # turns float rounding of a near-zero gradient into a visible difference).
  # nt_xent: its value and gradient do not depend on the mesh (gamma keeps negatives local).
  cfg = bn_config(data_dir, loss="nt_xent", optimizer="sgd", learning_rate=0.1)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    step, state, batch, model = setup_step(cfg, devices)
    for k in range(2):
      state, logs = step(state, batch(k))
    results.append(jax.device_get((state["params"], state["batch_stats"], logs["loss"])))
  (p1, s1, l1), (p8, s8, l8) = results
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((p8, s8)), jax.tree.leaves((p1, s1))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The check has power: normalising each device's 8 rows by their own statistics changes
  # the embeddings by far more than the tolerance above.
  x = jnp.asarray(batch(0)["view1"], jnp.float32) / 255.0
  variables = {**state["params"], "batch_stats": state["batch_stats"]}
  train_z = lambda v: model.apply(variables, v, train=True, mutable=["batch_stats"])[0][1]
  apply = lambda v: jax.vmap(train_z, axis_name=encoders.VIEWS_AXIS)(v[None])[0]
  whole = apply(x)
  per_device = jnp.concatenate([apply(c) for c in jnp.split(x, len(jax.devices()))])
  assert float(jnp.max(jnp.abs(whole - per_device))) > 1e-2 * float(jnp.max(jnp.abs(whole)))


def test_running_averages_resume_exactly_and_serve_evaluation(data_dir, tmp_path):
  cfg = bn_config(data_dir, num_steps=8, checkpoint_every=100)
  train.train_and_evaluate(cfg, str(tmp_path / "full"))
  assert train.train_and_evaluate(cfg, str(tmp_path / "resumed"), stop_at=3)["step"] == 3
  train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
  full = checkpointing.read(str(tmp_path / "full"))
  resumed = checkpointing.read(str(tmp_path / "resumed"))
  assert "batch_stats" in full
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)  # bitwise, running averages included
  means = [v for path, v in jax.tree_util.tree_leaves_with_path(full["batch_stats"])
           if "mean" in jax.tree_util.keystr(path)]
  assert means and all(np.abs(m).max() > 0 for m in means)  # updated from the init's zeros
  # Evaluation normalises with the averages: an example's features do not depend on the
  # rest of the batch, and the standalone evaluation reads the averages too.
  cfg_, state, task = eval_checkpoint.load(str(tmp_path / "full"))
  variables = task.eval_variables(state)
  x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1))
  f_all = task.model.apply(variables, x, train=False)[0]
  f_one = task.model.apply(variables, x[:1], train=False)[0]
  np.testing.assert_allclose(f_one[0], f_all[0], rtol=1e-5, atol=1e-6)
  stats = jax.tree.map(np.zeros_like, state["batch_stats"])
  f_zero = task.model.apply({**state["params"], "batch_stats": stats}, x, train=False)[0]
  assert not np.allclose(f_zero, f_all, atol=1e-3)  # the averages are what it used


def test_batch_norm_is_for_the_resnets():
  with pytest.raises(ValueError, match="norm=batch is for the ResNets"):
    encoders.get_model("mlp", norm="batch")
  with pytest.raises(ValueError, match="unknown dtype 'float16'"):
    encoders.get_model("mlp", dtype="float16")


def _loss_and_grads(cfg):
  """((loss, gradients) of cfg's task on its first batch at init, the lowered step)."""
  setup = step_lib.build(cfg)
  state = setup.init()
  step, _, batch, _ = setup_step(cfg, jax.devices()[:1])
  b, key = batch(0), jax.random.key(0)
  mesh = sharding.make_mesh(cfg, jax.devices()[:1])
  fn = jax.jit(jax.value_and_grad(lambda p: setup.task.loss(p, state, b, key, mesh)[0]))
  return fn(state["params"]), step.lower(state, b).as_text()


@pytest.mark.parametrize("model", ["mlp", "resnet_test"])
def test_bfloat16_matmuls_and_float32_agreement(data_dir, model):
  """A bfloat16 config's step multiplies and convolves bfloat16 operands (float32 for the
  float32 config); on one batch its loss is within 0.3 % of float32's and its gradient points
  the same way (cosine > 0.995)."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    cfg = small_config(data_dir, loss="nt_xent", model=model, head_hidden=32, proj_dim=16,
                       dtype=dtype)
    if model.startswith("resnet"):
      cfg.norm = "batch"
    out[dtype] = _loss_and_grads(cfg)
  ops = {d: hlo.matmul_dtypes(lowered) for d, (_, lowered) in out.items()}
  kinds = {"mlp": "dot_general", "resnet_test": "convolution"}
  bf16 = [o for o in ops["bfloat16"] if o[0] == kinds[model] and o[1] == o[2] == "bf16"]
  assert len(bf16) >= 3, ops["bfloat16"]  # every layer, forward and backward
  assert not any("bf16" in o for o in ops["float32"]), ops["float32"]
  (l32, g32), _ = out["float32"]
  (l16, g16), _ = out["bfloat16"]
  assert l16.dtype == jnp.float32
  np.testing.assert_allclose(float(l16), float(l32), rtol=3e-3)  # measured: 1e-4
  flat = lambda g: jnp.concatenate([x.ravel().astype(jnp.float32) for x in jax.tree.leaves(g)])
  cosine = float(flat(g16) @ flat(g32) / jnp.linalg.norm(flat(g16)) / jnp.linalg.norm(flat(g32)))
  assert cosine > 0.995, cosine  # measured: 0.9996 (MLP), 0.9998 (ResNet)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))  # float32 parameters
