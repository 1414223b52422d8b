"""CLIP-style two-tower model and its objective with the latent-structure regularisers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import multimodal as mm
from contrastive_jax.data import captions


def fake_data(n=64, seed=0):
  rng = np.random.default_rng(seed)
  tok = captions.Tokenizer.from_grammar()
  attrs = lambda i: {"digit": i % 10, "thickness": i % 3, "slant": 0, "colour": i % 3,
                     "writer": (i // 3) % 3}
  caps = np.stack([[tok.encode(captions.caption(t, attrs(i))) for t in captions.TEMPLATES[:3]]
                   for i in range(n)])
  images = rng.random((n, 8, 8, 3)).astype(np.float32)
  return {"image": images, "captions": caps}, tok


def forward(framework):
  """(cfg, model, state, batch of 16, model output) with separation heads on."""
  data, tok = fake_data()
  cfg = mm.get_config()
  cfg.framework, cfg.weights.sep = framework, 1.0
  model = mm.build(cfg, len(tok))
  state = mm.init(cfg, model, mm.optax.adamw(1e-3), 64, (8, 8, 3))
  batch = mm.sample_batch(data, 0, 16, 0)
  out = model.apply(state["params"], batch["image"], batch["tokens"])
  for k in ("img", "txt", "img_ind", "txt_ind"):
    assert out[k].shape == (16, cfg.proj_dim), k
  return cfg, model, state, batch, out, tok


def test_forward_shapes_and_padding_is_ignored():
  cfg, model, state, batch, out, _ = forward("clip")
  assert out["image_features"].shape[0] == 16
  np.testing.assert_allclose(out["temperature"], 0.07, rtol=1e-5)  # CLIP's initial value
  # Attention never reads padding: perturbing the position embeddings of the padded
  # positions of the longest caption changes no caption's embedding; perturbing a used
  # position does (the check can fail).
  tokens = np.array(batch["tokens"])
  first_pad = int(np.min(np.argmax(tokens == captions.PAD, axis=1)[(tokens == captions.PAD).any(1)]))
  longest = int(np.max(np.sum(tokens != captions.PAD, axis=1)))
  encode = lambda p: model.apply(p, tokens, method=model.encode_text)[1]

  def perturbed(start):
    p = jax.tree.map(lambda x: x, state["params"])
    pos = p["params"]["text_encoder"]["pos"]
    noise = jax.random.normal(jax.random.key(start), pos[start:].shape)  # not constant: LN
    p["params"]["text_encoder"]["pos"] = pos.at[start:].add(noise)      # would remove that
    return p

  np.testing.assert_allclose(encode(perturbed(longest)), encode(state["params"]), rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(encode(perturbed(first_pad - 1)), encode(state["params"]), atol=1e-4)


def test_sample_batch_pairs_two_different_captions_of_one_image():
  data, _ = fake_data()
  b = mm.sample_batch(data, 3, 32, 0)
  assert not np.any(np.all(b["tokens"] == b["tokens_aug"], axis=1))
  for i, j in enumerate(b["index"]):
    assert any((b["tokens"][i] == c).all() for c in data["captions"][j])
    assert any((b["tokens_aug"][i] == c).all() for c in data["captions"][j])
  np.testing.assert_array_equal(mm.sample_batch(data, 3, 32, 0)["index"], b["index"])


# Cross-modal losses are judged on CLIP's InfoNCE; the two-view losses (image and text as
# the two views) on the two-view InfoNCE, which has in-modal negatives: identical captions of
# different images make it stall near 4 here, whatever the loss.
@pytest.mark.parametrize("itc, weights, drop", [
    ("clip", {}, 1.0), ("clip", dict(sep=0.5, br=0.5, gc=0.05), 1.0), ("l_con", dict(br=1.0), 1.0),
    ("gamma_clip", dict(gc=0.05), 1.0), ("nt_xent", {}, 5.0), ("sogclr", {}, 5.0),
    ("gamma", {}, 5.0),
    ("sigmoid", {}, 0.5)])  # pairwise sigmoid: a different objective, slower on InfoNCE
def test_a_few_steps_lower_the_loss(itc, weights, drop):
  data, tok = fake_data()
  cfg = mm.get_config()
  cfg.update(dict(itc=itc, num_steps=100, batch_size=32, learning_rate=3e-3))
  cfg.weights.update(weights)
  model, params, history = mm.train(cfg, data, len(tok), log_every=10)
  assert all(np.isfinite(h["loss"]) for h in history)
  # The common objective (CLIP InfoNCE at t = 0.1 on a fixed batch) falls.
  batch = mm.sample_batch(data, 10_000, 32, 1)
  init = mm.init(cfg, model, mm.optax.adamw(1e-3), 64, (8, 8, 3))["params"]

  two_view = itc in ("nt_xent", "sogclr", "gamma")

  def clip(p):
    out = model.apply(p, batch["image"], batch["tokens"])
    if two_view:
      return float(mm.L.nt_xent(out["img"], out["txt"], temperature=0.1))
    return float(mm.L.clip_loss(out["img"], out["txt"], temperature=0.1))

  assert clip(params) < clip(init) - drop, (clip(init), clip(params))


def test_unknown_itc_is_a_clear_error():
  data, tok = fake_data()
  cfg = mm.get_config()
  cfg.itc, cfg.num_steps = "nope", 1
  with pytest.raises(ValueError, match="unknown itc 'nope'"):
    mm.train(cfg, data, len(tok))


def test_fusion_forward_shapes():
  cfg, model, state, batch, out, tok = forward("albef")
  assert out["itm"].shape == (16, 2)
  assert out["mlm"].shape == (16, captions.MAX_LEN, len(tok))
  image_tokens = model.apply(state["params"], batch["image"], method=model.encode_image)[0]
  assert image_tokens.shape == (16, 1 + 1, cfg.text_width)  # [CLS] + one 8x8 patch


def test_hard_negatives_never_pick_a_positive():
  key = jax.random.key(0)
  for trial in range(20):
    k1, k2, key = jax.random.split(key, 3)
    b = 12
    sim = 5.0 * jax.random.normal(k1, (b, b)) + 100.0 * jnp.eye(b)  # positives most similar
    same = jnp.eye(b, dtype=bool) | (jax.random.uniform(k2, (b, b)) < 0.3)
    same = same | same.T
    picks = np.asarray(mm.hard_negatives(jax.random.fold_in(key, trial), sim, same))
    assert not np.asarray(same)[np.arange(b), picks].any()
  # Hard: with one clearly most similar negative, it is picked most often.
  sim = jnp.zeros((4, 4)).at[0, 2].set(5.0)
  picks = jax.vmap(lambda k: mm.hard_negatives(k, sim, jnp.eye(4, dtype=bool)))(
      jax.random.split(jax.random.key(1), 500))
  assert np.mean(np.asarray(picks)[:, 0] == 2) > 0.9


def test_mask_tokens_masks_words_only_and_at_least_one():
  data, _ = fake_data()
  tokens = jnp.asarray(data["captions"][:, 0])
  masked, targets = mm.mask_tokens(jax.random.key(0), tokens, 0.15)
  targets = np.asarray(targets)
  assert targets.any(1).all()
  assert (np.asarray(tokens)[targets] > captions.MASK).all()  # never [CLS] or [PAD]
  np.testing.assert_array_equal(np.asarray(masked)[targets], captions.MASK)
  np.testing.assert_array_equal(np.asarray(masked)[~targets], np.asarray(tokens)[~targets])
  words = np.asarray(tokens) > captions.MASK
  assert 0.1 < targets.sum() / words.sum() < 0.35


def test_momentum_encoder_update():
  rng = np.random.default_rng(0)
  ema = {"a": rng.normal(size=(3, 2)), "b": {"c": rng.normal(size=4)}}
  params = jax.tree.map(lambda x: x + 1.0, ema)
  new = mm.ema_update(ema, params, 0.9)
  for e, p, n in zip(jax.tree.leaves(ema), jax.tree.leaves(params), jax.tree.leaves(new)):
    np.testing.assert_allclose(n, 0.9 * e + 0.1 * p, rtol=1e-6)


def test_fusion_a_few_steps_lower_its_losses():
  data, tok = fake_data()
  cfg = mm.get_config()
  cfg.update(dict(framework="albef", itc="l_con", num_steps=40, batch_size=32,
                  learning_rate=3e-3, momentum=0.9))
  cfg.weights.update(dict(br=0.5))
  model, params, history = mm.train(cfg, data, len(tok), log_every=5)
  first, last = history[0], history[-1]
  assert last["mlm"] < first["mlm"] and last["itc"] < first["itc"], (first, last)
  assert all(np.isfinite(h["loss"]) for h in history)


def test_two_view_vectors_train_and_albef_refuses_them():
  rng = np.random.default_rng(0)
  n = 64
  data = {"image": rng.random((n, 8, 8, 1)).astype(np.float32),
          "vectors": rng.standard_normal((n, 12)).astype(np.float32),
          "label": np.arange(n) % 10}
  b = mm.sample_batch(data, 0, 16, 0)
  np.testing.assert_array_equal(b["tokens"], data["vectors"][b["index"]])
  assert 0.05 < np.std(b["tokens_aug"] - b["tokens"]) < 0.2  # the noisy view
  cfg = mm.get_config()
  cfg.update(dict(num_steps=60, batch_size=32, learning_rate=3e-3))
  model, params, history = mm.train(cfg, data, 0, log_every=10)
  assert history[-1]["itc"] < history[0]["itc"] - 0.5, history
  result = mm.evaluate_views(model, params, data, data)
  assert result["retrieval"]["i2t_R@5"] > 0.3  # memorised pairs; chance is 5 / 64
  cfg.framework = "albef"
  with pytest.raises(ValueError, match="needs a tokenized"):
    mm.train(cfg, data, 0)


# The trainer path: same checkpoints, sharding and data pipeline as image pretraining.

def trainer_config(data_dir, **overrides):
  from configs import captions_clip  # pylint: disable=g-import-not-at-top
  cfg = captions_clip.get_config()
  cfg.update(dict(data_dir=data_dir, batch_size=32, num_steps=8, log_every=2,
                  checkpoint_every=100, eval_at_init=False, final_linear_probe=False,
                  progress=False, eval_limit=200, warmup_steps=2))
  cfg.multimodal.update(dict(text_depth=1, text_width=32, proj_dim=32))
  cfg.update(overrides)
  return cfg


def test_trainer_fusion_step_same_on_one_and_eight_devices(tmp_path):
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from contrastive_jax import train  # pylint: disable=g-import-not-at-top
  from contrastive_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = trainer_config(str(tmp_path / "tfds"))
  cfg.multimodal.update(dict(framework="albef", itc="l_con"))
  cfg.multimodal.weights.update(dict(br=0.5, sep=0.1))
  losses, states = [], []
  for devices in (jax.devices()[:1], jax.devices()):  # GSPMD partitions the whole objective
    mesh = train.make_mesh(cfg, devices)
    setup = train.build(cfg)
    shardings = train.state_shardings(jax.eval_shape(setup.init), mesh)
    state = jax.jit(setup.init, out_shardings=shardings)()
    step = train.make_step(setup, mesh, shardings)
    ds = pipeline.train_dataset(setup.train_src, batch_size=32, seed=0)
    dat = NamedSharding(mesh, P(train.BATCH_AXES))
    for k in range(2):
      batch = {key: jax.device_put(v, dat) for key, v in ds[k].items() if key != "label"}
      state, logs = step(state, batch)
    losses.append(float(logs["loss"]))
    states.append(jax.device_get(state["ema_params"]))
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
  for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    # Momentum encoders too; entries that started at 0 hold ~1e-6 after 2 steps, where the
    # 1- and 8-device reduction orders differ by about that much.
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_trainer_image_text_resumes_exactly(tmp_path):
  from contrastive_jax import train  # pylint: disable=g-import-not-at-top
  cfg = trainer_config(str(tmp_path / "tfds"), num_steps=6)
  cfg.multimodal.weights.update(dict(br=0.5, sep=0.1))
  full = train.train_and_evaluate(cfg, str(tmp_path / "full"))
  assert train.train_and_evaluate(cfg, str(tmp_path / "resumed"), stop_at=3)["preempted"]
  resumed = train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
  assert set(full) >= {"zero_shot", "retrieval", "linear_probe", "modality_gap"}
  assert full["zero_shot"] == resumed["zero_shot"]
  _, a, _ = train.restore_for_eval(str(tmp_path / "full"))
  _, b, _ = train.restore_for_eval(str(tmp_path / "resumed"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
