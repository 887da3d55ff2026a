"""HOPE speed on CPU: the chunked recurrence against its token-by-token reference, and HOPE against
a Transformer++ of equal parameter count in training tokens/s.

    python benchmarks/bench_hope.py [--seq-lens 512 2048 8192] [--batch 4] [--steps 2] [--skip-reference]
                                    [--hope momentum=true ...] [--interleave ROUNDS]

Shape (ENGINEERING.md section 5): dim 256, 4 blocks, 4 heads, vocab 4096, fp32, AdamW steps on
random tokens. HOPE: self-modifying Titans with MLP memories (hidden 128), DGD, HopeConfig's
defaults otherwise (inner momentum off; --hope momentum=true turns it on), chunk 64, 3-level CMS
of width 256; the Transformer++'s ffn_hidden is set so both count the same
parameters (within 1%). Batch is reduced at long T so that batch * T <= 8192. Timings are the
best of --steps steps after one warm-up step. Peak memory is the process's max RSS; with
--trim-heap glibc returns freed blocks (mallopt), so max RSS tracks live tensors (the chunk
loop frees many small buffers that glibc otherwise keeps), at some cost in speed.
Prints a markdown table with the command, machine and date. Against an older tree of the code (issue 11's
5% budget: HOPE / Transformer++ now over the same ratio then), see benchmarks/bench_budget.py.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # nl, bench_budget

import torch  # noqa: E402
import yaml  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nl.models.hope  # noqa: E402,F401
from nl.config import HopeConfig, ModelConfig  # noqa: E402
from nl.models import build_model, count_parameters  # noqa: E402
from nl.models.hope import SelfModifyingTitans  # noqa: E402
from bench_budget import timed_step  # noqa: E402


def _release_freed_memory() -> None:
    """glibc: serve large blocks with mmap and trim the heap, so max RSS tracks live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)      # M_TRIM_THRESHOLD
    except OSError:
        pass


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def hope_cfg(**hope) -> ModelConfig:
    hc = dict(cms_hidden=256, chunk_size=64, memory_chunk_size=64)
    hc.update(hope)
    return ModelConfig(arch="hope", vocab_size=4096, dim=256, n_layers=4, n_heads=4, hope=HopeConfig(**hc))


def matched_transformer(n_target: int) -> ModelConfig:
    best = None
    for hidden in range(64, 4096, 8):
        cfg = ModelConfig(arch="transformer", vocab_size=4096, dim=256, n_layers=4, n_heads=4, ffn_hidden=hidden)
        n = count_parameters(build_model(cfg, device="meta"))
        if best is None or abs(n - n_target) < abs(best[1] - n_target):
            best = (cfg, n)
    return best[0]


def train_tokens_per_s(cfg: ModelConfig, T: int, batch: int, steps: int) -> float:
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, T + 1), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(steps + 1):  # the first step is warm-up
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        best = min(best, time.perf_counter() - t0) if _ else best
    return batch * T / best


def alternating_step_seconds(cfgs: dict[str, ModelConfig], T: int, batch: int,
                             rounds: int) -> dict[str, list[tuple[float, float]]]:
    """One training step of each model in turn, `rounds` times after a warm-up round: per model, the
    (wall, CPU) seconds of each round's step. Alternating in one process makes ratios taken round by
    round immune to this VM's drift; the process's CPU time (one thread) is the steadier of the two
    where other jobs share the cores."""
    runs = {}
    for name, cfg in cfgs.items():
        model = build_model(cfg, seed=0)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    ids = torch.randint(0, 4096, (batch, T + 1), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in cfgs}
    for r in range(rounds + 1):
        for name, (model, opt) in runs.items():
            t = timed_step(model, opt, ids)
            if r:  # round 0 is warm-up
                times[name].append(t)
    return times


def median_ratio(num: list[float], den: list[float]) -> str:
    """Median of the round-by-round ratios num/den, with their range: '0.95 (0.93..0.97)'."""
    r = sorted(a / b for a, b in zip(num, den))
    return f"{statistics.median(r):.3f} ({r[0]:.3f}..{r[-1]:.3f})"


def interleaved_seconds_per_token(cfg: ModelConfig, seq_lens: list[int], rounds: int) -> dict[int, float]:
    """Batch 1, one model: a step at each T in turn, `rounds` times, after one warm-up step each; the
    best seconds per token at each T. Alternating in one process cancels this VM's drift between
    runs, which separate rows of the table above do not."""
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = {T: torch.randint(0, cfg.vocab_size, (1, T + 1), generator=gen) for T in seq_lens}
    best = {T: float("inf") for T in seq_lens}
    for r in range(rounds + 1):
        for T in seq_lens:
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(ids[T][:, :-1]).flatten(0, 1), ids[T][:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if r:  # round 0 is warm-up
                best[T] = min(best[T], (time.perf_counter() - t0) / T)
    return best


def layer_fwd_bwd_seconds(reference: bool, T: int, batch: int, overrides: dict) -> float:
    torch.manual_seed(0)
    layer = SelfModifyingTitans(hope_cfg(**overrides))
    layer.init_weights(0.02, 0.01)
    layer.reference = reference
    x = torch.randn(batch, T, 256, requires_grad=True)
    times = []
    for _ in range(1 if reference else 3):
        t0 = time.perf_counter()
        layer(x).square().mean().backward()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layer-T", type=int, default=2048)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--trim-heap", action="store_true")
    ap.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                    help="instead of the table: per-token cost at each --seq-lens, batch 1, steps at the "
                         "different T alternating in one process for ROUNDS rounds")
    ap.add_argument("--hope", nargs="*", default=[], metavar="KEY=VALUE",
                    help="HopeConfig overrides for the benchmarked HOPE, e.g. momentum=true memory_type=linear")
    ap.add_argument("--ab", nargs="*", default=None, metavar="KEY=VALUE",
                    help="instead of the table: HOPE (--hope) against HOPE with these further overrides and the "
                         "Transformer++, one step of each in turn for --steps rounds at each --seq-lens; median "
                         "ratios of wall and CPU time (e.g. --ab retention_target=zero normalized_step=false "
                         "normalize_v=false)")
    ap.add_argument("--flush-denormal", action="store_true",
                    help="torch.set_flush_denormal(True): subnormal floats (a memory decaying toward zero) "
                         "cost ~100x on x86; flushing them measures the arithmetic alone")
    args = ap.parse_args()
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.hope)}
    if args.trim_heap:
        _release_freed_memory()
    torch.manual_seed(0)

    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; date: {datetime.datetime.now().isoformat(timespec='minutes')}\n")

    if not args.skip_reference:
        chunked = layer_fwd_bwd_seconds(False, args.layer_T, 1, overrides)
        reference = layer_fwd_bwd_seconds(True, args.layer_T, 1, overrides)
        print(f"| HOPE layer fwd+bwd, T={args.layer_T}, batch 1 | chunked | token-by-token reference | speed-up |")
        print("|---|---|---|---|")
        print(f"| dim 256, 4 heads, MLP memories, chunk 64 | {chunked:.2f} s | {reference:.2f} s | "
              f"{reference / chunked:.1f}x |\n")

    hope = hope_cfg(**overrides)
    print(f"HOPE: {hope.hope}\n")
    n_hope = count_parameters(build_model(hope, device="meta"))
    tfm = matched_transformer(n_hope)
    n_tfm = count_parameters(build_model(tfm, device="meta"))
    if args.ab is not None:
        b_overrides = {**overrides, **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.ab)}}
        print("Speed ratios are medians of the round-by-round ratios (range in brackets); tokens/s from the "
              "median step time.\n")
        print(f"| T | batch | clock | HOPE A tokens/s | HOPE B ({' '.join(args.ab)}) tokens/s | Transformer++ tokens/s | "
              f"A / Transformer++ | B / Transformer++ | A / B |")
        print("|---|---|---|---|---|---|---|---|---|")
        for T in args.seq_lens:
            batch = max(1, min(args.batch, 8192 // T))
            times = alternating_step_seconds({"A": hope, "B": hope_cfg(**b_overrides), "T": tfm}, T, batch, args.steps)
            for j, clock in enumerate(("wall", "CPU")):
                sec = {n: [t[j] for t in ts] for n, ts in times.items()}
                tok = {n: batch * T / statistics.median(v) for n, v in sec.items()}
                print(f"| {T} | {batch} | {clock} | {tok['A']:.0f} | {tok['B']:.0f} | {tok['T']:.0f} | "
                      f"{median_ratio(sec['T'], sec['A'])} | {median_ratio(sec['T'], sec['B'])} | "
                      f"{median_ratio(sec['B'], sec['A'])} |", flush=True)
        return
    if args.interleave:
        costs = {name: interleaved_seconds_per_token(cfg, args.seq_lens, args.interleave)
                 for name, cfg in (("HOPE", hope), ("Transformer++", tfm))}
        T0 = args.seq_lens[0]
        print(f"| batch 1, best of {args.interleave} alternating rounds | "
              + " | ".join(f"T={T} tokens/s" for T in args.seq_lens)
              + " | " + " | ".join(f"cost/token T={T} vs {T0}" for T in args.seq_lens[1:]) + " |")
        print("|---" * (2 * len(args.seq_lens)) + "|")
        for name, cost in costs.items():
            print(f"| {name} | " + " | ".join(f"{1 / cost[T]:.0f}" for T in args.seq_lens)
                  + " | " + " | ".join(f"{cost[T] / cost[T0]:.2f}" for T in args.seq_lens[1:]) + " |", flush=True)
        return
    print(f"| T | batch | HOPE tokens/s ({n_hope / 1e6:.2f}M) | Transformer++ tokens/s ({n_tfm / 1e6:.2f}M, "
          f"ffn {tfm.ffn_hidden}) | HOPE / Transformer++ | peak RSS after |")
    print("|---|---|---|---|---|---|")
    for T in args.seq_lens:
        batch = max(1, min(args.batch, 8192 // T))
        h = train_tokens_per_s(hope, T, batch, args.steps)
        t = train_tokens_per_s(tfm, T, batch, args.steps)
        print(f"| {T} | {batch} | {h:.0f} | {t:.0f} | {h / t:.2f} | {peak_rss_gb():.2f} GB |", flush=True)


if __name__ == "__main__":
    main()
