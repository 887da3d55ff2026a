"""Step time of the in-context CMS with its segments recomputed in backward (the model's path,
nl.ops.cms.cms_chunked) against the stored chunk loop (nl.ops.cms.chunk_loop, the path before), and
against cms_mode=outer, in one process.

    python benchmarks/bench_cms_recompute.py [--preset configs/hope_tiny.yaml] [--batch 8] [--rounds 7]
                                             [--set model.hope.cms_chunk_sizes=[1,4,16] ...]

One training step = forward, next-token loss, backward (no optimizer: the step is the same for all
three) on random tokens at the preset's seq_len, fp32, one intra-op thread. The three variants run
interleaved, one step each per round after a warm-up round; each figure is the median over the rounds
of the process CPU time of a step (time.process_time: other jobs on the cores do not count), and the
ratios are taken against the stored loop. Prints a markdown table with the command, machine and date.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nl.models.hope as hope_model  # noqa: E402
from nl.config import load_config  # noqa: E402
from nl.models import build_model  # noqa: E402
from nl.ops.cms import chunk_loop  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="configs/hope_tiny.yaml")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    overrides = [f"model.vocab_size={args.vocab}", *args.set]
    variants = {  # name -> (cms_mode, patch of the chunk loop)
        "in_context, segments recomputed": ("in_context", None),
        "in_context, stored loop": ("in_context", chunk_loop),
        "outer": ("outer", None),
    }
    cfg = load_config(args.preset, overrides)
    T = cfg.data.seq_len
    ids = torch.randint(0, args.vocab, (args.batch, T + 1), generator=torch.Generator().manual_seed(0))
    models = {name: build_model(load_config(args.preset, [*overrides, f"model.hope.cms_mode={mode}"]).model, seed=0)
              for name, (mode, _) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds + 1):
        for name, (_, loop) in variants.items():
            patch = mock.patch.object(hope_model, "cms_chunked", loop) if loop else contextlib.nullcontext()
            model = models[name]
            model.zero_grad(set_to_none=True)
            with patch:
                t0 = time.process_time()
                logits = model(ids[:, :-1])
                F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
                dt = time.process_time() - t0
            if r:  # round 0 warms up
                times[name].append(dt)
    base = statistics.median(times["in_context, stored loop"])
    print(f"`python benchmarks/bench_cms_recompute.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ")
    print(f"{platform.node()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {Path(args.preset).stem}, "
          f"cms_chunk_sizes {list(cfg.model.hope.cms_chunk_sizes)} (in context: "
          f"{list(cfg.model.hope.cms_context_chunk_sizes) or 'the same'}), B={args.batch}, T={T}, fp32, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| variant | CPU s/step (fwd + bwd) | ratio to the stored loop |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {statistics.median(ts) / base:.3f} |")


if __name__ == "__main__":
    main()
