"""`accelerate launch ... train.py ...`: accelerate's launch flags, mapped onto our config or refused.

train.py does not build an `accelerate.Accelerator`; accelerate is the launcher only. Its flags reach
the training processes as environment variables (accelerate 1.15: accelerate/utils/launch.py,
prepare_*_env). Each variable it exports is, per the table `RULES` below, either

- mapped onto a config key (ACCELERATE_USE_FSDP=true -> dist.strategy=fsdp, ...),
- accepted because its value is what train.py does anyway (FSDP_VERSION=2, FSDP_OFFLOAD_PARAMS=false, ...),
- or refused with a one-line ConfigError naming the fix.

An unknown ACCELERATE_*/FSDP_* variable is refused too: nothing accelerate says is silently dropped.
A mapped key that the presets or the command line also set to another value is refused (which of
the two should win is not guessable). The process count arrives as torchrun's WORLD_SIZE, which
nl.distributed.init_distributed reads as under torchrun. docs/ACCELERATE.md has the table in prose.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import OmegaConf

from nl.config import Config, ConfigError, valid_keys

_PREFIXES = ("ACCELERATE_", "FSDP_", "MEGATRON_LM_", "PARALLELISM_CONFIG_")
_MPI_WORLD_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")

# A rule takes (variable name, its value, the whole environment) and returns the config values it
# asks for ({} when accepted as is), or raises ConfigError.
Rule = Callable[[str, str, Mapping[str, str]], dict[str, Any]]


def _refusal(name: str, value: str, fix: str) -> ConfigError:
    return ConfigError(f"accelerate launch set {name}={value}, which train.py does not support: {fix}")


def _boolean(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"accelerate launch set {name}={value}: expected true or false")


def _accept(*values: str, fix: str) -> Rule:
    """Accepted when the value is one of `values` (case-insensitive), refused with `fix` otherwise."""

    def rule(name, value, env):
        if value.lower() not in values:
            raise _refusal(name, value, fix)
        return {}

    return rule


def _refuse(fix: str) -> Rule:
    def rule(name, value, env):
        raise _refusal(name, value, fix)

    return rule


def _accept_any(name, value, env):  # documented in RULES: the value changes nothing train.py does
    return {}


def _if_true(key: str, value: Any) -> Rule:
    """true -> {key: value}; false -> nothing asked."""
    return lambda name, v, env: {key: value} if _boolean(name, v) else {}


def _mixed_precision(name, value, env):
    precision = {"no": "fp32", "bf16": "bf16"}.get(value.lower())
    if precision is None:
        raise _refusal(name, value, "train.precision is fp32 or bf16: pass --mixed_precision no or bf16")
    return {"train.precision": precision}


def _dynamo_backend(name, value, env):
    has_compile = "train.compile" in valid_keys()
    if value.upper() == "NO":
        return {"train.compile": False} if has_compile else {}
    if value.upper() == "INDUCTOR" and has_compile:
        return {"train.compile": True}
    fix = "pass --dynamo_backend inductor (train.compile=true) or no" if has_compile else \
        "this version of train.py does not compile: drop --dynamo_backend"
    raise _refusal(name, value, fix)


def _zero_stage(name, value, env):
    return {"dist.zero_stage": int(value)}


def _gradient_clipping(name, value, env):
    return {"train.grad_clip": float(value)}


def _accumulation(name, value, env):
    """accelerate's gradient_accumulation_steps -> train.micro_batch_size, as train.py derives
    accumulation = train.batch_size / (world size * micro-batch size). Resolved in `accelerate_overrides`."""
    steps = int(value)
    if steps < 1:
        raise ConfigError(f"accelerate launch set {name}={value}: expected an integer >= 1")
    return {"train.micro_batch_size": ("accumulation", steps)}


def _sharding_strategy(name, value, env):
    # accelerate accepts the FSDP1 name or its number (1 = FULL_SHARD, 2 = SHARD_GRAD_OP, ...)
    if value.upper() in ("FULL_SHARD", "1"):
        return {}
    fix = ("for unsharded data parallelism use --multi_gpu (dist.strategy=ddp)" if value.upper() in ("NO_SHARD", "3")
           else "train.py's FSDP2 shards fully (FULL_SHARD); drop --fsdp_sharding_strategy")
    raise _refusal(name, value, fix)


# Every variable accelerate 1.15's launchers export (and the few that only tune the launcher itself).
RULES: dict[str, Rule] = {
    # process count and placement: --cpu with --num_processes > 1 is refused in check_process_count
    "ACCELERATE_USE_CPU": _if_true("train.device", "cpu"),
    "ACCELERATE_MIXED_PRECISION": _mixed_precision,
    "ACCELERATE_USE_FSDP": _if_true("dist.strategy", "fsdp"),
    "ACCELERATE_USE_DEEPSPEED": _if_true("dist.strategy", "deepspeed"),
    "ACCELERATE_DYNAMO_BACKEND": _dynamo_backend,
    "ACCELERATE_DYNAMO_MODE": _accept("default", fix="train.compile uses torch.compile's default mode; "
                                      "drop --dynamo_mode"),
    "ACCELERATE_DYNAMO_USE_FULLGRAPH": _accept(*_FALSE, fix="drop --dynamo_use_fullgraph"),
    "ACCELERATE_DYNAMO_USE_DYNAMIC": _accept(*_FALSE, fix="drop --dynamo_use_dynamic"),
    # train.compile compiles block by block already, which is what regional compilation means
    "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": _accept_any,
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": _accumulation,
    "ACCELERATE_GRADIENT_CLIPPING": _gradient_clipping,
    # DeepSpeed
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": _zero_stage,
    "ACCELERATE_DEEPSPEED_CONFIG_FILE": lambda name, value, env: {"dist.deepspeed_config": value},
    # which of the DeepSpeed flags came from the accelerate config file: those arrive in their own variables
    "ACCELERATE_CONFIG_DS_FIELDS": _accept_any,
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": _accept(
        "none", fix="put zero_optimization.offload_optimizer in a JSON given as dist.deepspeed_config"),
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": _accept(
        "none", fix="put zero_optimization.offload_param in a JSON given as dist.deepspeed_config"),
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_NVME_PATH": _refuse(
        "put zero_optimization.offload_optimizer in a JSON given as dist.deepspeed_config"),
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_NVME_PATH": _refuse(
        "put zero_optimization.offload_param in a JSON given as dist.deepspeed_config"),
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": _accept(*_FALSE, fix="the model is built whole, then partitioned by "
                                               "the engine; drop --zero3_init_flag"),
    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": _accept(
        *_FALSE, fix="checkpoints are ZeRO shards; a full model comes from python -m nl.export"),
    "ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES": _refuse("the models have no MoE layers; drop the flag"),
    # FSDP (train.py shards with FSDP2 fully_shard, one unit per block of model.layers, then the root)
    "FSDP_VERSION": _accept("2", fix="train.py shards with FSDP2 (fully_shard): pass --fsdp_version 2"),
    "FSDP_SHARDING_STRATEGY": _sharding_strategy,
    "FSDP_RESHARD_AFTER_FORWARD": _accept(*_TRUE, fix="drop --fsdp_reshard_after_forward"),
    "FSDP_OFFLOAD_PARAMS": _accept(*_FALSE, fix="train.py does not offload parameters; drop --fsdp_offload_params"),
    "FSDP_AUTO_WRAP_POLICY": _accept("transformer_based_wrap", fix="train.py wraps each block of model.layers; "
                                     "drop --fsdp_auto_wrap_policy"),
    # read by the size-based wrap policy only, which is refused above
    "FSDP_MIN_NUM_PARAMS": _accept_any,
    "FSDP_TRANSFORMER_CLS_TO_WRAP": _refuse("train.py wraps each block of model.layers (TransformerBlock, "
                                            "HopeBlock) itself; drop --fsdp_transformer_layer_cls_to_wrap"),
    "FSDP_BACKWARD_PREFETCH": _accept("backward_pre", fix="FSDP2 prefetches before backward only; drop "
                                      "--fsdp_backward_prefetch"),
    "FSDP_FORWARD_PREFETCH": _accept(*_FALSE, fix="drop --fsdp_forward_prefetch"),
    "FSDP_STATE_DICT_TYPE": _accept("sharded_state_dict", fix="checkpoints are sharded (DCP); a full model "
                                    "comes from python -m nl.export"),
    "FSDP_USE_ORIG_PARAMS": _accept(*_TRUE, fix="FSDP2 always keeps the original parameters; drop the flag"),
    # both are about loading pretrained weights on rank 0; every rank here builds the same initial
    # weights from train.seed (or loads train.init_from itself), so neither value changes anything
    "FSDP_CPU_RAM_EFFICIENT_LOADING": _accept_any,
    "FSDP_SYNC_MODULE_STATES": _accept_any,
    "FSDP_ACTIVATION_CHECKPOINTING": lambda name, value, env: {
        "dist.activation_checkpointing": "full" if _boolean(name, value) else "none"},
    "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": _accept(*_FALSE, fix="drop --fsdp_activation_checkpointing_offload"),
    "FSDP_IGNORED_MODULES": _refuse("every parameter is sharded; drop --fsdp_ignored_modules"),
    # launcher-side only or unsupported engines
    "ACCELERATE_CPU_AFFINITY": _refuse("train.py sets threads per rank, not CPU affinity; drop "
                                       "--enable_cpu_affinity (pin with taskset or slurm instead)"),
    "ACCELERATE_DEBUG_MODE": _refuse("train.py has no collective-shape checks; drop --debug"),
    "ACCELERATE_USE_MEGATRON_LM": _refuse("use --use_fsdp or --use_deepspeed"),
    "ACCELERATE_USE_PARALLELISM_CONFIG": _refuse("only data parallelism (ddp, fsdp, deepspeed) is implemented"),
    "ACCELERATE_USE_SAGEMAKER": _refuse("launch on the machine itself"),
    "ACCELERATE_SAGEMAKER_DISTRIBUTED_TYPE": _refuse("launch on the machine itself"),
    "ACCELERATE_DOWNCAST_BF16": _refuse("TPUs are not supported"),
    # the launcher's own logging, already applied in the launcher
    "ACCELERATE_LOG_LEVEL": _accept_any,
    "ACCELERATE_ENABLE_RICH": _accept_any,
}
_PREFIX_RULES: dict[str, Rule] = {
    "MEGATRON_LM_": _refuse("use --use_fsdp or --use_deepspeed"),
    "PARALLELISM_CONFIG_": _refuse("only data parallelism (ddp, fsdp, deepspeed) is implemented"),
    "ACCELERATE_FP8_": _refuse("train.precision is fp32 or bf16"),
}


def launched_by_accelerate(env: Mapping[str, str]) -> bool:
    """Every accelerate 1.15 launcher exports ACCELERATE_MIXED_PRECISION; nothing else in our launch paths does."""
    return "ACCELERATE_MIXED_PRECISION" in env


def check_process_count(env: Mapping[str, str]) -> None:
    """Refuse launches that asked for several processes but started this one alone.

    `accelerate launch --cpu --num_processes N` takes accelerate's simple launcher, which starts ONE
    process (several only under mpirun); it does export MASTER_ADDR when N > 1, but no WORLD_SIZE."""
    if "WORLD_SIZE" in env:
        return
    if any(var in env for var in _MPI_WORLD_SIZES):
        raise ConfigError("train.py was started by mpirun (accelerate launch --mpirun_hostfile): it joins "
                          "torchrun's process groups only; use accelerate launch --multi_gpu --num_processes N")
    if _boolean("ACCELERATE_USE_CPU", env.get("ACCELERATE_USE_CPU", "false")) and "MASTER_ADDR" in env:
        raise ConfigError("accelerate launch --cpu --num_processes N starts one process, not N: for N CPU "
                          "processes use accelerate launch --multi_gpu --num_processes N (ranks run on CPU, gloo, "
                          "where there is no GPU; add train.device=cpu on a GPU machine); for one, drop "
                          "--num_processes (and unset MASTER_ADDR)")


def _rule(name: str) -> Rule:
    if name in RULES:
        return RULES[name]
    for prefix, rule in _PREFIX_RULES.items():
        if name.startswith(prefix):
            return rule
    return _refuse("accelerate 1.15 does not export it and train.py does not read it; unset it")


def accelerate_overrides(cfg: Config, explicit: Mapping[str, str],
                         env: Mapping[str, str] | None = None) -> list[str]:
    """Dotted overrides (`key=value`) that accelerate's launch flags ask for; [] when not launched by it.

    cfg: the config resolved from the presets and command line; explicit: {key: where it was set} for
    the keys the user gave (nl.train_cli.set_keys). Raises ConfigError for a refused flag, or for a
    mapped key that `explicit` sets to another value."""
    env = os.environ if env is None else env
    if not launched_by_accelerate(env):
        return []
    check_process_count(env)
    world_size = int(env.get("WORLD_SIZE", "1"))
    asked: dict[str, tuple[Any, str]] = {}  # key -> (value, the variable that asks for it)
    for name in sorted(env):
        if name.startswith(_PREFIXES):
            for key, value in _rule(name)(name, env[name], env).items():
                asked[key] = (value, name)
    if world_size > 1 and "dist.strategy" not in asked and "dist.strategy" not in explicit:
        asked["dist.strategy"] = ("ddp", "WORLD_SIZE")  # --multi_gpu: accelerate's MULTI_GPU is DDP
    if "train.micro_batch_size" in asked:
        (_, steps), name = asked["train.micro_batch_size"]
        per_rank = cfg.train.batch_size // world_size
        if cfg.train.batch_size % world_size or per_rank % steps:
            raise ConfigError(f"accelerate launch set {name}={steps}, which does not divide the per-rank batch "
                              f"train.batch_size/{world_size} = {cfg.train.batch_size / world_size:g}: pick a "
                              f"divisor, or drop --gradient_accumulation_steps and set train.micro_batch_size")
        asked["train.micro_batch_size"] = (per_rank // steps, name)
    overrides = []
    for key, (value, name) in asked.items():
        current = OmegaConf.select(cfg, key)
        if key in explicit and current != value:
            raise ConfigError(f"accelerate launch set {name}={env.get(name)}, meaning {key}={value}, but {key}="
                              f"{current} is set {explicit[key]}: drop one of the two")
        overrides.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return overrides
