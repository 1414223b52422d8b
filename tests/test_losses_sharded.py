"""Sharded semantics: global-negative losses equal their 1-device value and gradient
on 8 devices; the gamma loss moves no embeddings between devices."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastive_jax import hlo
from contrastive_jax import losses as L

N_DEV = 8
B, D = 32, 16
T = 0.2


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == N_DEV, "tests/conftest.py sets 8 simulated devices"
  return jax.sharding.Mesh(np.array(jax.devices()), ("data",))


def inputs(n, seed):
  keys = jax.random.split(jax.random.key(seed), n)
  return [jax.random.normal(k, (B, D), jnp.float32) for k in keys]


# name -> (number of [B, D] inputs, loss(*xs, axis_name))
GLOBAL = {
    "nt_xent": (2, lambda *x, axis_name=None: L.nt_xent(*x, temperature=T, axis_name=axis_name)),
    "clip": (2, lambda *x, axis_name=None: L.clip_loss(*x, temperature=T, axis_name=axis_name)),
    "sigmoid": (2, lambda *x, axis_name=None: L.sigmoid_loss(
        *x, temperature=0.1, bias=-5.0, axis_name=axis_name)),
    "dcl": (2, lambda *x, axis_name=None: L.dcl_loss(*x, temperature=T, axis_name=axis_name)),
    "dclw": (2, lambda *x, axis_name=None: L.dcl_loss(
        *x, temperature=T, weighted=True, axis_name=axis_name)),
    "modality_contrastive": (4, lambda *x, axis_name=None: L.modality_contrastive_loss(
        *x, temperature=T, axis_name=axis_name)),
    "feature_separation": (6, lambda *x, axis_name=None: L.feature_separation_loss(
        *x, temperature=T, axis_name=axis_name)),
    "brownian_bridge": (3, lambda *x, axis_name=None: L.brownian_bridge_loss(
        *x, axis_name=axis_name)),
    "geometric_consistency": (4, lambda *x, axis_name=None: L.geometric_consistency_loss(
        *x, axis_name=axis_name)),
}


def sharded(fn, mesh, n):
  return jax.shard_map(lambda *x: fn(*x, axis_name="data"), mesh=mesh,
                       in_specs=(P("data"),) * n, out_specs=P())


@pytest.mark.parametrize("name", sorted(GLOBAL))
def test_one_vs_eight_devices(name, mesh):
  n, fn = GLOBAL[name]
  xs = inputs(n, seed=len(name))
  argnums = tuple(range(n))
  v1, g1 = jax.jit(jax.value_and_grad(fn, argnums))(*xs)
  # shard_map with the axis name: local anchors against gathered keys.
  v8, g8 = jax.jit(jax.value_and_grad(sharded(fn, mesh, n), argnums))(*xs)
  # plain jit on inputs sharded over the mesh (GSPMD partitions the program).
  xs_sh = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in xs]
  vj, gj = jax.jit(jax.value_and_grad(fn, argnums))(*xs_sh)
  for v, g in ((v8, g8), (vj, gj)):
    np.testing.assert_allclose(v, v1, rtol=2e-6)
    for a, b in zip(g, g1):
      # Reordered float32 sums differ by a few ulps of the largest entry (1e-7 failed on
      # one CPU by 1.9e-8 at a max of 0.12).
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))) + 1e-9)


@pytest.mark.slow
def test_sogclr_one_vs_eight_devices(mesh):
  z1, z2 = inputs(2, seed=3)
  n = 100
  index = jax.random.permutation(jax.random.key(1), n)[:B]
  state = L.init_sogclr_state(n)
  state = {"log_u": state["log_u"].at[:, index[:10]].set(0.5)}

  def fn(a, b, idx, axis_name=None):
    return L.sogclr_loss(a, b, state, idx, temperature=T, rate=0.9, axis_name=axis_name)

  (v1, s1), g1 = jax.value_and_grad(fn, (0, 1), has_aux=True)(z1, z2, index)
  f8 = jax.shard_map(lambda a, b, i: fn(a, b, i, axis_name="data"), mesh=mesh,
                     in_specs=(P("data"), P("data"), P("data")), out_specs=(P(), P()))
  (v8, s8), g8 = jax.value_and_grad(f8, (0, 1), has_aux=True)(z1, z2, index)
  np.testing.assert_allclose(v8, v1, rtol=2e-6)
  np.testing.assert_array_equal(np.isfinite(s8["log_u"]), np.isfinite(s1["log_u"]))
  np.testing.assert_allclose(s8["log_u"], s1["log_u"], rtol=1e-6)
  for a, b in zip(g8, g1):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7 * float(jnp.max(jnp.abs(b))))


def collectives(fn, *args):
  """[(kind, result bytes)] of the cross-device collectives in the compiled program."""
  return hlo.collectives(jax.jit(fn).lower(*args).compile().as_text())


def elements(nbytes):
  return nbytes // 4  # every collective here moves f32 / s32


def gamma_sharded(mesh, estimator):
  state = L.init_gamma_state(1000 if estimator != "global" else None, estimator)

  def loss(a, b, idx, key, axis_name="data"):
    return L.gamma_loss(a, b, state, idx, key, temperature=T, estimator=estimator,
                        axis_name=axis_name)

  f = jax.shard_map(loss, mesh=mesh, in_specs=(P("data"), P("data"), P("data"), P()),
                    out_specs=(P(), P()))
  return jax.grad(lambda a, b, i, k: f(a, b, i, k)[0], (0, 1))


@pytest.mark.slow
def test_gamma_moves_no_embeddings(mesh):
  z1, z2 = inputs(2, seed=0)
  index, key = jnp.arange(B), jax.random.key(0)
  ops = collectives(gamma_sharded(mesh, "global"), z1, z2, index, key)
  assert ops, "expected the scalar all-reduces of the loss and the state"
  assert all(op == "all-reduce" for op, _ in ops), ops
  assert sum(elements(n) for _, n in ops) <= 8, ops  # a few scalars: loss, 2 log-rates
  # per_example: all-gathers carry only the B indices and 2 x B log-denominators.
  for estimator in ("per_example",):
    ops = collectives(gamma_sharded(mesh, estimator), z1, z2, index, key)
    assert not [op for op, _ in ops if op in ("all-to-all", "collective-permute")], ops
    gathered = [elements(s) for op, s in ops if op == "all-gather"]
    assert gathered and max(gathered) <= 2 * B < B * D, ops
    assert all(elements(s) <= 8 for op, s in ops if op == "all-reduce"), ops
  # The check can fail: sharded CLIP all-gathers [B, D] embeddings.
  clip = jax.shard_map(lambda a, b: L.clip_loss(a, b, temperature=T, axis_name="data"),
                       mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
  ops = collectives(jax.grad(clip, (0, 1)), z1, z2)
  assert any(op == "all-gather" and elements(s) >= B * D for op, s in ops), ops


@pytest.mark.slow
def test_gamma_sharded_uses_local_negatives(mesh):
  """On 8 devices, with eps = 1 and a known state, the loss is the mean of per-device losses."""
  z1, z2 = inputs(2, seed=5)
  state = {"log_z": jnp.zeros((2,))}
  kw = dict(temperature=T, eps_shape=float("inf"), rate=0.0, estimator="global")
  f8 = jax.shard_map(lambda a, b: L.gamma_loss(a, b, state, None, jax.random.key(0),
                                               axis_name="data", **kw)[0],
                     mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
  b = B // N_DEV
  per_device = [L.gamma_loss(z1[i * b:(i + 1) * b], z2[i * b:(i + 1) * b], state, None,
                             jax.random.key(0), **kw)[0] for i in range(N_DEV)]
  np.testing.assert_allclose(f8(z1, z2), np.mean(per_device), rtol=1e-6)


@pytest.mark.parametrize("check_vma", [True, False])
def test_the_readme_recipe_for_a_shard_map_loop(check_vma, mesh):
  """Losses return the global mean: pmean of the gradient is right on 8 devices, psum is 8x."""
  w = jax.random.normal(jax.random.key(0), (D, 4))
  x1, x2 = inputs(2, seed=4)
  loss = lambda p, a, b, ax=None: L.nt_xent(a @ p, b @ p, temperature=T, axis_name=ax)
  want = jax.grad(loss)(w, x1, x2)

  def grad(reduce):
    def step(p, a, b):
      g = jax.grad(lambda p: loss(p, a, b, "data"))(p)
      return reduce(g, "data")
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                 out_specs=P(), check_vma=check_vma))(w, x1, x2)
  np.testing.assert_allclose(grad(jax.lax.pmean), want, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(grad(jax.lax.psum), N_DEV * want, rtol=1e-4, atol=1e-6)
