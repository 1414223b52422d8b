"""Two-view self-supervised task (SimCLR layout): two augmented views of each
image through one encoder + projection head, any library loss between them.

The host crops (uint8, `pipeline.TwoViews`); the step augments each view on the
device (`augment.photometric`); evaluation streams embeddings batch by batch
(`pipeline.eval_batches`, `evaluate.in_batches`)."""

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from contrastive_jax import evaluate
from contrastive_jax import losses as L
from contrastive_jax import metrics
from contrastive_jax.data import augment as aug_lib
from contrastive_jax.data import pipeline
from contrastive_jax.models import encoders
from contrastive_jax.sharding import BATCH_AXES
from contrastive_jax.tasks import base


class TwoViewTask(base.Task):
  """A two-view objective: an encoder and projection head (`fields`: the model, its
  augmentations, its loss and the probes' settings).

  With norm=batch the state holds the BatchNorm running averages (`batch_stats`): the
  step normalises each layer by the statistics of the global batch of both views (2B
  examples) and updates the averages; evaluation normalises with the averages."""

  fields = dict(
      model=base.REQUIRED, head_hidden=base.REQUIRED, proj_dim=base.REQUIRED,
      augment=base.REQUIRED, loss=base.REQUIRED, temperature=base.REQUIRED,
      loss_options=base.REQUIRED,
      norm="group",  # the ResNets': group | batch
      image_size=None,  # None: the images' own
      knn_k=20,  # the kNN probe's neighbours
      eval_crop_fraction=1.0,  # evaluation: a centre crop of this fraction, resized
      eval_batch_size=256)
  batch_keys = ("view1", "view2", "index")
  mutable_on_resume = ("knn_k",)
  evaluators = {"knn": "eval_knn", "linear_probe": "eval_linear", "rank": "eval_rank"}

  def __init__(self, cfg, train_src, eval_src=None):
    super().__init__(cfg, train_src, eval_src)
    cfg = self.cfg
    self.batch_norm = cfg.norm == "batch"
    self.model = encoders.get_model(cfg.model, cfg.head_hidden, cfg.proj_dim, dtype=cfg.dtype,
                                    norm=cfg.norm, axis_name=encoders.VIEWS_AXIS)
    if self.batch_norm:
      self.eval_keys = ("params", "batch_stats")
    self.loss_fn, self.loss_state = L.registry.make(
        cfg.loss, cfg.loss_options.get(cfg.loss, {}), len(train_src))
    if L.registry.get(cfg.loss).augmented:
      raise ValueError(f"loss {cfg.loss!r} needs image-text augmented views: the two_view "
                       "task takes a two-view loss (nt_xent, dcl, sogclr, gamma, ...)")
    self.augment = aug_lib.AugmentConfig(**cfg.augment)
    self.channels = pipeline.channels_of(train_src)
    self.size = cfg.image_size
    if self.size:
      self.image_shape = (self.size, self.size, self.channels)

  def check_eval(self) -> None:
    super().check_eval()
    cfg = self.cfg
    if "knn" in cfg.evals:
      n = len(self.train_src) if cfg.eval_limit is None else min(cfg.eval_limit,
                                                                  len(self.train_src))
      k = cfg.knn_k
      if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"--config.knn_k={k!r}: must be an integer in [1, {n}] (the train "
                         "examples the kNN probe searches)")

  def transform(self) -> Any:
    return pipeline.TwoViews(self.train_src, self.augment, self.size, self.channels)

  def init(self, key: jax.Array) -> dict:
    variables = self.model.init(key, jnp.zeros((1,) + tuple(self.image_shape), jnp.float32),
                                train=False)
    state = {"params": {"params": variables["params"]}, "loss_state": self.loss_state}
    if self.batch_norm:
      state["batch_stats"] = variables["batch_stats"]
    return state

  def embed_views(self, params: Any, state: dict, views: jax.Array) -> tuple[jax.Array, dict]:
    """Projections z [2, B, P] of both views [2, B, H, W, C], one apply mapped over the
    views, and the state updates (BatchNorm's averages, from both views' statistics)."""
    if not self.batch_norm:
      _, z = jax.vmap(self.model.apply, in_axes=(None, 0))(params, views)
      return z, {}
    variables = {**params, "batch_stats": state["batch_stats"]}
    apply = lambda v: self.model.apply(variables, v, train=True, mutable=["batch_stats"])
    (_, z), new = jax.vmap(apply, axis_name=encoders.VIEWS_AXIS)(views)
    # Both views computed the same averages (their statistics are shared): keep one.
    return z, {"batch_stats": jax.tree.map(lambda a: a[0], new["batch_stats"])}

  def loss(self, params: Any, state: dict, batch: dict, key: jax.Array, mesh: jax.sharding.Mesh) -> tuple[jax.Array, tuple[dict, dict]]:
    def local(z1, z2, s, i, k, progress):
      loss, s = self.loss_fn(z1, z2, s, i, k, temperature=self.cfg.temperature,
                             axis_name=BATCH_AXES, progress=progress)
      # Monitoring metric: InfoNCE (t = 0.1) over each device's own rows, averaged; a
      # global one would gather the keys that the gamma loss never moves.
      sg = jax.lax.stop_gradient
      local_infonce = jax.lax.pmean(L.nt_xent(sg(z1), sg(z2), temperature=0.1), BATCH_AXES)
      return loss, s, local_infonce

    # Photometric augmentation on the device: example i of view v draws from
    # (seed, step, v, index[i]), so views are the same on any mesh and after a resume.
    k_aug, key = jax.random.split(key)
    views = [aug_lib.photometric(jax.random.fold_in(k_aug, v), batch[f"view{v + 1}"],
                                 batch["index"], self.augment) for v in (0, 1)]
    # Both views in one apply, mapped over a new leading axis: every device keeps its own
    # rows (concatenating two batch-sharded arrays is not batch-sharded, and GSPMD would
    # gather them), and the weight gradient is one all-reduce, not one per view.
    z, updates = self.embed_views(params, state, jnp.stack(views))
    loss, loss_state, local_infonce = jax.shard_map(
        local, mesh=mesh, in_specs=(P(BATCH_AXES), P(BATCH_AXES), P(), P(BATCH_AXES), P(), P()),
        out_specs=(P(), P(), P()))(z[0], z[1], state["loss_state"], batch["index"], key,
                                   base.progress(state, self.cfg))
    return loss, ({"loss_state": loss_state, **updates}, {"nt_xent_local": local_infonce})

  def eval_data(self, limit: Optional[int]=None) -> Any:
    """The (train, test) sources and the limit: nothing is loaded until an evaluation
    streams them."""
    return self.train_src, self.eval_src, limit

  def prepare(self, params: Any, data: Any) -> dict:
    train_src, test_src, limit = data
    transform = pipeline.EvalImage(self.size, self.channels,
                                   self.cfg.eval_crop_fraction)
    features = lambda p, x, y: (self.model.apply(p, aug_lib.to_float(x), train=False)[0]
                                .astype(jnp.float32), y)
    embed = lambda src: evaluate.in_batches(features, params, (
        (b["image"], b["label"]) for b in pipeline.eval_batches(
            src, transform, self.cfg.eval_batch_size, limit,
            threads=max(1, self.cfg.data_threads))))
    (tr, tr_y), (te, te_y) = embed(train_src), embed(test_src)
    return {"train": tr, "test": te, "train_y": tr_y, "test_y": te_y,
            "num_classes": int(max(tr_y.max(), te_y.max()) + 1)}

  def eval_knn(self, c: dict) -> dict:
    return {"knn_top1": evaluate.knn_accuracy(c["train"], c["train_y"], c["test"], c["test_y"],
                                              num_classes=c["num_classes"], k=self.cfg.knn_k)}

  def eval_linear(self, c: dict) -> dict:
    return {"linear_top1": evaluate.linear_probe(c["train"], c["train_y"], c["test"], c["test_y"],
                                                 num_classes=c["num_classes"])["top1"]}

  def eval_rank(self, c: dict) -> dict:
    return {"effective_rank": float(metrics.effective_rank(jnp.asarray(c["test"])))}
