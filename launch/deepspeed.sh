#!/usr/bin/env bash
# Launch `pretrain train` with the DeepSpeed launcher (pdsh/ssh by default, or openmpi/slurm).
#
#   launch/deepspeed.sh CONFIG [key=value ...]
#
# Environment (all optional):
#   HOSTFILE        hostfile, one line per node: "host slots=N" (see launch/hostfile.example);
#                   without it the launcher uses the local machine only
#   NUM_GPUS        processes per node when there is no hostfile (default: all local GPUs, or 1)
#   MASTER_ADDR     address of the first node (default: first host of the hostfile)
#   MASTER_PORT     rendezvous port (default 29500)
#   DS_LAUNCHER     pdsh (default), openmpi, mvapich, slurm, ...
#   PYTHON          interpreter (default: .venv/bin/python if present, else python3)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[[ $# -ge 1 ]] || { echo "usage: $0 CONFIG [key=value ...]" >&2; exit 2; }
[[ -f $1 ]] || { echo "error: config file not found: $1" >&2; exit 2; }

PYTHON=${PYTHON:-$( [[ -x $here/.venv/bin/python ]] && echo "$here/.venv/bin/python" || echo python3 )}
DEEPSPEED=$(dirname "$PYTHON")/deepspeed
[[ -x $DEEPSPEED ]] || DEEPSPEED=deepspeed

args=(--master_port "${MASTER_PORT:-29500}")
if [[ -n ${HOSTFILE:-} ]]; then
  [[ -f $HOSTFILE ]] || { echo "error: HOSTFILE not found: $HOSTFILE" >&2; exit 2; }
  hosts=$(grep -Ev '^[[:space:]]*(#|$)' "$HOSTFILE" | awk '{print $1}')
  [[ -n $hosts ]] || { echo "error: HOSTFILE lists no hosts: $HOSTFILE" >&2; exit 2; }
  args+=(--hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}")
  if [[ $(wc -l <<<"$hosts") -eq 1 ]]; then
    # One host: the launcher starts ranks locally, so skip its ssh reachability check and
    # the ssh 'hostname -I' lookup of the master address.
    args+=(--no_ssh_check)
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  fi
else
  # No hostfile: this machine only.
  [[ -n ${NUM_GPUS:-} ]] && args+=(--num_gpus "$NUM_GPUS")
fi
[[ -n ${MASTER_ADDR:-} ]] && args+=(--master_addr "$MASTER_ADDR")
# Without CUDA, DeepSpeed's CPU accelerator + gloo are selected by the trainer; tell the
# launcher too, so it counts CPU "slots" instead of looking for GPUs.
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export DS_ACCELERATOR=cpu
fi
exec "$DEEPSPEED" "${args[@]}" --module pretrain train "$@"
