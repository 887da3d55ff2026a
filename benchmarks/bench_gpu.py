"""The GPU table in one command: training tokens/s, MFU, peak memory and the largest micro-batch per
preset, with and without activation checkpointing, compile and the HOPE kernels.

    python benchmarks/bench_gpu.py [--presets configs/hope_340m.yaml configs/transformer_340m.yaml] [--all]
        [--steps 10] [--warmup 3] [--ac none full] [--compile off on] [--kernels torch triton]
        [--max-micro-batch 64] [--peak-tflops 989] [--dry-run]

For each preset and each combination of dist.activation_checkpointing (--ac), train.compile (--compile;
only where this checkout's config has the key, else the rows are skipped with a note) and
model.hope.kernel (--kernels; HOPE presets, only where the key exists, else kernel "torch" as the code is):
1. the model is built as train.py builds it (nl.models.build_model, nl.distributed.parallelize for AC
   and compile, nl.optim.build_optimizer), on one device;
2. largest micro-batch: b = 1, 2, 4, ... while a training step (forward under bf16 autocast, backward
   outside it, optimizer step) fits, up to --max-micro-batch and the preset's per-rank batch; a
   torch.cuda.OutOfMemoryError ends the search;
3. at that micro-batch: --warmup steps, then --steps timed steps between two device synchronisations:
   tokens/s = b * T * steps / seconds; peak memory = torch.cuda.max_memory_allocated over them;
4. MFU = tokens/s * nl.models.flops_per_token(model, T) / peak FLOP/s (6 N + 3 F_mix, model FLOPs: AC's
   recomputation is not counted), the peak being the device's dense bf16 rate from PEAK_BF16_TFLOPS
   (matched against torch.cuda.get_device_name) or --peak-tflops.
A configuration that fails for another reason than memory prints `failed: <the error>` in its row.
Runs unchanged on any CUDA machine. --dry-run: the same code at a tiny shape (dim 64, 2 layers, T 64,
per-rank batch 2) on the CPU (fp32, as the trainer's precision=auto there), 1 warm-up and 2 timed steps,
a micro-batch search of at most two tries; MFU and peak memory print as n/a without CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nl.config import load_config, valid_keys  # noqa: E402
from nl.distributed import DistEnv, parallelize  # noqa: E402
from nl.evaluate import token_loss_sum  # noqa: E402
from nl.models import build_model, count_parameters, flops_per_token  # noqa: E402
from nl.optim import build_optimizer  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s from the vendors' datasheets (they print the
# sparse figure, twice these), matched as a case-insensitive substring of torch.cuda.get_device_name,
# first match wins: the more specific names come first ("H100 PCIe" before "H100", "L40S" before "L4").
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0),      # Grace Hopper: the H100/H200 SXM tensor cores
    ("H200 NVL", 835.0),   # PCIe form factor: 1,671 sparse
    ("H200", 989.0),       # H200 SXM: 1,979 sparse
    ("H100 NVL", 835.0),   # 1,671 sparse
    ("H100 PCIe", 756.0),  # 1,513 sparse
    ("H100", 989.0),       # H100 SXM5 ("NVIDIA H100 80GB HBM3"): 1,979 sparse
    ("H800", 989.0),       # H100 SXM compute with reduced interconnect
    ("B200", 2250.0),      # HGX B200: 4.5 PFLOP/s sparse per GPU
    ("A100", 312.0),       # SXM4 and PCIe, 40 and 80 GB: 624 sparse
    ("A800", 312.0),
    ("L40S", 362.0),       # 733 sparse
    ("L40", 181.0),        # 362 sparse
    ("L4", 121.0),         # 242 sparse
    ("RTX 4090", 165.0),   # GeForce, bf16 with fp32 accumulate: 330 sparse
    ("MI300X", 1307.0),    # AMD Instinct MI300X (ROCm reports it through torch.cuda)
]

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=256", "model.ffn_hidden=128",
        "model.hope.memory_hidden=16", "model.hope.chunk_size=16", "model.hope.memory_chunk_size=16",
        "model.hope.cms_hidden=64", "data.seq_len=64", "train.batch_size=2", "train.micro_batch_size=0"]


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a device named `device_name`, or None when the table lacks it."""
    name = device_name.lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name:
            return tflops
    return None


class _Run:
    """One configuration's model and optimizer, and a training step at micro-batch b."""

    def __init__(self, cfg, device: torch.device, bf16: bool) -> None:
        self.cfg, self.device, self.bf16 = cfg, device, bf16
        self.model = build_model(cfg.model, device=device, seed=0)
        self.n_params = count_parameters(self.model)
        self.model = parallelize(self.model, cfg, DistEnv(0, 1, 0, device), bf16)
        self.optimizer = build_optimizer(self.model, cfg)
        self.T = cfg.data.seq_len

    def step(self, b: int) -> None:
        ids = torch.randint(0, self.cfg.model.vocab_size, (b, self.T + 1), device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = token_loss_sum(self.model, ids[:, :-1], ids[:, 1:]) / (b * self.T)
        loss.backward()  # outside autocast, as PyTorch advises
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def fits(self, b: int) -> bool:
        """Whether a training step at micro-batch b runs without running out of device memory."""
        try:
            self.step(b)
            return True
        except torch.cuda.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def largest_micro_batch(run: _Run, cap: int, max_tries: int) -> int:
    """Largest b in 1, 2, 4, ... <= cap for which a step fits (0: not even b = 1), in at most max_tries steps."""
    best, b = 0, 1
    for _ in range(max_tries):
        if b > cap or not run.fits(b):
            break
        best, b = b, 2 * b
    return best


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _timed(run: _Run, b: int, steps: int, warmup: int) -> float:
    """tokens/s of `steps` training steps at micro-batch b after `warmup` steps (peak memory stats reset)."""
    for _ in range(warmup):
        run.step(b)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    _sync(run.device)
    start = time.perf_counter()
    for _ in range(steps):
        run.step(b)
    _sync(run.device)
    return b * run.T * steps / (time.perf_counter() - start)


def measure(cfg, device: torch.device, bf16: bool, steps: int, warmup: int, cap: int, max_tries: int,
            peak_tflops: float | None) -> dict:
    """tokens/s, MFU, peak memory at the largest micro-batch of one configuration. A configuration
    that fails (other than by running out of memory) gives a row with `error` set, not an exception."""
    row = {"params": None, "micro_batch": 0, "tokens_per_s": None, "mfu": None, "peak_gb": None, "error": None}
    run = None
    try:
        run = _Run(cfg, device, bf16)
        row["params"] = run.n_params
        b = largest_micro_batch(run, min(cap, cfg.train.batch_size), max_tries)  # one rank: its batch is the global one
        while b > 0:  # the search's last fit can fail once fragmented by its out-of-memory try: halve
            try:
                row["tokens_per_s"] = _timed(run, b, steps, warmup)
                break
            except torch.cuda.OutOfMemoryError:
                run.optimizer.zero_grad(set_to_none=True)
                _free(device)
                b //= 2
        row["micro_batch"] = b
        if b and peak_tflops:
            row["mfu"] = row["tokens_per_s"] * flops_per_token(cfg.model, run.T) / (peak_tflops * 1e12)
        if b and device.type == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    except Exception as e:  # noqa: BLE001 -- one failing configuration must not end the table
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
    del run
    _free(device)
    return row


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["configs/hope_340m.yaml", "configs/transformer_340m.yaml"])
    ap.add_argument("--all", action="store_true", help="also the 760m and 1.3b presets")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ac", nargs="+", default=["none", "full"], choices=["none", "full", "every_n"])
    ap.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--kernels", nargs="+", default=["torch", "triton"], choices=["torch", "triton"])
    ap.add_argument("--max-micro-batch", type=int, default=64)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    ap.add_argument("--dry-run", action="store_true", help="tiny shape, few steps, on CPU (CI)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every preset")
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)

    presets = list(args.presets)
    if args.all:
        presets += [f"configs/{a}_{s}.yaml" for s in ("760m", "1.3b") for a in ("hope", "transformer")]
    keys = set(valid_keys())
    notes = []
    compiles = args.compile if "train.compile" in keys else ["off"]
    if "train.compile" not in keys and "on" in args.compile:
        notes.append("compile: no train.compile key in this checkout's config, compile rows skipped")
    has_kernel = "model.hope.kernel" in keys
    if not has_kernel:
        notes.append("kernel: no model.hope.kernel key in this checkout's config, HOPE runs its torch code only")

    if args.dry_run:
        device, bf16, steps, warmup, cap, tries = torch.device("cpu"), False, 2, 1, 2, 2
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_gpu.py needs a CUDA device; on a CPU run it with --dry-run")
        device, bf16, steps, warmup, cap, tries = (torch.device("cuda"), True, args.steps, args.warmup,
                                                   args.max_micro_batch, 64)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or (peak_bf16_tflops(device_name) if device.type == "cuda" else None)
    if device.type == "cuda" and peak is None:
        notes.append(f"MFU: {device_name!r} is not in PEAK_BF16_TFLOPS: pass --peak-tflops")

    print(f"`python benchmarks/bench_gpu.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ")
    print(f"{device_name}{f' (dense bf16 peak {peak:g} TFLOP/s)' if peak else ''}, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{'fp32 (dry run)' if not bf16 else 'bf16 autocast'}  ")
    for note in notes:
        print(f"note: {note}  ")
    print("\n| preset | params | T | AC | compile | kernel | largest micro-batch | tokens/s | MFU | peak memory GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for preset in presets:
        base = load_config(preset, [*args.set, *(TINY if args.dry_run else [])])
        kernels = args.kernels if has_kernel and base.model.arch == "hope" else ["torch"]
        for ac, comp, kernel in itertools.product(args.ac, compiles, kernels):
            overrides = [*args.set, *(TINY if args.dry_run else []), f"dist.activation_checkpointing={ac}"]
            if "train.compile" in keys:
                overrides.append(f"train.compile={comp == 'on'}")
            if has_kernel and base.model.arch == "hope":
                overrides.append(f"model.hope.kernel={kernel}")
            cfg = load_config(preset, overrides)
            row = measure(cfg, device, bf16, steps, warmup, cap, tries, peak)
            row.update(preset=Path(preset).stem, ac=ac, compile=comp, kernel=kernel, T=cfg.data.seq_len)
            rows.append(row)
            fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
            params = "n/a" if row["params"] is None else f"{row['params'] / 1e6:.1f}M"
            if row["error"]:
                print(f"| {row['preset']} | {params} | {row['T']} | {ac} | {comp} | {kernel} | "
                      f"failed: {row['error']} | | | |", flush=True)
                continue
            print(f"| {row['preset']} | {params} | {row['T']} | {ac} | {comp} | {kernel} | "
                  f"{row['micro_batch'] or 'none fits'} | {fmt(row['tokens_per_s'], ',.0f')} | "
                  f"{fmt(row['mfu'], '.1%')} | {fmt(row['peak_gb'], '.1f')} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
