"""The losses in a Flax NNX + optax loop: nt_xent and the stateful gamma_loss, under
`nnx.jit` on one device, then with the loss per device in `shard_map`.

  python -m examples.nnx_port [--steps 60]    # from the checkout

As in examples/linen_port.py: the model applies to the global batch, the loss runs inside
`jax.shard_map` with in_specs P("data") for the embeddings and indices and P() for the gamma
state and the key. The gamma state is a plain pytree of arrays that the loop carries and
returns from the jitted step (it is not an nnx.Variable: no gradient flows into it).
"""

import argparse
import math

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from contrastive_jax import losses
from examples.linen_port import D_IN, N, T, views


class Encoder(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(D_IN, 64, rngs=rngs)
    self.out = nnx.Linear(64, 16, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def contrastive(name: str, z1, z2, state, index, key, axis_name=None):
  if name == "nt_xent":
    return losses.nt_xent(z1, z2, temperature=T, axis_name=axis_name), state
  return losses.gamma_loss(z1, z2, state, index, key, temperature=T, eps_shape=math.inf,
                           rate=0.5, axis_name=axis_name)


def train(name: str, steps: int, mesh: Mesh | None = None, batch: int = 64) -> tuple[float, float]:
  """Held-out InfoNCE (fixed views of 256 points) before and after `steps` steps."""
  model = Encoder(nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  state = losses.init_gamma_state(N) if name == "gamma" else {}
  loss_of = lambda *a: contrastive(name, *a)
  if mesh is not None:
    loss_of = jax.shard_map(lambda *a: contrastive(name, *a, axis_name="data"), mesh=mesh,
                            in_specs=(P("data"), P("data"), P(), P("data"), P()),
                            out_specs=(P(), P()))

  @nnx.jit
  def step(model, optimizer, state, v1, v2, index, key):
    def objective(model):
      return loss_of(model(v1), model(v2), state, index, key)
    (loss, state), grads = nnx.value_and_grad(objective, has_aux=True)(model)
    optimizer.update(model, grads)
    return state, loss

  def held_out(model):
    v1, v2, _ = views(jax.random.key(7), 256)
    return float(losses.nt_xent(model(v1), model(v2), temperature=T))

  shard = (lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))) if mesh else (lambda x: x)
  before = held_out(model)
  for i in range(steps):
    v1, v2, index = (shard(x) for x in views(jax.random.key(100 + i), batch))
    state, _ = step(model, optimizer, state, v1, v2, index, jax.random.key(i))
  return before, held_out(model)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--loss", default="nt_xent,gamma", help="nt_xent, gamma or both")
  args = parser.parse_args(argv)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  result = {}
  for name in args.loss.split(","):
    for where, m in (("nnx.jit", None), (f"shard_map on {mesh.size} devices", mesh)):
      result[(name, where)] = before, after = train(name, args.steps, m)
      print(f"{name:<8} {where:<24} held-out InfoNCE {before:.3f} -> {after:.3f}")
  return result


if __name__ == "__main__":
  main()
