"""DMGD's internal objective on the tiny HOPE: which (key, value) pair should the memory learn?

    python benchmarks/bench_dmgd.py [--steps 200] [--seeds 0,1] [--variants next,copy,...] [key=value ...]

Each variant trains configs/hope_tiny.yaml + configs/optim/dmgd.yaml + the overrides through the
real train() (same seed, data order and token budget); only the memory's objective differs:
  next    the optimizer's objective: key [P u_{i-1}, mbar_{i-1}], value P u_i (predict the next gradient)
  copy    the objective before issue 12: key [P u_i, mbar_i], value P u_i (the value is one of the inputs)
  mbar    key [0, mbar_{i-1}] (P u left out of the key), value P u_i
  frozen  memory_lr = 0: the initial memory, an EMA momentum of P u, never trained (the control)
  dot     the optimizer's dot objective (-<m(key), P u_i>, memory_decay 0.01)
Every variant reads the memory on the current features [P u_i, mbar_i]. Prints, per variant and
seed, the train loss (mean of the last 3 logged), the val loss, the memory's internal loss (first
and last logged) and its linear read-out w (weights on P u and on mbar, mean over param groups),
then a markdown table of the means over seeds.
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

import nl.trainer  # noqa: E402
from nl.config import load_config  # noqa: E402
from nl.optim import DMGD, build_optimizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class CopyKey(DMGD):
    """The objective before issue 12: P u_i regressed from features that contain it."""

    def memory_pair(self, state, pu):
        a = self.param_groups[0]["momentum"]  # every group has the same a here
        mbar = a * state["momentum"] + (1 - a) * pu
        return self.features(pu, mbar), pu.reshape(-1).float()


class MbarKey(DMGD):
    """P u_i regressed from the previous EMA alone (the P u channel of the key is zero)."""

    def memory_pair(self, state, pu):
        key, value = super().memory_pair(state, pu)
        key[:, 0] = 0
        return key, value


VARIANTS = {  # name -> (class, group overrides)
    "next": (DMGD, {}),
    "copy": (CopyKey, {}),
    "mbar": (MbarKey, {}),
    "frozen": (DMGD, {"memory_lr": 0.0}),
    "dot": (DMGD, {"internal_loss": "dot", "memory_decay": 0.01}),
}


def run(variant: str, seed: int, steps: int, overrides: list[str], tmp: str) -> dict:
    cls, group_overrides = VARIANTS[variant]
    built = []

    def build(model, cfg):  # the trainer's grouping and hyper-parameters, this variant's objective
        groups = [{**g, **group_overrides} for g in build_optimizer(model, cfg).param_groups]
        built.append(cls(groups, seed=cfg.train.seed))
        return built[-1]

    run_dir = f"{tmp}/{variant}_{seed}"
    cfg = load_config([str(REPO / "configs/hope_tiny.yaml"), str(REPO / "configs/optim/dmgd.yaml")],
                      [f"train.steps={steps}", f"train.seed={seed}", "train.log_every=10", f"eval.every={steps}",
                       "checkpoint.every=0", f"run.dir={run_dir}", "checkpoint.resume=false", *overrides])
    nl.trainer.build_optimizer, original = build, nl.trainer.build_optimizer
    start = time.perf_counter()
    try:
        summary = nl.trainer.train(cfg)
    finally:
        nl.trainer.build_optimizer = original
    wall = time.perf_counter() - start
    logs = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    memory = [r["memory_loss"] for r in logs if "memory_loss" in r]
    opt = built[-1]
    readouts = torch.stack([opt.state[g["params"][0]]["memory"][:2] for g in opt.param_groups]).mean(0)
    return {"variant": variant, "seed": seed, "train_loss": sum(losses[-3:]) / len(losses[-3:]), "val_loss": summary["val_loss"],
            "memory_first": memory[0], "memory_last": memory[-1], "w": readouts.tolist(), "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))  # 1 on a shared CPU
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                rows.append(run(variant, seed, args.steps, args.overrides, tmp))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nbench_dmgd: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{datetime.date.today()}, {args.steps} steps of configs/hope_tiny.yaml + configs/optim/dmgd.yaml, "
          f"seeds {args.seeds}, load {os.getloadavg()[0]:.1f}, overrides {args.overrides}\n")
    print("| variant | train loss (per seed) | val loss (per seed) | mean val | memory loss first -> last | w (P u, mbar) |")
    print("|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        rs = [r for r in rows if r["variant"] == variant]
        mean = sum(r["val_loss"] for r in rs) / len(rs)
        train_losses = " / ".join(f"{r['train_loss']:.3f}" for r in rs)
        val_losses = " / ".join(f"{r['val_loss']:.3f}" for r in rs)
        memory = " / ".join(f"{r['memory_first']:.3f} -> {r['memory_last']:.4f}" for r in rs)
        readout = " / ".join(f"({r['w'][0]:.2f}, {r['w'][1]:.2f})" for r in rs)
        print(f"| {variant} | {train_losses} | {val_losses} | {mean:.3f} | {memory} | {readout} |")

if __name__ == "__main__":
    main()
