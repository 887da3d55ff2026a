"""Step time of each data-parallel strategy on N local processes, as a ratio to ddp.

    python benchmarks/bench_dist.py [--nproc 2] [--steps 30] [--strategies ddp fsdp zero1 zero2 zero3] [key=value ...]

Each strategy runs the real train.py under launch/torchrun.sh on the demo corpus
(data/demo/tokens) with the tiny preset; tokens/s is averaged over the logged windows after
the first (warm-up) one. On CPU the processes share the machine's cores (gloo).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRATEGY_ARGS = {
    "ddp": ["dist.strategy=ddp"],
    "fsdp": ["dist.strategy=fsdp"],
    "zero1": ["dist.strategy=deepspeed", "dist.zero_stage=1"],
    "zero2": ["dist.strategy=deepspeed", "dist.zero_stage=2"],
    "zero3": ["dist.strategy=deepspeed", "dist.zero_stage=3"],
}


def tokens_per_s(nproc: int, steps: int, log_every: int, extra: list[str], run_dir: Path) -> float:
    cmd = ["bash", "launch/torchrun.sh", str(nproc), "--config", "configs/tiny.yaml",
           f"train.steps={steps}", f"train.log_every={log_every}", "eval.every=0", "checkpoint.every=0",
           f"run.dir={run_dir}", *extra]
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_s"] for r in rows if "loss" in r][1:]
    return sum(timed) / len(timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGY_ARGS), choices=list(STRATEGY_ARGS))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if "ddp" not in args.strategies:
        args.strategies.insert(0, "ddp")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.strategies:
            results[name] = tokens_per_s(args.nproc, args.steps, args.log_every,
                                         STRATEGY_ARGS[name] + args.overrides, Path(tmp) / name)
            print(f"{name}: {results[name]:,.0f} tokens/s", file=sys.stderr)

    print(f"\ncommand: python benchmarks/bench_dist.py --nproc {args.nproc} --steps {args.steps} "
          f"--strategies {' '.join(args.strategies)} {' '.join(args.overrides)}".rstrip())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
          f"date {datetime.date.today()}; preset configs/tiny.yaml\n")
    print("| strategy | tokens/s | step time vs ddp |\n|---|---|---|")
    for name, tps in results.items():
        print(f"| {name} | {tps:,.0f} | {results['ddp'] / tps:.2f} |")


if __name__ == "__main__":
    main()
