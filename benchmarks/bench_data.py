"""Data pipeline throughput: tokenize_corpus (MB/s per core) and TokenLoader.next_batch (tokens/s).

    python benchmarks/bench_data.py [--root data/demo] [--loader-batches 2000]

Prepares the demo data under --root first if needed (data_prep/prepare_demo.py). Tokenization is
timed end to end (read jsonl, encode, write shards + checksums) with 1 and 2 workers, best of
--repeats; MB/s per core = MB of UTF-8 text / seconds / workers. The loader is timed over the
demo train tokens at seq_len 256, batch 16. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.prepare_demo import prepare_demo  # noqa: E402
from data_prep.tokenize_corpus import tokenize_corpus  # noqa: E402
from nl.data.loader import TokenLoader  # noqa: E402
from nl.data.shards import TokenShards  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/demo")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--loader-batches", type=int, default=2000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    root = Path(args.root)
    tokens = prepare_demo(root)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            best = float("inf")
            for i in range(args.repeats):
                m = tokenize_corpus([str(root / "corpus.jsonl")], root / "tokenizer.model",
                                    Path(tmp) / f"{workers}_{i}", val_fraction=0.02, num_workers=workers,
                                    progress=False)
                best = min(best, m["seconds"])
            mb = m["text_bytes"] / 1e6
            rows.append((f"tokenize_corpus, {workers} worker{'s' if workers > 1 else ''}",
                         f"{mb / best / workers:.2f} MB/s per core",
                         f"{mb:.2f} MB in {best:.2f} s ({mb / best:.2f} MB/s total)"))

    shards = TokenShards(tokens, "train", verify_checksums=False)
    loader = TokenLoader(shards, args.seq_len, args.batch_size, seed=0)
    loader.next_batch()  # builds the epoch permutation
    start = time.perf_counter()
    for _ in range(args.loader_batches):
        loader.next_batch()
    seconds = time.perf_counter() - start
    n_tokens = args.loader_batches * args.batch_size * args.seq_len
    rows.append((f"TokenLoader.next_batch, seq_len {args.seq_len}, batch {args.batch_size}",
                 f"{n_tokens / seconds / 1e6:.1f}M tokens/s",
                 f"{args.loader_batches} batches in {seconds:.3f} s "
                 f"({seconds / args.loader_batches * 1e6:.0f} us/batch)"))

    print(f"\ncommand: python benchmarks/bench_data.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f} (other processes share these cores)")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"data: {root / 'corpus.jsonl'} -> {tokens} ({shards.num_tokens} train tokens, vocab {shards.vocab_size})\n")
    print("| what | throughput | detail |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
