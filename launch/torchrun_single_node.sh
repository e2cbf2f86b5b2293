#!/usr/bin/env bash
# One node, N processes (default: every GPU, else 2 CPU processes). Extra arguments go to train.py.
#   launch/torchrun_single_node.sh parallel.ep=8 trainer.ckpt_every=200
# A lost worker restarts the whole group (MAX_RESTARTS, default 3); ranks resume from the run dir's latest
# checkpoint, which stays the same because the run dir is named after RUN_ID.
# Preemption: SIGTERM or SIGUSR1 to this script (or SIGUSR1 to any one worker) makes every worker finish its
# step, write a checkpoint and stop; the script exits 75. It exits with train.py's status (docs/launching.md),
# which rank 0 leaves in outputs/torchrun-$RUN_ID/exit_status: torchrun itself says 1 for any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/exit_status.sh
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
RUN_ID=${RUN_ID:-$(date +%Y%m%d-%H%M%S)}
# every restart gets a fresh store: otherwise new workers can read the dead attempt's gloo/NCCL addresses
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# seconds torchrun gives its workers to checkpoint after it passes them SIGTERM, before SIGKILL
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
export MOE_TRAIN_STATUS_FILE=${MOE_TRAIN_STATUS_FILE:-$PWD/outputs/torchrun-$RUN_ID/exit_status}
rm -f "$MOE_TRAIN_STATUS_FILE"
torchrun --nnodes=1 --nproc-per-node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
  --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:"${PORT:-29500}" --rdzv-id="$RUN_ID" \
  train.py trainer.resume=auto "$@" &
AGENT=$!
# torchrun passes SIGTERM on to every worker (SIGUSR1 it does not handle: it would die of it)
trap 'kill -TERM "$AGENT" 2>/dev/null' TERM USR1
wait_for_status "$AGENT"
exit "$STATUS"
