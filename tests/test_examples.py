"""The porting examples (docs/porting.md) run as a user runs them and train: a stateless
and a stateful loss, under jit and with the loss in shard_map over the 8 devices."""

import numpy as np
import pytest

from examples import linen_port, nnx_port


@pytest.mark.slow
@pytest.mark.parametrize("example", [linen_port, nnx_port], ids=["linen", "nnx"])
def test_example_trains_under_jit_and_shard_map(example):
  result = example.main(["--steps", "30"])
  assert len(result) == 4
  for (loss, where), (before, after) in result.items():
    assert after < before - 0.5, (loss, where, before, after)
  jit = {loss: v for (loss, where), v in result.items() if "shard_map" not in where}
  sharded = {loss: v for (loss, where), v in result.items() if "shard_map" in where}
  # nt_xent is the same loss on any mesh; gamma uses each device's local negatives.
  np.testing.assert_allclose(sharded["nt_xent"], jit["nt_xent"], rtol=1e-4)
  np.testing.assert_allclose(sharded["gamma"], jit["gamma"], atol=0.1)


@pytest.mark.parametrize("eps_shape", [float("inf"), 1.0], ids=["eps1", "gamma_draw"])
def test_four_device_gamma_steps_equal_the_one_device_runs_of_each_device(eps_shape):
  """The guide's stateful loss in shard_map on 4 devices, 3 steps: the state and the loss
  equal one-device runs of gamma_loss on each device's rows (local negatives, the key
  folded with the device index), their updates merged by index, their losses averaged."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from contrastive_jax import losses
  seed, n, batch, shards = 11, 64, 32, 4
  mesh = Mesh(np.array(jax.devices()[:shards]), ("data",))
  fn = lambda *a, axis_name=None: losses.gamma_loss(
      *a, temperature=linen_port.T, eps_shape=eps_shape, rate=0.5, axis_name=axis_name)
  sharded = jax.jit(jax.shard_map(
      lambda *a: fn(*a, axis_name="data"), mesh=mesh,
      in_specs=(P("data"), P("data"), P(), P("data"), P()), out_specs=(P(), P())))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  rng = np.random.default_rng(seed)
  state = one = losses.init_gamma_state(n)
  for step in range(3):
    z1, z2 = (rng.normal(size=(batch, 16)).astype(np.float32) for _ in range(2))
    index = rng.permutation(n)[:batch].astype(np.int32)
    key = jax.random.key(step)
    loss, state = sharded(put(z1), put(z2), state, put(index), key)
    rows = np.split(np.arange(batch), shards)
    parts = [fn(z1[r], z2[r], one, index[r], jax.random.fold_in(key, s))
             for s, r in enumerate(rows)]
    merged = np.array(one["log_z"])
    for (_, new), r in zip(parts, rows):
      merged[:, index[r]] = np.asarray(new["log_z"])[:, index[r]]
    one = {"log_z": jnp.asarray(merged)}
    np.testing.assert_allclose(np.asarray(state["log_z"]), merged, rtol=1e-5,
                               err_msg=f"seed {seed}, step {step}")
    np.testing.assert_allclose(float(loss), np.mean([float(l) for l, _ in parts]),
                               rtol=1e-5, err_msg=f"seed {seed}, step {step}")
  assert np.isfinite(merged).sum() > batch  # later steps revisited and added examples
