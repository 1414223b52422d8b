"""Two-view self-supervised task (SimCLR layout): two augmented views of each
image through one encoder + projection head, any library loss between them."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from contrastive_jax import evaluate
from contrastive_jax import losses as L
from contrastive_jax import metrics
from contrastive_jax.data import augment as aug_lib
from contrastive_jax.data import pipeline
from contrastive_jax.models.encoders import get_model
from contrastive_jax.sharding import BATCH_AXES
from contrastive_jax.tasks import base


class TwoView(base.Task):
  """cfg: model, head_hidden, proj_dim, augment, loss, temperature, loss_options, knn_k."""

  batch_keys = ("view1", "view2", "index")
  evaluators = {"knn": "eval_knn", "linear_probe": "eval_linear", "rank": "eval_rank"}

  def __init__(self, cfg, train_src):
    super().__init__(cfg, train_src)
    self.model = get_model(cfg.model, cfg.head_hidden, cfg.proj_dim)
    self.loss_fn, self.loss_state = L.registry.make(
        cfg.loss, cfg.loss_options.get(cfg.loss, {}), len(train_src))
    if L.registry.get(cfg.loss).augmented:
      raise ValueError(f"loss {cfg.loss!r} needs image-text augmented views: the two_view "
                       "task takes a two-view loss (nt_xent, dcl, sogclr, gamma, ...)")

  def transform(self):
    return pipeline.TwoViews(self.train_src, aug_lib.AugmentConfig(**self.cfg.augment))

  def init(self, key):
    params = self.model.init(key, jnp.zeros((1,) + tuple(self.image_shape), jnp.float32))
    return {"params": params, "loss_state": self.loss_state}

  def loss(self, params, state, batch, key, mesh):
    def local(z1, z2, s, i, k):
      loss, s = self.loss_fn(z1, z2, s, i, k, temperature=self.cfg.temperature,
                             axis_name=BATCH_AXES)
      # Monitoring metric: InfoNCE (t = 0.1) over each device's own rows, averaged; a
      # global one would gather the keys that the gamma loss never moves.
      sg = jax.lax.stop_gradient
      local_infonce = jax.lax.pmean(L.nt_xent(sg(z1), sg(z2), temperature=0.1), BATCH_AXES)
      return loss, s, local_infonce

    # Both views in one apply, mapped over a new leading axis: every device keeps its own
    # rows (concatenating two batch-sharded arrays is not batch-sharded, and GSPMD would
    # gather them), and the weight gradient is one all-reduce, not one per view.
    views = jnp.stack([batch["view1"], batch["view2"]])  # [2, b, ...]
    _, z = jax.vmap(self.model.apply, in_axes=(None, 0))(params, views)
    loss, loss_state, local_infonce = jax.shard_map(
        local, mesh=mesh, in_specs=(P(BATCH_AXES), P(BATCH_AXES), P(), P(BATCH_AXES), P()),
        out_specs=(P(), P(), P()))(z[0], z[1], state["loss_state"], batch["index"], key)
    return loss, ({"loss_state": loss_state}, {"nt_xent_local": local_infonce})

  def eval_data(self, limit=None):
    test_src = pipeline.get_source(self.cfg.dataset, self.cfg.eval_split, self.cfg.data_dir)
    return pipeline.load_arrays(self.train_src, limit), pipeline.load_arrays(test_src, limit)

  def prepare(self, params, data):
    (tr_x, tr_y), (te_x, te_y) = data
    features = jax.jit(lambda x: self.model.apply(params, x)[0])
    return {"train": evaluate.embed(features, tr_x), "test": evaluate.embed(features, te_x),
            "train_y": tr_y, "test_y": te_y,
            "num_classes": int(max(tr_y.max(), te_y.max()) + 1)}

  def eval_knn(self, c):
    return {"knn_top1": evaluate.knn_accuracy(c["train"], c["train_y"], c["test"], c["test_y"],
                                              num_classes=c["num_classes"], k=self.cfg.knn_k)}

  def eval_linear(self, c):
    return {"linear_top1": evaluate.linear_probe(c["train"], c["train_y"], c["test"], c["test_y"],
                                                 num_classes=c["num_classes"])["top1"]}

  def eval_rank(self, c):
    return {"effective_rank": float(metrics.effective_rank(jnp.asarray(c["test"])))}
