"""`accelerate launch ... train.py`: every variable accelerate 1.15's launchers export is mapped onto
the config or refused (the environments below come from accelerate's own prepare_*_env code), an
explicit config key that disagrees is refused, `--cpu --num_processes 2` is refused instead of
silently starting one process, and real 2-process launches (ddp, fsdp; deepspeed in the slow
suite) give the losses of launch/torchrun.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from test_distributed import command, env, metrics, overrides

from nl.config import ConfigError, load_config, valid_keys
from nl.distributed.accelerate_env import _PREFIX_RULES, RULES, accelerate_overrides

pytest.importorskip("accelerate", reason="accelerate launch needs the optional accelerate package")

COMPILE = ["train.compile=false"] if "train.compile" in valid_keys() else []  # the dynamo flag's target


def accelerate_env(*flags: str, world_size: int | None = None) -> dict[str, str]:
    """The variables `accelerate launch FLAGS train.py` adds for the training processes, computed by
    accelerate's own launch code, plus torchrun's WORLD_SIZE where the launch is multi-process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (prepare_deepspeed_cmd_env, prepare_multi_gpu_env,
                                         prepare_simple_launcher_cmd_env)

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args([*flags, "train.py"]))
    if args.use_deepspeed and not args.cpu:
        args.deepspeed_fields_from_accelerate_config = ""  # as launch_command sets it without a config file
        _, full = prepare_deepspeed_cmd_env(args)
    elif (args.use_fsdp or args.multi_gpu) and not args.cpu:
        full = prepare_multi_gpu_env(args)
    else:
        _, full = prepare_simple_launcher_cmd_env(args)
    added = {k: v for k, v in full.items() if os.environ.get(k) != v}
    if world_size is not None:
        added["WORLD_SIZE"] = str(world_size)
    return added


def mapped(*flags: str, world_size: int | None = 2, cfg_overrides: tuple[str, ...] = (),
           explicit: dict[str, str] | None = None) -> list[str]:
    cfg = load_config(None, list(cfg_overrides))
    return accelerate_overrides(cfg, explicit or {}, accelerate_env(*flags, world_size=world_size))


PORT = ("--main_process_port", "0")


def test_multi_gpu_is_ddp_and_no_mixed_precision_is_fp32():
    assert sorted(mapped("--multi_gpu", "--num_processes", "2", *PORT)) == sorted(
        ["train.precision=fp32", "dist.strategy=ddp", *COMPILE])


def test_fsdp_flags_map_to_strategy_precision_and_checkpointing():
    got = mapped("--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--mixed_precision", "bf16",
                 "--fsdp_activation_checkpointing", "true", *PORT)
    assert sorted(got) == sorted(["dist.strategy=fsdp", "train.precision=bf16",
                                  "dist.activation_checkpointing=full", *COMPILE])


def test_deepspeed_flags_map_to_stage_accumulation_clipping_and_config(tmp_path):
    ds_json = tmp_path / "ds.json"
    got = mapped("--use_deepspeed", "--num_processes", "2", "--zero_stage", "3", "--gradient_accumulation_steps",
                 "4", "--gradient_clipping", "0.5", "--deepspeed_config_file", str(ds_json), *PORT,
                 cfg_overrides=("train.batch_size=32",))
    # 32 sequences over 2 ranks = 16 per rank, in 4 accumulation steps of 4
    assert sorted(got) == sorted(["dist.strategy=deepspeed", "dist.zero_stage=3", "train.micro_batch_size=4",
                                  "train.grad_clip=0.5", f"dist.deepspeed_config={ds_json}",
                                  "train.precision=fp32"])  # the DeepSpeed launcher exports no dynamo flags


@pytest.mark.parametrize("name, expected", [
    ("fsdp", ["dist.strategy=fsdp", "train.precision=bf16", "dist.activation_checkpointing=none", *COMPILE]),
    ("deepspeed", ["dist.strategy=deepspeed", "dist.zero_stage=2", "train.grad_clip=1.0", "train.precision=bf16"]),
])
def test_example_config_files_in_launch_map_cleanly(name, expected):
    got = mapped("--config_file", str(REPO / "launch" / f"accelerate_{name}.yaml"), "--num_processes", "2", *PORT)
    assert sorted(got) == sorted(expected)


def test_cpu_flag_with_one_process_maps_to_the_cpu_device():
    assert sorted(mapped("--cpu", world_size=None)) == sorted(["train.device=cpu", "train.precision=fp32", *COMPILE])


def test_not_launched_by_accelerate_changes_nothing():
    cfg = load_config(None, [])
    assert accelerate_overrides(cfg, {}, {"WORLD_SIZE": "2", "RANK": "0", "FSDP_VERSION": "1"}) == []


@pytest.mark.parametrize("flags, fix", [
    (("--cpu", "--num_processes", "2"), "use accelerate launch --multi_gpu --num_processes N"),
    (("--multi_gpu", "--num_processes", "2", "--mixed_precision", "fp16", *PORT), "--mixed_precision no or bf16"),
    (("--use_fsdp", "--num_processes", "2", *PORT), "pass --fsdp_version 2"),
    (("--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--fsdp_offload_params", "true", *PORT),
     "drop --fsdp_offload_params"),
    (("--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--fsdp_sharding_strategy", "NO_SHARD", *PORT),
     "use --multi_gpu"),
    (("--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--fsdp_auto_wrap_policy", "SIZE_BASED_WRAP",
      *PORT), "drop --fsdp_auto_wrap_policy"),
    (("--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--fsdp_state_dict_type", "FULL_STATE_DICT",
      *PORT), "nl.export"),
    (("--use_deepspeed", "--num_processes", "2", "--offload_optimizer_device", "cpu", *PORT),
     "offload_optimizer in a JSON"),
    (("--use_deepspeed", "--num_processes", "2", "--zero_stage", "3", "--zero3_init_flag", "true", *PORT),
     "drop --zero3_init_flag"),
    (("--use_deepspeed", "--num_processes", "2", "--zero3_save_16bit_model", "true", *PORT), "nl.export"),
    (("--multi_gpu", "--num_processes", "2", "--debug", *PORT), "drop --debug"),
    (("--multi_gpu", "--num_processes", "2", "--enable_cpu_affinity", *PORT), "drop --enable_cpu_affinity"),
    (("--multi_gpu", "--num_processes", "2", "--dynamo_backend", "aot_eager", *PORT), "--dynamo_backend"),
    (("--multi_gpu", "--num_processes", "2", "--dynamo_mode", "max-autotune", *PORT), "drop --dynamo_mode"),
    (("--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--use_parallelism_config",
      "--parallelism_config_dp_shard_size", "2", *PORT), "only data parallelism"),
])
def test_unsupported_flags_are_refused_with_the_fix(flags, fix):
    with pytest.raises(ConfigError, match="accelerate launch") as err:
        mapped(*flags, world_size=None if "--cpu" in flags else 2)
    assert fix in str(err.value)


def test_every_variable_accelerate_exports_has_a_rule():
    """The union of what the launch paths export, with every optional flag given, names no variable
    that would fall to the catch-all refusal for unknown names."""
    fsdp2 = ("--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--fsdp_auto_wrap_policy",
             "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "HopeBlock",
             "--fsdp_backward_prefetch", "BACKWARD_PRE", "--fsdp_state_dict_type", "SHARDED_STATE_DICT")
    deepspeed = ("--use_deepspeed", "--num_processes", "2", "--zero_stage", "3", "--gradient_accumulation_steps",
                 "2", "--gradient_clipping", "1", "--offload_optimizer_device", "none", "--offload_param_device",
                 "none", "--zero3_init_flag", "false", "--zero3_save_16bit_model", "false",
                 "--deepspeed_config_file", "ds.json", "--deepspeed_moe_layer_cls_names", "X")
    common = ("--debug", "--enable_cpu_affinity", *PORT)
    exported: set[str] = set()
    for flags in (("--cpu",), ("--multi_gpu", "--num_processes", "2"), fsdp2, deepspeed,
                  (*fsdp2, "--use_parallelism_config", "--parallelism_config_dp_shard_size", "2")):
        exported |= set(accelerate_env(*flags, *common))
    ours = {n for n in exported if n.startswith(("ACCELERATE_", "FSDP_", "MEGATRON_LM_", "PARALLELISM_CONFIG_"))}
    assert len(ours) >= 30
    unruled = [n for n in ours if n not in RULES and not n.startswith(tuple(_PREFIX_RULES))]
    assert unruled == []


def test_an_unknown_accelerate_variable_is_refused():
    env_vars = {**accelerate_env("--cpu"), "ACCELERATE_SOMETHING_NEW": "1"}
    with pytest.raises(ConfigError, match="ACCELERATE_SOMETHING_NEW=1.*unset it"):
        accelerate_overrides(load_config(None, []), {}, env_vars)


def test_mpirun_launch_is_refused():
    env_vars = {**accelerate_env("--cpu"), "OMPI_COMM_WORLD_SIZE": "2"}
    with pytest.raises(ConfigError, match="mpirun"):
        accelerate_overrides(load_config(None, []), {}, env_vars)


def test_explicit_key_that_disagrees_is_refused_and_one_that_agrees_is_kept(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("train:\n  precision: bf16\n")
    cfg = load_config([str(preset)], ["dist.strategy=ddp"])
    explicit = {"train.precision": f"in {preset}", "dist.strategy": "on the command line"}
    fsdp = accelerate_env("--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--mixed_precision", "bf16",
                          *PORT, world_size=2)
    with pytest.raises(ConfigError, match="FSDP=true, meaning dist.strategy=fsdp, but dist.strategy=ddp is set "
                                          "on the command line"):
        accelerate_overrides(cfg, explicit, fsdp)
    plain = accelerate_env("--multi_gpu", "--num_processes", "2", *PORT, world_size=2)  # --mixed_precision no
    with pytest.raises(ConfigError, match=f"train.precision=fp32, but train.precision=bf16 is set in {preset}"):
        accelerate_overrides(cfg, explicit, plain)
    bf16 = accelerate_env("--multi_gpu", "--num_processes", "2", "--mixed_precision", "bf16", *PORT, world_size=2)
    assert "dist.strategy=ddp" not in accelerate_overrides(cfg, explicit, bf16)  # set already, and agreed with


# --- real launches: 2 CPU processes on gloo -----------------------------------------------------------

STEPS = 4


def run_overrides(token_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*overrides(token_dir, run_dir, f"train.steps={STEPS}", "eval.every=0", "checkpoint.every=0"), *extra]


def accelerate_launch(flags: tuple[str, ...], token_dir: Path, run_dir: Path, *extra: str,
                      check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "train.py", "--config", "configs/tiny.yaml",
           *run_overrides(token_dir, run_dir, *extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=400)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def torchrun_ddp(token_dir, tmp_path_factory) -> list[float]:
    """The reference: the same config under launch/torchrun.sh with dist.strategy=ddp."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    cmd = command(2, token_dir, run_dir, "dist.strategy=ddp", f"train.steps={STEPS}", "eval.every=0",
                  "checkpoint.every=0")
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses, _ = metrics(run_dir)
    assert len(losses) == STEPS
    return losses


def test_accelerate_multi_gpu_on_cpu_runs_ddp_with_torchrun_losses(token_dir, tmp_path, torchrun_ddp):
    run_dir = tmp_path / "run"
    accelerate_launch(("--multi_gpu", "--num_processes", "2", *PORT), token_dir, run_dir)
    assert "strategy: ddp" in (run_dir / "config.yaml").read_text()
    assert metrics(run_dir)[0] == torchrun_ddp


def test_accelerate_fsdp_on_cpu_has_torchrun_losses(token_dir, tmp_path, torchrun_ddp):
    run_dir = tmp_path / "run"
    accelerate_launch(("--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", *PORT), token_dir, run_dir)
    assert "strategy: fsdp" in (run_dir / "config.yaml").read_text()
    np.testing.assert_allclose(metrics(run_dir)[0], torchrun_ddp, rtol=1e-5)


def test_accelerate_cpu_with_two_processes_is_refused(token_dir, tmp_path):
    proc = accelerate_launch(("--cpu", "--num_processes", "2"), token_dir, tmp_path / "run", check=False)
    assert proc.returncode != 0
    assert "error: accelerate launch --cpu --num_processes N starts one process" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_accelerate_deepspeed_on_cpu_has_torchrun_losses(token_dir, tmp_path, torchrun_ddp):
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    accelerate_launch(("--use_deepspeed", "--zero_stage", "2", "--num_processes", "2", *PORT), token_dir, run_dir)
    text = (run_dir / "config.yaml").read_text()
    assert "strategy: deepspeed" in text and "zero_stage: 2" in text
    np.testing.assert_allclose(metrics(run_dir)[0], torchrun_ddp, rtol=1e-5)
