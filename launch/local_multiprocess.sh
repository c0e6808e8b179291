#!/usr/bin/env bash
# Usage: launch/local_multiprocess.sh N [main.py train flags...]
#
# Starts N CPU processes of `python main.py train ...` on this machine, joined into one JAX
# multi-process run (a rehearsal of multi-host training without a cluster). Each process gets
#   JAXDIFF_COORDINATOR=127.0.0.1:$PORT  JAXDIFF_NUM_PROCESSES=N  JAXDIFF_PROCESS_ID=i
# which jaxdiff.parallel.initialize_distributed() reads; CPU collectives go over gloo.
#
# Environment:
#   PORT            coordinator port (default 12355)
#   DEVICES_PER_PROC  fake CPU devices per process (default 1), via XLA_FLAGS
#   LOGDIR          per-process logs go to $LOGDIR/proc_i.log (default: ./multiprocess_logs)
#
# Example (2 processes x 2 devices = a 4-device mesh):
#   DEVICES_PER_PROC=2 launch/local_multiprocess.sh 2 --config configs/shapes_unet.py \
#       --workdir /tmp/run --config.train.steps=10
# Exit status: non-zero if any process failed (the others are stopped).
set -euo pipefail

N=${1:?usage: $0 N [main.py train flags...]}
shift
PORT=${PORT:-12355}
DEVICES_PER_PROC=${DEVICES_PER_PROC:-1}
LOGDIR=${LOGDIR:-multiprocess_logs}
cd "$(dirname "$0")/.."
mkdir -p "$LOGDIR"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROC} ${XLA_FLAGS:-}" \
  JAXDIFF_COORDINATOR="127.0.0.1:${PORT}" JAXDIFF_NUM_PROCESSES="$N" JAXDIFF_PROCESS_ID="$i" \
    python main.py train "$@" >"$LOGDIR/proc_$i.log" 2>&1 &
  pids+=($!)
done

status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $LOGDIR/proc_$i.log" >&2
    status=1
    cleanup
  fi
done
exit $status
