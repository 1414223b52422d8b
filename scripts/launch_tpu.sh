#!/usr/bin/env bash
# Creates a Cloud TPU VM (or pod slice), installs contrastive_jax on every worker and runs
# one config on all of them. Cannot run on the development machines (no gcloud, no network);
# see docs/tpu.md. Usage:
#   TPU_NAME=cj-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 WORKDIR=/mnt/shared/runs/x \
#     bash scripts/launch_tpu.sh configs/mnist_gamma.py --config.batch_size=4096
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (shared by all hosts)}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
REPO="${REPO:-https://github.com/OWNER/contrastive_jax.git}"
CONFIG="$1"; shift

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
    --accelerator-type "$ACCELERATOR" --version "$VERSION"
fi

ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }

# Same pinned environment as CI, plus the TPU runtime for the pinned jax.
ssh_all "test -d contrastive_jax || git clone $REPO contrastive_jax; cd contrastive_jax && git pull \
  && bash scripts/env.sh && .venv/bin/pip install -q 'jax[tpu]==$(grep -oP 'jax==\K[0-9.]+' pyproject.toml)'"

# Every worker runs the same command; jax.distributed.initialize() finds the other hosts.
ssh_all "cd contrastive_jax && .venv/bin/python -m contrastive_jax.train --config $CONFIG \
  --workdir $WORKDIR --config.distributed.initialize=True $*"
