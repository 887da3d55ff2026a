"""Several training runs in one process, or in one torchrun launch, one after another: tests that
need many short runs share one Python + torch start (and one process group) instead of paying it
per run (tests/test_distributed.py: train_runs).

    python tests/train_runs.py SPEC
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/train_runs.py SPEC

SPEC is JSON: a list of runs, each {"argv": [train.py arguments], "export": directory or null}.
Each run is `train.py`'s own main(argv) (its config, validation and trainer path); with "export",
rank 0 writes `nl.export`'s model directory of the run's latest checkpoint there once every run
has trained. The first failing run ends the process with its error (exit status non-zero).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch.distributed as dist  # noqa: E402

import train  # noqa: E402  (train.py at the repo root)
from nl.export import export  # noqa: E402


def main(spec: str) -> None:
    runs = json.loads(spec)
    for run in runs:
        train.main(run["argv"])
    if dist.is_initialized():  # export reads a checkpoint alone, as `python -m nl.export` does: with a
        dist.destroy_process_group()  # process group, DCP would load collectively, waiting on the other ranks
    if os.environ.get("RANK", "0") != "0":
        return
    for run in runs:  # after all training: a rank still training would wait on rank 0's export
        if run.get("export"):
            run_dir = [a for a in run["argv"] if a.startswith("run.dir=")][-1].split("=", 1)[1]  # last wins
            export(run_dir, run["export"])


if __name__ == "__main__":
    main(sys.argv[1])
