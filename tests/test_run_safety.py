"""Run safety (issue 12): a run directory belongs to one run, resume compares configs, older
checkpoints after a divergence, one metrics record per step, clean interrupts with documented
exit codes, rank-0 output, the progress-bar switch, and model diagnostics in the metrics."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from nl.checkpoint import CheckpointError, list_checkpoints, save_checkpoint
from test_train import nan_loss_from_step_13, read_metrics, small_cfg
from nl.trainer import StopSignal, TrainingError, train


def steps_of(rows: list[dict]) -> list[int]:
    return [r["step"] for r in rows]


# ---- a run directory belongs to one run ------------------------------------------------------

def test_fresh_start_over_an_existing_run_is_refused_unless_overwrite(token_dir, tmp_path):
    run = tmp_path / "run"
    train(small_cfg(token_dir, run, "eval.every=0"))  # checkpoints at 10 and 20
    with pytest.raises(CheckpointError, match=r"holds a run up to step 20.*checkpoint\.overwrite=true"):
        train(small_cfg(token_dir, run, "train.steps=10", "checkpoint.resume=false", "eval.every=0"))
    assert [s for s, _ in list_checkpoints(run)] == [10, 20]  # the refusal touched nothing
    with pytest.raises(CheckpointError, match=r"overwrite=true .*checkpoint\.resume=false"):
        train(small_cfg(token_dir, run, "checkpoint.overwrite=true", "eval.every=0"))  # ambiguous: refused
    summary = train(small_cfg(token_dir, run, "train.steps=10", "checkpoint.resume=false",
                              "checkpoint.overwrite=true", "eval.every=0"))
    assert [s for s, _ in list_checkpoints(run)] == [10]  # the new run's own, not pruned for the old 20
    assert summary["checkpoint"] == str(run / "checkpoints" / "step_00000010")
    assert steps_of(read_metrics(run)[0]) == list(range(1, 11))  # the old run's records are gone


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    state = {"w": torch.zeros(2)}
    for step in (30, 40):
        save_checkpoint(tmp_path, step, state, "x: 1\n", keep_last=2)
    save_checkpoint(tmp_path, 10, state, "x: 1\n", keep_last=2)  # a step below existing ones
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 30, 40]
    save_checkpoint(tmp_path, 50, state, "x: 1\n", keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [40, 50]


# ---- resume compares configs -----------------------------------------------------------------

@pytest.mark.parametrize("arch,change,key", [
    ("transformer", "model.tie_embeddings=true", "model.tie_embeddings False -> True"),
    ("transformer", "optim.name=momentum", "optim.name adamw -> momentum"),
    ("hope", "model.hope.chunk_size=4", "model.hope.chunk_size 8 -> 4"),
    ("hope", "model.hope.retention=false", "model.hope.retention True -> False"),
])
def test_resume_refuses_state_shaping_changes_in_one_line(token_dir, tmp_path, arch, change, key):
    run = tmp_path / "run"
    hope = ("model.hope.chunk_size=8", "model.hope.memory_chunk_size=8")
    train(small_cfg(token_dir, run, "train.steps=2", "eval.every=0", *hope, arch=arch))
    with pytest.raises(CheckpointError) as err:
        train(small_cfg(token_dir, run, "train.steps=4", "eval.every=0", *hope, change, arch=arch))
    message = str(err.value)
    assert key in message and "checkpoint.overwrite=true" in message and "\n" not in message, message
    assert [s for s, _ in list_checkpoints(run)] == [2]


def test_resume_announces_allowed_changes_and_recomputes_the_schedule(token_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(small_cfg(token_dir, run, "train.steps=10", "eval.every=0"))
    capsys.readouterr()
    train(small_cfg(token_dir, run, "train.steps=20", "eval.every=0", "train.log_every=5"))
    out = capsys.readouterr().out
    assert "resume: train.steps changed 10 -> 20 since the checkpoint" in out
    assert "resume: train.log_every changed 1 -> 5 since the checkpoint" in out
    assert "lr schedule is recomputed" in out
    # cosine over the new 20 steps (warmup 2, min ratio 0.1), from the definition
    lr_step_11 = 3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (10 - 2) / (20 - 2))))
    rows = {r["step"]: r for r in read_metrics(run)[0]}
    assert rows[15]["lr"] == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 12 / 18))))
    assert f"{lr_step_11:.3e}" in out


# ---- divergence recovery ---------------------------------------------------------------------

def test_load_step_resumes_from_an_older_checkpoint(token_dir, tmp_path):
    run = tmp_path / "run"
    args = ("checkpoint.every=5", "checkpoint.keep_last=4", "eval.every=0")
    train(small_cfg(token_dir, run, *args))
    first = read_metrics(run)[0]
    train(small_cfg(token_dir, run, *args, "checkpoint.load_step=10"))
    again = read_metrics(run)[0]
    assert steps_of(again) == list(range(1, 21))  # steps 11-20 re-done, recorded once
    assert [r["loss"] for r in again] == [r["loss"] for r in first]  # resumed exactly at step 10
    assert sorted(p.name for p in (run / "checkpoints_abandoned").iterdir()) == ["step_00000015", "step_00000020"]
    assert [s for s, _ in list_checkpoints(run)] == [5, 10, 15, 20]
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 7.*available steps: 5, 10, 15, 20"):
        train(small_cfg(token_dir, run, *args, "checkpoint.load_step=7"))


def test_divergence_error_names_the_checkpoints_and_load_step(token_dir, tmp_path, monkeypatch):
    nan_loss_from_step_13(monkeypatch)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 13.*Checkpoints kept: steps 5, 10;.*"
                                            r"may already carry the divergence.*checkpoint\.load_step=5"):
        train(small_cfg(token_dir, tmp_path / "run", "checkpoint.every=5", "eval.every=0"))


# ---- logs ------------------------------------------------------------------------------------

def test_metrics_hold_one_record_per_step_after_crash_and_resume(token_dir, tmp_path):
    run = tmp_path / "run"
    train(small_cfg(token_dir, run))
    (run / "checkpoints" / "step_00000020").rename(tmp_path / "lost")  # crashed after the step-10 save
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "lo')  # and a record cut off mid-write
    train(small_cfg(token_dir, run))
    train_rows, val_rows = read_metrics(run)
    assert steps_of(train_rows) == list(range(1, 21)) and steps_of(val_rows) == [10, 20]


def test_finished_run_rerun_reports_its_last_metrics(token_dir, tmp_path):
    run = tmp_path / "run"
    first = train(small_cfg(token_dir, run, "train.steps=10"))
    again = train(small_cfg(token_dir, run, "train.steps=10"))
    assert again["loss"] == first["loss"] == read_metrics(run)[0][-1]["loss"]
    assert again["val_loss"] == first["val_loss"]
    json.dumps(again, allow_nan=False)  # valid JSON: no NaN
    assert again["checkpoint"] == str(run / "checkpoints" / "step_00000010")


def test_progress_bar_switch_and_tqdm_disable(token_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # as in a terminal
    train(small_cfg(token_dir, tmp_path / "a", "train.steps=2", "eval.every=0"))
    assert "\r" in capsys.readouterr().err  # the bar is drawn in a terminal
    train(small_cfg(token_dir, tmp_path / "b", "train.steps=2", "eval.every=0", "run.progress=false"))
    assert "\r" not in capsys.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    train(small_cfg(token_dir, tmp_path / "c", "train.steps=2", "eval.every=0"))
    assert "\r" not in capsys.readouterr().err
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # a redirected log: no bar by default
    train(small_cfg(token_dir, tmp_path / "d", "train.steps=2", "eval.every=0"))
    assert "\r" not in capsys.readouterr().err


def test_model_diagnostics_join_the_metrics_record(token_dir, tmp_path, monkeypatch):
    import nl.trainer as trainer

    real_build = trainer.build_model
    calls = {"n": 0}

    def build_with_diagnostics(*args, **kwargs):
        model = real_build(*args, **kwargs)

        def diagnostics():  # stands in for HOPE's per-block memory statistics
            calls["n"] += 1
            return {"memory/block0/norm_ratio": torch.tensor(0.5 * calls["n"]),
                    "memory/block1/norm_ratio": model.tok_embeddings.weight.detach().abs().max()}
        model.diagnostics = diagnostics
        return model

    monkeypatch.setattr(trainer, "build_model", build_with_diagnostics)
    items = {"n": 0}
    real_item = torch.Tensor.item

    def counted_item(self):
        items["n"] += 1
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    run = tmp_path / "run"
    train(small_cfg(token_dir, run, "train.steps=6", "train.log_every=2", "eval.every=0"))
    rows = read_metrics(run)[0]
    assert steps_of(rows) == [2, 4, 6]
    assert [r["memory/block0/norm_ratio"] for r in rows] == [0.5, 1.0, 1.5]  # read at logged steps only
    assert all(isinstance(r["memory/block1/norm_ratio"], float) for r in rows)
    assert items["n"] == 0  # no host sync of their own: they travel with the loss


# ---- interrupts ------------------------------------------------------------------------------

def test_a_second_sigint_aborts(monkeypatch):
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.received == signal.SIGINT  # the first one asks for a save
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.received == signal.SIGINT  # a repeated SIGTERM does not abort
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)


def _interrupt(cmd: list[str], run: Path, sig: int) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable}
    env.pop("NL_STOP_EXIT_CODE", None)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.3)
    os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C or a scheduler: the whole foreground group
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def _long_run(token_dir: Path, run: Path) -> list[str]:
    return ["--config", "configs/tiny.yaml", "model.dim=32", "model.n_layers=2", "model.n_heads=2",
            f"data.dir={token_dir}", "data.seq_len=32", "train.steps=5000", "train.batch_size=8",
            "train.micro_batch_size=4",
            "train.log_every=1", "eval.every=0", "checkpoint.every=0", "dist.timeout_s=60", f"run.dir={run}"]


def test_sigint_saves_and_exits_130_with_one_process(token_dir, tmp_path):
    run = tmp_path / "run"
    rc, out = _interrupt([sys.executable, "train.py", *_long_run(token_dir, run)], run, signal.SIGINT)
    assert rc == 130, out[-3000:]
    assert "stop signal received (SIGINT)" in out and "Traceback" not in out, out[-3000:]
    (saved, _), = list_checkpoints(run)
    assert json.loads(out.strip().splitlines()[-1])["step"] == saved  # the final JSON names the saved step


@pytest.mark.slow  # ~18 s on 2 shared cores: a 2-rank launch
def test_sigint_under_torchrun_sh_saves_on_every_rank_and_exits_130(token_dir, tmp_path):
    run = tmp_path / "run"
    cmd = ["bash", "launch/torchrun.sh", "2", *_long_run(token_dir, run), "dist.strategy=fsdp"]
    rc, out = _interrupt(cmd, run, signal.SIGINT)
    assert rc == 130, out[-3000:]  # the same code as one process
    (saved, path), = list_checkpoints(run)
    assert len(list(path.glob("*.distcp"))) == 2  # both ranks wrote their shard
    assert out.count("stop signal received (SIGINT)") == 1 and out.count("parameters |") == 1, out[-3000:]
    finals = [line for line in out.splitlines() if line.startswith("{")]
    assert len(finals) == 1 and json.loads(finals[0])["step"] == saved  # rank 0 alone prints
