"""One small interface per training strategy, so the loop in nl/trainer.py has one path.

A strategy owns what differs between plain PyTorch data parallelism (single / DDP / FSDP2) and
a DeepSpeed ZeRO engine: the gradient-sync context of a micro-batch, backward, gradient
clipping, the optimizer step, and checkpoint save / load. The loop calls, per step:

    with strategy.gradient_sync(last_micro): loss = ...; strategy.backward(loss, last_micro)
    norm = strategy.clip_gradients()      # device tensor, or None where step() clips
    (one host sync of loss, stop votes, norm; a non-finite loss stops here)
    norm = strategy.step(norm_value)      # the global grad norm after the step

`model` is what the forward calls; `optimizer` holds the param groups whose lr the loop sets;
`run_files` are the files (name: text) the trainer writes into run.dir once the start is sure.
`check_strategy` and `check_checkpoint` make the refusals that need nothing built, so the
trainer makes them before run.dir is created, or before anything in it is moved or written.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from nl.checkpoint import check_dcp_checkpoint, load_checkpoint, save_checkpoint
from nl.config import Config
from nl.distributed import DistEnv, check_parallelize, full_norm, set_gradient_sync


class DataParallel:
    """single / ddp / fsdp: autograd backward, torch clipping and step, DCP checkpoints."""

    autocast_ok = True  # the loop's autocast applies (DeepSpeed casts the model itself)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float):
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.run_files: dict[str, str] = {}

    def gradient_sync(self, last_micro: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
        return set_gradient_sync(self.model, last_micro)

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        loss.backward()

    def clip_gradients(self) -> torch.Tensor:
        """Clip to train.grad_clip (0: no clipping); the global norm before clipping, 0-dim, on device."""
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        return full_norm(nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True))

    def step(self, grad_norm: float | None) -> float:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, run_dir: Path, step: int, trainer_state: dict, config_yaml: str, keep_last: int,
             info: dict) -> Path:
        return save_checkpoint(run_dir, step, {**self._state(), "trainer": trainer_state}, config_yaml,
                               keep_last, info)

    def load(self, path: Path, trainer_template: dict) -> dict:
        """Load weights and optimizer state from `path` in place; returns the saved trainer state."""
        state = {**self._state(), "trainer": trainer_template}
        load_checkpoint(path, state)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return state["trainer"]


class DeepSpeedEngine:
    """dist.strategy=deepspeed: the ZeRO engine does backward, accumulation, clipping and the step."""

    autocast_ok = False  # DeepSpeed casts the model itself (bf16.enabled)

    def __init__(self, engine, world_size: int, zero_stage: int, ds_config: dict):
        self.model = self.engine = engine
        self.optimizer = engine.optimizer  # the ZeRO wrapper: its param_groups carry the lr
        self.world_size, self.zero_stage = world_size, zero_stage
        self.run_files = {"ds_config.json": json.dumps(ds_config, indent=2) + "\n"}  # the merged config, a record

    def gradient_sync(self, last_micro: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine reduces at the accumulation boundary itself

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        # no 1/GAS from DeepSpeed: the loss already is a share of the global batch
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last_micro:
            self.engine.step()  # accumulation only; the boundary step is step()

    def clip_gradients(self) -> None:
        return None  # clipped inside the engine's boundary step: the norm is known after it

    def step(self, grad_norm: float | None) -> float:
        from nl.distributed import deepspeed as ds

        return ds.boundary_step(self.engine)

    def save(self, run_dir: Path, step: int, trainer_state: dict, config_yaml: str, keep_last: int,
             info: dict) -> Path:
        from nl.distributed import deepspeed as ds

        return ds.save(self.engine, run_dir, step, {"trainer": trainer_state, "strategy": "deepspeed"}, config_yaml,
                       keep_last, self.world_size, self.zero_stage, info)

    def load(self, path: Path, trainer_template: dict) -> dict:
        from nl.distributed import deepspeed as ds

        return ds.load(self.engine, path, self.world_size, self.zero_stage)["trainer"]


def check_strategy(cfg: Config, micro_bs: int, accum_steps: int, bf16: bool) -> None:
    """parallelize's and build_strategy's refusals that need nothing built (e.g. train.compile with
    deepspeed, deepspeed not installed, a bad dist.deepspeed_config), in one line each."""
    check_parallelize(cfg)
    if cfg.dist.strategy == "deepspeed":
        from nl.distributed import deepspeed as ds

        ds.check_config(cfg, micro_bs, accum_steps, bf16)


def check_checkpoint(path: Path, cfg: Config, world_size: int) -> None:
    """Refuse checkpoint `path` unless this strategy can load it (another strategy's format; deepspeed:
    another ZeRO stage, or ZeRO-0 at another world size), reading only its marker files."""
    if cfg.dist.strategy != "deepspeed":
        return check_dcp_checkpoint(path)
    from nl.distributed import deepspeed as ds

    ds.check_checkpoint(path, world_size, cfg.dist.zero_stage)


def build_strategy(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, env: DistEnv,
                   micro_bs: int, accum_steps: int, bf16: bool):
    """The strategy of cfg.dist.strategy around an already parallelized `model` and its `optimizer`."""
    if cfg.dist.strategy != "deepspeed":
        return DataParallel(model, optimizer, cfg.train.grad_clip)
    from nl.distributed import deepspeed as ds
    from nl.optim import attach_zero_partitions

    ds_config = ds.build_ds_config(cfg, micro_bs, accum_steps, bf16)
    engine = ds.initialize(model, optimizer, ds_config, cfg)
    attach_zero_partitions(optimizer, engine.optimizer, cfg.dist.zero_stage)
    return DeepSpeedEngine(engine, env.world_size, cfg.dist.zero_stage, ds_config)
