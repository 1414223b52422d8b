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
