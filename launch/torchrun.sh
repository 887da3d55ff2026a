#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU processes on gloo when there is no GPU):
#   bash launch/torchrun.sh 8 --config configs/hope_340m.yaml dist.strategy=fsdp run.dir=runs/hope_340m
# SIGTERM/SIGINT to this script reach every rank, which saves at the next step boundary and
# exits; rerunning the same command resumes. If one rank fails, torchrun stops the others
# and exits with that rank's error (--max_restarts=0).
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC --config FILE [key=value ...]}
shift
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    --max_restarts=0 train.py "$@"
