#!/usr/bin/env bash
# Several nodes: run this same command on every node (same RUN_ID and HEAD_ADDR everywhere).
#   RUN_ID=exp1 HEAD_ADDR=node0 NNODES=4 launch/torchrun_multi_node.sh parallel.ep=16 parallel.gpus_per_node=8
# c10d rendezvous on HEAD_ADDR:PORT; restarts (MAX_RESTARTS) re-rendezvous and resume from the run dir
# outputs/torchrun-$RUN_ID, which must be on a filesystem every node sees.
# Preemption: SIGTERM or SIGUSR1 to this script on any node (or SIGUSR1 to any one worker) makes every worker
# finish its step, write a checkpoint and stop; each node's script then exits 75 (train.py's status, which
# rank 0 leaves in outputs/torchrun-$RUN_ID/exit_status: torchrun itself says 1 for any failure).
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/exit_status.sh
: "${RUN_ID:?set RUN_ID, the same on every node}"
: "${HEAD_ADDR:?set HEAD_ADDR, a host name or address of one node that every node reaches}"
NNODES=${NNODES:?set NNODES}
NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count() or 1)")}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# NCCL: NVLS (NVLink SHARP multicast) off, as on the machines this was tried on; surface errors early
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# export NCCL_SOCKET_IFNAME=ib0  NCCL_IB_HCA=mlx5  # set for your fabric
# seconds torchrun gives its workers to checkpoint after it passes them SIGTERM, before SIGKILL
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
export MOE_TRAIN_STATUS_FILE=${MOE_TRAIN_STATUS_FILE:-$PWD/outputs/torchrun-$RUN_ID/exit_status}
torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
  --rdzv-backend=c10d --rdzv-endpoint="$HEAD_ADDR:${PORT:-29500}" --rdzv-id="$RUN_ID" \
  train.py trainer.resume=auto parallel.gpus_per_node="$NPROC" "$@" &
AGENT=$!
# torchrun passes SIGTERM on to every worker (SIGUSR1 it does not handle: it would die of it)
trap 'kill -TERM "$AGENT" 2>/dev/null' TERM USR1
wait_for_status "$AGENT"
exit "$STATUS"
