"""Streamed losses (key chunks, recomputed in the backward pass) equal the direct
path and the float64 references, values and gradients, on one device and sharded;
their memory stays O(B x chunk); index and state inputs are checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import hlo
from contrastive_jax import losses as L
from contrastive_jax.losses import streamed
from tests import reference as ref

B, D, T = 24, 8, 0.2
CHUNKS = (5, 7, 24)  # 5 and 7 do not divide B (nor 2B)


def inputs(n, seed, b=B):
  keys = jax.random.split(jax.random.key(seed), n)
  return [jax.random.normal(k, (b, D), jnp.float32) for k in keys]


def _gamma(loss_fn, chunk):
  state = L.init_gamma_state(64)
  idx = jnp.arange(B) * 2
  return lambda a, b: loss_fn(a, b, state, idx, jax.random.key(3), temperature=T,
                              chunk_size=chunk)[0]


LOSSES = {  # name -> (number of inputs, chunk -> loss(*xs))
    "nt_xent": (2, lambda c: lambda a, b: L.nt_xent(a, b, temperature=T, chunk_size=c)),
    "clip": (2, lambda c: lambda a, b: L.clip_loss(a, b, temperature=T, chunk_size=c)),
    "sigmoid": (2, lambda c: lambda a, b: L.sigmoid_loss(a, b, temperature=0.1, bias=-3.0,
                                                          chunk_size=c)),
    "dcl": (2, lambda c: lambda a, b: L.dcl_loss(a, b, temperature=T, chunk_size=c)),
    "dclw": (2, lambda c: lambda a, b: L.dcl_loss(a, b, temperature=T, weighted=True,
                                                  chunk_size=c)),
    "infonce": (2, lambda c: lambda a, b: L.infonce(a, b, temperature=T, chunk_size=c)),
    "l_con": (4, lambda c: lambda *x: L.modality_contrastive_loss(*x, temperature=T,
                                                                  chunk_size=c)),
    "feature_separation": (6, lambda c: lambda *x: L.feature_separation_loss(
        *x, temperature=T, chunk_size=c)),
    "sogclr": (2, lambda c: lambda a, b: L.sogclr_loss(
        a, b, L.init_sogclr_state(64), jnp.arange(B) * 2, temperature=T, chunk_size=c)[0]),
    "gamma": (2, lambda c: _gamma(L.gamma_loss, c)),
    "gamma_clip": (2, lambda c: _gamma(L.gamma_clip_loss, c)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_streamed_equals_direct(name):
  n, make = LOSSES[name]
  xs = inputs(n, seed=len(name))
  argnums = tuple(range(n))
  v0, g0 = jax.jit(jax.value_and_grad(make(None), argnums))(*xs)
  for chunk in CHUNKS:
    v, g = jax.jit(jax.value_and_grad(make(chunk), argnums))(*xs)
    np.testing.assert_allclose(v, v0, rtol=1e-5, atol=1e-6, err_msg=f"{name} chunk {chunk}")
    for a, b in zip(g, g0):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"{name} chunk {chunk}")


def test_streamed_equals_float64_references():
  z1, z2 = [np.asarray(x, np.float64) for x in inputs(2, seed=11)]
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  for name, fn, want in [
      ("nt_xent", lambda a, b: L.nt_xent(a, b, temperature=T, chunk_size=7),
       lambda a, b: ref.nt_xent(a, b, T)),
      ("clip", lambda a, b: L.clip_loss(a, b, temperature=T, chunk_size=7),
       lambda a, b: ref.clip(a, b, T)),
      ("sigmoid", lambda a, b: L.sigmoid_loss(a, b, temperature=0.1, bias=-3.0, chunk_size=7),
       lambda a, b: ref.sigmoid(a, b, 0.1, -3.0))]:
    v, g = jax.value_and_grad(fn, (0, 1))(f32(z1), f32(z2))
    np.testing.assert_allclose(v, want(z1, z2), rtol=1e-5, err_msg=name)
    g_ref = ref.numerical_grad(want, (z1, z2))
    for a, b in zip(g, g_ref):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5, err_msg=name)


def test_learnable_temperature_and_bias_get_the_same_gradient():
  img, txt = inputs(2, seed=5)
  for chunk in (None, 7):
    clip = jax.grad(lambda t: L.clip_loss(img, txt, temperature=t, chunk_size=chunk))(0.2)
    sig = jax.grad(lambda t, b: L.sigmoid_loss(img, txt, temperature=t, bias=b,
                                               chunk_size=chunk), (0, 1))(0.1, -3.0)
    if chunk is None:
      want = (clip, sig)
    else:
      np.testing.assert_allclose(clip, want[0], rtol=1e-4)
      np.testing.assert_allclose(sig, want[1], rtol=1e-4)


@pytest.mark.parametrize("name", ["nt_xent", "clip", "sigmoid"])
def test_streamed_sharded_equals_one_device(name):
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  xs = inputs(2, seed=3, b=64)
  kw = dict(temperature=0.1, bias=-3.0) if name == "sigmoid" else dict(temperature=T)
  f = dict(nt_xent=L.nt_xent, clip=L.clip_loss, sigmoid=L.sigmoid_loss)[name]
  sharded = jax.shard_map(lambda a, b: f(a, b, chunk_size=3, axis_name="data", **kw),
                          mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
  v8, g8 = jax.jit(jax.value_and_grad(sharded, (0, 1)))(*xs)
  v1, g1 = jax.jit(jax.value_and_grad(lambda a, b: f(a, b, **kw), (0, 1)))(*xs)
  np.testing.assert_allclose(v8, v1, rtol=1e-5)
  for a, b in zip(g8, g1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_gamma_clip_streams_its_local_block_when_sharded():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  xs = inputs(2, seed=3, b=64)

  def run(chunk):
    fn = lambda a, b, i: L.gamma_clip_loss(a, b, L.init_gamma_state(64), i, jax.random.key(1),
                                           temperature=T, chunk_size=chunk, axis_name="data")[0]
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P())
    return jax.jit(jax.value_and_grad(sharded, (0, 1)))(*xs, jnp.arange(64))
  (v0, g0), (v3, g3) = run(None), run(3)
  np.testing.assert_allclose(v3, v0, rtol=1e-5)
  for a, b in zip(g3, g0):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["nt_xent", "clip_loss", "sigmoid_loss", "gamma_loss"])
def test_default_call_at_65536_compiles_under_4_gib(name):
  """XLA's memory analysis of fwd + bwd at B = 65536, D = 128 (compiled, not run)."""
  b, d = 65536, 128
  spec = jax.ShapeDtypeStruct((b, d), jnp.float32)
  if name == "gamma_loss":
    state = jax.eval_shape(lambda: L.init_gamma_state(b))
    fn = lambda x, y, s: L.gamma_loss(x, y, s, jnp.arange(b), jax.random.key(0),
                                      temperature=T)[0]
    args = (spec, spec, state)
  else:
    kw = dict(temperature=0.1, bias=-10.0) if name == "sigmoid_loss" else dict(temperature=T)
    fn = lambda x, y: getattr(L, name)(x, y, **kw)
    args = (spec, spec)
  compiled = jax.jit(jax.grad(fn, (0, 1))).lower(*args).compile()
  m = compiled.memory_analysis()
  total = m.temp_size_in_bytes + m.output_size_in_bytes + m.argument_size_in_bytes
  assert total <= 4 * 2**30, f"{name}: {total / 2**30:.2f} GiB"


def test_chunk_choice():
  assert streamed.choose_chunk(1024, 1024, None) is None  # S fits: direct
  assert streamed.choose_chunk(131072, 131072, None) == 256
  assert streamed.choose_chunk(10, 10, 4) == 4
  with pytest.raises(ValueError, match="chunk_size"):
    streamed.choose_chunk(10, 10, 0)


# ----------------------------------------------------------------------------
# Index and state checks.


@pytest.mark.parametrize("loss", ["gamma", "gamma_clip", "sogclr"])
@pytest.mark.parametrize("index,message", [
    ([0, 1, 2, 64], r"outside \[0, 64\)"), ([0, 1, -1, 3], r"outside \[0, 64\)"),
    ([0, 1, 1, 3], "duplicates")])
def test_a_bad_index_raises_in_an_eager_call(loss, index, message):
  z1, z2 = inputs(2, seed=1, b=4)
  idx = jnp.asarray(index)
  with pytest.raises(ValueError, match=message):
    if loss == "sogclr":
      L.sogclr_loss(z1, z2, L.init_sogclr_state(64), idx, temperature=T)
    else:
      fn = L.gamma_loss if loss == "gamma" else L.gamma_clip_loss
      fn(z1, z2, L.init_gamma_state(64), idx, jax.random.key(0), temperature=T)


def test_checkify_catches_a_bad_index_under_jit():
  from jax.experimental import checkify
  z1, z2 = inputs(2, seed=1, b=4)
  state = L.init_gamma_state(64)

  def f(idx):
    L.common.index_checks(idx, 64)
    return L.gamma_loss(z1, z2, state, idx, jax.random.key(0), temperature=T)[0]
  checked = jax.jit(checkify.checkify(f))
  err, _ = checked(jnp.asarray([0, 1, 2, 3]))
  err.throw()  # fine
  err, _ = checked(jnp.asarray([0, 1, 2, 64]))
  with pytest.raises(checkify.JaxRuntimeError, match="outside"):
    err.throw()


@pytest.mark.parametrize("loss", ["gamma", "gamma_clip", "sogclr"])
def test_nan_embeddings_leave_the_state_table_finite(loss):
  z1, z2 = inputs(2, seed=2, b=8)
  z1 = z1.at[3].set(jnp.nan)
  idx = jnp.arange(8) * 3
  if loss == "sogclr":
    state = L.init_sogclr_state(32)
    _, new = L.sogclr_loss(z1, z2, state, idx, temperature=T)
    table, old = new["log_u"], state["log_u"]
  else:
    fn = L.gamma_loss if loss == "gamma" else L.gamma_clip_loss
    good, _ = inputs(2, seed=9, b=8)
    state = fn(good, z2, L.init_gamma_state(32), idx, jax.random.key(0), temperature=T)[1]
    _, new = fn(z1, z2, state, idx, jax.random.key(0), temperature=T)
    table, old = new["log_z"], state["log_z"]
  table, old = np.asarray(table), np.asarray(old)
  assert not np.isnan(table).any() and not np.isposinf(table).any()
  changed = table != old
  assert changed.any() or loss == "sogclr"  # unaffected entries still learn


def test_sogclr_rate_is_validated():
  z1, z2 = inputs(2, seed=1, b=4)
  for rate in (1.5, 0.0, -0.1):
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\]"):
      L.sogclr_loss(z1, z2, L.init_sogclr_state(8), jnp.arange(4), temperature=T, rate=rate)


# ----------------------------------------------------------------------------
# Ring: key blocks between neighbours instead of an all-gather.

RING = {  # name -> (inputs, loss(*xs, ring, axis_name))
    "nt_xent": (2, lambda *x, **kw: L.nt_xent(*x, temperature=T, **kw)),
    "clip": (2, lambda *x, **kw: L.clip_loss(*x, temperature=T, **kw)),
    "dcl": (2, lambda *x, **kw: L.dcl_loss(*x, temperature=T, weighted=True, **kw)),
    "infonce": (2, lambda *x, **kw: L.infonce(*x, temperature=T, **kw)),
    "l_con": (4, lambda *x, **kw: L.modality_contrastive_loss(*x, temperature=T, **kw)),
    "sogclr": (2, lambda *x, **kw: L.sogclr_loss(
        *x, L.init_sogclr_state(64), jax.lax.axis_index("data") * 8 + jnp.arange(8),
        temperature=T, **kw)[0]),
}


@pytest.mark.parametrize("name", sorted(RING))
def test_ring_equals_all_gather_and_one_device(name):
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  n, fn = RING[name]
  xs = inputs(n, seed=len(name), b=64)
  argnums = tuple(range(n))
  out = {}
  for ring in (False, True):
    sharded = jax.shard_map(lambda *x: fn(*x, ring=ring, axis_name="data"), mesh=mesh,
                            in_specs=(P("data"),) * n, out_specs=P())
    step = jax.jit(jax.value_and_grad(sharded, argnums))
    out[ring] = step(*xs)
    if ring:  # the compiled program passes blocks and gathers no keys
      text = step.lower(*xs).compile().as_text()
      assert "collective-permute" in text
      ops = hlo.collectives(text)
      keys = 64 * D * 4  # one view of the global batch
      assert all(nbytes < keys for kind, nbytes in ops if kind == "all-gather"), ops
  if name != "sogclr":  # sogclr's state update gathers (index, value) pairs on every path
    one = jax.jit(jax.value_and_grad(lambda *x: fn(*x), argnums))(*xs)
    np.testing.assert_allclose(out[True][0], one[0], rtol=1e-5)
  for (v, g), (v0, g0) in [(out[True], out[False])]:
    np.testing.assert_allclose(v, v0, rtol=1e-5)
    for a, b in zip(g, g0):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_ring_needs_an_axis_name():
  z1, z2 = inputs(2, seed=1)
  with pytest.raises(ValueError, match="ring=True"):
    L.nt_xent(z1, z2, temperature=T, ring=True)
