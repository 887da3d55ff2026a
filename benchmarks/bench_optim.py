"""Every optimizer of nl/optim on the tiny HOPE: training step time and optimizer-step time as
ratios to AdamW measured in the same process, validation loss after a fixed token budget on
the demo corpus, and optimizer-state bytes per parameter.

    python benchmarks/bench_optim.py [--steps 150] [--optimizers adamw,dmgd,...] [key=value ...]

Each optimizer trains with configs/hope_tiny.yaml + configs/optim/<name>.yaml + the overrides
(the same seed, data order and token budget), through the real train(). The optimizer-step
time is a separate measurement: the preset's model, `--step-repeats` calls of optimizer.step()
on fixed random gradients. State bytes count every tensor in optimizer.state (CMS accumulators
included) after those calls, per model parameter. Prints a markdown table.
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
from nl.data.shards import TokenShards  # noqa: E402
from nl.models import build_model, count_parameters  # noqa: E402
from nl.optim import OPTIMIZERS, build_optimizer  # noqa: E402
from nl.trainer import TrainingError, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def presets(name: str) -> list[str]:
    return [str(REPO / "configs/hope_tiny.yaml"), str(REPO / f"configs/optim/{name}.yaml")]


def optimizer_cost(name: str, overrides: list[str], repeats: int) -> tuple[float, float]:
    """(seconds per optimizer.step(), state bytes per parameter) on the preset's model."""
    cfg = load_config(presets(name), overrides)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = TokenShards(cfg.data.dir, split="train", verify_checksums=False).vocab_size
    model = build_model(cfg.model, device=torch.device("cpu"), seed=0)
    optimizer = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in model.parameters()]

    def one_step():
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        if name == "dgd":  # DGD reads layer inputs: one training forward feeds its statistics
            model(torch.randint(0, cfg.model.vocab_size, (2, 32), generator=gen))
        optimizer.step()

    with torch.no_grad():
        one_step()  # lazily created state
    start = time.perf_counter()
    for _ in range(repeats):
        one_step()
    seconds = (time.perf_counter() - start) / repeats
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t))
    return seconds, state_bytes / count_parameters(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--step-repeats", type=int, default=10)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    names = args.optimizers.split(",")
    if names[0] != "adamw":
        names = ["adamw"] + [n for n in names if n != "adamw"]  # the baseline of every ratio
    torch.set_num_threads(os.cpu_count() or 1)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            overrides = [f"train.steps={args.steps}", "train.log_every=10", f"eval.every={args.steps}",
                         "checkpoint.every=0", f"run.dir={tmp}/{name}", "checkpoint.resume=false", *args.overrides]
            cfg = load_config(presets(name), overrides)
            start = time.perf_counter()
            try:
                summary = train(cfg)
            except TrainingError as e:  # a diverged optimizer is a result too: say where it stopped
                rows[name] = {"diverged": str(e).split(";")[0]}
                print(json.dumps({name: rows[name]}), flush=True)
                continue
            wall = time.perf_counter() - start
            logs = [json.loads(line) for line in Path(f"{tmp}/{name}/metrics.jsonl").read_text().splitlines()]
            speeds = [r["tokens_per_s"] for r in logs if "tokens_per_s" in r][1:]  # first window: warm-up
            memory = [r["memory_loss"] for r in logs if "memory_loss" in r]
            step_s, bytes_per_param = optimizer_cost(name, [f"run.dir={tmp}/{name}", *args.overrides], args.step_repeats)
            rows[name] = {"val_loss": summary["val_loss"], "train_loss": summary["loss"], "wall": wall,
                          "step_time": cfg.train.batch_size * cfg.data.seq_len / (sum(speeds) / len(speeds)),
                          "opt_step": step_s, "bytes": bytes_per_param, "tokens": summary["tokens"],
                          "memory": (memory[0], memory[-1]) if memory else None}
            print(json.dumps({name: rows[name]}), flush=True)
    base = rows["adamw"]
    print(f"\nbench_optim: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{datetime.date.today()}, {args.steps} steps ({base['tokens']:,} tokens) of configs/hope_tiny.yaml, "
          f"load {os.getloadavg()[0]:.1f}, overrides {args.overrides}\n")
    print("| optimizer | train step time / AdamW | optimizer.step time / AdamW | val loss | train loss | state bytes/param |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "diverged" in r:
            print(f"| {name} | - | - | {r['diverged']} | - | - |")
            continue
        note = f" (memory loss {r['memory'][0]:.3f} -> {r['memory'][1]:.3f})" if r["memory"] else ""
        print(f"| {name} | {r['step_time'] / base['step_time']:.2f} | {r['opt_step'] / base['opt_step']:.2f} | "
              f"{r['val_loss']:.3f}{note} | {r['train_loss']:.3f} | {r['bytes']:.1f} |")


if __name__ == "__main__":
    main()
