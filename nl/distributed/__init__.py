"""Process-group setup and parallelisation applied to a model from outside.

Order as in torchtitan: activation checkpointing on each block, then torch.compile per block
(train.compile), then DDP or FSDP2
(`fully_shard` per block, then the root, which groups embeddings, final norm and head).
The model code never knows whether it is sharded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from nl.config import Config, ConfigError

try:  # torch >= 2.6
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch 2.5
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def coordinator(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: Config, device: torch.device) -> DistEnv:
    """Join the process group torchrun/srun set up (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*).

    Every collective gets a finite timeout (dist.timeout_s) so a dead rank cannot hang the job."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        if cfg.dist.strategy not in ("single", "ddp", "fsdp", "deepspeed"):
            raise ConfigError(f"unknown dist.strategy {cfg.dist.strategy!r}")
        if cfg.dist.strategy == "deepspeed" and not dist.is_initialized():
            # DeepSpeed needs a process group even for one process: a private 1-rank one.
            for var in ("RANK", "LOCAL_RANK"):  # DeepSpeed asserts these exist, as torchrun sets them
                os.environ.setdefault(var, "0")
            if device.type == "cuda":
                torch.cuda.set_device(device.index or 0)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1, timeout=timedelta(seconds=cfg.dist.timeout_s))
        return DistEnv(0, 1, 0, device)
    if cfg.dist.strategy == "single":
        raise ConfigError(f"dist.strategy=single but {world_size} processes were launched: set "
                          f"dist.strategy=ddp, fsdp or deepspeed, or launch one process")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=cfg.dist.timeout_s))
    return DistEnv(rank, world_size, local_rank, device)


def apply_activation_checkpointing(model: nn.Module, mode: str, every_n: int) -> None:
    """Recompute the activations of `model.layers[i]` in backward (all, or every n-th block).

    checkpoint_wrapper strips its own prefix from state-dict keys, so checkpoints are
    interchangeable with and without it."""
    if mode == "none":
        return
    if every_n < 1:
        raise ConfigError(f"dist.ac_every_n must be >= 1, got {every_n}")
    for i, block in enumerate(model.layers):
        if mode == "full" or i % every_n == 0:
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile every block of `model.layers` in place (`Module.compile`, as torchtitan compiles
    per block: many blocks share one graph, and state-dict keys keep no `_orig_mod.` prefix).

    HOPE's recurrence leaves the block's graph (a graph break in `nl.ops.titans.titans_chunked`): its
    chunk loop stays in Python and each chunk body is compiled once, with the same backend, instead
    of the loop being unrolled (docs/COMPILE.md)."""
    from nl.ops import titans

    titans.CHUNK_COMPILE_BACKEND = backend
    for block in model.layers:
        # Inside an activation-checkpoint wrapper, the wrapped block is compiled and the checkpoint stays
        # eager: dynamo traces a checkpoint as one higher-order op, which cannot hold HOPE's graph break,
        # and gives up on the whole block (it would silently run eager).
        getattr(block, "_checkpoint_wrapped_module", block).compile(backend=backend)


def check_parallelize(cfg: Config) -> None:
    """parallelize's refusals, which need no model (nl/trainer.py makes them before run.dir is touched)."""
    if cfg.train.compile and cfg.dist.strategy == "deepspeed":
        raise ConfigError("train.compile=true with dist.strategy=deepspeed is not supported (DeepSpeed's "
                          "parameter hooks run inside the compiled blocks): use dist.strategy=fsdp or ddp, or "
                          "train.compile=false")


def parallelize(model: nn.Module, cfg: Config, env: DistEnv, bf16: bool) -> nn.Module:
    """Apply activation checkpointing, then compile (train.compile), then the data-parallel strategy
    of cfg.dist.strategy (torchtitan's order)."""
    check_parallelize(cfg)
    apply_activation_checkpointing(model, cfg.dist.activation_checkpointing, cfg.dist.ac_every_n)
    if cfg.train.compile:
        apply_compile(model, cfg.train.compile_backend)
    if env.world_size == 1 or cfg.dist.strategy in ("single", "deepspeed"):
        return model  # deepspeed: the engine wraps it later (nl/distributed/deepspeed.py)
    if cfg.dist.strategy == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce/reduce-scatter on all but the last micro-batch."""
    import contextlib

    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A grad norm from clip_grad_norm_: FSDP2 returns a DTensor; make it a plain tensor."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
