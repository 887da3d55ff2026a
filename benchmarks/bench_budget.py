"""HOPE's speed budget against an older tree (issue 11: "the chunked path may not get slower by more than 5%
at T=2048, same-process ratio to the Transformer++"): this tree's HOPE / Transformer++ speed over the base
tree's, each ratio measured within one process.

    python benchmarks/bench_budget.py --base /tmp/pre11 [--seq-len 2048] [--batch 4] [--rounds 6]
                                      [--flush-denormal] [--hope KEY=VALUE ...] [--mixer]

Make the base tree with `git worktree add --detach /tmp/pre11 4c0ec5e^` (the code before issue 11).
Two worker processes, one per tree, each importing its own tree's `nl` and building the bench_hope shape
(`hope_cfg`, `matched_transformer` of that tree's benchmarks/bench_hope.py) with that tree's defaults.
After a warm-up step of each model, the driver asks the workers in turn (which goes first alternates
round by round; the idle one waits on its pipe) for one training step of HOPE and one of the
Transformer++. Per round and tree: r = Transformer++ time / HOPE time in process CPU time (one thread:
the steadier clock where other jobs share the cores) and in wall time; the budget is this tree's r over
the base's, reported as the median over rounds with the range. >= 0.95 meets the issue's 5%. After each
(timed) step a worker returns its freed heap to the system (malloc_trim), so the idle one holds only its models.
--hope overrides apply to this tree's HOPE only (the base tree may not know the keys).

--mixer: the budget where it is spent, and steadier: one process imports each tree's `nl` in turn (the
modules of one are dropped before the other is imported; each model keeps its own tree's code), takes the
first HOPE mixer (SelfModifyingTitans) of each tree's bench_hope model, and times forward + backward of
the same input [batch, T, dim] alternately, --rounds times each, in process CPU time. Reports now / base
as the ratio of the minima (the least disturbed runs) and of the medians. The Transformer++ is not
needed there: both mixers run in one process under the same load.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def timed_step(model, opt, ids) -> tuple[float, float]:
    """One training step (next-token cross-entropy, backward, optimizer step) on ids [B, T + 1]: its
    (wall, process CPU) seconds."""
    import torch.nn.functional as F
    t0, c0 = time.perf_counter(), time.process_time()
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


def worker(tree: str, T: int, batch: int, flush_denormal: bool, hope: list[str]) -> None:
    """Serve steps over stdin/stdout: one line 'step' in, one JSON line {"hope": [wall, cpu], "tfm": [...]} out."""
    sys.path[:0] = [tree, str(Path(tree) / "benchmarks")]
    import torch
    import yaml
    from bench_hope import hope_cfg, matched_transformer  # the tree's own shape and defaults
    from nl.models import build_model, count_parameters
    assert Path(sys.modules["nl"].__file__).resolve().is_relative_to(Path(tree).resolve()), "imported the wrong nl"

    torch.set_flush_denormal(flush_denormal)
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in hope)}
    cfg = hope_cfg(**overrides)
    runs = {}
    for name, c in (("hope", cfg), ("tfm", matched_transformer(count_parameters(build_model(cfg, device="meta"))))):
        model = build_model(c, seed=0)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    ids = torch.randint(0, 4096, (batch, T + 1), generator=torch.Generator().manual_seed(0))

    def step() -> dict[str, tuple[float, float]]:
        times = {name: timed_step(model, opt, ids) for name, (model, opt) in runs.items()}
        # Untimed: hand the step's freed heap back to the system, so the worker that waits holds its models and
        # not the ~6 GB glibc keeps after a step at T=2048, batch 4 (two such workers were killed for memory on
        # our 24 GB VM). Trimming during the step instead (bench_hope --trim-heap) slowed it by ~40%.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return times

    step()  # warm-up
    print(json.dumps({"ready": True, "hope_cfg": str(cfg.hope)}), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            print(json.dumps(step()), flush=True)


def _load_tree(tree: str):
    """Import `tree`'s nl and bench_hope (dropping any other tree's first): (bench_hope, nl.models, nl.models.hope)."""
    import importlib
    for name in [m for m in sys.modules if m in ("nl", "bench_hope") or m.startswith("nl.")]:
        del sys.modules[name]
    sys.path[:0] = [tree, str(Path(tree) / "benchmarks")]
    try:
        modules = [importlib.import_module(m) for m in ("bench_hope", "nl.models", "nl.models.hope")]
    finally:
        del sys.path[:2]
    assert Path(modules[1].__file__).resolve().is_relative_to(Path(tree).resolve()), "imported the wrong nl"
    return modules


def mixer_ratio(trees: dict[str, str], T: int, batch: int, rounds: int, hope: list[str]) -> dict[str, list[float]]:
    """--mixer: per tree name, the CPU seconds of `rounds` forward + backward passes of its first HOPE mixer."""
    import torch
    import yaml
    torch.set_num_threads(1)
    mixers = {}
    for name, tree in trees.items():
        bench_hope, models, hope_mod = _load_tree(tree)
        overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in hope)} if name == "now" else {}
        cfg = bench_hope.hope_cfg(**overrides)
        model = models.build_model(cfg, seed=0)
        mixers[name] = next(m for m in model.modules() if isinstance(m, hope_mod.SelfModifyingTitans))
    x = torch.randn(batch, T, cfg.dim, generator=torch.Generator().manual_seed(0)).requires_grad_()

    def run(mixer) -> float:
        c0 = time.process_time()
        mixer(x).square().mean().backward()
        return time.process_time() - c0

    times = {name: [] for name in mixers}
    for m in mixers.values():
        run(m)  # warm-up
    for r in range(rounds):
        for name in (list(mixers) if r % 2 == 0 else list(reversed(mixers))):
            times[name].append(run(mixers[name]))
    return times


def _spawn(tree: str, args: argparse.Namespace, hope: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, str(HERE), "--worker", tree, "--seq-len", str(args.seq_len), "--batch", str(args.batch),
           *(["--flush-denormal"] if args.flush_denormal else []), "--hope", *hope]
    return subprocess.Popen(cmd, cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def _ask(p: subprocess.Popen, line: str | None = None) -> dict:
    if line is not None:
        p.stdin.write(line + "\n")
        p.stdin.flush()
    reply = p.stdout.readline()
    if not reply:
        raise RuntimeError(f"worker {p.args} exited with {p.wait()}")
    return json.loads(reply)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="the older tree (e.g. a git worktree of 4c0ec5e^)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--flush-denormal", action="store_true",
                    help="both trees flush subnormal floats (measures the arithmetic, not x86's subnormal penalty)")
    ap.add_argument("--hope", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of this tree's HOPE")
    ap.add_argument("--mixer", action="store_true", help="in one process, HOPE mixer forward + backward only")
    ap.add_argument("--worker", metavar="TREE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.seq_len, args.batch, args.flush_denormal, args.hope)
    if not args.base:
        ap.error("--base TREE is required (e.g. git worktree add --detach /tmp/pre11 4c0ec5e^)")

    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '1')}; date: {datetime.datetime.now().isoformat(timespec='minutes')}; "
          f"load average at start: {os.getloadavg()[0]:.1f}")
    trees = {"now": str(HERE.parents[1]), "base": str(Path(args.base).resolve())}
    if args.mixer:
        import torch
        torch.set_flush_denormal(args.flush_denormal)
        times = mixer_ratio(trees, args.seq_len, args.batch, args.rounds, args.hope)
        print("\n| T | batch | rounds | now min / median (s) | base min / median (s) | now / base (min) | now / base (median) |")
        print("|---|---|---|---|---|---|---|")
        now, base = times["now"], times["base"]
        print(f"| {args.seq_len} | {args.batch} | {args.rounds} | {min(now):.3f} / {statistics.median(now):.3f} | "
              f"{min(base):.3f} / {statistics.median(base):.3f} | {min(now) / min(base):.3f} | "
              f"{statistics.median(now) / statistics.median(base):.3f} |")
        return
    workers = {}
    for name, tree in trees.items():  # one at a time: the warm-ups do not overlap
        workers[name] = _spawn(tree, args, args.hope if name == "now" else [])
        print(f"{name} ({tree}): {_ask(workers[name])['hope_cfg']}", flush=True)
    ratios = {"now": [], "base": []}  # per round: (wall, CPU) Transformer++ time / HOPE time
    for r in range(args.rounds):
        for name in (("now", "base") if r % 2 == 0 else ("base", "now")):
            t = _ask(workers[name], "step")
            ratios[name].append(tuple(t["tfm"][j] / t["hope"][j] for j in range(2)))
            print(f"round {r} {name}: HOPE {t['hope'][1]:.2f} s CPU, Transformer++ {t['tfm'][1]:.2f} s CPU",
                  flush=True)
    for p in workers.values():
        p.stdin.close()
        p.wait()
    print(f"\n| clock | T | batch | rounds | now HOPE / Transformer++ | base HOPE / Transformer++ | now / base |")
    print("|---|---|---|---|---|---|---|")
    for j, clock in enumerate(("wall", "CPU")):
        cells = []
        for rs in (ratios["now"], ratios["base"], [n[j] / b[j] for n, b in zip(ratios["now"], ratios["base"])]):
            v = sorted(x[j] if isinstance(x, tuple) else x for x in rs)
            cells.append(f"{statistics.median(v):.3f} ({v[0]:.3f}..{v[-1]:.3f})")
        print(f"| {clock} | {args.seq_len} | {args.batch} | {args.rounds} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
