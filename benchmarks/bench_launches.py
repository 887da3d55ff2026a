"""Kernel launches per HOPE layer per forward + backward, model.hope.kernel=torch vs triton (issue 14 item 3).

    python benchmarks/bench_launches.py [--preset configs/hope_340m.yaml] [--seq-len 4096] [--batch 1]
        [--kernels torch triton] [--set model.hope.momentum=false ...]

One sequence mixer (SelfModifyingTitans, the part whose chunk loop runs in sequence) and the whole block
(+ its norm and CMS) at the preset's width run forward and backward on FakeTensorMode (shapes only, no
arithmetic: seconds at T=4096 on a CPU), under a TorchDispatchMode that counts
  - aten ops that launch a kernel on a GPU (views, aliases, empty allocations and prim:: metadata queries
    excluded: no launch; the same count as on real tensors);
  - Triton kernel calls: one per call of our custom ops (`nl::*`: the fused chunk step nl::dgd_chunk, an MLP
    memory's nl::mlp_grad_factors and nl::mlp_apply, nl::l2norm, nl::gate, and their backward ops).
On CUDA each counted op is one launch (a handful of aten ops launch two; cuBLAS picks
one kernel per bmm), so this is the host-side launch count that bounds a small-chunk recurrence's speed.
No kernel runs, so the Triton kernels need neither a GPU nor the interpreter here (TRITON_INTERPRET=1
is set only so that kernel=triton passes the model's device check). Prints a markdown table.

    python benchmarks/bench_launches.py --compile [...]

With train.compile on (`--compile`): an ESTIMATE of the CUDA count, from inductor's CPU code. The layer
(mixer or block) is compiled in place as `apply_compile` does (the block's graphs, a graph break at the
chunk loop, each chunk body compiled once through `titans._run_chunk`) and runs forward + backward twice
on real CPU tensors at the given T (the second pass is counted; the first compiles). Inductor generates
its code as usual, but no kernel is built or run: its C++ kernels and our Triton kernels are replaced by
no-ops (outputs stay uninitialised: only the calls matter here), so the 340m shape compiles and runs in
minutes. Counted per call of each compiled graph, from the graph's generated `call()`: fused kernels
(`cpp_fused_*`; `.run` of a Triton kernel), extern calls (`extern_kernels.mm/bmm/...`: cuBLAS on CUDA),
other ops (aten fallbacks such as `linalg_solve_triangular`, `cumsum`, and `nl::` custom ops: one launch
each); plus, with the eager counter above, the ops that run outside compiled graphs: the chunk loop's own
glue (split, stack, cat, ...), its backward, and the loss. Not counted: ops of AOT autograd's runtime
wrappers around a compiled forward (usually none). Inductor fuses differently for CUDA (Triton) than for
CPU (C++), so the CUDA count may differ in either direction.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import platform
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no kernel is executed here (fake tensors): see the docstring
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from nl.config import load_config  # noqa: E402
from nl.models.hope import HopeBlock  # noqa: E402

# aten ops that return a view or only allocate: no kernel launch on a GPU.
NO_LAUNCH = {torch.ops.aten.detach.default, torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default,
             torch.ops.aten.empty_strided.default, torch.ops.aten.lift_fresh.default,
             torch.ops.aten._unsafe_view.default}


# aten ops that compute a dtype from dtypes on the host, or only allocate (new_empty): no launch.
NO_LAUNCH_NAMES = {"aten::promote_types", "aten::result_type", "aten::new_empty", "aten::new_empty_strided"}


def launches(func) -> bool:
    """Whether an aten op launches a kernel on a GPU (prim::device etc. are metadata queries)."""
    name = func._schema.name
    return name.startswith("aten::") and not (func.is_view or func in NO_LAUNCH or name in NO_LAUNCH_NAMES)


class LaunchCounter(TorchDispatchMode):
    """Counts launching aten ops (by op) and Triton kernel calls while it is on."""

    def __init__(self) -> None:
        super().__init__()
        self.aten: collections.Counter = collections.Counter()
        self.triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name  # e.g. aten::mm, nl::dgd_chunk
        if name.startswith("nl::"):  # our custom ops: one Triton kernel each
            self.triton += 1
        elif launches(func):
            self.aten[name] += 1
        return func(*args, **kwargs)

    def total(self) -> int:
        return sum(self.aten.values()) + self.triton


def count(cfg, T: int, B: int, whole_block: bool) -> dict[str, int]:
    """Launches of one forward and one backward of a HOPE mixer (or block) on [B, T, dim] fake inputs."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.manual_seed(0)
        block = HopeBlock(cfg)
        block.init_weights(0.02, 0.02)
        x = torch.empty(B, T, cfg.dim).normal_().requires_grad_()  # a fake tensor (made inside the mode)
        module = block if whole_block else block.mixer
        fwd, bwd = LaunchCounter(), LaunchCounter()
        with fwd:
            out = module(x)
            loss = out.float().square().mean()
        with bwd:
            loss.backward()
    return {"fwd_aten": sum(fwd.aten.values()), "fwd_triton": fwd.triton, "bwd_aten": sum(bwd.aten.values()),
            "bwd_triton": bwd.triton, "total": fwd.total() + bwd.total()}


# Calls in inductor's generated `call()` that launch nothing: allocation, views, checks.
NO_LAUNCH_CALLS = ("empty_strided", "reinterpret_tensor", "assert_size_stride", "assert_alignment", "args.clear",
                   "get_raw_stream", "torch.cuda._DeviceGuard", "alloc_from_pool")


def generated_launches(source: str) -> collections.Counter:
    """Kernel launches in one call of an inductor output module's `call()`, by kind: 'fused' (a kernel
    inductor generated), 'extern' (extern_kernels.mm/bmm/...), 'other' (an aten fallback or custom op).
    Raises ValueError on a call it cannot classify (a newer inductor), rather than miscount it."""
    import ast

    fn = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == "call")
    kinds: collections.Counter = collections.Counter()
    for node in ast.walk(fn):  # statement-level calls only: a call inside the arguments is a view or a size
        if not (isinstance(node, (ast.Expr, ast.Assign)) and isinstance(node.value, ast.Call)):
            continue
        name = ast.unparse(node.value.func)
        if name.startswith(NO_LAUNCH_CALLS):
            continue
        if name.startswith(("cpp_fused", "triton_")) or name.endswith(".run"):
            kinds["fused"] += 1
        elif name.startswith("extern_kernels."):
            kinds["extern"] += 1
        elif name.startswith(("torch.ops.", "aten.")) or name.endswith(".copy_"):
            kinds["other"] += 1
        else:
            raise ValueError(f"bench_launches: unclassified call {name!r} in inductor's generated code")
    return kinds


class CompiledLaunchCounter(TorchDispatchMode):
    """Launches of a compiled HOPE layer, per phase ('fwd', 'bwd') and kind (`generated_launches`' kinds
    plus 'eager': aten ops run outside the compiled graphs). While `patched()`: inductor generates code
    without building kernels (no-op kernels: nothing is computed), every compiled graph's `call()` adds its
    launches when `counting`, and chunk-body graphs (compiled inside `titans._run_chunk`) are tallied apart
    in `chunk`. As a dispatch mode it counts eager ops; it must be off while dynamo runs a compiled frame
    (under a dispatch mode dynamo runs the frame eager), so the chunk loop pops it around each chunk body."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = {"fwd": collections.Counter(), "bwd": collections.Counter()}
        self.phase, self.counting, self.in_graph, self.in_chunk = "fwd", False, 0, False
        self.chunk = 0
        self.graphs = 0
        self._chunk_compile_ids: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting and not self.in_graph and launches(func):
            self.parts[self.phase]["eager"] += 1
        return func(*args, **(kwargs or {}))

    def _wrap_call(self, module) -> None:
        # Equal code loads one cached module (across counters too): wrap it once per counter, around the original.
        if getattr(module, "_nl_counter", None) is self:
            return
        kinds = generated_launches(Path(module.__file__).read_text())
        chunk = torch._guards.CompileContext.current_compile_id() in self._chunk_compile_ids
        inner = getattr(module, "_nl_inner", module.call)

        def call(args):
            if self.counting:
                self.parts[self.phase].update(kinds)
                self.chunk += sum(kinds.values()) if chunk else 0
            self.in_graph += 1
            try:
                return inner(args)
            finally:
                self.in_graph -= 1

        module._nl_inner, module._nl_counter, module.call = inner, self, call
        self.graphs += 1

    @contextlib.contextmanager
    def patched(self, codegen: str = "cpp"):
        """codegen: inductor's code for CPU tensors, 'cpp' (its CPU default) or 'triton' (the Triton
        scheduling and fusion it uses on CUDA; the kernels are never compiled, so no Triton driver is needed)."""
        import torch._inductor.config as inductor_config
        import torch.utils._triton
        from torch._inductor.async_compile import AsyncCompile
        from torch._inductor.graph import GraphLowering
        from torch.utils._python_dispatch import _pop_mode_temporarily

        from nl.ops import titans

        counter = self
        no_op = lambda *args, **kwargs: None  # noqa: E731

        class NoLaunch:  # a Triton kernel: kernel[grid](...) runs nothing
            def __getitem__(self, grid):
                return no_op

        def run_chunk(compiled, cfg, fn, *args):
            counter.in_chunk = True
            try:
                with _pop_mode_temporarily() if counter.counting else contextlib.nullcontext():
                    return run_chunk_orig(compiled, cfg, fn, *args)
            finally:
                counter.in_chunk = False

        @torch._disable_dynamo  # as titans._chunk_loop_in_python: the compiled block breaks here
        def chunk_loop(*args, **kwargs):
            with counter if counter.counting else contextlib.nullcontext():
                return loop_orig(*args, **kwargs)

        def compile_to_module(graph):  # generates the code (kernels: no-ops), wraps its call()
            if counter.in_chunk:  # a chunk body's forward; its backward compiles later under the same id
                counter._chunk_compile_ids.add(torch._guards.CompileContext.current_compile_id())
            module = to_module(graph)
            counter._wrap_call(module)
            return module

        to_module = GraphLowering.compile_to_module
        run_chunk_orig, loop_orig = titans._run_chunk, titans._chunk_loop_in_python
        saved = [(AsyncCompile, "cpp_pybinding"), (AsyncCompile, "cpp"), (GraphLowering, "compile_to_module"),
                 (titans, "_run_chunk"), (titans, "_chunk_loop_in_python")]
        originals = [getattr(o, n) for o, n in saved]
        AsyncCompile.cpp_pybinding = lambda self, argtypes, source: no_op
        AsyncCompile.cpp = lambda self, source: no_op
        if codegen == "triton":
            saved += [(AsyncCompile, "triton"), (torch.utils._triton, "triton_hash_with_backend")]
            originals += [AsyncCompile.triton, torch.utils._triton.triton_hash_with_backend]
            AsyncCompile.triton = lambda self, name, source, device_str="cuda": types.SimpleNamespace(run=no_op)
            # a cache-key field that asks the (absent) GPU driver for its target
            torch.utils._triton.triton_hash_with_backend = lambda: "bench_launches:no-driver"
        GraphLowering.compile_to_module = compile_to_module
        titans._run_chunk, titans._chunk_loop_in_python = run_chunk, chunk_loop
        kernels = []
        if "nl.ops.triton_dgd" in sys.modules:  # every Triton kernel of our ops: kernel[grid](...) objects
            modules = [sys.modules[m] for m in ("nl.ops.triton_dgd", "nl.ops.triton_memory", "nl.ops.triton_gates")
                       if m in sys.modules]
            kernels = [(m, name) for m in modules for name, f in vars(m).items()
                       if name.endswith("_kernel") and hasattr(f, "__getitem__")]  # (jit, interpreted or autotuned)
            originals += [getattr(o, n) for o, n in kernels]
            for o, n in kernels:
                setattr(o, n, NoLaunch())
        try:
            with inductor_config.patch(fx_graph_cache=False, compile_threads=1, cpu_backend=codegen):
                yield self
        finally:
            for (o, n), f in zip(saved + kernels, originals):
                setattr(o, n, f)


def count_compiled(cfg, T: int, B: int, whole_block: bool, codegen: str = "cpp") -> dict[str, int]:
    """Launches of one forward and one backward of a compiled HOPE mixer (or block) on [B, T, dim] inputs,
    as train.compile=true runs it (inductor; module docstring: an estimate of the CUDA count). Returns the
    counts per phase and kind, 'chunk' (launches inside the chunk-body graphs), 'graphs' and 'total'.
    codegen: 'cpp' or 'triton' (`CompiledLaunchCounter.patched`)."""
    from nl.ops import titans

    torch._dynamo.reset()
    titans._compiled_chunks.clear()
    titans.CHUNK_COMPILE_BACKEND = "inductor"
    if cfg.hope.kernel == "triton":  # imported before patching: their kernels become no-ops
        import nl.ops.triton_dgd  # noqa: F401
        import nl.ops.triton_gates  # noqa: F401
        import nl.ops.triton_memory  # noqa: F401
    torch.manual_seed(0)
    block = HopeBlock(cfg)
    block.init_weights(0.02, 0.02)
    module = block if whole_block else block.mixer
    module.compile(backend="inductor")
    counter = CompiledLaunchCounter()
    with counter.patched(codegen):
        for counting in (False, True):  # the first pass compiles (backward lazily), the second is counted
            counter.counting = counting
            graphs = counter.graphs
            x = torch.randn(B, T, cfg.dim, requires_grad=True)
            counter.phase = "fwd"
            out = module(x)
            with counter if counting else contextlib.nullcontext():
                loss = out.float().square().mean()
            counter.phase = "bwd"
            with counter if counting else contextlib.nullcontext():
                loss.backward()
        if counter.graphs != graphs:
            raise RuntimeError("bench_launches: the counted pass compiled new graphs (a recompile): not counted")
    c = {f"{ph}_{k}": counter.parts[ph][k] for ph in ("fwd", "bwd") for k in ("fused", "extern", "other", "eager")}
    return {**c, "chunk": counter.chunk, "graphs": counter.graphs, "total": sum(c.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="configs/hope_340m.yaml")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kernels", nargs="+", default=["torch", "triton"], choices=["torch", "triton"])
    ap.add_argument("--parts", nargs="+", default=["mixer", "block"], choices=["mixer", "block"])
    ap.add_argument("--compile", action="store_true",
                    help="count with train.compile on (inductor; an estimate of the CUDA count: see the docstring)")
    ap.add_argument("--codegen", nargs="+", default=["triton", "cpp"], choices=["triton", "cpp"],
                    help="with --compile: inductor's Triton code (its CUDA scheduling) and/or its C++ code")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    args = ap.parse_args()
    how = ("inductor's CPU code, kernels not built: an ESTIMATE of the CUDA count" if args.compile
           else "FakeTensorMode, counts exact")
    print(f"`python benchmarks/bench_launches.py --preset {args.preset} --seq-len {args.seq_len} --batch "
          f"{args.batch} --parts {' '.join(args.parts)}"
          f"{' --compile --codegen ' + ' '.join(args.codegen) if args.compile else ''}"
          f"{' --set ' + ' '.join(args.set) if args.set else ''}` ({platform.node()}, torch "
          f"{torch.__version__}, {datetime.date.today()}; {how})\n")
    if args.compile:
        print("| kernel | part | codegen | graphs | fwd fused | fwd mm/bmm | fwd other | fwd eager | bwd fused | "
              "bwd mm/bmm | bwd other | bwd eager | total | per chunk | in chunk bodies, per chunk |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    else:
        print("| kernel | part | fwd aten | fwd triton | bwd aten | bwd triton | total | per chunk |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
    for kernel in args.kernels:
        cfg = load_config(args.preset, [f"model.hope.kernel={kernel}", *args.set]).model
        chunks = -(-args.seq_len // int(cfg.hope.memory_chunk_size))
        for part in args.parts:
            whole = part == "block"
            if args.compile:
                for codegen in args.codegen:
                    c = count_compiled(cfg, args.seq_len, args.batch, whole, codegen)
                    kinds = " | ".join(f"{c[f'{ph}_{k}']:,}" for ph in ("fwd", "bwd")
                                       for k in ("fused", "extern", "other", "eager"))
                    print(f"| {kernel} | {part} | {codegen} | {c['graphs']} | {kinds} | {c['total']:,} | "
                          f"{c['total'] / chunks:,.0f} | {c['chunk'] / chunks:,.0f} |", flush=True)
                continue
            c = count(cfg, args.seq_len, args.batch, whole)
            print(f"| {kernel} | {part} | {c['fwd_aten']:,} | {c['fwd_triton']:,} | "
                  f"{c['bwd_aten']:,} | {c['bwd_triton']:,} | {c['total']:,} | {c['total'] / chunks:,.0f} |")


if __name__ == "__main__":
    main()
