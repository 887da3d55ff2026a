"""`make demo` trains the tiny HOPE and runs the whole pipeline: the Makefile's own recipe
(read with `make -n`) is executed at a reduced budget on the test corpus."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# The demo's budget, shrunk: a few steps of a short window, validation twice, a loss per step.
SMALL = ("train.steps=6 train.batch_size=2 train.micro_batch_size=0 train.warmup_steps=0 data.seq_len=32 "
         "eval.every=3 eval.max_batches=2 checkpoint.every=0 train.log_every=1 run.progress=false")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def recipe(target: str, **variables: str) -> list[str]:
    """The shell lines `make TARGET` would run (setup excluded), with VAR=value overrides."""
    args = ["make", "-s", "-n", "-o", "setup", target, *(f"{k}={v}" for k, v in variables.items())]
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip() and not line.startswith("echo ")]


def demo_data(root: Path, small_corpus: Path, token_dir: Path) -> Path:
    """The layout prepare_demo.py writes (corpus, tokenizer, tokens), from the test corpus, so its
    every step is skipped as already done."""
    data = root / "data"
    data.mkdir()
    shutil.copy(small_corpus, data / "corpus.jsonl")
    shutil.copy(token_dir / "tokenizer.model", data / "tokenizer.model")
    (data / "tokens").symlink_to(token_dir)
    return data


def test_make_demo_trains_hope_then_exports_evaluates_samples_and_plots(tmp_path, small_corpus, token_dir):
    data = demo_data(tmp_path, small_corpus, token_dir)
    lines = recipe("demo", PY=sys.executable, DATA=str(data), RUNS=str(tmp_path / "runs"),
                   EXPORTS=str(tmp_path / "exports"), DEMO_ARGS=SMALL, EVAL_ARGS="--max-batches 2")
    steps = ["prepare_demo.py", "train.py", "nl.export", "nl.evaluate", "nl.generate", "nl.plot"]
    assert [next(s for s in steps if s in line) for line in lines] == steps  # the pipeline, in order
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 threads on a shared 2-core machine crawl
    outputs = []
    for line in lines:
        proc = subprocess.run(line, shell=True, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
        outputs.append(proc.stdout)

    run, export = tmp_path / "runs" / "demo_hope_tiny", tmp_path / "exports" / "demo_hope_tiny"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["arch"] == "hope"  # the demo trains HOPE, not the Transformer++
    assert config["model"]["hope"]["mixer"] == "self_modifying"
    assert json.loads((export / "config.json").read_text())["model"]["arch"] == "hope"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]  # it trained, and learned something
    assert sum("val_loss" in r for r in records) >= 2

    evaluation = json.loads(outputs[3].strip().splitlines()[-1])
    assert 0 < evaluation["val_loss"] < math.log(1024) + 1  # a real loss of the 1,024-token vocabulary
    sample = outputs[4].strip()
    assert sample.startswith("The history of") and len(sample) > len("The history of")
    png = run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transformer_demo_is_one_override_away():
    lines = recipe("demo", PY="python", CONFIG="configs/tiny.yaml")
    train = next(line for line in lines if "train.py" in line)
    assert "--config configs/tiny.yaml --config configs/demo.yaml" in train
    assert "run.dir=runs/demo_tiny" in train


def test_demo_compare_trains_both_on_the_same_budget_and_plots_them_together():
    lines = recipe("demo-compare", PY="python", DEMO_ARGS="train.steps=7")
    trains = [shlex.split(line) for line in lines if "train.py" in line]
    assert [t[t.index("--config") + 1] for t in trains] == ["configs/hope_tiny.yaml", "configs/tiny.yaml"]
    # the same budget layer and overrides for both (same tokens in the same order); only the run dir differs
    rest = [[a for a in t[t.index("--config") + 2:] if not a.startswith("run.dir=")] for t in trains]
    assert rest[0] == rest[1] and "configs/demo.yaml" in rest[0] and "train.steps=7" in rest[0]
    plot = shlex.split(next(line for line in lines if "nl.plot" in line))
    assert plot[plot.index("nl.plot") + 1:][:2] == ["runs/demo_hope_tiny", "runs/demo_tiny"]
    assert "--output" in plot and "--table" in plot
