"""benchmarks/bench_kernel_compile.py: the kernel=triton launches of a HOPE block, captured on a CPU and compiled
for sm_90 without a GPU (Triton's bundled ptxas), with registers and spill bytes read from the cubin."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Not imported here: the children below import triton themselves, each with the TRITON_INTERPRET it needs
# (conftest.py sets it for this process before any test module imports triton).
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernel_compile", ROOT / "benchmarks" / "bench_kernel_compile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def launches(bench):
    got = bench.run_child(["--capture-only", "--preset", "configs/hope_tiny.yaml"], 600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert not isinstance(got, str), got
    return got


def test_capture_sees_every_fused_kernel_with_3xtf32(launches):
    """One block forward + backward launches the fused kernels of the chunk step (the MLP memories' whole step,
    q/k/v and gates, the generators' MLP on z), forward and backward, and every float32 product asks for
    3xTF32 (`triton_dgd.dot_precision`): IEEE fp32 dots would be FMA loops that ptxas spills and compiles for
    tens of minutes at the 340m shape."""
    names = {r["kernel"] for r in launches}
    assert {"_mlp_memory_kernel", "_mlp_memory_bwd_kernel", "_qkv_gates_kernel", "_qkv_gates_bwd_kernel",
            "_mlp_apply_kernel", "_mlp_apply_bwd_kernel"} <= names, names
    precisions = {r["constexprs"]["PRECISION"] for r in launches if "PRECISION" in r["constexprs"]}
    assert precisions == {"tf32x3"}
    assert {t for r in launches for t in r["types"]} == {"*fp32", "i32", "fp32"}  # tensors fp32 (the model's dtype)


def test_compiles_a_kernel_for_sm90(bench, launches):
    """The generators' MLP on z at the tiny shape compiles to a cubin for sm_90 on this GPU-less machine: 96
    registers, no spills (measured 2026-12-01)."""
    rec = next(r for r in launches if r["kernel"] == "_mlp_apply_kernel")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = bench.run_child(["--arch", "90", "--compile-one", bench.json.dumps([rec, 4])], 600, env=env)
    assert isinstance(res, dict), res
    assert res["cubin_kb"] > 0 and 0 < res["registers"] <= 255 and res["spill_bytes"] == 0, res
