"""Every Triton kernel that model.hope.kernel=triton launches, compiled for an NVIDIA GPU on a machine without
one (issue 14): compile seconds, PTX size, registers and spill (stack) bytes per thread, at a preset's shapes.

    python benchmarks/bench_kernel_compile.py [--preset configs/hope_340m.yaml] [--arch 90]
        [--kernels NAME ...] [--set KEY=VALUE ...] [--timeout 1800]

1. Capture. A child process (TRITON_INTERPRET=1, only so that kernel=triton passes the model's device check on a
   CPU) runs one HOPE block of the preset (its width, heads, memories and flags) forward and backward over two
   memory chunks of CPU tensors, every Triton kernel of nl/ops replaced by a recorder: nothing is computed,
   each distinct launch (kernel, argument types, constexpr flags) is kept. The batch size changes only the
   grid, not the compiled kernel, so one sequence is run.
2. Compile. Each launch is compiled as Triton compiles it on first use on a GPU: `triton.compile` for
   GPUTarget("cuda", arch, 32), ptxas included (the one Triton bundles), one child process per kernel with a
   time limit. Registers and stack bytes are read from the cubin by the bundled cuobjdump: stack bytes are
   register spills (the kernels use no local arrays), each a round trip to local memory per thread. An
   autotuned kernel is compiled at each num_warps of its configs, a plain one at Triton's default (4).
   Launch-time specialisation (integer arguments equal to 1, 16-byte alignment hints) is not applied: the
   figures are for the generic kernel.
Nothing here runs a kernel, so the speed of the code is not measured (bench_gpu.py does that on a GPU); the
compile time is this machine's (2 CPU cores here), for the cold cache of a first step on a GPU.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODULES = ("nl.ops.triton_dgd", "nl.ops.triton_memory", "nl.ops.triton_gates")


def _arg_type(a) -> str:
    import torch
    if isinstance(a, torch.Tensor):
        return {torch.float32: "*fp32", torch.float64: "*fp64", torch.int32: "*i32", torch.int64: "*i64"}[a.dtype]
    if isinstance(a, bool):
        return "i1"
    if isinstance(a, int):
        return "i32" if -2 ** 31 <= a < 2 ** 31 else "i64"
    if isinstance(a, float):
        return "fp32"
    raise TypeError(f"bench_kernel_compile: kernel argument of type {type(a).__name__} not handled")


def capture(preset: str, overrides: list[str]) -> list[dict]:
    """The distinct kernel launches of one HOPE block's forward + backward over two memory chunks (run in a
    process with TRITON_INTERPRET=1): [{module, kernel, types (positional), constexprs, num_warps}]."""
    import importlib

    import torch

    from nl.config import load_config
    from nl.models.hope import HopeBlock

    cfg = load_config(preset, ["model.hope.kernel=triton", *overrides]).model
    mods = [importlib.import_module(m) for m in MODULES]
    launches, originals = {}, []

    class Recorder:
        def __init__(self, module: str, name: str, kernel) -> None:
            self.module, self.name = module, name
            configs = getattr(kernel, "configs", None)  # an Autotuner: compiled at each config's num_warps
            self.num_warps = sorted({c.num_warps for c in configs}) if configs else [4]

        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                rec = dict(module=self.module, kernel=self.name, types=[_arg_type(a) for a in args],
                           constexprs=constexprs, num_warps=self.num_warps)
                launches.setdefault(json.dumps(rec, sort_keys=True), rec)
            return launch

    for m in mods:
        for name, k in list(vars(m).items()):
            if name.endswith("_kernel") and hasattr(k, "__getitem__"):
                originals.append((m, name, k))
                setattr(m, name, Recorder(m.__name__, name, k))
    try:
        torch.manual_seed(0)
        block = HopeBlock(cfg)
        block.init_weights(0.02, 0.02)
        x = torch.randn(1, 2 * int(cfg.hope.memory_chunk_size), cfg.dim, requires_grad=True)
        block(x).float().square().mean().backward()
    finally:
        for m, name, k in originals:
            setattr(m, name, k)
    return list(launches.values())


def compile_one(rec: dict, arch: int, num_warps: int) -> dict:
    """Compile one captured launch for sm_{arch} (this process must not interpret): seconds, sizes, resources."""
    import importlib
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(rec["module"]), rec["kernel"])
    while not isinstance(fn, triton.runtime.JITFunction):  # an Autotuner (or heuristics) around the kernel
        fn = fn.fn
    types = iter(rec["types"])
    signature = {p.name: "constexpr" if p.is_constexpr else next(types) for p in fn.params}
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=rec["constexprs"]),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    seconds = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"bench_kernel_compile: no resource usage in cuobjdump's output: {usage!r}")
    return dict(seconds=round(seconds, 1), ptx_kb=len(kernel.asm["ptx"]) // 1024,
                cubin_kb=len(kernel.asm["cubin"]) // 1024, registers=int(found[1]), spill_bytes=int(found[2]))


def flags(rec: dict) -> str:
    """The launch's constexprs in short: block sizes, and the names of the flags that are on."""
    c = rec["constexprs"]
    blocks = " ".join(f"{k}={v}" for k, v in c.items() if k.startswith("B") and isinstance(v, int)
                      and not isinstance(v, bool))
    on = [k for k, v in c.items() if v is True]
    return " ".join([blocks, *on, c.get("PRECISION", "")]).strip()


def run_child(args: list[str], timeout: float, env: dict | None = None) -> dict | str:
    """A JSON result from a child process of this script, or a short reason it gave none."""
    try:
        p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout,
                           env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout:.0f} s"
    if p.returncode != 0:
        return "failed: " + (p.stderr.strip().splitlines() or ["?"])[-1][:200]
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="configs/hope_340m.yaml")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 H100/H200, 80 A100")
    ap.add_argument("--kernels", nargs="*", default=[], help="compile only these (names as in nl/ops, e.g. "
                    "_mlp_memory_bwd_kernel); default all")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per kernel compile")
    ap.add_argument("--capture-only", action="store_true", help=argparse.SUPPRESS)  # (child) print launches
    ap.add_argument("--compile-one", help=argparse.SUPPRESS)  # (child) JSON [record, num_warps]
    args = ap.parse_args()
    if args.capture_only:
        print(json.dumps(capture(args.preset, args.set)))
        return
    if args.compile_one:
        rec, warps = json.loads(args.compile_one)
        print(json.dumps(compile_one(rec, args.arch, warps)))
        return

    launches = run_child(["--capture-only", "--preset", args.preset, "--set", *args.set], 600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    if isinstance(launches, str):
        raise SystemExit(f"bench_kernel_compile: capturing the launches {launches}")
    unknown = set(args.kernels) - {r["kernel"] for r in launches}
    if unknown:
        raise SystemExit(f"bench_kernel_compile: {sorted(unknown)} not launched by {args.preset} with kernel=triton; "
                         f"launched: {sorted({r['kernel'] for r in launches})}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set to silence its warning
    env["TRITON_ALWAYS_COMPILE"] = "1"  # a cold compile each time, not Triton's on-disk cache of an earlier run
    import triton
    print(f"`python benchmarks/bench_kernel_compile.py --preset {args.preset} --arch {args.arch}"
          f"{' --kernels ' + ' '.join(args.kernels) if args.kernels else ''}"
          f"{' --set ' + ' '.join(args.set) if args.set else ''}` ({platform.node()}, {os.cpu_count()} CPUs, "
          f"triton {triton.__version__}, {datetime.date.today()}; compiled for sm_{args.arch}, nothing run)\n")
    print("| kernel | flags | num_warps | compile s | PTX KB | cubin KB | registers | spill bytes/thread |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for rec in sorted(launches, key=lambda r: (r["kernel"], flags(r))):
        if args.kernels and rec["kernel"] not in args.kernels:
            continue
        for warps in rec["num_warps"]:
            res = run_child(["--arch", str(args.arch), "--compile-one", json.dumps([rec, warps])], args.timeout,
                            env=env)
            cells = (f"{res['seconds']} | {res['ptx_kb']:,} | {res['cubin_kb']:,} | {res['registers']} | "
                     f"{res['spill_bytes']:,}" if isinstance(res, dict) else f"{res} | | | |")
            print(f"| {rec['kernel']} | {flags(rec)} | {warps} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
