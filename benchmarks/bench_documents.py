"""Cost of data.document_boundaries=reset: training tokens/s with reset vs none, in one process.

    python benchmarks/bench_documents.py [--configs configs/hope_tiny.yaml configs/tiny.yaml]
                                         [--seq-len 512] [--batch 4] [--steps 6] [--rounds 2]

For each preset: one model (its weights), the same demo-corpus batches (data/demo/tokens, created by
data_prep/prepare_demo.py) and an AdamW step; forward + backward + step timed with reset and with
none, alternating in rounds (A B A B ...) so drift of a shared machine hits both. Prints a markdown
table: tokens/s of each mode, their ratio, and what reset pays for: documents per window, and the
padded batches the recurrent layers run on (documents grouped by length, nl.models.documents): their
number per forward and their tokens over the window's B * T.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nl.config import load_config  # noqa: E402
from nl.data.loader import TokenLoader  # noqa: E402
from nl.data.shards import TokenShards  # noqa: E402
from nl.models import build_model, count_parameters  # noqa: E402
from nl.models.documents import Documents, document_reset  # noqa: E402


def time_steps(model, optimizer, batches, eos_id: int | None) -> float:
    """Seconds for one training step per batch (forward, backward, AdamW) with the reset on (eos_id) or off."""
    document_reset(model, eos_id)
    start = time.perf_counter()
    for inputs, targets in batches:
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["configs/hope_tiny.yaml", "configs/tiny.yaml"])
    ap.add_argument("--data", default="data/demo/tokens")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode and round")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    shards = TokenShards(args.data, "train", verify_checksums=False)
    loader = TokenLoader(shards, args.seq_len, args.batch, seed=0)
    batches = [loader.next_batch() for _ in range(args.steps)]
    docs = [Documents.from_eos(x, shards.eos_id) for x, _ in batches]
    padded = sum(d.padded_tokens() for d in docs) / (len(docs) * args.batch * args.seq_len)
    per_window = sum(d.n_docs for d in docs) / (len(docs) * args.batch)
    groups = sum(len(d.groups) for d in docs) / len(docs)

    rows = []
    for path in args.configs:
        cfg = load_config(path, [f"model.vocab_size={shards.vocab_size}", f"data.seq_len={args.seq_len}"])
        model = build_model(cfg.model, seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        time_steps(model, optimizer, batches[:1], None)  # warm-up: allocator, first-call costs
        time_steps(model, optimizer, batches[:1], shards.eos_id)
        seconds = {"none": 0.0, "reset": 0.0}
        for _ in range(args.rounds):
            for mode, eos in (("none", None), ("reset", shards.eos_id)):
                seconds[mode] += time_steps(model, optimizer, batches, eos)
        tokens = args.rounds * len(batches) * args.batch * args.seq_len
        tps = {m: tokens / s for m, s in seconds.items()}
        rows.append((f"{cfg.model.arch} ({Path(path).name}, {count_parameters(model) / 1e6:.2f}M)", tps))

    print(f"\ncommand: python benchmarks/bench_documents.py --configs {' '.join(args.configs)} --seq-len "
          f"{args.seq_len} --batch {args.batch} --steps {args.steps} --rounds {args.rounds}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; date {datetime.date.today()}")
    print(f"data: {args.data}, {per_window:.2f} documents per window of {args.seq_len}; with reset the recurrent "
          f"layers run {groups:.1f} padded batches per forward, {padded:.2f}x the window tokens\n")
    print("| model | tokens/s none | tokens/s reset | reset / none |\n|---|---|---|---|")
    for name, tps in rows:
        print(f"| {name} | {tps['none']:,.0f} | {tps['reset']:,.0f} | {tps['reset'] / tps['none']:.2f} |")


if __name__ == "__main__":
    main()
