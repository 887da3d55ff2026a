"""End-to-end behaviour of train.py: loss falls, metrics, exact resume, micro-batch
invariance, export/evaluate round trip, and a clear error for each kind of bad input."""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from nl.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from nl.config import ConfigError, load_config
from nl.data.shards import DataError
from nl.trainer import LRSchedule, TrainingError, build_optimizer, train


def small_cfg(token_dir: Path, run_dir: Path, *extra: str, arch: str = "transformer"):
    """A ~0.1M-parameter model on 32-token windows: a step takes a few ms on CPU."""
    return load_config("configs/tiny.yaml", [
        f"model.arch={arch}", "model.dim=32", "model.n_layers=2", "model.n_heads=2",
        f"data.dir={token_dir}", "data.seq_len=32",
        "train.steps=20", "train.batch_size=8", "train.micro_batch_size=4", "train.lr=3e-3",
        "train.warmup_steps=2", "train.log_every=1", "eval.every=10", "eval.max_batches=2",
        "checkpoint.every=10", "checkpoint.keep_last=3", f"run.dir={run_dir}", *extra])


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def test_run_writes_metrics_config_checkpoints_and_loss_falls(token_dir, tmp_path):
    run = tmp_path / "run"
    summary = train(small_cfg(token_dir, run, "train.steps=60", "checkpoint.every=20", "checkpoint.keep_last=2"))
    train_rows, val_rows = read_metrics(run)
    assert [r["step"] for r in train_rows] == list(range(1, 61))
    assert set(train_rows[0]) >= {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}
    assert train_rows[-1]["tokens"] == 60 * 8 * 32
    first, last = np.mean([r["loss"] for r in train_rows[:5]]), np.mean([r["loss"] for r in train_rows[-5:]])
    assert last < first - 0.7, (first, last)  # ln(1024)=6.93 at init; measured: 6.91 -> 5.97
    assert [r["step"] for r in val_rows] == [10, 20, 30, 40, 50, 60]
    assert val_rows[-1]["val_loss"] < val_rows[0]["val_loss"]
    assert [s for s, _ in list_checkpoints(run)] == [40, 60]  # keep_last=2 pruned step 20
    saved = load_config(run / "config.yaml")
    assert saved.train.steps == 60 and saved.model.vocab_size == 1024  # resolved from the data
    assert summary["step"] == 60 and math.isfinite(summary["val_loss"])


def test_lr_schedules():
    cos = LRSchedule(total_steps=100, warmup_steps=10, kind="cosine", min_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(100) == pytest.approx(0.1)
    assert cos(55) == pytest.approx(0.55)  # halfway through the cosine: mean of 1 and 0.1
    wsd = LRSchedule(total_steps=100, warmup_steps=10, kind="wsd", min_ratio=0.0, decay_fraction=0.2)
    assert wsd(50) == 1.0 and wsd(79) == 1.0 and wsd(89) == pytest.approx(0.5) and wsd(99) == pytest.approx(0.0)
    assert LRSchedule(100, 0, "constant")(70) == 1.0


def test_weight_decay_groups(token_dir, tmp_path):
    from nl.models import build_model

    cfg = small_cfg(token_dir, tmp_path / "r", "model.vocab_size=1024")
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        is_embedding = "embed" in name or (cfg.model.tie_embeddings and "output" in name)
        assert (id(p) in decayed) == (p.ndim >= 2 and not is_embedding), name


def test_resume_reproduces_uninterrupted_losses_bit_for_bit(token_dir, tmp_path):
    run = tmp_path / "run"
    train(small_cfg(token_dir, run))
    full, full_val = read_metrics(run)
    # Simulate a crash right after the step-10 checkpoint: drop everything later, rerun.
    shutil.rmtree(dict(list_checkpoints(run))[20])
    (run / "metrics.jsonl").write_text("")
    summary = train(small_cfg(token_dir, run))
    resumed, resumed_val = read_metrics(run)
    assert [r["step"] for r in resumed] == list(range(11, 21))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[10:]]  # exact, not approx
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full[10:]]
    assert resumed_val[-1]["val_loss"] == full_val[-1]["val_loss"]
    assert summary["tokens"] == 20 * 8 * 32


def test_micro_batch_split_does_not_change_results(token_dir, tmp_path):
    losses = []
    for micro in (8, 2):
        run = tmp_path / f"micro{micro}"
        train(small_cfg(token_dir, run, "train.steps=8", f"train.micro_batch_size={micro}", "eval.every=0"))
        losses.append([r["loss"] for r in read_metrics(run)[0]])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_export_load_pretrained_and_evaluate(token_dir, tmp_path, small_corpus):
    import nl
    from nl.models import build_model

    run, out = tmp_path / "run", tmp_path / "export"
    cfg = small_cfg(token_dir, run, "train.steps=10", "model.tie_embeddings=true")
    train(cfg)
    run_script("-m", "nl.export", "--run", str(run), "--output", str(out))
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.model"}
    loaded = nl.load_pretrained(out)

    reference = build_model(cfg.model)  # the training model, from the checkpoint
    state = {"model": reference.state_dict()}
    load_checkpoint(list_checkpoints(run)[-1][1], state)
    reference.load_state_dict(state["model"])
    x = torch.randint(0, 1024, (2, 32))
    assert torch.equal(loaded(x), reference.eval()(x))

    res = json.loads(run_script("-m", "nl.evaluate", "--model", str(out), "--data", str(token_dir),
                                "--max-batches", "4").stdout)
    assert res["perplexity"] == pytest.approx(math.exp(res["val_loss"]))
    assert 0 < res["val_loss"] < math.log(1024) and res["tokens"] == 4 * 8 * 32
    text = tmp_path / "doc.txt"
    text.write_text(" ".join(json.loads(line)["text"] for line in small_corpus.read_text().splitlines()[:20]))
    res_text = json.loads(run_script("-m", "nl.evaluate", "--model", str(out), "--data", str(text)).stdout)
    assert 0 < res_text["val_loss"] < math.log(1024) and res_text["tokens"] > 0


# ---------------------------------------------------------------- bad input ---------

def test_unknown_config_key_names_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.stepz.*Did you mean: train\.steps"):
        load_config("configs/tiny.yaml", ["train.stepz=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dimm: 64\n")
    with pytest.raises(ConfigError, match=r"model\.dimm.*model\.dim"):
        load_config(bad)
    proc = run_script("train.py", "--config", "configs/tiny.yaml", "train.stpes=1", check=False)
    assert proc.returncode != 0 and "unknown config key 'train.stpes'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="tokenize_corpus"):
        train(small_cfg(tmp_path / "nope", tmp_path / "run"))


def test_vocab_mismatch(token_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"model.vocab_size=32000 .* 1024-token"):
        train(small_cfg(token_dir, tmp_path / "run", "model.vocab_size=32000"))


def test_seq_len_the_data_cannot_fill(token_dir, tmp_path):
    with pytest.raises(DataError, match="seq_len"):
        train(small_cfg(token_dir, tmp_path / "run", "data.seq_len=10000000"))


def test_corrupt_shard(token_dir, tmp_path):
    bad = tmp_path / "tokens"
    shutil.copytree(token_dir, bad)
    shard = sorted(bad.glob("train_*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt"):
        train(small_cfg(bad, tmp_path / "run"))


def test_checkpoint_of_a_different_model_shape(token_dir, tmp_path):
    run = tmp_path / "run"
    train(small_cfg(token_dir, run, "train.steps=10"))
    with pytest.raises(CheckpointError, match="different model shape"):
        train(small_cfg(token_dir, run, "train.steps=20", "model.dim=64"))


def test_disk_full_while_saving_keeps_previous_checkpoint(token_dir, tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs

    run = tmp_path / "run"
    train(small_cfg(token_dir, run, "train.steps=10"))
    real_write = fs._write_item

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs, "_write_item", full_disk)
    with pytest.raises(CheckpointError, match="disk full.*step_00000010 is intact"):
        train(small_cfg(token_dir, run, "train.steps=20"))
    monkeypatch.setattr(fs, "_write_item", real_write)
    assert [s for s, _ in list_checkpoints(run)] == [10]
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())
    summary = train(small_cfg(token_dir, run, "train.steps=20"))  # resumes from step 10 and finishes
    assert summary["step"] == 20


def nan_loss_from_step_13(monkeypatch) -> None:
    """Make the trainer's loss NaN from step 13 on (small_cfg: 2 micro-batches per step)."""
    import nl.trainer as trainer

    calls = {"n": 0}
    real = trainer.token_loss_sum

    def nan_from_step_13(model, x, y):
        calls["n"] += 1
        loss = real(model, x, y)
        return loss * float("nan") if calls["n"] > 24 else loss

    monkeypatch.setattr(trainer, "token_loss_sum", nan_from_step_13)


def test_non_finite_loss_stops_without_saving(token_dir, tmp_path, monkeypatch):
    nan_loss_from_step_13(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite loss at step 13.*step_00000010 is intact"):
        train(small_cfg(token_dir, run))
    assert [s for s, _ in list_checkpoints(run)] == [10]
    assert max(r["step"] for r in read_metrics(run)[0]) == 12


def test_corrupt_checkpoint_is_refused_with_the_fix(token_dir, tmp_path):
    run = tmp_path / "run"
    train(small_cfg(token_dir, run, "train.steps=10"))
    ckpt = list_checkpoints(run)[-1][1]
    data_file = next(ckpt.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:100])  # truncated mid-write by something else
    with pytest.raises(CheckpointError, match=r"could not be loaded.*move it away"):
        train(small_cfg(token_dir, run, "train.steps=20"))
    (ckpt / ".metadata").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"unreadable.*move it away"):
        train(small_cfg(token_dir, run, "train.steps=20"))


def test_wandb_offline_logs_without_network(token_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(small_cfg(token_dir, run, "train.steps=3", "eval.every=0", "wandb.enabled=true",
                    "wandb.mode=offline"))
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_bf16_autocast_trains_on_cpu(token_dir, tmp_path):
    run = tmp_path / "run"
    summary = train(small_cfg(token_dir, run, "train.steps=3", "eval.every=0", "train.precision=bf16"))
    losses = [r["loss"] for r in read_metrics(run)[0]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - math.log(1024)) < 0.3 and summary["step"] == 3


def test_hope_trains_with_train_py_and_val_loss_falls(token_dir, tmp_path):
    run = tmp_path / "run"
    train(small_cfg(token_dir, run, "train.steps=40", "eval.every=20", "model.hope.chunk_size=8",
                    "model.hope.memory_chunk_size=8", arch="hope"))
    train_rows, val_rows = read_metrics(run)
    first, last = np.mean([r["loss"] for r in train_rows[:5]]), np.mean([r["loss"] for r in train_rows[-5:]])
    assert last < first - 0.5, (first, last)
    assert val_rows[-1]["val_loss"] < val_rows[0]["val_loss"] < math.log(1024)


def test_layered_presets_select_optimizer_and_cms_schedule(tmp_path):
    """--config may repeat: configs/optim/<name>.yaml on a model preset, later files win."""
    from nl.models import build_model
    from nl.optim import OPTIMIZERS

    presets = sorted((REPO / "configs" / "optim").glob("*.yaml"))
    assert {p.stem for p in presets} == set(OPTIMIZERS)
    for preset in presets:
        cfg = load_config([REPO / "configs/hope_tiny.yaml", preset], ["model.vocab_size=256", "model.n_layers=1"])
        assert cfg.optim.name == preset.stem and cfg.model.arch == "hope" and cfg.optim.cms.enabled
        opt = build_optimizer(build_model(cfg.model), cfg)
        assert type(opt) is OPTIMIZERS[preset.stem]
        every = sorted({g["every"] for g in opt.param_groups})
        assert every == sorted(set(cfg.model.hope.cms_chunk_sizes))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([REPO / "configs/hope_tiny.yaml", tmp_path / "missing.yaml"])
