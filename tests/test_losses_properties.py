"""Statistical and API properties of the losses: unbiasedness of the gamma estimator,
its SogCLR limit, bfloat16, optax parity, jit/vmap, bad input, zero vectors."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from contrastive_jax import losses as L

T = 0.2


# ---------------------------------------------------------------------------
# Unbiasedness on a finite pool.

POOL, DIM, BATCH, DRAWS = 24, 6, 4, 20000


def _pool():
  k1, k2 = jax.random.split(jax.random.key(0))
  p1 = jax.random.normal(k1, (POOL, DIM))
  return p1, p1 + 0.8 * jax.random.normal(k2, (POOL, DIM))


def _exact_log_z(p1, p2):
  """log mean over each anchor's 2(N - 1) pool negatives, [2, N] (SimCLR layout)."""
  z = jnp.concatenate([p1, p2]) / jnp.linalg.norm(jnp.concatenate([p1, p2]), axis=1,
                                                   keepdims=True)
  s = z @ z.T / T
  n = POOL
  mask = jnp.eye(2 * n, dtype=bool) | jnp.roll(jnp.eye(2 * n, dtype=bool), n, axis=1)
  return (jax.nn.logsumexp(jnp.where(mask, -jnp.inf, s), 1) - jnp.log(2 * n - 2.0)).reshape(2, n)


def _mc_gradients(loss_fn):
  """Per-draw gradients w.r.t. the whole pool [DRAWS, 2 * N * D]: random batch, random key."""
  p1, p2 = _pool()

  def one(key):
    k_idx, k_eps = jax.random.split(key)
    idx = jax.random.permutation(k_idx, POOL)[:BATCH]
    g = jax.grad(lambda a, b: loss_fn(a[idx], b[idx], idx, k_eps), (0, 1))(p1, p2)
    return jnp.concatenate([g[0].ravel(), g[1].ravel()])

  return jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), DRAWS))


def _relative_bias(grads, target):
  """(||mean - target|| / ||target||, the same ratio expected from Monte-Carlo noise alone)."""
  mean = jnp.mean(grads, 0)
  noise = jnp.sqrt(jnp.sum(jnp.var(grads, 0)) / grads.shape[0])
  norm = jnp.linalg.norm(target)
  return float(jnp.linalg.norm(mean - target) / norm), float(noise / norm)


@pytest.mark.slow
def test_gamma_gradient_is_unbiased_and_minibatch_infonce_is_not():
  p1, p2 = _pool()
  # Full-pool objective mean_k [-s_k+ + log Z_k] = DCL on the whole pool + const.
  g_full = jax.grad(lambda a, b: L.dcl_loss(a, b, temperature=T), (0, 1))(p1, p2)
  g_full = jnp.concatenate([g_full[0].ravel(), g_full[1].ravel()])
  state = {"log_z": _exact_log_z(p1, p2)}  # exact denominators, held fixed (rate 0)

  gamma = _mc_gradients(lambda a, b, idx, key: L.gamma_loss(  # the paper's form: eps drawn
      a, b, state, idx, key, temperature=T, eps_shape=1.0, rate=0.0)[0])
  infonce = _mc_gradients(lambda a, b, idx, key: L.dcl_loss(a, b, temperature=T))
  gamma_bias, gamma_noise = _relative_bias(gamma, g_full)
  infonce_bias, infonce_noise = _relative_bias(infonce, g_full)
  # Stated tolerance: the gamma mean is within 3x its Monte-Carlo standard error
  # (measured: error 0.029 for a standard error of about 0.01-0.03, relative to
  # ||grad||); minibatch InfoNCE (DCL, same negatives) is off by 0.21, over 9
  # standard errors (0.023).
  assert gamma_bias < 3 * gamma_noise, (gamma_bias, gamma_noise)
  assert infonce_bias > 5 * infonce_noise and infonce_bias > 5 * gamma_bias, (
      infonce_bias, infonce_noise, gamma_bias)


@pytest.mark.slow
def test_gamma_shape_to_infinity_gives_sogclr_gradient():
  """With update_first=True (SogCLR's order), shape = inf is SogCLR's gradient."""
  k = jax.random.split(jax.random.key(3), 3)
  z1, z2 = jax.random.normal(k[0], (16, 8)), jax.random.normal(k[1], (16, 8))
  index = jnp.arange(16) * 2
  log_table = jnp.full((2, 40), -jnp.inf).at[:, index[:8]].set(
      jax.random.normal(k[2], (2, 8)))
  sog = jax.grad(lambda a, b: L.sogclr_loss(a, b, {"log_u": log_table}, index, temperature=T,
                                           rate=0.3)[0], (0, 1))(z1, z2)

  def gamma_grad(shape):
    return jax.grad(lambda a, b: L.gamma_loss(
        a, b, {"log_z": log_table}, index, jax.random.key(9), temperature=T, eps_shape=shape,
        rate=0.3, update_first=True)[0], (0, 1))(z1, z2)

  for g, s in zip(gamma_grad(float("inf")), sog):
    np.testing.assert_allclose(g, s, rtol=1e-5, atol=1e-7)
  errors = [max(float(jnp.max(jnp.abs(g - s)) / jnp.max(jnp.abs(s)))
                for g, s in zip(gamma_grad(a), sog)) for a in (1.0, 1e2, 1e4)]
  assert errors[0] > 0.05 and errors[1] < errors[0] and errors[2] < 0.02, errors


# ---------------------------------------------------------------------------
# Numerics.

def _all_losses(x1, x2, x3, x4):
  idx = jnp.arange(x1.shape[0])
  key = jax.random.key(0)
  return {
      "nt_xent": L.nt_xent(x1, x2, temperature=T),
      "clip": L.clip_loss(x1, x2, temperature=T),
      "sigmoid": L.sigmoid_loss(x1, x2, temperature=0.1, bias=-10.0),
      "dcl": L.dcl_loss(x1, x2, temperature=T),
      "dclw": L.dcl_loss(x1, x2, temperature=T, weighted=True),
      "sogclr": L.sogclr_loss(x1, x2, L.init_sogclr_state(64), idx, temperature=T)[0],
      "gamma": L.gamma_loss(x1, x2, L.init_gamma_state(64), idx, key, temperature=T)[0],
      "gamma_clip": L.gamma_clip_loss(x1, x2, L.init_gamma_state(64), idx, key,
                                      temperature=T)[0],
      "lcon": L.modality_contrastive_loss(x1, x2, x3, x4, temperature=T),
      "separation": L.feature_separation_loss(x1, x2, x3, x4, x2, x1, temperature=T),
      "bridge": L.brownian_bridge_loss(x1, x2, x3),
      "geometric": L.geometric_consistency_loss(x1, x2, x3, x4),
  }


def test_bfloat16_inputs_are_finite_and_close_to_float32():
  xs = [jax.random.normal(k, (64, 32)) for k in jax.random.split(jax.random.key(4), 4)]
  f32 = jax.jit(_all_losses)(*xs)
  bf16 = jax.jit(_all_losses)(*[x.astype(jnp.bfloat16) for x in xs])
  for name in f32:
    assert bf16[name].dtype == jnp.float32, name
    assert jnp.isfinite(bf16[name]), name
    np.testing.assert_allclose(bf16[name], f32[name], rtol=3e-2, atol=3e-2, err_msg=name)


def test_float64_inputs_are_computed_and_returned_in_float32():
  """The documented dtype policy (losses/__init__): float64 in, float32 out."""
  with jax.enable_x64(True):
    xs = [jax.random.normal(k, (16, 8), jnp.float64)
          for k in jax.random.split(jax.random.key(5), 4)]
    assert xs[0].dtype == jnp.float64
    out = jax.jit(_all_losses)(*xs)
    for name, value in out.items():
      assert value.dtype == jnp.float32, name
      assert jnp.isfinite(value), name


@pytest.mark.slow
def test_zero_vectors_give_finite_values_and_gradients():
  xs = [jax.random.normal(k, (8, 4)) for k in jax.random.split(jax.random.key(5), 4)]
  xs = [x.at[0].set(0.0) for x in xs]
  values = jax.jit(_all_losses)(*xs)
  names = list(values)
  # One Jacobian (row k: the gradient of loss k), traced and compiled once.
  stacked = lambda *x: jnp.stack([_all_losses(*x)[n] for n in names])
  jacobians = jax.jit(jax.jacrev(stacked, argnums=(0, 1, 2, 3)))(*xs)
  for k, name in enumerate(names):
    assert jnp.isfinite(values[name]), name
    assert all(bool(jnp.all(jnp.isfinite(j[k]))) for j in jacobians), name


def test_nt_xent_matches_optax():
  """optax.losses.ntxent with labels [0..B-1, 0..B-1] on [z1; z2] is the same loss:
  each of the 2B anchors has one positive (its other view), the other 2(B-1) views
  are negatives, averaged over the 2B anchors. (optax normalises with eps = machine
  epsilon inside the cosine; ours floors the norm at 1e-6: equal for non-zero rows.)"""
  for seed in range(3):
    k1, k2 = jax.random.split(jax.random.key(seed))
    z1, z2 = jax.random.normal(k1, (32, 16)), jax.random.normal(k2, (32, 16))
    labels = jnp.concatenate([jnp.arange(32), jnp.arange(32)])
    theirs = optax.losses.ntxent(jnp.concatenate([z1, z2]), labels, temperature=0.1)
    np.testing.assert_allclose(L.nt_xent(z1, z2, temperature=0.1), theirs, rtol=1e-5)


# ---------------------------------------------------------------------------
# API: jit, vmap, learnable temperature, errors.

@pytest.mark.slow
def test_vmap_over_batches_equals_loop():
  xs = [jax.random.normal(k, (3, 8, 4)) for k in jax.random.split(jax.random.key(6), 4)]
  batched = jax.jit(jax.vmap(_all_losses))(*xs)
  for i in range(3):
    single = _all_losses(*[x[i] for x in xs])
    for name, v in single.items():
      np.testing.assert_allclose(batched[name][i], v, rtol=1e-5, err_msg=name)


def test_learnable_temperature_and_bias_are_traced():
  z1, z2 = jax.random.normal(jax.random.key(7), (2, 8, 4))
  g = jax.jit(jax.grad(lambda t, b: L.sigmoid_loss(z1, z2, temperature=t, bias=b)
                       + L.clip_loss(z1, z2, temperature=t), (0, 1)))(0.1, -1.0)
  assert all(jnp.isfinite(x) for x in g)


@pytest.mark.parametrize("call,match", [
    (lambda z: L.nt_xent(z[0], z[1][:, :3], temperature=T), r"z2 shape \(8, 3\).*z1 shape \(8, 4\)"),
    (lambda z: L.clip_loss(z[0][:5], z[1], temperature=T), r"txt shape \(8, 4\).*img shape \(5, 4\)"),
    (lambda z: L.sigmoid_loss(z[0][0], z[1][0], temperature=T, bias=0.0), r"img must have rank 2.*\(4,\)"),
    (lambda z: L.dcl_loss(z[0].astype(jnp.int32), z[1], temperature=T), r"z1 must be a floating dtype"),
    (lambda z: L.nt_xent(z[0], z[1], temperature=0.0), r"temperature must be > 0"),
    (lambda z: L.clip_loss(z[0][:1], z[1][:1], temperature=T), r"batch size 1"),
    (lambda z: L.sogclr_loss(z[0], z[1], L.init_sogclr_state(10), jnp.arange(7), temperature=T),
     r"index must have shape \[8\]"),
    (lambda z: L.gamma_loss(z[0], z[1], L.init_gamma_state(10), jnp.arange(8), jax.random.key(0),
                            temperature=T, estimator="global"), r"state for estimator='global'"),
    (lambda z: L.gamma_loss(z[0], z[1], L.init_gamma_state(10), jnp.arange(8), jax.random.key(0),
                            temperature=T, rate=1.5), r"rate must be in \[0, 1\]"),
    (lambda z: L.gamma_loss(z[0], z[1], L.init_gamma_state(10), jnp.arange(8), jax.random.key(0),
                            temperature=T, estimator="batch"), r"estimator must be one of"),
])
def test_bad_input_errors_name_argument_and_shapes(call, match):
  z = jax.random.normal(jax.random.key(8), (2, 8, 4))
  with pytest.raises((ValueError, TypeError), match=match):
    jax.jit(lambda: call(z))()


def test_gamma_defaults_train_and_need_no_key_at_shape_inf():
  """The library's gamma defaults are the trainer's (rate 0.5, eps = 1 for two views), and
  eps = 1 needs no key; a drawn eps without a key is a clear error."""
  assert L.registry.options("gamma")["rate"] == 0.5
  assert L.registry.options("gamma")["eps_shape"] == float("inf")
  assert L.registry.options("gamma_clip")["rate"] == 0.5
  z1, z2 = jax.random.normal(jax.random.key(0), (2, 8, 4))
  state = L.init_gamma_state(8)
  with_key = L.gamma_loss(z1, z2, state, jnp.arange(8), jax.random.key(3), temperature=0.2)
  without = L.gamma_loss(z1, z2, state, jnp.arange(8), temperature=0.2)
  jax.tree.map(np.testing.assert_array_equal, with_key, without)
  with pytest.raises(L.OptionError, match="give a PRNG key"):
    L.gamma_clip_loss(z1, z2, state, jnp.arange(8), temperature=0.2)


@pytest.mark.parametrize("name", ["gamma", "sogclr"])
def test_registry_passes_progress_to_the_rate_schedule(name):
  """A trainer's loss_fn(progress=p) under the cosine schedule is the constant-rate loss at
  the schedule's rate: once past rate_fraction, rate_min."""
  rng = np.random.default_rng(3)
  z1, z2 = (jnp.asarray(rng.normal(size=(8, 5)), jnp.float32) for _ in range(2))
  index = jnp.arange(8)
  cosine, state = L.registry.make(name, {"rate_schedule": "cosine", "rate_min": 0.3,
                                         "rate_fraction": 0.5}, num_examples=8)
  constant, _ = L.registry.make(name, {"rate": 0.3}, num_examples=8)
  _, state = constant(z2, z1, state, index, jax.random.key(0), temperature=0.2)  # a prior
  got = cosine(z1, z2, state, index, jax.random.key(1), temperature=0.2, progress=0.75)
  want = constant(z1, z2, state, index, jax.random.key(1), temperature=0.2)
  other = constant(z1, z2, state, index, jax.random.key(1), temperature=0.2, progress=0.0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), other, want)
  early = cosine(z1, z2, state, index, jax.random.key(1), temperature=0.2, progress=0.1)
  assert not np.allclose(early[1][next(iter(state))], want[1][next(iter(state))])


@pytest.mark.parametrize("fn, old, new, value", [
    ("gamma_loss", "rate_decay", "rate", 0.3), ("gamma_loss", "shape", "eps_shape", 2.0),
    ("gamma_clip_loss", "rate_decay", "rate", 0.3), ("sogclr_loss", "gamma", "rate", 0.3)])
def test_renamed_options_still_work_for_one_release_with_a_warning(fn, old, new, value):
  """One name per concept across the losses (rate: the moving-average weight, eps_shape: the
  draw's shape); the old keyword gives the same result and a DeprecationWarning, in the
  function, in the registry (configs) and in a stored config's comparison on resume."""
  z1, z2 = jax.random.normal(jax.random.key(2), (2, 8, 4))
  loss = getattr(L, fn)
  state = L.init_sogclr_state(8) if fn == "sogclr_loss" else L.init_gamma_state(8)
  args = (z1, z2, state, jnp.arange(8)) + (() if fn == "sogclr_loss" else (jax.random.key(1),))
  want = loss(*args, temperature=0.2, **{new: value})
  with pytest.warns(DeprecationWarning, match=f"use {new}="):
    got = loss(*args, temperature=0.2, **{old: value})
  jax.tree.map(np.testing.assert_array_equal, got, want)
  with pytest.raises(TypeError, match=f"give {new}= only"):
    loss(*args, temperature=0.2, **{old: value, new: value})
  assert old not in inspect.signature(loss).parameters  # the docs show the new name
  name = {"gamma_loss": "gamma", "gamma_clip_loss": "gamma_clip", "sogclr_loss": "sogclr"}[fn]
  with pytest.warns(DeprecationWarning, match=f"now {new!r}"):
    made, _ = L.registry.make(name, {old: value}, num_examples=8)
  assert L.registry.renamed_options()[name][old] == new
