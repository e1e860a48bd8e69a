#!/usr/bin/env bash
# Launch `megatron-cla pretrain` with torchrun on one node or many (c10d rendezvous).
#
# One node, all local GPUs (or 1 CPU process):
#   launch/torchrun.sh configs/tiny_mqa_cla2.yaml [section.key=value ...]
# Several nodes: run the same command on every node with the same rendezvous endpoint:
#   NNODES=4 NPROC_PER_NODE=8 RDZV_ENDPOINT=node001:29500 RDZV_ID=myjob launch/torchrun.sh CONFIG
#
# Environment (all optional):
#   NNODES          number of nodes                          (default 1)
#   NPROC_PER_NODE  processes per node                       (default: GPUs on this node, or 1)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous         (default localhost:29500)
#   RDZV_ID         job id shared by all nodes               (default megatron-cla)
#   PYTHON          interpreter with megatron_cla installed  (default python)
set -euo pipefail
if [ $# -lt 1 ]; then
    sed -n '2,15p' "$0"; exit 2
fi
CONFIG=$1; shift

if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(${PYTHON:-python} -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron's TP overlap needs it
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}

DISTRIBUTED_ARGS=(
    --nnodes "${NNODES:-1}"
    --nproc-per-node "$NPROC_PER_NODE"
    --rdzv-backend c10d
    --rdzv-endpoint "${RDZV_ENDPOINT:-localhost:29500}"
    --rdzv-id "${RDZV_ID:-megatron-cla}"
    --max-restarts 0
)
exec ${PYTHON:-python} -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" \
    -m megatron_cla pretrain --config "$CONFIG" "$@"
