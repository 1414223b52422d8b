"""The losses in your own Flax Linen + optax loop: a stateless loss (nt_xent) and a stateful
one (gamma_loss), under `jit` on one device, then under `shard_map` on every device.

  python -m examples.linen_port [--steps 60] [--loss nt_xent,gamma]    # from the checkout

The model applies to the global batch under `jit` (GSPMD shards it); only the loss runs per
device inside `shard_map`, with `axis_name`. Specs: embeddings and dataset indices are
sharded on the batch axis, P("data"); the gamma state and the PRNG key are replicated, P().
The stateful loss returns (loss, new_state): `has_aux=True` threads the state out of
`value_and_grad`, and the loop carries it like the optimiser state.
"""

import argparse
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from contrastive_jax import losses

N, D_IN, T = 512, 32, 0.2


class Encoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(16)(nn.relu(nn.Dense(64)(x)))


def views(key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Two noisy views [batch, D_IN] of `batch` of N fixed points, and their indices."""
  points = jax.random.normal(jax.random.key(0), (N, D_IN))
  k_idx, k1, k2 = jax.random.split(key, 3)
  index = jax.random.choice(k_idx, N, (batch,), replace=False)
  noise = lambda k: 0.3 * jax.random.normal(k, (batch, D_IN))
  return points[index] + noise(k1), points[index] + noise(k2), index


def contrastive(name: str, z1, z2, state, index, key, axis_name=None):
  """(loss, new state) of `name`; the state is an empty dict for nt_xent."""
  if name == "nt_xent":
    return losses.nt_xent(z1, z2, temperature=T, axis_name=axis_name), state
  # eps = 1 and a moving-average weight of 0.5: the trainer's settings for two views.
  return losses.gamma_loss(z1, z2, state, index, key, temperature=T, eps_shape=math.inf,
                           rate=0.5, axis_name=axis_name)


def held_out_infonce(model: nn.Module, params) -> float:
  """nt_xent on fixed views of 256 points: a number every loss can be compared by (the
  gamma loss's own value is not InfoNCE)."""
  v1, v2, _ = views(jax.random.key(7), 256)
  return float(losses.nt_xent(model.apply(params, v1), model.apply(params, v2), temperature=T))


def train(name: str, steps: int, mesh: Mesh | None = None, batch: int = 64) -> tuple[float, float]:
  """Trains the encoder; `mesh`: the loss runs per device in shard_map. Returns the held-out
  InfoNCE before and after."""
  model, tx = Encoder(), optax.adam(1e-2)
  params = model.init(jax.random.key(1), jnp.zeros((1, D_IN)))
  opt_state = tx.init(params)
  state = losses.init_gamma_state(N) if name == "gamma" else {}

  def loss_of(z1, z2, state, index, key):
    if mesh is None:
      return contrastive(name, z1, z2, state, index, key)
    per_device = jax.shard_map(
        lambda *a: contrastive(name, *a, axis_name="data"), mesh=mesh,
        in_specs=(P("data"), P("data"), P(), P("data"), P()), out_specs=(P(), P()))
    return per_device(z1, z2, state, index, key)

  @jax.jit
  def step(params, opt_state, state, v1, v2, index, key):
    def objective(p):
      return loss_of(model.apply(p, v1), model.apply(p, v2), state, index, key)
    (loss, state), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, state, loss

  shard = (lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))) if mesh else (lambda x: x)
  before = held_out_infonce(model, params)
  for i in range(steps):
    v1, v2, index = (shard(x) for x in views(jax.random.key(100 + i), batch))
    params, opt_state, state, _ = step(params, opt_state, state, v1, v2, index,
                                       jax.random.key(i))
  return before, held_out_infonce(model, params)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--loss", default="nt_xent,gamma", help="nt_xent, gamma or both")
  args = parser.parse_args(argv)
  # An explicit mesh whose axis is GSPMD's (Auto), over every device this process sees.
  mesh = Mesh(np.array(jax.devices()), ("data",))
  result = {}
  for name in args.loss.split(","):
    for where, m in (("jit", None), (f"shard_map on {mesh.size} devices", mesh)):
      result[(name, where)] = before, after = train(name, args.steps, m)
      print(f"{name:<8} {where:<24} held-out InfoNCE {before:.3f} -> {after:.3f}")
  return result


if __name__ == "__main__":
  main()
