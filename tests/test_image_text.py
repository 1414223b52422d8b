"""Image-text tasks (two-tower, fusion) through the one trainer: model shapes, data
pairing, the objective of every ITC, ITM / MLM pieces, 1 vs 8 devices, the compiled
step's communication, exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.configs import base, captions_albef, captions_clip, captions_gamma
from contrastive_jax import step as step_lib
from contrastive_jax import checkpointing
from contrastive_jax import hlo
from contrastive_jax import losses as L
from contrastive_jax import sharding
from contrastive_jax import tasks
from contrastive_jax import train
from contrastive_jax.data import captions
from contrastive_jax.data import pipeline
from contrastive_jax.tasks import fusion as fusion_lib

SEED = 0  # fixed: every random input below derives from it


def fake_source(n=64, seed=SEED):
  """n captioned records (random 8x8 images, three captions each): a stand-in source."""
  rng = np.random.default_rng(seed)
  tok = captions.Tokenizer.from_grammar()
  records = []
  for i in range(n):
    attrs = {"digit": i % 10, "thickness": i % 3, "slant": 0, "colour": i % 3,
             "writer": (i // 3) % 3}
    caps = np.stack([tok.encode(captions.caption(t, attrs)) for t in captions.TEMPLATES[:3]])
    records.append({"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                    "captions": caps, "label": np.int64(i % 10),
                    "position": np.int64(i % 3), "writer": np.int64(attrs["writer"])})
  return records, tok


def small(module=captions_clip, final=None, **overrides):
  """The config of `module` at test size; `final`: the evaluators run at the end (default:
  the config's), none at init."""
  cfg = module.get_config()
  cfg.update(dict(batch_size=32, num_steps=100, learning_rate=3e-3, warmup_steps=5,
                  proj_dim=32, log_every=2, checkpoint_every=100, progress=False, eval_limit=200))
  if final is not None:
    cfg.evals = base.evals(**{n: dict(final=True) for n in final})
  for schedule in cfg.evals.values():
    schedule.at_init = False
  cfg.text.update(dict(width=32, depth=1))
  weights = overrides.pop("weights", {})
  cfg.update(overrides)
  cfg.weights.update(weights)
  return cfg


class Runner:
  """A task's jitted trainer step on a mesh of `devices`, fed by the grain pipeline."""

  def __init__(self, cfg, devices=None, source=None):
    src, tok = source or fake_source()
    self.setup = step_lib.build(cfg, tasks.get(cfg, src, tokenizer=tok))
    self.task = self.setup.task
    self.mesh = sharding.make_mesh(cfg, devices)
    shardings = step_lib.shardings(self.setup, self.mesh)
    self.state = jax.jit(self.setup.init, out_shardings=shardings)()
    self.init_params = jax.device_get(self.state["params"])
    self.step_fn = step_lib.make_step(self.setup, self.mesh, shardings)
    self.ds = self.task.train_dataset(cfg.batch_size, cfg.seed)

  def batch(self, k):
    return {key: jax.device_put(self.ds[k][key], sharding.batch_sharding(self.mesh))
            for key in self.task.batch_keys}

  def run(self, steps):
    logs = []
    for k in range(steps):
      self.state, out = self.step_fn(self.state, self.batch(k))
      logs.append(jax.device_get(out))
    return logs


@pytest.mark.slow
def test_forward_shapes_and_padding_is_ignored():
  r = Runner(small(weights=dict(sep=1.0)))
  model, params = r.task.model, r.init_params
  batch = r.ds[0]
  out = model.apply(params, pipeline.to_float(batch["image"]), batch["tokens"])
  for k in ("img", "txt", "img_ind", "txt_ind"):
    assert out[k].shape == (32, 32), k
  np.testing.assert_allclose(out["temperature"], 0.07, rtol=1e-5)  # CLIP's initial value
  # Attention never reads padding: perturbing the position embeddings of the padded
  # positions of the longest caption changes no caption's embedding; perturbing a used
  # position does (the check can fail).
  tokens = np.array(batch["tokens"])
  first_pad = int(np.min(np.argmax(tokens == captions.PAD, axis=1)[(tokens == captions.PAD).any(1)]))
  longest = int(np.max(np.sum(tokens != captions.PAD, axis=1)))
  encode = lambda p: model.apply(p, tokens, method=model.encode_text)[1]

  def perturbed(start):
    p = jax.tree.map(jnp.asarray, params)
    pos = p["params"]["text_encoder"]["pos"]
    noise = jax.random.normal(jax.random.key(start), pos[start:].shape)  # not constant: LN
    p["params"]["text_encoder"]["pos"] = pos.at[start:].add(noise)      # would remove that
    return p

  np.testing.assert_allclose(encode(perturbed(longest)), encode(params), rtol=1e-5, atol=1e-6)
  assert not np.allclose(encode(perturbed(first_pad - 1)), encode(params), atol=1e-4)


def test_caption_pairs_are_two_different_captions_of_one_image():
  src, _ = fake_source()
  ds = pipeline.train_dataset(src, batch_size=32, seed=SEED, transform=pipeline.CaptionPair(src))
  b = ds[3]
  assert not np.any(np.all(b["tokens"] == b["tokens_aug"], axis=1))
  for i, j in enumerate(b["index"]):
    assert any((b["tokens"][i] == c).all() for c in src[j]["captions"])
    assert any((b["tokens_aug"][i] == c).all() for c in src[j]["captions"])
  np.testing.assert_array_equal(ds[3]["index"], b["index"])  # batch k = f(seed, k)


# Cross-modal losses are judged on CLIP's InfoNCE; the two-view losses (image and text as
# the two views) on the two-view InfoNCE, which has in-modal negatives: identical captions of
# different images make it stall near 4 here, whatever the loss.
@pytest.mark.parametrize("loss, weights, drop", [
    ("clip", dict(sep=0.5, br=0.5, gc=0.05), 1.0), ("l_con", dict(br=1.0), 1.0),
    ("gamma_clip", dict(gc=0.05), 0.5), ("gamma", {}, 5.0),
    ("sigmoid", {}, 0.5)])  # pairwise sigmoid: a different objective, slower on InfoNCE
# (plain clip, nt_xent and sogclr run the same code paths as these and as test_train.py's.)
@pytest.mark.slow
def test_a_few_steps_lower_the_loss(loss, weights, drop):
  r = Runner(small(loss=loss, weights=weights), jax.devices()[:1])
  logs = r.run(100)
  assert all(np.isfinite(l["loss"]) for l in logs)
  fixed = r.ds[10_000]  # a batch the run never saw (its index is past 100 steps)
  two_view = loss in ("nt_xent", "sogclr", "gamma")

  def objective(p):
    out = r.task.model.apply(p, pipeline.to_float(fixed["image"]), fixed["tokens"])
    fn = L.nt_xent if two_view else L.clip_loss
    return float(fn(out["img"], out["txt"], temperature=0.1))

  before, after = objective(r.init_params), objective(jax.device_get(r.state["params"]))
  assert after < before - drop, (loss, before, after)


def test_bad_names_are_clear_errors():
  with pytest.raises(ValueError, match="unknown loss 'nope'.*--config.loss"):
    Runner(small(loss="nope"))
  with pytest.raises(ValueError, match="unknown evaluator 'knn'.*two_tower"):
    Runner(small(final=("zero_shot", "knn")))
  with pytest.raises(ValueError, match="unknown task 'three_tower'"):
    Runner(small(task="three_tower"))


@pytest.mark.slow
def test_fusion_forward_shapes():
  r = Runner(small(captions_albef, weights=dict(sep=1.0)))
  model, params, batch = r.task.model, r.init_params, r.ds[0]
  out = model.apply(params, pipeline.to_float(batch["image"]), batch["tokens"])
  assert out["itm"].shape == (32, 2)
  assert out["mlm"].shape == (32, captions.MAX_LEN, len(r.task.tokenizer))
  image_tokens = model.apply(params, pipeline.to_float(batch["image"]),
                             method=model.encode_image)[0]
  assert image_tokens.shape == (32, 1 + 1, 32)  # [CLS] + one 8x8 patch, text width 32


def test_hard_negatives_never_pick_a_positive():
  key = jax.random.key(SEED)
  for trial in range(20):
    k1, k2, key = jax.random.split(key, 3)
    b = 12
    sim = 5.0 * jax.random.normal(k1, (b, b)) + 100.0 * jnp.eye(b)  # positives most similar
    same = jnp.eye(b, dtype=bool) | (jax.random.uniform(k2, (b, b)) < 0.3)
    same = same | same.T
    picks = np.asarray(fusion_lib.hard_negatives(jax.random.fold_in(key, trial), sim, same))
    assert not np.asarray(same)[np.arange(b), picks].any()
  # Hard: with one clearly most similar negative, it is picked most often.
  sim = jnp.zeros((4, 4)).at[0, 2].set(5.0)
  picks = jax.vmap(lambda k: fusion_lib.hard_negatives(k, sim, jnp.eye(4, dtype=bool)))(
      jax.random.split(jax.random.key(SEED + 1), 500))
  assert np.mean(np.asarray(picks)[:, 0] == 2) > 0.9


def test_mask_tokens_masks_words_only_and_at_least_one():
  src, _ = fake_source()
  tokens = jnp.asarray(np.stack([r["captions"][0] for r in src]))
  masked, targets = fusion_lib.mask_tokens(jax.random.key(SEED), tokens, 0.15)
  targets = np.asarray(targets)
  assert targets.any(1).all()
  assert (np.asarray(tokens)[targets] > captions.MASK).all()  # never [CLS] or [PAD]
  np.testing.assert_array_equal(np.asarray(masked)[targets], captions.MASK)
  np.testing.assert_array_equal(np.asarray(masked)[~targets], np.asarray(tokens)[~targets])
  words = np.asarray(tokens) > captions.MASK
  assert 0.1 < targets.sum() / words.sum() < 0.35


def test_momentum_encoder_update():
  rng = np.random.default_rng(SEED)
  ema = {"a": rng.normal(size=(3, 2)), "b": {"c": rng.normal(size=4)}}
  params = jax.tree.map(lambda x: x + 1.0, ema)
  new = fusion_lib.ema_update(ema, params, 0.9)
  for e, p, n in zip(jax.tree.leaves(ema), jax.tree.leaves(params), jax.tree.leaves(new)):
    np.testing.assert_allclose(n, 0.9 * e + 0.1 * p, rtol=1e-6)


@pytest.mark.slow
def test_fusion_a_few_steps_lower_its_losses_with_distillation():
  cfg = small(captions_albef, weights=dict(br=0.5))
  cfg.fusion.momentum = 0.9
  r = Runner(cfg, jax.devices()[:1])
  logs = r.run(40)
  first, last = logs[0], logs[-1]
  assert last["mlm"] < first["mlm"] and last["itc"] < first["itc"], (first, last)
  assert last["distill"] < first["distill"], (first, last)
  assert all(np.isfinite(l["loss"]) for l in logs)
  # The momentum encoders followed the online ones: nearer to them than the initial
  # parameters are, and not equal to them.
  ema, params = jax.device_get(r.state["ema_params"]), jax.device_get(r.state["params"])
  dist = lambda x, y: sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
                          for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
  assert 0 < dist(ema, params) < dist(r.init_params, params), (
      dist(ema, params), dist(r.init_params, params))


def vector_source(n=64, d=12, seed=SEED):
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (8, 8, 1), dtype=np.uint8),
           "fourier": rng.standard_normal(d).astype(np.float32),
           "label": np.int64(i % 10)} for i in range(n)], None


def test_vector_modality_trains_and_fusion_refuses_it():
  src, _ = vector_source()
  cfg = small(final=("retrieval", "gap", "probes"))
  cfg.vector_views, cfg.vector_noise = "fourier", 0.1
  r = Runner(cfg, jax.devices()[:1], source=(src, None))
  b = r.ds[0]
  mean, std = pipeline.view_statistics(src, ("fourier",))
  np.testing.assert_allclose(b["tokens"], (np.stack([src[i]["fourier"] for i in b["index"]])
                                           - mean) / std, rtol=1e-5)
  assert 0.05 < np.std(b["tokens_aug"] - b["tokens"]) < 0.2  # the noisy view
  logs = r.run(60)
  assert logs[-1]["itc"] < logs[0]["itc"] - 0.5, (logs[0], logs[-1])
  with pytest.raises(ValueError, match="needs a tokenized"):
    tasks.get(small(captions_albef), src)


# The real data and the trainer's whole path: sharding, checkpoints, evaluation.

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  pipeline.get_source("captioned_digits", "train", path)  # prepare once
  return path


def _step_on(cfg, devices, steps=2):
  r = Runner(cfg, devices, source=(pipeline.get_source(cfg.dataset, "train", cfg.data_dir),
                                   None))
  logs = r.run(steps)
  return logs[-1], jax.device_get(r.state)


@pytest.mark.slow
@pytest.mark.parametrize("module", [captions_clip, captions_albef])
def test_step_same_on_one_and_eight_devices(module, data_dir):
  cfg = small(module, data_dir=data_dir, weights=dict(br=0.5, sep=0.1, gc=0.05))
  (l1, s1), (l8, s8) = (_step_on(cfg, d) for d in (jax.devices()[:1], jax.devices()))
  for k in l1:
    np.testing.assert_allclose(l8[k], l1[k], rtol=1e-4, err_msg=k)
  for part in ("params", "ema_params", "loss_state"):
    leaves = jax.tree_util.tree_leaves_with_path(s1.get(part, {}))
    for (path, x), y in zip(leaves, jax.tree.leaves(s8.get(part, {}))):
      name = jax.tree_util.keystr(path)
      if "['key']['bias']" in name:
        # Softmax is shift-invariant, so an attention key bias has an exactly zero
        # gradient: Adam turns the rounding noise of either reduction order into steps.
        continue
      # Entries that started at 0 hold ~1e-6 after 2 steps, where the 1- and 8-device
      # reduction orders differ by about that much.
      np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5, err_msg=f"{part} {name}")


@pytest.mark.slow
def test_gamma_step_moves_no_embedding_between_devices(data_dir):
  """Compiled on 8 devices, the two-tower step with the gamma ITC moves only the
  (index, log-denominator) pairs and the gradient all-reduce; with clip it gathers
  the text keys."""
  moved = {}
  b, d = 64, 32
  for module in (captions_gamma, captions_clip):
    cfg = small(module, data_dir=data_dir, batch_size=b)
    r = Runner(cfg, jax.devices(), source=(pipeline.get_source(cfg.dataset, "train", data_dir),
                                           None))
    ops = hlo.collectives(r.step_fn.lower(r.state, r.batch(0)).compile().as_text())
    n_params = sum(x.size for x in jax.tree.leaves(r.init_params))
    moved[cfg.loss] = ops
    assert not [op for op in ops if op[0] in ("all-to-all", "collective-permute")], ops
    reduced = sum(n for kind, n in ops if kind == "all-reduce")
    assert 4 * n_params <= reduced < 4 * n_params + 1024, (cfg.loss, reduced, n_params)
  gathered = lambda loss: sum(n for kind, n in moved[loss] if kind == "all-gather")
  assert gathered("gamma_clip") == 4 * 3 * b, moved["gamma_clip"]  # b indices + 2 b log Z
  assert not [n for kind, n in moved["gamma_clip"] if kind == "reduce-scatter"]
  # clip gathers the text keys; both directions come from that one block
  assert gathered("clip") >= 4 * b * d, moved["clip"]


@pytest.mark.slow
def test_trainer_image_text_resumes_exactly(data_dir, tmp_path):
  cfg = small(data_dir=data_dir, num_steps=6, weights=dict(br=0.5, sep=0.1),
              final=("zero_shot",))
  full = train.train_and_evaluate(cfg, str(tmp_path / "full"))
  assert train.train_and_evaluate(cfg, str(tmp_path / "resumed"), stop_at=3)["preempted"]
  resumed = train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
  assert "zero_shot" in full
  assert full["zero_shot"] == resumed["zero_shot"]
  a = checkpointing.read(str(tmp_path / "full"))
  b = checkpointing.read(str(tmp_path / "resumed"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
