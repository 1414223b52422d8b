"""Every loss and regulariser against its float64 NumPy reference: values and gradients."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import losses as L
from tests import reference as ref

B, D = 8, 16
RTOL = 1e-5


def assert_close(actual, expected, rtol=RTOL, err_msg=""):
  """Element-wise rtol, with an absolute floor of rtol x the largest |expected| entry."""
  expected = np.asarray(expected, np.float64)
  atol = rtol * max(np.max(np.abs(expected)), 1e-3)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol,
                             err_msg=err_msg)


def fresh_inputs(n, seed):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(B, D)) for _ in range(n)]


def seed_of(*parts) -> int:
  """A stable seed from test parameters (never hash(): it is salted per process)."""
  return zlib.crc32(repr(parts).encode())


T = 0.3
# name -> (number of [B, D] inputs, jax loss, float64 reference)
STATELESS = {
    "nt_xent": (2, lambda a, b: L.nt_xent(a, b, temperature=T), lambda a, b: ref.nt_xent(a, b, T)),
    "clip": (2, lambda a, b: L.clip_loss(a, b, temperature=T), lambda a, b: ref.clip(a, b, T)),
    "sigmoid": (2, lambda a, b: L.sigmoid_loss(a, b, temperature=0.1, bias=-3.0),
                lambda a, b: ref.sigmoid(a, b, 0.1, -3.0)),
    "dcl": (2, lambda a, b: L.dcl_loss(a, b, temperature=T), lambda a, b: ref.dcl(a, b, T)),
    "dclw": (2, lambda a, b: L.dcl_loss(a, b, temperature=T, weighted=True),
             lambda a, b: ref.dcl(a, b, T, weighted=True)),
    "infonce": (2, lambda a, b: L.infonce(a, b, temperature=T), lambda a, b: ref.infonce(a, b, T)),
    "modality_contrastive": (
        4, lambda *x: L.modality_contrastive_loss(*x, temperature=T),
        lambda *x: ref.modality_contrastive(*x, T)),
    "feature_separation": (
        6, lambda *x: L.feature_separation_loss(*x, temperature=T),
        lambda *x: ref.feature_separation(*x, T)),
    "brownian_bridge": (3, lambda *x: L.brownian_bridge_loss(*x, t=0.25),
                        lambda *x: ref.brownian(*x, 0.25)),
    "geometric_consistency": (4, lambda *x: L.geometric_consistency_loss(*x),
                              lambda *x: ref.geometric(*x)),
}


@pytest.mark.parametrize("name", sorted(STATELESS))
@pytest.mark.parametrize("seed", [0, 1])
def test_stateless_value_and_grad(name, seed):
  n, fn, reference = STATELESS[name]
  args = fresh_inputs(n, seed=seed_of(name, seed))
  value, grads = jax.value_and_grad(fn, argnums=tuple(range(n)))(
      *[jnp.asarray(a, jnp.float32) for a in args])
  assert_close(value, reference(*args))
  for g, g_ref in zip(grads, ref.numerical_grad(reference, args)):
    assert_close(g, g_ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_dclw_is_finite_and_exact_at_a_small_sigma(seed):
  """sigma = 0.01 with near-duplicate positives: exp(cos / sigma) ~ e^100 overflows float32."""
  rng = np.random.default_rng(seed_of("dclw_sigma", seed))
  z1 = rng.normal(size=(B, D))
  z2 = z1 + 0.01 * rng.normal(size=(B, D))
  reference = lambda a, b: ref.dcl(a, b, T, weighted=True, sigma=0.01)
  fn = lambda a, b: L.dcl_loss(a, b, temperature=T, weighted=True, sigma=0.01)
  value, grads = jax.value_and_grad(fn, argnums=(0, 1))(jnp.asarray(z1, jnp.float32),
                                                         jnp.asarray(z2, jnp.float32))
  assert np.isfinite(float(value)) and all(np.isfinite(g).all() for g in grads), seed
  assert_close(value, reference(z1, z2), rtol=1e-4)
  for g, g_ref in zip(grads, ref.numerical_grad(reference, [z1, z2])):
    assert_close(g, g_ref, rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_momentum_distillation_value_and_grad(seed):
  img, txt, img_m, txt_m = fresh_inputs(4, seed=seed_of("momentum_distillation", seed))
  fn = lambda *x: L.momentum_distillation_loss(*x, temperature=T)
  value, grads = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(
      *[jnp.asarray(a, jnp.float32) for a in (img, txt, img_m, txt_m)])
  assert_close(value, ref.momentum_distillation(img, txt, img_m, txt_m, T))
  # The momentum model's softmax is a constant target: gradients reach the online inputs only.
  g_ref = ref.numerical_grad(lambda a, b: ref.momentum_distillation(a, b, img_m, txt_m, T),
                             [img, txt])
  for g, gr in zip(grads[:2], g_ref):
    assert_close(g, gr)
  assert not np.any(grads[2]) and not np.any(grads[3])
  # One-hot targets (orthogonal momentum embeddings at a low temperature): CLIP's InfoNCE.
  sharp = L.momentum_distillation_loss(jnp.float32(img), jnp.float32(txt),
                                       jnp.float32(np.eye(B, D)), jnp.float32(np.eye(B, D)),
                                       temperature=1e-3)
  assert_close(sharp, L.clip_loss(jnp.float32(img), jnp.float32(txt), temperature=1e-3))


def test_sigmoid_bias_and_temperature_grads():
  img, txt = fresh_inputs(2, seed=3)
  fn = lambda t, b: L.sigmoid_loss(jnp.float32(img), jnp.float32(txt), temperature=t, bias=b)
  g = jax.grad(fn, argnums=(0, 1))(jnp.float32(0.2), jnp.float32(-2.0))
  g_ref = ref.numerical_grad(lambda t, b: ref.sigmoid(img, txt, float(t), float(b)),
                             [np.float64(0.2), np.float64(-2.0)])
  assert_close(np.array(g), np.array([float(x) for x in g_ref]))


def test_shared_state_sogclr_is_the_official_bookkeeping_over_three_steps():
  """sogclr_loss(shared_state=True) against a float64 transcription of the official code's
  update: one u per example for both views, the rate 1 only for an all-new batch (step 0),
  new examples among seen ones starting at rate * Zb (step 1), revisits (step 2); each
  step's state, value and gradients (weights Zb / u_view of the official u1, u2)."""
  n, rate = 24, 0.7
  rng = np.random.default_rng(8)
  u = np.zeros(n)
  state = L.init_sogclr_state(n, shared=True)
  batches = [np.arange(0, 8), np.concatenate([np.arange(4, 8), np.arange(8, 12)]),
             rng.permutation(12)[:B]]
  for step, index in enumerate(batches):
    z1, z2 = fresh_inputs(2, seed=20 + step)
    u, u1, u2, zb = ref.sogclr_official(z1, z2, u, index, T, rate)
    weights = (zb / np.stack([u1, u2])).reshape(-1)
    fn = lambda a, b, state=state, index=index: L.sogclr_loss(
        a, b, state, jnp.asarray(index), temperature=T, rate=rate, shared_state=True)
    (loss, state), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
        jnp.float32(z1), jnp.float32(z2))
    got = np.exp(np.asarray(state["log_u"], np.float64))[0]
    assert_close(got, u, err_msg=f"step {step}")  # unset entries: exp(-inf) = 0 = u
    table = np.full((2, n), -np.inf)  # the surrogate with the official weights held fixed
    surrogate = lambda a, b: ref.sogclr(a, b, table, index, T, 1.0, weights=weights)[0]
    assert_close(loss, surrogate(z1, z2), err_msg=f"step {step}")
    for g, gr in zip(grads, ref.numerical_grad(surrogate, [z1, z2])):
      assert_close(g, gr, err_msg=f"step {step}")
  assert (u > 0).sum() == 12 and batches[1][0] in batches[0]
  with pytest.raises(ValueError, match="shared=True"):
    L.sogclr_loss(jnp.float32(z1), jnp.float32(z2), L.init_sogclr_state(n), jnp.arange(B),
                  temperature=T, shared_state=True)


def test_sogclr_value_grad_state():
  z1, z2 = fresh_inputs(2, seed=11)
  n = 20
  rng = np.random.default_rng(5)
  index = rng.permutation(n)[:B]
  table = np.full((2, n), -np.inf)
  table[:, index[:3]] = rng.normal(size=(2, 3))  # some examples seen before, some new
  loss_ref, table_ref, w = ref.sogclr(z1, z2, table, index, T, 0.9)
  fn = lambda a, b: L.sogclr_loss(a, b, {"log_u": jnp.float32(table)}, jnp.asarray(index),
                                  temperature=T, rate=0.9)
  (loss, state), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
      jnp.float32(z1), jnp.float32(z2))
  assert_close(loss, loss_ref)
  np.testing.assert_array_equal(np.isneginf(state["log_u"]), np.isneginf(table_ref))
  seen = np.isfinite(table_ref)
  assert_close(np.asarray(state["log_u"])[seen], table_ref[seen])
  g_ref = ref.numerical_grad(lambda a, b: ref.sogclr(a, b, table, index, T, 0.9, weights=w)[0],
                             [z1, z2])
  for g, gr in zip(grads, g_ref):
    assert_close(g, gr)


@pytest.mark.parametrize("layout", ["two_view", "clip"])
@pytest.mark.parametrize("include_positive", [False, True])
@pytest.mark.parametrize("shape,update_first,max_ratio", [
    (1.0, False, 100.0), (3.0, True, 100.0), (float("inf"), False, 100.0),
    (float("inf"), True, 100.0), (1.0, False, 1.5), (float("inf"), False, float("inf"))])
def test_gamma_value_grad_state(layout, include_positive, shape, update_first, max_ratio):
  z1, z2 = fresh_inputs(2, seed=seed_of(layout, include_positive, shape, update_first,
                                        max_ratio))
  n, rate = 30, 0.2
  rng = np.random.default_rng(7)
  index = rng.permutation(n)[:B]
  table = np.full((2, n), -np.inf)
  table[:, index[::2]] = rng.normal(size=(2, len(index[::2])))
  key = jax.random.key(42)
  # The E-step draw the loss makes: log eps = loggamma(key, shape) - log shape, one per anchor.
  log_eps = (np.zeros(2 * B) if np.isinf(shape) else
             np.asarray(jax.random.loggamma(key, shape, (2 * B,)) - np.log(shape), np.float64))
  jax_fn = L.gamma_loss if layout == "two_view" else L.gamma_clip_loss
  ref_fn = ref.gamma_two_view if layout == "two_view" else ref.gamma_clip
  loss_ref, table_ref, zhat = ref_fn(z1, z2, table, index, log_eps, T, rate, include_positive,
                                     update_first=update_first, max_ratio=max_ratio)
  if max_ratio == 1.5:  # the bound must act on some revisited anchor, or this case tests nothing
    _, _, unbounded = ref_fn(z1, z2, table, index, log_eps, T, rate, include_positive,
                             update_first=update_first, max_ratio=float("inf"))
    assert np.any(zhat > unbounded + 1e-3)
  fn = lambda a, b: jax_fn(a, b, {"log_z": jnp.float32(table)}, jnp.asarray(index), key,
                           temperature=T, eps_shape=shape, rate=rate, max_ratio=max_ratio,
                           include_positive=include_positive, update_first=update_first)
  (loss, state), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
      jnp.float32(z1), jnp.float32(z2))
  assert_close(loss, loss_ref)
  seen = np.isfinite(table_ref)
  np.testing.assert_array_equal(np.isfinite(state["log_z"]), seen)
  assert_close(np.asarray(state["log_z"])[seen], table_ref[seen])
  # Gradient of the M-step objective with u held fixed (stop-gradient).
  g_ref = ref.numerical_grad(
      lambda a, b: ref_fn(a, b, table, index, log_eps, T, rate, include_positive, zhat)[0],
      [z1, z2])
  for g, gr in zip(grads, g_ref):
    assert_close(g, gr)


def test_gamma_global_estimator_state():
  z1, z2 = fresh_inputs(2, seed=21)
  state = L.init_gamma_state(estimator="global")
  s, pos = ref.two_view(z1, z2, T)
  log_zb = ref.neg_log_mean(s, pos).reshape(2, B)
  batch_log_mean = np.log(np.mean(np.exp(log_zb), axis=1))
  loss, state = L.gamma_loss(jnp.float32(z1), jnp.float32(z2), state, None, jax.random.key(0),
                             temperature=T, eps_shape=float("inf"), rate=0.3,
                             estimator="global")
  assert_close(state["log_z"], batch_log_mean)  # first observation initialises
  expected, _ = ref.gamma_em(s, pos, np.repeat(batch_log_mean, B), np.zeros(2 * B))
  assert_close(loss, expected)
  _, state2 = L.gamma_loss(jnp.float32(z2), jnp.float32(z1), state, None, jax.random.key(0),
                           temperature=T, eps_shape=float("inf"), rate=0.3,
                           estimator="global")
  assert_close(state2["log_z"], ref.ema(batch_log_mean, batch_log_mean[::-1], 0.3))


@pytest.mark.parametrize("progress", [0.0, 0.13, 0.37, 0.5, 0.9])
def test_cosine_rate_against_reference(progress):
  rate = L.common.scheduled_rate(0.7, "cosine", jnp.float32(progress), 0.2, 0.5)
  np.testing.assert_allclose(float(rate), ref.cosine_rate(progress, 0.2, 0.5), rtol=1e-6)
  assert L.common.scheduled_rate(0.7, "constant", None, 0.2, 0.5) == 0.7


@pytest.mark.parametrize("name", ["gamma", "gamma_clip", "sogclr"])
@pytest.mark.parametrize("progress", [0.1, 0.3, 0.8])
def test_cosine_schedule_value_grad_state(name, progress):
  """Under the cosine schedule each stateful loss is its float64 reference at the rate the
  schedule gives at `progress` (values, state and gradients)."""
  z1, z2 = fresh_inputs(2, seed=seed_of("cosine", name, progress))
  n, rate_min, fraction = 30, 0.1, 0.6
  rate = ref.cosine_rate(progress, rate_min, fraction)
  rng = np.random.default_rng(seed_of("table", name, progress))
  index = rng.permutation(n)[:B]
  table = np.full((2, n), -np.inf)
  table[:, index[::2]] = rng.normal(size=(2, len(index[::2])))
  schedule = dict(rate_schedule="cosine", rate_min=rate_min, rate_fraction=fraction,
                  progress=jnp.float32(progress))
  if name == "sogclr":
    loss_ref, table_ref, w = ref.sogclr(z1, z2, table, index, T, rate)
    ref_loss = lambda a, b: ref.sogclr(a, b, table, index, T, rate, weights=w)[0]
    fn = lambda a, b: L.sogclr_loss(a, b, {"log_u": jnp.float32(table)}, jnp.asarray(index),
                                    temperature=T, rate=0.9, **schedule)
  else:
    ref_fn = ref.gamma_two_view if name == "gamma" else ref.gamma_clip
    jax_fn = L.gamma_loss if name == "gamma" else L.gamma_clip_loss
    log_eps = np.zeros(2 * B)
    loss_ref, table_ref, zhat = ref_fn(z1, z2, table, index, log_eps, T, rate)
    ref_loss = lambda a, b: ref_fn(a, b, table, index, log_eps, T, rate, False, zhat)[0]
    fn = lambda a, b: jax_fn(a, b, {"log_z": jnp.float32(table)}, jnp.asarray(index),
                             jax.random.key(0), temperature=T, eps_shape=float("inf"),
                             rate=0.9, **schedule)
  (loss, state), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
      jnp.float32(z1), jnp.float32(z2))
  assert_close(loss, loss_ref)
  seen = np.isfinite(table_ref)
  assert_close(np.asarray(next(iter(state.values())))[seen], table_ref[seen])
  for g, gr in zip(grads, ref.numerical_grad(ref_loss, [z1, z2])):
    assert_close(g, gr)


def test_cosine_schedule_errors():
  z = jnp.ones((4, 3)) + jnp.eye(4, 3)
  state = L.init_gamma_state(10)
  with pytest.raises(ValueError, match="needs progress"):
    L.gamma_loss(z, z, state, jnp.arange(4), jax.random.key(0), temperature=0.1,
                 rate_schedule="cosine")
  with pytest.raises(L.OptionError, match="rate_schedule must be one of"):
    L.gamma_loss(z, z, state, jnp.arange(4), jax.random.key(0), temperature=0.1,
                 rate_schedule="linear", progress=0.5)
  with pytest.raises(L.OptionError, match="rate_min must be in"):
    L.sogclr_loss(z, z, L.init_sogclr_state(10), jnp.arange(4), temperature=0.1,
                  rate_schedule="cosine", rate_min=0.0, progress=0.5)
