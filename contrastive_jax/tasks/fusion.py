"""Image-text fusion task (ALBEF-style): the two-tower objective of `image_text` on
the fusion model's unimodal embeddings, plus image-text matching on hard negatives
and masked language modelling through the cross-attention fusion encoder.

  objective = (1 - a) ITC + a L_distill + regularisers + w_itm L_itm + w_mlm L_mlm

The augmented features of the regularisers (and of l_con) come from momentum
(EMA) encoders applied to the augmented inputs; with a = cfg.fusion.distill_alpha
> 0 the ITC is distilled from the momentum model's image-text similarities of the
same pairs, as in ALBEF. ITM and MLM run outside
`shard_map`: hard negatives are sampled from the global batch's similarities.
"""

from typing import Any

import jax
from jax.typing import ArrayLike
import jax.numpy as jnp
import numpy as np
import optax

from contrastive_jax import evaluate
from contrastive_jax import metrics
from contrastive_jax.data import augment as aug_lib
from contrastive_jax.data import captions
from contrastive_jax.models import multimodal
from contrastive_jax.tasks import base
from contrastive_jax.tasks import image_text


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


def ema_update(ema: Any, params: Any, momentum: float) -> Any:
  """Momentum encoder: ema <- m ema + (1 - m) params, leaf by leaf."""
  return jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p, ema, params)


class FusionTask(image_text.TwoTowerTask):
  """An ALBEF-style fusion objective: the two-tower fields, plus fusion.{momentum,
  itm_weight, mlm_weight, mlm_prob, distill_alpha}."""

  fields = {**image_text.TwoTowerTask.fields, "fusion": base.REQUIRED}
  model_sized = ("params", "ema_params")  # the momentum encoders are as large as the model

  def __init__(self, cfg, train_src, eval_src=None, tokenizer=None):
    if "captions" not in train_src[0]:
      raise ValueError(f"the fusion task needs a tokenized (caption) second modality; "
                       f"dataset {cfg.dataset!r} has none: use --config.task=two_tower")
    super().__init__(cfg, train_src, eval_src, tokenizer)
    self.evaluators = {**self.evaluators, "fusion": "eval_fusion"}

  def build_model(self) -> Any:
    cfg = self.cfg
    return multimodal.Fusion(len(self.tokenizer), captions.MAX_LEN, cfg.text.width,
                             cfg.text.depth, proj_dim=cfg.proj_dim,
                             separate=cfg.weights.sep > 0)

  def init(self, key: jax.Array) -> dict:
    state = super().init(key)
    state["ema_params"] = jax.tree.map(jnp.copy, state["params"])  # momentum encoders
    return state

  def after_step(self, state: dict) -> dict:
    return {**state, "ema_params": ema_update(state["ema_params"], state["params"],
                                              self.cfg.fusion.momentum)}

  def loss(self, params: Any, state: dict, batch: dict, key: jax.Array, mesh: jax.sharding.Mesh) -> tuple[jax.Array, tuple[dict, dict]]:
    f = self.cfg.fusion
    m = self.model
    batch = {**batch, "image": aug_lib.to_float(batch["image"])}  # the host sends uint8
    k_aug, k_itm1, k_itm2, k_mlm, k_loss = jax.random.split(key, 5)
    img_tokens, img, img_ind = m.apply(params, batch["image"], method=m.encode_image)
    seq, txt, txt_ind = m.apply(params, batch["tokens"], method=m.encode_text)
    emb = {"img": img, "txt": txt, "img_ind": img_ind, "txt_ind": txt_ind}
    ema = jax.lax.stop_gradient(state["ema_params"])
    aug_images = image_text.augment_images(k_aug, batch["image"], self.cfg.noise_std)
    _, img_m, img_ind_m = m.apply(ema, aug_images, method=m.encode_image)
    _, txt_m, txt_ind_m = m.apply(ema, batch["tokens_aug"], method=m.encode_text)
    aug = {"img": img_m, "txt": txt_m, "img_ind": img_ind_m, "txt_ind": txt_ind_m}
    teacher = None
    if f.distill_alpha > 0:  # ALBEF: the momentum model's view of the same pairs
      teacher = {"img": m.apply(ema, batch["image"], method=m.encode_image)[1],
                 "txt": m.apply(ema, batch["tokens"], method=m.encode_text)[1]}
    total, loss_state, terms = self.contrastive_terms(params, emb, aug, state, batch, k_loss,
                                                      mesh, teacher, f.distill_alpha)

    # ITM: every image with its caption (match), with a hard negative caption, and every
    # caption with a hard negative image (no match); negatives never share the caption.
    same = jnp.all(batch["tokens"][:, None] == batch["tokens"][None], -1)
    sim = jax.lax.stop_gradient(metrics.l2_normalize(img) @ metrics.l2_normalize(txt).T)
    neg_txt = hard_negatives(k_itm1, sim, same)
    neg_img = hard_negatives(k_itm2, sim.T, same)
    fuse = lambda it, sq, tk: m.apply(params, it, sq, tk, method=m.fuse)
    fused = jnp.concatenate([
        fuse(img_tokens, seq, batch["tokens"]),
        fuse(img_tokens, seq[neg_txt], batch["tokens"][neg_txt]),
        fuse(img_tokens[neg_img], seq, batch["tokens"])])
    b = img.shape[0]
    itm_labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
    itm = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        m.apply(params, fused, method=m.itm), itm_labels))

    masked, targets = mask_tokens(k_mlm, batch["tokens"], f.mlm_prob)
    mseq = m.apply(params, masked, method=m.encode_text)[0]
    logits = m.apply(params, fuse(img_tokens, mseq, masked), method=m.mlm)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"])
    mlm = jnp.sum(ce * targets) / jnp.sum(targets)

    terms.update(itm=itm, mlm=mlm, temperature=self.temperatures(params)[0])
    total = total + f.itm_weight * itm + f.mlm_weight * mlm
    return total, ({"loss_state": loss_state}, terms)

  # -- fusion tasks -------------------------------------------------------------

  def eval_fusion(self, c: dict) -> dict:
    return {"fusion": evaluate_fusion(self.model, c["params"], c["train"], c["test"],
                                      self.tokenizer)}


def _fused(model, params, images, tokens) -> jax.Array:
  """Fusion-encoder sequence [B, L, W] of pairs (images [B, ...], tokens [B, L])."""
  image_tokens = model.apply(params, images, method=model.encode_image)[0]
  seq = model.apply(params, tokens, method=model.encode_text)[0]
  return model.apply(params, image_tokens, seq, tokens, method=model.fuse)


def fused_features(model: Any, params: Any, images: ArrayLike, tokens: ArrayLike, batch_size: int = 500) -> np.ndarray:
  """[CLS] of the fusion encoder for pairs (images [N, ...], tokens [N, L]) -> [N, W]."""
  return evaluate.in_batches(lambda p, x, t: _fused(model, p, x, t)[:, 0], params,
                             evaluate.batches_of(images, tokens, batch_size=batch_size))


def fusion_tasks(data: dict, tokenizer: Any, seed: int) -> dict:
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


def evaluate_fusion(model: Any, params: Any, train: dict, test: dict, tokenizer: Any,
                    limit: int = 2000) -> dict:
  """Fusion tasks of the ALBEF-style model: ITM accuracy of its matching head, and QA /
  entailment accuracy of linear probes on the frozen fused [CLS] (fit on `limit` train
  images, scored on the test split)."""
  tr = {k: v[:limit] for k, v in train.items()}
  tasks = {"train": fusion_tasks(tr, tokenizer, 1), "test": fusion_tasks(test, tokenizer, 2)}
  t = tasks["test"]["itm"]

  itm_logits = lambda p, x, tok: model.apply(p, _fused(model, p, x, tok), method=model.itm)
  pred = np.argmax(evaluate.in_batches(itm_logits, params, evaluate.batches_of(
      test["image"][t["image"]], t["tokens"])), -1)
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
