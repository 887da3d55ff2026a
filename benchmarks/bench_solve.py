"""The DGD chunk solve (I + A) X = B, forward + backward: LAPACK's batched triangular solve (the
previous implementation), our explicit inverse by halves, and what nl.ops.delta_rule.
_solve_unit_lower dispatches to (the inverse from INVERSE_MIN_WORK matrices x columns), at the shapes of
benchmarks/bench_hope.py's HOPE (4 heads, chunk 64, MLP memories of hidden 128 on heads of 64,
4 generator memories sharing k), alone and inside that HOPE's whole training step.

    python benchmarks/bench_solve.py [--batch 4] [--repeats 10] [--model-T 2048] [--rounds 2]

Both run in the same process on the same inputs; a solve's time is the best of --repeats, and the
training step (--model-T > 0) alternates the two solves for --rounds rounds after a warm-up step
and keeps each one's best. Prints markdown tables with the command, machine and date.
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

from nl.models import build_model  # noqa: E402
from nl.ops import delta_rule  # noqa: E402
from nl.ops.delta_rule import _solve_unit_lower  # noqa: E402

C, HIDDEN, D = 64, 128, 64
# (which layer, A's shape, B's shape): A is broadcast over the generators where they share k.
CASES = [  # batch dims after the sequence batch
    ("generators, layer reading k (A shared by 4)", (4, 1, C, C), (4, 4, C, HIDDEN)),
    ("generators, layer reading h", (4, 4, C, C), (4, 4, C, D)),
    ("memory, layer reading k", (4, C, C), (4, C, HIDDEN)),
    ("memory, layer reading h", (4, C, C), (4, C, D)),
]


def lapack_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The previous implementation: one LAPACK solve, a shared A's generator dim folded into columns."""
    if A.dim() == 5 and A.shape[2] == 1:
        Bf = B.movedim(2, -2)                               # [b, h, C, G, O]
        X = torch.linalg.solve_triangular(A.squeeze(2), Bf.flatten(-2), upper=False, unitriangular=True)
        return X.unflatten(-1, Bf.shape[-2:]).movedim(-2, 2)
    return torch.linalg.solve_triangular(A, B, upper=False, unitriangular=True)


def inverse_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The explicit inverse whatever the size."""
    threshold, delta_rule.INVERSE_MIN_WORK = delta_rule.INVERSE_MIN_WORK, 0
    try:
        return _solve_unit_lower(A, B)
    finally:
        delta_rule.INVERSE_MIN_WORK = threshold


def best_ms(solve, A: torch.Tensor, B: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is warm-up
        t0 = time.perf_counter()
        X = solve(A, B)
        X.backward(torch.ones_like(X))
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times[1:])


def train_step_seconds(T: int, batch: int, rounds: int) -> dict[str, float]:
    """Best HOPE training step (bench_hope's model, AdamW) with each solve, alternating in one process."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_hope import hope_cfg

    model = build_model(hope_cfg(), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 4096, (batch, T + 1), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    step()  # warm-up
    best = {"lapack": float("inf"), "ours": float("inf")}
    try:
        for _ in range(rounds):
            for name, solve in (("lapack", lapack_solve), ("ours", _solve_unit_lower)):
                delta_rule._solve_unit_lower = solve
                best[name] = min(best[name], step())
    finally:
        delta_rule._solve_unit_lower = _solve_unit_lower
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--model-T", type=int, default=2048, help="0: the solves alone")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; date: {datetime.datetime.now().isoformat(timespec='minutes')}\n")
    print("| solve, fwd + bwd, fp32 | A | B | LAPACK trsm | explicit inverse | dispatched | speed-up of "
          "dispatched |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, a_shape, b_shape in CASES:
        a_shape, b_shape = (args.batch, *a_shape), (args.batch, *b_shape)
        A = (0.1 * torch.randn(*a_shape, generator=g)).tril(-1).requires_grad_()
        B = torch.randn(*b_shape, generator=g).requires_grad_()
        lapack = best_ms(lapack_solve, A, B, args.repeats)
        inverse = best_ms(inverse_solve, A, B, args.repeats)
        ours = best_ms(_solve_unit_lower, A, B, args.repeats)
        print(f"| {name} | {list(a_shape)} | {list(b_shape)} | {lapack:.2f} ms | {inverse:.2f} ms | "
              f"{ours:.2f} ms | {lapack / ours:.2f}x |", flush=True)
    if args.model_T:
        best = train_step_seconds(args.model_T, args.batch, args.rounds)
        tokens = args.batch * args.model_T
        print(f"\n| HOPE training step, T={args.model_T}, batch {args.batch} | LAPACK trsm | dispatched | "
              f"speed-up |\n|---|---|---|---|")
        print(f"| best of {args.rounds} (tokens/s) | {best['lapack']:.2f} s ({tokens / best['lapack']:.0f}) | "
              f"{best['ours']:.2f} s ({tokens / best['ours']:.0f}) | {best['lapack'] / best['ours']:.2f}x |")


if __name__ == "__main__":
    main()
