#!/usr/bin/env bash
# The first checks on a CUDA machine, as one command that fits a short lease (about 10 minutes of limits):
# does the code run there, do the Triton kernels compile and agree with the float64 reference, and how fast
# are the torch and the Triton paths. Every step has its own time limit; a failed or timed-out step does not
# stop the next. Logs and a summary go to OUT.
#
#     bash benchmarks/gpu_session.sh [OUT]          (OUT defaults to runs/gpu_session)
#
# Steps and limits (seconds): versions; the float32 kernel tests of tests/test_triton_kernels.py on CUDA (200:
# the whole file compiles ~190 distinct kernel variants, some for a minute each on a 2-core host, so only the
# GPU_KERNEL_TESTS subset runs, ~45 variants, on pytest-xdist workers where it is installed: they compile in
# parallel; the float64 checks run in CI under the interpreter); bench_gpu.py for transformer_340m (90),
# hope_340m with kernel=torch at micro-batch <= 2 (120: its chunk loop is host-bound), hope_tiny with kernel
# torch and triton (120). Its Triton kernels compile in the background from the start (warm_triton, the same
# command, Triton only, one step, 380) into the shared TRITON_CACHE_DIR, so the timed step finds them compiled; the
# 340m Triton kernels compile for over 20 minutes on a cold cache (docs/BENCHMARKS.md "Kernels compiled for
# sm_90"), more than a lease holds.
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
TINY=(benchmarks/bench_gpu.py --presets configs/hope_tiny.yaml --kernels torch triton --ac none --compile off
      --max-micro-batch 8)
warm_start=$SECONDS
timeout --kill-after=10 $(( 380 * SCALE )) "$PY" "${TINY[@]}" --kernels triton --steps 1 --warmup 0 > "$OUT/warm_triton.log" 2>&1 &
warm_pid=$!

# float32 (what training runs), every kernel: the chunk step, the MLP memory's, gates, norms, the whole tiny model
GPU_KERNEL_TESTS=${GPU_KERNEL_TESTS:-"tiny_hope_forward_backward or (token_by_token and dtype1) or \
(mlp_memory_chunk_equals and dtype5) or (grad_factors_kernel and dtype4) or qkv_gates_kernel or mlp_apply_kernel \
or gate_and_l2norm"}
XDIST=(); "$PY" -c "import xdist" > /dev/null 2>&1 && XDIST=(-n 8)
step kernel_tests 200 "$PY" -m pytest -q -p no:cacheprovider -rfE --timeout 190 "${XDIST[@]}" -k "$GPU_KERNEL_TESTS" \
    tests/test_triton_kernels.py
step transformer_340m 90 "$PY" benchmarks/bench_gpu.py --presets configs/transformer_340m.yaml --ac full --compile off \
    --steps 5 --warmup 2 --max-micro-batch 16
step hope_340m_torch 120 "$PY" benchmarks/bench_gpu.py --presets configs/hope_340m.yaml --kernels torch --ac full \
    --compile off --steps 2 --warmup 1 --max-micro-batch 2
wait "$warm_pid"
rc=$?; note=""; [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (time limit)"
echo "- warm_triton: exit $rc$note after $(( SECONDS - warm_start )) s of $(( 380 * SCALE )) s, in the background: \`$PY ${TINY[*]} --kernels triton --steps 1 --warmup 0\`" | tee -a "$SUMMARY"
step hope_tiny_kernels 120 "$PY" "${TINY[@]}" --steps 5 --warmup 2
echo "summary: $SUMMARY"
