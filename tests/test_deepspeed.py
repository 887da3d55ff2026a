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
from test_distributed import command, crashed_after_step_5, env, metrics, train_runs  # noqa: E402
from test_optim_distributed import HOPE  # noqa: E402

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


DMGD = (*HOPE, "optim.name=dmgd")  # DMGD (its memory MLP is not partitioned) and CMS levels every 1, 2, 4 steps
BF16 = ("train.precision=bf16",)


@pytest.fixture(scope="module")
def one_rank_runs(token_dir, tmp_path_factory) -> dict[str, Path]:
    """The runs of 1 process, in ONE launch (a launch costs more than one of these runs): "single"
    (no DeepSpeed), and "dmgd1", "dmgd3": DMGD + CMS at ZeRO-1 and ZeRO-3."""
    runs = {"single": (), "dmgd1": (*ds(1), *DMGD), "dmgd3": (*ds(3), *DMGD)}
    return train_runs(1, token_dir, tmp_path_factory.mktemp("one_rank"), runs)


@pytest.fixture(scope="module")
def single_run(one_rank_runs) -> Path:
    return one_rank_runs["single"]


@pytest.fixture(scope="module")
def two_rank_runs(token_dir, tmp_path_factory) -> dict[int | str, Path]:
    """The runs of 2 ranks, in ONE launch: one per ZeRO stage (1, 2, 3; stage 1 also carries a user
    ds_config JSON) and "bf16" (ZeRO-3 in bf16). ZeRO-2 and ZeRO-3 are exported (nl.export, which
    consolidates their shards) into zero2-export, zero3-export beside them."""
    root = tmp_path_factory.mktemp("zero")
    user_json = root / "ds_user.json"
    user_json.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": BUCKET}}))
    runs = train_runs(2, token_dir, root, {"zero1": (*ds(1), f"dist.deepspeed_config={user_json}"), "zero2": ds(2),
                                           "zero3": ds(3), "bf16": (*ds(3), *BF16)}, export=("zero2", "zero3"))
    return {1: runs["zero1"], 2: runs["zero2"], 3: runs["zero3"], "bf16": runs["bf16"]}


@pytest.fixture(scope="module")
def zero_runs(two_rank_runs) -> dict[int, Path]:
    """One 2-rank run per ZeRO stage; stage 1 also carries a user ds_config JSON."""
    return {stage: two_rank_runs[stage] for stage in (1, 2, 3)}


def resumed(nproc: int, token_dir: Path, root: Path, runs: dict[str, tuple[Path, tuple[str, ...]]]) -> dict[str, Path]:
    """Each name: (finished run, its overrides) crashed after its step-5 checkpoint and resumed on
    `nproc` ranks in root/name, all in one launch."""
    for name, (full, _) in runs.items():
        crashed_after_step_5(full, root / name)
    return train_runs(nproc, token_dir, root, {name: extra for name, (_, extra) in runs.items()})


@pytest.fixture(scope="module")
def resumed_on_two(token_dir, tmp_path_factory, one_rank_runs, two_rank_runs) -> dict[str, Path]:
    """Resumed by 2 ranks: "zero3" (the 2-rank ZeRO-3 run: same world size), "dmgd1", "dmgd3" (1 -> 2)."""
    return resumed(2, token_dir, tmp_path_factory.mktemp("resumed_on_two"), {
        "zero3": (two_rank_runs[3], ds(3)),
        "dmgd1": (one_rank_runs["dmgd1"], (*ds(1), *DMGD)),
        "dmgd3": (one_rank_runs["dmgd3"], (*ds(3), *DMGD))})


@pytest.fixture(scope="module")
def resumed_on_one(token_dir, tmp_path_factory, two_rank_runs) -> dict[str, Path]:
    """The 2-rank runs resumed by 1 process (2 -> 1): "zero2", "zero3", "bf16" (ZeRO-3 in bf16)."""
    return resumed(1, token_dir, tmp_path_factory.mktemp("resumed_on_one"), {
        "zero2": (two_rank_runs[2], ds(2)), "zero3": (two_rank_runs[3], ds(3)),
        "bf16": (two_rank_runs["bf16"], (*ds(3), *BF16))})


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


def test_zero3_resume_at_same_world_size_is_bit_exact(zero_runs, resumed_on_two):
    full, _ = metrics(zero_runs[3])
    assert metrics(resumed_on_two["zero3"])[0] == full[5:]


def test_export_of_zero_checkpoints_equals_single_process_model(tmp_path, single_run, zero_runs):
    from nl.export import export, load_pretrained

    reference = load_pretrained(export(single_run, tmp_path / "single"))
    x = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
    for stage in (2, 3):  # exported in the launch that trained them (two_rank_runs)
        with torch.no_grad():
            logits = load_pretrained(zero_runs[stage].parent / f"zero{stage}-export")(x)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def assert_continues(full_dir: Path, resumed_dir: Path, rtol: float = 1e-5) -> None:
    """The run in full_dir, crashed after step 5 and resumed in resumed_dir, gave its losses."""
    full, _ = metrics(full_dir)
    np.testing.assert_allclose(metrics(resumed_dir)[0], full[5:], rtol=rtol)


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_reshards_2_to_1(zero_runs, resumed_on_one, stage):
    """A checkpoint of 2 ranks resumed by 1 process continues the same run (AdamW). ZeRO-2 cuts
    flat partitions; ZeRO-3 partitions each parameter on its own."""
    assert_continues(zero_runs[stage], resumed_on_one[f"zero{stage}"])


@pytest.mark.parametrize("stage", [1, 3])
def test_dmgd_cms_checkpoint_reshards_1_to_2(one_rank_runs, resumed_on_two, stage):
    """1 -> 2 ranks with DMGD (its memory MLP is not partitioned) and CMS levels stepping every 2
    and 4 steps, resumed at step 5: mid-window, so the accumulators must be re-partitioned too."""
    assert_continues(one_rank_runs[f"dmgd{stage}"], resumed_on_two[f"dmgd{stage}"])


def test_zero3_bf16_checkpoint_reshards_2_to_1(two_rank_runs, resumed_on_one):
    """bf16, the default on GPUs: DeepSpeed names the optimizer files bf16_*, and the bf16 working
    weights must follow the loaded fp32 master. Within 1e-4: bf16 gradients sum in another order."""
    assert_continues(two_rank_runs["bf16"], resumed_on_one["bf16"], rtol=1e-4)


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
