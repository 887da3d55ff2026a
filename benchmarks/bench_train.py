"""Training throughput of a preset, and the loader's speed as a multiple of what training consumes.

    python benchmarks/bench_train.py [--config configs/tiny.yaml] [--steps 60] [key=value ...]

Runs the real train() for --steps steps (first --warmup-steps excluded from timing) on the
demo corpus (data/demo/tokens; created by data_prep/prepare_demo.py), then times
TokenLoader.next_batch() for the same batch shape. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nl.config import load_config  # noqa: E402
from nl.data.loader import TokenLoader  # noqa: E402
from nl.data.shards import TokenShards  # noqa: E402
from nl.trainer import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--loader-batches", type=int, default=200)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [f"train.steps={args.steps}", f"train.log_every={args.warmup_steps}",
                                        "eval.every=0", "checkpoint.every=0", f"run.dir={tmp}/run",
                                        *args.overrides])
        summary = train(cfg)
        rows = [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl")]
    timed = [r for r in rows if r["step"] > args.warmup_steps]
    train_tps = sum(r["tokens_per_s"] for r in timed) / len(timed)

    shards = TokenShards(cfg.data.dir, "train", verify_checksums=False)
    loader = TokenLoader(shards, cfg.data.seq_len, cfg.train.batch_size, seed=0)
    loader.next_batch()
    start = time.perf_counter()
    for _ in range(args.loader_batches):
        loader.next_batch()
    loader_tps = args.loader_batches * cfg.train.batch_size * cfg.data.seq_len / (time.perf_counter() - start)

    print(f"\ncommand: python benchmarks/bench_train.py --config {args.config} --steps {args.steps} "
          f"{' '.join(args.overrides)}".rstrip())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; date {datetime.date.today()}")
    print(f"model: {cfg.model.arch} {summary['parameters'] / 1e6:.2f}M params, seq_len {cfg.data.seq_len}, "
          f"batch {cfg.train.batch_size} (micro {cfg.train.micro_batch_size or cfg.train.batch_size})\n")
    print("| measure | value |\n|---|---|")
    print(f"| training tokens/s (steps {args.warmup_steps + 1}-{args.steps}) | {train_tps:,.0f} |")
    print(f"| loader tokens/s (next_batch) | {loader_tps:,.0f} |")
    print(f"| loader / training consumption | {loader_tps / train_tps:,.0f}x |")


if __name__ == "__main__":
    main()
