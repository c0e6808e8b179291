#!/usr/bin/env bash
# Usage: launch/gpu_host.sh [main.py train flags...]
#
# One process driving every GPU of one host (JAX single-controller: no per-GPU processes).
# The mesh covers all visible GPUs; choose the split with the config, e.g. --config.mesh.fsdp=2
# (data axis = the rest). Restrict GPUs with CUDA_VISIBLE_DEVICES.
#
# For several GPU hosts, run this script once per host with
#   JAXDIFF_COORDINATOR=<host0>:<port> JAXDIFF_NUM_PROCESSES=<hosts> JAXDIFF_PROCESS_ID=<rank>
# (or use launch/slurm.sbatch, which jax configures itself from).
#
# Example:
#   launch/gpu_host.sh --config configs/shapes_unet.py --workdir /runs/unet
set -euo pipefail
cd "$(dirname "$0")/.."

# Let JAX take most of GPU memory up front (less fragmentation) but leave room for cuDNN/NCCL.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# Overlap the FSDP all-gathers / reduce-scatters with compute.
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
exec python main.py train "$@"
