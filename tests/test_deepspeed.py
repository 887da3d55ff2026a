"""dist.strategy=deepspeed on 2 CPU ranks (gloo): ZeRO 1/2/3 equal single-process training,
checkpoints resume bit-exactly at the same world size, ZeRO-1/2/3 checkpoints reshard 2 -> 1
and 1 -> 2, export consolidates ZeRO shards, other strategies' checkpoints (and another stage,
or ZeRO-0 at another world size) are refused clearly, and a user ds_config JSON is merged into
the engine's config.

The first DeepSpeed launch on a machine JIT-compiles its shared-memory comm op (~30-60 s,
cached in ~/.cache/torch_extensions afterwards)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("deepspeed", reason="dist.strategy=deepspeed needs the optional deepspeed package")

from conftest import REPO  # noqa: E402
from test_distributed import command, crashed_after_step_5, env, metrics  # noqa: E402

from nl.checkpoint import DEEPSPEED_MARKER, CheckpointError, list_checkpoints, load_checkpoint  # noqa: E402

BUCKET = 123456  # a user ds_config value that must reach the engine


def run(nproc: int, token_dir: Path, run_dir: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(nproc, token_dir, run_dir, *extra), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=400)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def ds(stage: int) -> tuple[str, ...]:
    return "dist.strategy=deepspeed", f"dist.zero_stage={stage}"


@pytest.fixture(scope="module")
def single_run(token_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run(1, token_dir, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def zero_runs(token_dir, tmp_path_factory) -> dict[int, Path]:
    """One 2-rank run per ZeRO stage; stage 1 also carries a user ds_config JSON."""
    root = tmp_path_factory.mktemp("zero")
    user_json = root / "ds_user.json"
    user_json.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": BUCKET}}))
    runs = {}
    for stage in (1, 2, 3):
        runs[stage] = root / f"zero{stage}"
        extra = (f"dist.deepspeed_config={user_json}",) if stage == 1 else ()
        run(2, token_dir, runs[stage], *ds(stage), *extra)
    return runs


def test_build_ds_config_from_ours_and_user_json(tmp_path):
    from nl.config import ConfigError, load_config
    from nl.distributed.deepspeed import build_ds_config

    cfg = load_config("configs/tiny.yaml", ["train.batch_size=16", "train.grad_clip=0.5", "dist.zero_stage=3"])
    generated = build_ds_config(cfg, micro_bs=2, accum_steps=4, bf16=False)
    assert generated["train_batch_size"] == 16 and generated["train_micro_batch_size_per_gpu"] == 2
    assert generated["gradient_accumulation_steps"] == 4 and generated["gradient_clipping"] == 0.5
    assert generated["zero_optimization"] == {"stage": 3} and generated["bf16"] == {"enabled": False}
    assert "optimizer" not in generated and "scheduler" not in generated
    user = tmp_path / "user.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": False}, "gradient_clipping": 2.0}))
    cfg.dist.deepspeed_config = str(user)
    merged = build_ds_config(cfg, 2, 4, False)
    assert merged["zero_optimization"] == {"stage": 3, "overlap_comm": False} and merged["gradient_clipping"] == 2.0
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="'optimizer' section"):
        build_ds_config(cfg, 2, 4, False)
    with pytest.raises(ConfigError, match="dist.zero_stage"):
        load_config("configs/tiny.yaml", ["dist.zero_stage=4"])


def test_zero_1_2_3_on_two_ranks_equal_single_process(single_run, zero_runs):
    single, single_val = metrics(single_run)
    for stage, run_dir in zero_runs.items():
        losses, val = metrics(run_dir)
        assert len(losses) == len(single), stage
        np.testing.assert_allclose(losses, single, rtol=1e-5, err_msg=f"ZeRO-{stage}")
        np.testing.assert_allclose(val, single_val, rtol=1e-5, err_msg=f"ZeRO-{stage}")
        assert [s for s, _ in list_checkpoints(run_dir)] == [5, 10]
        marker = json.loads((run_dir / "checkpoints/step_00000010/deepspeed.json").read_text())
        assert marker["strategy"] == "deepspeed" and marker["zero_stage"] == stage and marker["world_size"] == 2


def test_user_ds_config_reaches_the_engine(zero_runs):
    merged = json.loads((zero_runs[1] / "ds_config.json").read_text())
    assert merged["zero_optimization"] == {"stage": 1, "reduce_bucket_size": BUCKET}
    saved = torch.load(zero_runs[1] / "checkpoints/step_00000010/ds/mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    assert saved["ds_config"]["zero_optimization"]["reduce_bucket_size"] == BUCKET  # as the engine saw it


def test_zero3_resume_at_same_world_size_is_bit_exact(token_dir, tmp_path, zero_runs):
    full, _ = metrics(zero_runs[3])
    run_dir = crashed_after_step_5(zero_runs[3], tmp_path / "run")
    run(2, token_dir, run_dir, *ds(3))
    assert metrics(run_dir)[0] == full[5:]


def test_export_of_zero_checkpoints_equals_single_process_model(tmp_path, single_run, zero_runs):
    from nl.export import export, load_pretrained

    reference = load_pretrained(export(single_run, tmp_path / "single"))
    x = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
    for stage in (2, 3):
        out = tmp_path / f"zero{stage}"
        proc = subprocess.run([sys.executable, "-m", "nl.export", "--run", str(zero_runs[stage]), "--output", str(out)],
                              cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with torch.no_grad():
            logits = load_pretrained(out)(x)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def assert_resumes_on(world: int, token_dir: Path, full_dir: Path, tmp_path: Path, extra: tuple[str, ...],
                      rtol: float = 1e-5) -> None:
    """The run in full_dir, crashed after step 5 and resumed on `world` ranks, gives its losses."""
    full, _ = metrics(full_dir)
    run_dir = crashed_after_step_5(full_dir, tmp_path / "resumed")
    run(world, token_dir, run_dir, *extra)
    np.testing.assert_allclose(metrics(run_dir)[0], full[5:], rtol=rtol)


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_reshards_2_to_1(token_dir, tmp_path, zero_runs, stage):
    """A checkpoint of 2 ranks resumed by 1 process continues the same run (AdamW). ZeRO-2 cuts
    flat partitions; ZeRO-3 partitions each parameter on its own."""
    assert_resumes_on(1, token_dir, zero_runs[stage], tmp_path, ds(stage))


@pytest.mark.parametrize("stage", [1, 3])
def test_dmgd_cms_checkpoint_reshards_1_to_2(token_dir, tmp_path, stage):
    """1 -> 2 ranks with DMGD (its memory MLP is not partitioned) and CMS levels stepping every 2
    and 4 steps, resumed at step 5: mid-window, so the accumulators must be re-partitioned too."""
    from test_optim_distributed import HOPE

    extra = (*ds(stage), *HOPE, "optim.name=dmgd")
    run(1, token_dir, tmp_path / "one_rank", *extra)
    assert_resumes_on(2, token_dir, tmp_path / "one_rank", tmp_path, extra)


def test_zero3_bf16_checkpoint_reshards_2_to_1(token_dir, tmp_path):
    """bf16, the default on GPUs: DeepSpeed names the optimizer files bf16_*, and the bf16 working
    weights must follow the loaded fp32 master. Within 1e-4: bf16 gradients sum in another order."""
    extra = (*ds(3), "train.precision=bf16")
    run(2, token_dir, tmp_path / "two_ranks", *extra)
    assert_resumes_on(1, token_dir, tmp_path / "two_ranks", tmp_path, extra, rtol=1e-4)


def test_other_strategy_or_world_size_is_refused(token_dir, tmp_path, single_run, zero_runs):
    from nl.distributed.deepspeed import load

    dcp_ckpt = dict(list_checkpoints(single_run))[10]
    with pytest.raises(CheckpointError, match="dist.strategy=single/ddp/fsdp .*not deepspeed"):
        load(None, dcp_ckpt, world_size=2, zero_stage=1)  # refused before the engine is touched
    ds_ckpt = dict(list_checkpoints(zero_runs[2]))[10]
    with pytest.raises(CheckpointError, match="written by dist.strategy=deepspeed"):
        load_checkpoint(ds_ckpt, {"model": {}})
    with pytest.raises(CheckpointError, match="ZeRO-2 on 2 ranks, this run is ZeRO-1 on 2: resume with "
                                              "dist.zero_stage=2 on any world size"):
        load(None, ds_ckpt, world_size=2, zero_stage=1)
    zero0 = tmp_path / "zero0"  # the marker of a ZeRO-0 checkpoint is all that is read before refusing
    zero0.mkdir()
    (zero0 / DEEPSPEED_MARKER).write_text(json.dumps({"strategy": "deepspeed", "tag": "ds", "zero_stage": 0,
                                                      "world_size": 2, "step": 10}))
    with pytest.raises(CheckpointError, match="ZeRO-0 on 2 ranks, this run is ZeRO-0 on 1: resume with "
                                              "dist.zero_stage=0 on 2 ranks"):
        load(None, zero0, world_size=1, zero_stage=0)
    # End to end: the ZeRO-3 run of 2 ranks resumed by 1 process at ZeRO-2 is refused, one line.
    run_dir = tmp_path / "one_rank"
    shutil.copytree(zero_runs[3], run_dir)
    proc = run(1, token_dir, run_dir, *ds(2), "train.steps=12", check=False)
    assert proc.returncode != 0
    assert "error: checkpoint" in proc.stderr and "on 2 ranks, this run is ZeRO-2 on 1" in proc.stderr, \
        proc.stderr[-3000:]
    assert "dist.zero_stage=3 on any world size" in proc.stderr


def test_core_path_does_not_import_deepspeed():
    code = ("import sys, nl.trainer, nl.export, nl.distributed.deepspeed; "
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported eagerly'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), check=True, timeout=120)
