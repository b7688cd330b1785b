#!/usr/bin/env bash
# Train on one node with torchrun: one process per GPU, or N processes on CPU.
#
#   launch/torchrun.sh CONFIG [--section.field=value ...]
#
# Relaunching the same command resumes from the run's latest complete checkpoint. The Slurm
# script runs this once per node with NNODES and RDZV_ENDPOINT set.
#
# Variables (all optional):
#   DEVICE          cuda | cpu; passed on as --training.device (unset: the config's choice)
#   NPROC_PER_NODE  processes on this node (default: every visible GPU, or 1 when there is none)
#   NNODES          nodes of the job (default 1: a private rendezvous on this node)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous, on the first node (needed when NNODES > 1)
#   RDZV_ID         id the nodes of one job share (default fms-bamba)
#   RDZV_TIMEOUT    seconds to reach the rendezvous and for every node to join it (default 300)
set -euo pipefail

die() {
    echo "launch/torchrun.sh: error: $*" >&2
    exit 2
}

[[ $# -ge 1 ]] || die "usage: launch/torchrun.sh CONFIG [--section.field=value ...]"
config=$1
shift
[[ -f $config ]] || die "config file not found: $config"
command -v fms-bamba >/dev/null || die "fms-bamba is not on PATH (pip install -e . in the repository)"

[[ ${NPROC_PER_NODE:-1} =~ ^[1-9][0-9]*$ ]] ||
    die "NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'"
device_override=()
if [[ -n ${DEVICE:-} ]]; then
    [[ $DEVICE == cuda || $DEVICE == cpu ]] || die "DEVICE must be cuda or cpu, got '$DEVICE'"
    device_override=(--training.device="$DEVICE")
fi

# Count the GPUs this node really has before asking torchrun for one process per GPU.
visible_gpus=0
if [[ ${DEVICE:-} != cpu ]]; then
    visible_gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
fi
if [[ ${DEVICE:-} == cuda ]]; then
    ((visible_gpus > 0)) || die "DEVICE=cuda but $(hostname -s) has no GPU visible to torch"
    nproc=${NPROC_PER_NODE:-$visible_gpus}
    ((nproc <= visible_gpus)) ||
        die "NPROC_PER_NODE=$nproc GPUs asked for, but $(hostname -s) has $visible_gpus"
else
    default_nproc=$((visible_gpus > 0 ? visible_gpus : 1))
    nproc=${NPROC_PER_NODE:-$default_nproc}
fi

nnodes=${NNODES:-1}
rdzv_timeout=${RDZV_TIMEOUT:-300}
if [[ -z ${RDZV_ENDPOINT:-} ]]; then
    ((nnodes == 1)) || die "NNODES=$nnodes needs RDZV_ENDPOINT=host:port (on the first node)"
    rendezvous=(--standalone)
    where="this node"
else
    rendezvous=(--nnodes="$nnodes" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT"
        --rdzv-id="${RDZV_ID:-fms-bamba}"
        --rdzv-conf="join_timeout=$rdzv_timeout,read_timeout=$rdzv_timeout")
    where="$RDZV_ENDPOINT (timeout ${rdzv_timeout}s)"
fi

echo "launch/torchrun.sh: $(hostname -s): $nproc process(es) x $nnodes node(s), rendezvous at $where" >&2
exec python "$(dirname "$0")/torchrun.py" --nproc-per-node="$nproc" --max-restarts=0 \
    "${rendezvous[@]}" --no-python fms-bamba train "$config" "${device_override[@]}" "$@"
