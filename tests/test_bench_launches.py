"""benchmarks/bench_launches.py --compile (issue 14 item 3 with train.compile): launches of inductor's
generated code, counted per compiled-graph call, kernels never built."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as the bench sets it: kernel=triton passes the device check


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_launches", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_launches.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The shape of inductor's output module (torch 2.13): allocations, views and checks launch nothing; one
# C++ and one Triton kernel, one cuBLAS-style extern call, one aten fallback and one custom op do.
GENERATED = '''
class Runner:
    def call(self, args):
        arg0_1, arg1_1 = args
        args.clear()
        assert_size_stride(arg0_1, (4, 4), (4, 1), 'input')
        buf0 = empty_strided_cpu((4, 4), (4, 1), torch.float32)
        extern_kernels.mm(arg0_1, reinterpret_tensor(arg1_1, (4, 4), (1, 4), 0), out=buf0)
        buf1 = empty_strided_cpu((4, ), (1, ), torch.float32)
        cpp_fused_relu_sum_0(buf0, buf1)
        buf2 = torch.ops.aten.linalg_solve_triangular.default(buf0, buf0, upper=False)
        buf3 = torch.ops.nl.dgd_chunk.default(buf0, None, buf0, buf0, None, None, buf1, buf1, None, True)
        with torch.cuda._DeviceGuard(0):
            stream0 = get_raw_stream(0)
            triton_poi_fused_add_1.run(buf0, buf1, 16, stream=stream0)
        del buf0
        return (buf1, buf2, buf3)

runner = Runner()
call = runner.call
'''


def test_generated_launches_counts_kernel_calls_only(bench):
    kinds = bench.generated_launches(GENERATED)
    assert dict(kinds) == {"fused": 2, "extern": 1, "other": 2}


def test_generated_launches_refuses_an_unknown_call(bench):
    with pytest.raises(ValueError, match="unclassified call 'mystery_launcher'"):
        bench.generated_launches(GENERATED.replace("del buf0", "mystery_launcher(buf0)"))


@pytest.mark.parametrize("codegen", ["cpp", "triton"])
def test_counter_counts_each_call_of_a_compiled_graph_without_building_kernels(bench, codegen):
    """A compiled relu(x @ w) * 2 under the counter: inductor's one extern mm and one fused pointwise kernel
    per call (3 calls: 3 each), in C++ or in Triton (no GPU driver needed), the kernels no-ops (nothing is
    computed: only calls are counted). A second counter over a fresh compile of the same code (inductor
    hands back its cached module) counts as much."""
    x, w = torch.randn(8, 16), torch.randn(16, 4)
    for _ in range(2):
        torch._dynamo.reset()
        fn = torch.compile(lambda x, w: torch.relu(x @ w) * 2, backend="inductor")
        counter = bench.CompiledLaunchCounter()
        with torch.no_grad(), counter.patched(codegen):
            counter.counting = True
            for _ in range(3):
                fn(x, w)
        assert counter.graphs == 1
        assert dict(counter.parts["fwd"]) == {"extern": 3, "fused": 3}


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 3 inductor codegens of a tiny HOPE mixer: ~10 min on the loaded 2-core VM
def test_compiled_hope_count_keeps_the_graphs_and_cuts_launches(bench):
    """Tiny HOPE mixer, train.compile-style: 2 and 3 chunks compile the same graphs (the chunk loop is not
    unrolled), launches stay below eager's, and one more chunk adds chunk-body launches, fewer than eager's
    per-chunk increment. kernel=triton: 4 custom ops per chunk in the forward (an nl::mlp_memory_chunk each for
    the stacked generators and the memory, nl::mlp_apply, nl::qkv_gates), opaque calls in the graphs."""
    from test_hope_model import small

    cfg = small(chunk=4, kernel="torch", recompute_chunks=False)
    compiled = {T: bench.count_compiled(cfg, T=T, B=1, whole_block=False, codegen="triton") for T in (8, 12)}
    eager = {T: bench.count(cfg, T=T, B=1, whole_block=False) for T in (8, 12)}
    assert compiled[8]["graphs"] == compiled[12]["graphs"]
    for T in (8, 12):
        assert 0 < compiled[T]["chunk"] < compiled[T]["total"] < eager[T]["total"]
    added = compiled[12]["chunk"] - compiled[8]["chunk"]
    assert 0 < added < eager[12]["total"] - eager[8]["total"]
    triton = bench.count_compiled(small(chunk=4, kernel="triton", recompute_chunks=False), T=8, B=1,
                                  whole_block=False, codegen="triton")
    assert triton["fwd_other"] >= 2 * 4
    assert triton["total"] < compiled[8]["total"]
