#!/usr/bin/env bash
# Usage: launch/tpu_pod.sh TPU_NAME ZONE [main.py train flags...]
#
# Runs the same training command on every worker of a Cloud TPU VM slice (v4/v5e/v5p pods).
# jax.distributed.initialize() needs no arguments there: jaxdiff.parallel.initialize_distributed()
# detects the multi-host TPU environment (TPU_WORKER_HOSTNAMES) and lets jax configure itself.
# The repository and data must already be at the same path on every worker (e.g. via
# `gcloud compute tpus tpu-vm scp --worker=all` or a shared bucket); --workdir should be a
# shared path (gs://... works with Orbax) so all hosts write one checkpoint.
#
# Example:
#   launch/tpu_pod.sh my-v4-32 us-central2-b --config configs/shapes_unet.py \
#       --workdir gs://my-bucket/runs/unet
set -euo pipefail
TPU_NAME=${1:?usage: $0 TPU_NAME ZONE [train flags...]}
ZONE=${2:?usage: $0 TPU_NAME ZONE [train flags...]}
shift 2
REPO_DIR=${REPO_DIR:-\$HOME/jaxdiff}

# Quote the flags for the remote shell.
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd $REPO_DIR && python main.py train$ARGS"
