"""Image-text training of the CLIP-style two-tower model with the CVPR 2023 regularisers.

  objective = ITC + w_sep L_sep + w_br L_br + w_gc L_gc + w_align L_align

ITC is any contrastive loss of the library between image and text embeddings
("clip" with the learnable temperature, "l_con" the 4-term form with augmented
views, "gamma_clip"); L_align = mean ||img - txt||^2 of normalised pairs is the
explicit alignment of the theory check (forcing the modalities together). The
augmented image is the image with pixel noise and brightness jitter (placement
is kept: it is an image-only attribute); the augmented text is another caption
of the same image.

This module holds the objective, the jitted step and evaluation on in-memory
arrays (the built-in captioned data fits in memory); `experiments/
modality_structures.py` drives it.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from contrastive_jax import evaluate
from contrastive_jax import losses as L
from contrastive_jax import metrics
from contrastive_jax.data import captions
from contrastive_jax.models import multimodal
from contrastive_jax.models.encoders import get_model


def get_config() -> ml_collections.ConfigDict:
  """Defaults for captioned digits on CPU."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.itc = "clip"  # clip | l_con | gamma_clip
  c.learn_temperature = True
  c.temperature = 0.1  # used when learn_temperature is False, and by gamma_clip
  c.weights = ml_collections.ConfigDict(dict(sep=0.0, br=0.0, gc=0.0, align=0.0))
  c.bridge_t = 0.25
  c.image_model = "mlp"
  c.text_width, c.text_depth = 64, 2
  c.proj_dim = 64
  c.batch_size = 128
  c.num_steps = 600
  c.learning_rate = 1e-3
  c.weight_decay = 1e-4
  c.noise_std = 0.1
  return c


ITC = ("clip", "l_con", "gamma_clip")


def build(cfg: ml_collections.ConfigDict, vocab_size: int) -> multimodal.TwoTower:
  """The two-tower model of cfg (independent heads only when separation is on)."""
  if cfg.itc not in ITC:
    raise ValueError(f"unknown itc {cfg.itc!r}: use one of {ITC}")
  image_encoder = get_model(cfg.image_model, 256, cfg.proj_dim).encoder
  text_encoder = multimodal.TextTransformer(vocab_size, captions.MAX_LEN, cfg.text_width,
                                            cfg.text_depth)
  return multimodal.TwoTower(image_encoder, text_encoder, cfg.proj_dim,
                             separate=cfg.weights.sep > 0)


def augment_images(key: jax.Array, images: jax.Array, noise_std: float) -> jax.Array:
  """float [B, H, W, C] in [0, 1] -> noisy, brightness-jittered copy (same placement)."""
  k1, k2 = jax.random.split(key)
  scale = jax.random.uniform(k1, (images.shape[0], 1, 1, 1), minval=0.7, maxval=1.3)
  noise = noise_std * jax.random.normal(k2, images.shape)
  return jnp.clip(images * scale + noise, 0.0, 1.0)


def objective(params, batch: dict, loss_state: Any, key: jax.Array, *, model, cfg):
  """(total loss, (new loss state, {term: value})) of one batch.

  batch: image float [B, H, W, C], tokens / tokens_aug int32 [B, L] (two captions
  of each image), index int32 [B].
  """
  k_aug, k_loss = jax.random.split(key)
  out = model.apply(params, batch["image"], batch["tokens"])
  aug = model.apply(params, augment_images(k_aug, batch["image"], cfg.noise_std),
                    batch["tokens_aug"])
  t = out["temperature"] if cfg.learn_temperature else cfg.temperature
  img, txt = out["img"], out["txt"]
  if cfg.itc == "clip":
    itc = L.clip_loss(img, txt, temperature=t)
  elif cfg.itc == "l_con":
    itc = L.modality_contrastive_loss(img, txt, aug["img"], aug["txt"], temperature=t)
  elif cfg.itc == "gamma_clip":
    itc, loss_state = L.gamma_clip_loss(img, txt, loss_state, batch["index"], k_loss,
                                        temperature=cfg.temperature)
  else:
    raise ValueError(f"unknown itc {cfg.itc!r}: use one of {ITC}")
  w = cfg.weights
  terms = {"itc": itc}
  if w.sep > 0:
    terms["sep"] = L.feature_separation_loss(img, txt, out["img_ind"], out["txt_ind"],
                                             aug["img_ind"], aug["txt_ind"], temperature=t)
  if w.br > 0:
    terms["br"] = L.brownian_bridge_loss(img, txt, aug["img"], t=cfg.bridge_t,
                                         txt_aug=aug["txt"])
  if w.gc > 0:
    terms["gc"] = L.geometric_consistency_loss(img, txt, aug["img"], aug["txt"])
  if w.align > 0:
    terms["align"] = jnp.mean(jnp.sum(
        (metrics.l2_normalize(img) - metrics.l2_normalize(txt)) ** 2, -1))
  total = itc + sum(w[k] * v for k, v in terms.items() if k != "itc")
  return total, (loss_state, terms)


def init(cfg, model, tx, num_examples: int, image_shape) -> dict:
  key = jax.random.PRNGKey(cfg.seed)
  params = model.init(key, jnp.zeros((1,) + tuple(image_shape)),
                      jnp.full((1, captions.MAX_LEN), captions.CLS, jnp.int32))
  loss_state = L.init_gamma_state(num_examples) if cfg.itc == "gamma_clip" else {}
  return {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params),
          "loss_state": loss_state, "rng": jax.random.fold_in(key, 1)}


def train_step(state: dict, batch: dict, *, model, tx, cfg) -> tuple[dict, dict]:
  key = jax.random.fold_in(state["rng"], state["step"])
  (loss, (loss_state, terms)), grads = jax.value_and_grad(
      functools.partial(objective, model=model, cfg=cfg), has_aux=True)(
          state["params"], batch, state["loss_state"], key)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  return ({"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
           "opt_state": opt_state, "loss_state": loss_state, "rng": state["rng"]},
          {"loss": loss, **terms})


def sample_batch(data: dict, step: int, batch_size: int, seed: int) -> dict:
  """Batch `step` (a pure function of seed and step): images, two distinct captions each."""
  rng = np.random.default_rng([seed, step])
  idx = rng.choice(len(data["image"]), batch_size, replace=False)
  n_cap = data["captions"].shape[1]
  c1 = rng.integers(n_cap, size=batch_size)
  c2 = (c1 + rng.integers(1, n_cap, size=batch_size)) % n_cap
  return {"image": data["image"][idx], "tokens": data["captions"][idx, c1],
          "tokens_aug": data["captions"][idx, c2], "index": idx.astype(np.int32)}


def train(cfg, data: dict, vocab_size: int, log_every: int = 0):
  """Trains on in-memory arrays {"image" float [N, H, W, C], "captions" [N, K, L]}.

  Returns (model, params, history of per-step dicts).
  """
  model = build(cfg, vocab_size)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, min(50, cfg.num_steps // 10), max(cfg.num_steps, 1)), weight_decay=cfg.weight_decay)
  state = init(cfg, model, tx, len(data["image"]), data["image"].shape[1:])
  step = jax.jit(functools.partial(train_step, model=model, tx=tx, cfg=cfg), donate_argnums=0)
  history = []
  for k in range(cfg.num_steps):
    state, logs = step(state, sample_batch(data, k, cfg.batch_size, cfg.seed))
    if log_every and (k + 1) % log_every == 0:
      history.append({"step": k + 1, **{n: float(v) for n, v in logs.items()}})
  return model, state["params"], history


def embed_all(model, params, images, tokens, batch_size: int = 500) -> dict:
  """Embeddings of images [N, ...] and token rows [M, L] in batches."""
  enc_img = jax.jit(lambda x: model.apply(params, x, method=model.encode_image))
  enc_txt = jax.jit(lambda t: model.apply(params, t, method=model.encode_text))
  f, img, txt = [], [], []
  for i in range(0, len(images), batch_size):
    feats, z, _ = enc_img(images[i:i + batch_size])
    f.append(np.asarray(feats))
    img.append(np.asarray(z))
  for i in range(0, len(tokens), batch_size):
    txt.append(np.asarray(enc_txt(tokens[i:i + batch_size])[0]))
  return {"features": np.concatenate(f), "img": np.concatenate(img), "txt": np.concatenate(txt)}


def evaluate_clip(model, params, train: dict, test: dict, tokenizer) -> dict:
  """Zero-shot top-1/3/5 (prompt templates), retrieval R@1/5/10 both ways, linear probes
  (digit on encoder features; position on the image embedding; writer on the text
  embedding), modality gap."""
  n, k = test["captions"].shape[:2]
  e = embed_all(model, params, test["image"], test["captions"].reshape(n * k, -1))
  prompts = np.stack([[tokenizer.encode(p.format(digit=d)) for p in captions.PROMPTS]
                      for d in captions.DIGITS])  # [10, P, L]
  class_txt = embed_all(model, params, test["image"][:1], prompts.reshape(-1, prompts.shape[-1]))
  out = {"zero_shot": evaluate.zero_shot(e["img"], class_txt["txt"].reshape(10, len(
      captions.PROMPTS), -1), test["label"]),
         "retrieval": evaluate.retrieval_recall(e["img"], e["txt"], np.repeat(np.arange(n), k)),
         "modality_gap": float(metrics.modality_gap(jnp.asarray(e["img"]),
                                                    jnp.asarray(e["txt"])))}
  tr = embed_all(model, params, train["image"], train["captions"][:, 0])
  te_txt = e["txt"].reshape(n, k, -1)[:, 0]
  probe = lambda a, ya, b, yb: evaluate.linear_probe(a, ya, b, yb, num_classes=int(
      max(ya.max(), yb.max()) + 1))["top1"]
  out["linear_probe"] = {
      "digit_from_features": probe(tr["features"], train["label"], e["features"], test["label"]),
      "position_from_img": probe(tr["img"], train["position"], e["img"], test["position"]),
      "writer_from_txt": probe(tr["txt"], train["writer"], te_txt, test["writer"]),
      "digit_from_img": probe(tr["img"], train["label"], e["img"], test["label"])}
  return out
