#!/usr/bin/env bash
# One node, N processes (default: every GPU, else 2 CPU processes). Extra arguments go to train.py.
#   launch/torchrun_single_node.sh parallel.ep=8 trainer.ckpt_every=200
# A lost worker restarts the whole group (MAX_RESTARTS, default 3); ranks resume from the run dir's latest
# checkpoint, which stays the same because the run dir is named after RUN_ID.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
RUN_ID=${RUN_ID:-$(date +%Y%m%d-%H%M%S)}
# every restart gets a fresh store: otherwise new workers can read the dead attempt's gloo/NCCL addresses
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nnodes=1 --nproc-per-node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
  --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:"${PORT:-29500}" --rdzv-id="$RUN_ID" \
  train.py trainer.resume=auto "$@"
