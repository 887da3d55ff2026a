#!/usr/bin/env bash
# The first checks on a CUDA machine, as one command that fits a short lease (about 10 minutes of limits):
# does the code run there, do the Triton kernels compile and agree with the float64 reference, and how fast
# are the torch and the Triton paths. Every step has its own time limit; a failed or timed-out step does not
# stop the next. Logs and a summary go to OUT.
#
#     bash benchmarks/gpu_session.sh [OUT]          (OUT defaults to runs/gpu_session)
#
# Steps and limits (seconds): versions; tests/test_triton_kernels.py on CUDA (180); bench_gpu.py for
# transformer_340m (90), hope_340m with kernel=torch at micro-batch <= 2 (150: its chunk loop is host-bound),
# hope_tiny with kernel torch and triton (120: small shapes compile in seconds; the 340m Triton kernels
# compile for over 20 minutes on a cold cache, docs/BENCHMARKS.md "Kernels compiled for sm_90").
# A machine without package access: `make gpu-wheels` here puts the pure-Python packages that GPU images
# tend to lack (omegaconf and its parser runtime, fla-core) in .whl/; this script installs whatever .whl/ holds
# into a private folder on PYTHONPATH before it starts. Environment: PYTHON (default python3), STEP_SCALE
# (multiplies every limit, e.g. 2 on a slow host).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_session}
PY=${PYTHON:-python3}
SCALE=${STEP_SCALE:-1}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/nl_triton_cache}

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nl_site .whl/*.whl \
        && export PYTHONPATH=/tmp/nl_site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME LIMIT_S COMMAND...: run it under its limit, log to OUT/NAME.log, one summary line
    local name=$1 limit=$(( $2 * SCALE )); shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local note=""; [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (time limit)"
    echo "- $name: exit $rc$note after $(( SECONDS - start )) s of $limit s: \`$*\`" | tee -a "$SUMMARY"
    tail -n 30 "$OUT/$name.log"
}

step versions 60 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name()); print(\"triton\", triton.__version__)'"
step kernel_tests 180 "$PY" -m pytest -q -p no:cacheprovider -rfE --timeout 120 tests/test_triton_kernels.py
step transformer_340m 90 "$PY" benchmarks/bench_gpu.py --presets configs/transformer_340m.yaml --ac full --compile off \
    --steps 5 --warmup 2 --max-micro-batch 16
step hope_340m_torch 150 "$PY" benchmarks/bench_gpu.py --presets configs/hope_340m.yaml --kernels torch --ac full \
    --compile off --steps 2 --warmup 1 --max-micro-batch 2
step hope_tiny_kernels 120 "$PY" benchmarks/bench_gpu.py --presets configs/hope_tiny.yaml --kernels torch triton \
    --ac none --compile off --steps 5 --warmup 2 --max-micro-batch 8
echo "summary: $SUMMARY"
