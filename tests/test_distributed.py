"""2 CPU ranks on gloo under torchrun: ddp and fsdp equal single-process training, sharded
checkpoints resume exactly and reshard 2 -> 1 and 1 -> 2, activation checkpointing changes
nothing, and SIGTERM makes every rank save and exit cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from nl.checkpoint import list_checkpoints

STEPS = 10


def overrides(token_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["model.dim=32", "model.n_layers=2", "model.n_heads=2", f"data.dir={token_dir}",
            "data.seq_len=32", f"train.steps={STEPS}", "train.batch_size=8", "train.micro_batch_size=2",
            "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=1", "eval.every=5",
            "eval.max_batches=2", "checkpoint.every=5", "checkpoint.keep_last=3",
            "dist.timeout_s=60", f"run.dir={run_dir}", *extra]


def command(nproc: int, token_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    base = [sys.executable]
    if nproc > 1:
        base += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return base + ["train.py", "--config", "configs/tiny.yaml", *overrides(token_dir, run_dir, *extra)]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(nproc: int, token_dir: Path, run_dir: Path, *extra: str) -> tuple[list[float], list[float]]:
    proc = subprocess.run(command(nproc, token_dir, run_dir, *extra), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metrics(run_dir)


def metrics(run_dir: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.fixture(scope="module")
def single_run(token_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    launch(1, token_dir, run)
    return run


@pytest.fixture(scope="module")
def fsdp_run(token_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fsdp") / "run"
    launch(2, token_dir, run, "dist.strategy=fsdp")
    return run


def test_ddp_and_fsdp_on_two_ranks_equal_single_process(token_dir, tmp_path, single_run, fsdp_run):
    single, single_val = metrics(single_run)
    assert len(single) == STEPS
    fsdp, fsdp_val = metrics(fsdp_run)
    np.testing.assert_allclose(fsdp, single, rtol=1e-5)
    np.testing.assert_allclose(fsdp_val, single_val, rtol=1e-5)
    ddp, _ = launch(2, token_dir, tmp_path / "ddp", "dist.strategy=ddp", "train.micro_batch_size=4")
    np.testing.assert_allclose(ddp, single, rtol=1e-5)  # also a different micro-batch split


def test_fsdp_resume_at_same_world_size_is_bit_exact(token_dir, tmp_path, fsdp_run):
    full, _ = metrics(fsdp_run)
    run = tmp_path / "run"
    shutil.copytree(fsdp_run, run)
    shutil.rmtree(dict(list_checkpoints(run))[10])
    (run / "metrics.jsonl").write_text("")
    resumed, _ = launch(2, token_dir, run, "dist.strategy=fsdp")
    assert resumed == full[5:]


def test_fsdp_checkpoint_reshards_2_to_1_and_1_to_2(token_dir, tmp_path, single_run, fsdp_run):
    full_fsdp, _ = metrics(fsdp_run)
    run = tmp_path / "two_to_one"
    shutil.copytree(fsdp_run, run)
    shutil.rmtree(dict(list_checkpoints(run))[10])
    (run / "metrics.jsonl").write_text("")
    resumed, _ = launch(1, token_dir, run)  # same data stream, now in one process
    np.testing.assert_allclose(resumed, full_fsdp[5:], rtol=1e-5)

    full_single, _ = metrics(single_run)
    run = tmp_path / "one_to_two"
    shutil.copytree(single_run, run)
    shutil.rmtree(dict(list_checkpoints(run))[10])
    (run / "metrics.jsonl").write_text("")
    resumed, _ = launch(2, token_dir, run, "dist.strategy=fsdp")
    np.testing.assert_allclose(resumed, full_single[5:], rtol=1e-5)


def test_activation_checkpointing_keeps_the_loss_sequence(token_dir, tmp_path, single_run):
    from nl.config import load_config
    from nl.trainer import train

    reference, _ = metrics(single_run)
    for mode in ("full", "every_n"):
        run = tmp_path / mode
        train(load_config("configs/tiny.yaml", overrides(token_dir, run, f"dist.activation_checkpointing={mode}")))
        np.testing.assert_allclose(metrics(run)[0], reference, rtol=1e-6)


def test_sigterm_saves_on_every_rank_and_rerun_resumes(token_dir, tmp_path):
    run = tmp_path / "run"
    cmd = command(2, token_dir, run, "dist.strategy=fsdp", "train.steps=2000", "checkpoint.every=0",
                  "eval.every=0")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training is under way
        if (run / "metrics.jsonl").exists() and len(metrics(run)[0]) >= 3:
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("training did not start in time")
    os.killpg(proc.pid, signal.SIGTERM)  # as slurm or a scheduler would: the whole process group
    out, _ = proc.communicate(timeout=90)
    ckpts = list_checkpoints(run)
    assert len(ckpts) == 1, out[-3000:]
    stopped_at = ckpts[0][0]
    assert 3 <= stopped_at < 2000 and "stop signal received" in out
    (run / "metrics.jsonl").write_text("")
    subprocess.run(cmd[:-3] + [f"train.steps={stopped_at + 2}", "checkpoint.every=0", "eval.every=0"], cwd=REPO, env=env(), check=True, capture_output=True,
                   timeout=300)
    assert len(metrics(run)[0]) == 2  # resumed at the saved step and ran the remaining two
