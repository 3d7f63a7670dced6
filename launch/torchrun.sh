#!/usr/bin/env bash
# Launch `pretrain train` with torchrun: one node with N processes, or several nodes.
#
#   launch/torchrun.sh CONFIG [key=value ...]
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: number of GPUs, or 1 without CUDA)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank, with MASTER_ADDR/MASTER_PORT (static rendezvous)
#   MASTER_ADDR     address of node 0 (default 127.0.0.1)
#   MASTER_PORT     port on node 0 (default 29500)
#   RDZV_ENDPOINT   host:port of a c10d rendezvous instead (node ranks assigned automatically)
#   RDZV_ID         rendezvous/job id for c10d (default: pretrain)
#   PYTHON          interpreter (default: .venv/bin/python if present, else python3)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[[ $# -ge 1 ]] || { echo "usage: $0 CONFIG [key=value ...]" >&2; exit 2; }
[[ -f $1 ]] || { echo "error: config file not found: $1" >&2; exit 2; }

PYTHON=${PYTHON:-$( [[ -x $here/.venv/bin/python ]] && echo "$here/.venv/bin/python" || echo python3 )}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
NNODES=${NNODES:-1}

args=(--nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE")
if [[ -n ${RDZV_ENDPOINT:-} ]]; then
  args+=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-pretrain}")
else
  args+=(--node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi
# One OpenMP thread pool per process: cores are split between local ranks, not oversubscribed.
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
  cores=$(nproc)
  export OMP_NUM_THREADS=$(( cores / NPROC_PER_NODE > 0 ? cores / NPROC_PER_NODE : 1 ))
fi
exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m pretrain train "$@"
