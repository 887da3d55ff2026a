"""Kernel launches per HOPE layer per forward + backward, model.hope.kernel=torch vs triton (issue 14 item 3).

    python benchmarks/bench_launches.py [--preset configs/hope_340m.yaml] [--seq-len 4096] [--batch 1]
        [--kernels torch triton] [--set model.hope.momentum=false ...]

One sequence mixer (SelfModifyingTitans, the part whose chunk loop runs in sequence) and the whole block
(+ its norm and CMS) at the preset's width run forward and backward on FakeTensorMode (shapes only, no
arithmetic: seconds at T=4096 on a CPU), under a TorchDispatchMode that counts
  - aten ops that launch a kernel on a GPU (views, aliases, empty allocations and prim:: metadata queries
    excluded: no launch; the same count as on real tensors);
  - Triton kernel calls: one per nl::dgd_chunk (the fused chunk step) and per nl::dgd_chunk_backward.
On CUDA each counted op is one launch (a handful of aten ops launch two; cuBLAS picks
one kernel per bmm), so this is the host-side launch count that bounds a small-chunk recurrence's speed.
No kernel runs, so the Triton kernels need neither a GPU nor the interpreter here (TRITON_INTERPRET=1
is set only so that kernel=triton passes the model's device check). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no kernel is executed here (fake tensors): see the docstring
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from nl.config import load_config  # noqa: E402
from nl.models.hope import HopeBlock  # noqa: E402

# aten ops that return a view or only allocate: no kernel launch on a GPU.
NO_LAUNCH = {torch.ops.aten.detach.default, torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default,
             torch.ops.aten.empty_strided.default, torch.ops.aten.lift_fresh.default,
             torch.ops.aten._unsafe_view.default}


class LaunchCounter(TorchDispatchMode):
    """Counts launching aten ops (by op) and Triton kernel calls while it is on."""

    def __init__(self) -> None:
        super().__init__()
        self.aten: collections.Counter = collections.Counter()
        self.triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name  # e.g. aten::mm, nl::dgd_chunk
        if name in ("nl::dgd_chunk", "nl::dgd_chunk_backward"):  # one Triton kernel each
            self.triton += 1
            return func(*args, **kwargs)
        if name.startswith("aten::") and not (func.is_view or func in NO_LAUNCH):  # prim::device etc.: metadata
            self.aten[name] += 1
        return func(*args, **kwargs)

    def total(self) -> int:
        return sum(self.aten.values()) + self.triton


def count(cfg, T: int, B: int, whole_block: bool) -> dict[str, int]:
    """Launches of one forward and one backward of a HOPE mixer (or block) on [B, T, dim] fake inputs."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.manual_seed(0)
        block = HopeBlock(cfg)
        block.init_weights(0.02, 0.02)
        x = torch.empty(B, T, cfg.dim).normal_().requires_grad_()  # a fake tensor (made inside the mode)
        module = block if whole_block else block.mixer
        fwd, bwd = LaunchCounter(), LaunchCounter()
        with fwd:
            out = module(x)
            loss = out.float().square().mean()
        with bwd:
            loss.backward()
    return {"fwd_aten": sum(fwd.aten.values()), "fwd_triton": fwd.triton, "bwd_aten": sum(bwd.aten.values()),
            "bwd_triton": bwd.triton, "total": fwd.total() + bwd.total()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="configs/hope_340m.yaml")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kernels", nargs="+", default=["torch", "triton"], choices=["torch", "triton"])
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    args = ap.parse_args()
    print(f"`python benchmarks/bench_launches.py --preset {args.preset} --seq-len {args.seq_len} --batch "
          f"{args.batch}{' --set ' + ' '.join(args.set) if args.set else ''}` ({platform.node()}, torch "
          f"{torch.__version__}, {datetime.date.today()}; FakeTensorMode, counts exact)\n")
    print("| kernel | part | fwd aten | fwd triton | bwd aten | bwd triton | total | per chunk |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for kernel in args.kernels:
        cfg = load_config(args.preset, [f"model.hope.kernel={kernel}", *args.set]).model
        chunks = -(-args.seq_len // int(cfg.hope.memory_chunk_size))
        for whole in (False, True):
            c = count(cfg, args.seq_len, args.batch, whole)
            print(f"| {kernel} | {'block' if whole else 'mixer'} | {c['fwd_aten']:,} | {c['fwd_triton']:,} | "
                  f"{c['bwd_aten']:,} | {c['bwd_triton']:,} | {c['total']:,} | {c['total'] / chunks:,.0f} |")


if __name__ == "__main__":
    main()
