#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU processes on gloo when there is no GPU):
#   bash launch/torchrun.sh 8 --config configs/hope_340m.yaml dist.strategy=fsdp run.dir=runs/hope_340m
# Ctrl-C (SIGINT) or SIGTERM to this script reaches every rank once: each saves a checkpoint at
# the next step boundary and stops, and the script exits 128+N (130 for SIGINT, 143 for SIGTERM),
# as `python train.py` does with one process; rerunning the same command resumes. A second Ctrl-C
# stops the ranks at once, without that save (exit 1). If one rank fails, torchrun stops the
# others and this script exits non-zero (--max_restarts=0), ending with torchrun's summary of the
# failed ranks (launch/torchrun.py: no torchrun traceback above it), where each shows its error: a
# bad config's one line (also printed once, by rank 0), or a crash's traceback.
#
# How: torchrun runs in its own session, so a terminal's Ctrl-C reaches this script only (not
# torchrun as well, which would send the ranks a second signal); the script passes each signal
# to the ranks (torchrun's children), which exit 0 after their save (NL_STOP_EXIT_CODE=0: torchrun
# reports a non-zero rank as a failure), and maps that to 128+N itself.
set -uo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC --config FILE [key=value ...]}
shift
if ! [[ "$NPROC" =~ ^([1-9][0-9]*|auto|gpu|cpu)$ ]]; then  # torchrun's own answer is a traceback
    echo "error: launch/torchrun.sh: NPROC must be a process count (or auto, gpu, cpu), got '$NPROC':" \
        "usage: launch/torchrun.sh NPROC --config FILE [key=value ...]" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export NL_STOP_EXIT_CODE=0
# Time torchrun gives the ranks to exit once it is itself signalled (e.g. by a scheduler's kill of
# the whole job) before SIGKILL: room for one checkpoint save.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

setsid "${PYTHON:-python}" launch/torchrun.py --standalone --nproc_per_node="$NPROC" \
    --max_restarts=0 train.py "$@" &
LAUNCHER=$!
STOPPED_BY=""  # the first signal received
PENDING=""     # signals not yet passed on (the ranks may not have started)
on_signal() { STOPPED_BY=${STOPPED_BY:-$1}; PENDING="$PENDING $1"; }
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM HUP

pass_on() {
    local ranks
    ranks=$(pgrep -P "$LAUNCHER" -f train.py 2>/dev/null || true)
    [[ -n "$ranks" ]] || return 0  # not started yet: try again on the next turn
    for sig in $PENDING; do
        # shellcheck disable=SC2086  # one pid per word
        kill -s "$sig" $ranks 2>/dev/null || true
    done
    PENDING=""
}

while kill -0 "$LAUNCHER" 2>/dev/null; do
    [[ -z "$PENDING" ]] || pass_on
    sleep 0.2
done
wait "$LAUNCHER"
RC=$?
if [[ -n "$STOPPED_BY" && $RC -eq 0 ]]; then
    exit $((128 + $(kill -l "$STOPPED_BY")))
fi
exit "$RC"
