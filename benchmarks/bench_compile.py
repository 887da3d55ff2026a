"""train.compile on CPU: eager vs torch.compile (per block, HOPE's chunk body once) in training tokens/s,
measured in the same process, with the compile time and dynamo's graph counts.

    python benchmarks/bench_compile.py [--arch hope] [--seq-len 128] [--batch 8] [--steps 5] [--backend inductor]

Shape: the hope_tiny preset (dim 128, 4 blocks, 4 heads, MLP memories, chunk 16, 3-level CMS), vocab
8192, fp32, AdamW on random tokens. Step 1 of the compiled model pays the compile (reported on its
own); tokens/s is the best of --steps steps after it, for eager likewise after one warm-up step.
Graphs/ops: dynamo's counters after step 1 and after the last step (equal: nothing recompiled).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from nl.config import load_config  # noqa: E402
from nl.distributed import apply_compile  # noqa: E402
from nl.models import build_model  # noqa: E402

PRESETS = {"hope": "configs/hope_tiny.yaml", "transformer": "configs/tiny.yaml"}


def step_times(model: torch.nn.Module, x: torch.Tensor, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = model(x[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=sorted(PRESETS), default="hope")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--backend", default="inductor")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / PRESETS[args.arch], ["model.vocab_size=8192"]).model
    x = torch.randint(0, 8192, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.seq_len
    eager = step_times(build_model(cfg, seed=0), x, args.steps + 1)[1:]
    model = build_model(cfg, seed=0)
    apply_compile(model, backend=args.backend)
    times = step_times(model, x, 1)
    first = (counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"])
    times += step_times(model, x, args.steps)
    last = (counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"])
    print(f"`python benchmarks/bench_compile.py {' '.join(sys.argv[1:])}` | {platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__} | {datetime.date.today()}\n")
    print("| arch | T | batch | backend | eager tok/s | compiled tok/s | ratio | step 1 (compile) s | graphs/ops after step 1 | after the last |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    e, c = tokens / min(eager), tokens / min(times[1:])
    print(f"| {args.arch} | {args.seq_len} | {args.batch} | {args.backend} | {e:,.0f} | {c:,.0f} | {c / e:.2f} | "
          f"{times[0]:.0f} | {first[0]} / {first[1]} | {last[0]} / {last[1]} |")


if __name__ == "__main__":
    main()
