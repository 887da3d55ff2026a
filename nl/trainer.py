"""The training loop: data -> model -> loss -> optimizer (nl/optim) -> metrics and checkpoints.

One obvious path (nanoGPT style). The global batch is `train.batch_size` sequences; each
rank takes batch_size / world_size of them and splits those into micro-batches of
`train.micro_batch_size`. Every micro-batch loss is a token-loss SUM divided by the global
token count, so gradients do not depend on the micro-batch split or the world size.
With dist.strategy=deepspeed the ZeRO engine does backward, accumulation, clipping and the
optimizer step (nl/distributed/deepspeed.py); the branches are marked `ds_engine`.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm import tqdm

from nl.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from nl.config import Config, ConfigError, to_dict, to_yaml
from nl.data.loader import TokenLoader, iter_eval_batches
from nl.data.shards import TokenShards
from nl.distributed import all_reduce_sum, full_norm, init_distributed, parallelize, set_gradient_sync
from nl.evaluate import evaluate_loss, token_loss_sum
from nl.metrics import MetricsLogger, peak_flops
from nl.models import build_model, count_parameters, flops_per_token
from nl.optim import attach_zero_partitions, build_optimizer, check_supported
from nl.provenance import claim_tokenizer


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); nothing corrupt has been saved."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for (auto: on CUDA only; bf16 on CPU is 25-80x slower here)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class LRSchedule:
    """Learning-rate multiplier of step s (0-based): linear warmup, then cosine / WSD / constant.

    cosine: 1 -> min_ratio over the steps after warmup.
    wsd:    1 until the last `decay_fraction` of the steps, then linear to min_ratio."""

    total_steps: int
    warmup_steps: int
    kind: str = "cosine"
    min_ratio: float = 0.1
    decay_fraction: float = 0.2

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        decay_steps = max(1, int(self.total_steps * self.decay_fraction))
        decay_start = self.total_steps - decay_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1 - self.min_ratio) * min(1.0, (step - decay_start + 1) / decay_steps)


def _batch_split(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro-batch size, gradient-accumulation steps) per rank, validated."""
    bs, micro = cfg.train.batch_size, cfg.train.micro_batch_size
    if bs % world_size:
        raise ConfigError(f"train.batch_size={bs} is not divisible by the world size {world_size}")
    local = bs // world_size
    micro = micro or local
    if local % micro:
        raise ConfigError(f"per-rank batch {local} (train.batch_size/world size) is not divisible by "
                          f"train.micro_batch_size={micro}: pick a divisor of {local}")
    return micro, local // micro


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _open_data(cfg: Config) -> tuple[TokenShards, TokenShards | None]:
    train = TokenShards(cfg.data.dir, split="train", verify_checksums=cfg.data.verify_checksums)
    train.check_seq_len(cfg.data.seq_len, min_windows=cfg.train.batch_size)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = train.vocab_size
    elif cfg.model.vocab_size != train.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but {cfg.data.dir} was tokenized with "
                          f"a {train.vocab_size}-token vocabulary: set model.vocab_size=0 (use the "
                          f"data's) or re-tokenize with the model's tokenizer")
    val = None
    if cfg.eval.every > 0 and "val" in train.manifest["splits"] \
            and train.manifest["splits"]["val"]["num_tokens"] > cfg.data.seq_len:
        val = TokenShards(cfg.data.dir, split="val", verify_checksums=cfg.data.verify_checksums)
    return train, val


class StopSignal:
    """SIGTERM / SIGUSR1 (slurm pre-emption) ask for a save at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: Config) -> dict:
    """Train (or resume) the run described by `cfg`; returns a summary of the final state."""
    env = init_distributed(cfg, resolve_device(cfg.train.device))
    rank, world_size, coordinator, device = env.rank, env.world_size, env.coordinator, env.device
    autocast = autocast_for(device, cfg.train.precision)
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    micro_bs, accum_steps = _batch_split(cfg, world_size)
    check_supported(cfg)
    train_data, val_data = _open_data(cfg)

    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = to_yaml(cfg)
    if coordinator:
        (run_dir / "config.yaml").write_text(config_yaml)

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, device=device, seed=cfg.train.seed)
    n_params = count_parameters(model)  # before sharding: FSDP2 parameters hold only a shard
    model = parallelize(model, cfg, env, use_bf16)
    optimizer = inner_optimizer = build_optimizer(model, cfg)  # inner: ours, also under DeepSpeed
    ds_engine = None  # dist.strategy=deepspeed: the engine does backward, accumulation, clipping, step
    if cfg.dist.strategy == "deepspeed":
        from nl.distributed import deepspeed as ds

        ds_config = ds.build_ds_config(cfg, micro_bs, accum_steps, use_bf16)
        if coordinator:
            (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        model = ds_engine = ds.initialize(model, optimizer, ds_config, cfg)
        optimizer = ds_engine.optimizer  # the ZeRO wrapper: its param_groups carry the lr
        attach_zero_partitions(inner_optimizer, optimizer, cfg.dist.zero_stage)
        autocast = contextlib.nullcontext()  # DeepSpeed casts the model itself (bf16.enabled)
    schedule = LRSchedule(cfg.train.steps, cfg.train.warmup_steps, cfg.train.schedule,
                          cfg.train.min_lr_ratio, cfg.train.decay_fraction)
    loader = TokenLoader(train_data, cfg.data.seq_len, cfg.train.batch_size, rank=rank,
                         world_size=world_size, seed=cfg.train.seed)
    step, tokens_seen = 0, 0

    def trainer_state() -> dict:
        return {"step": step, "tokens": tokens_seen, "loader": loader.state_dict(),
                "scheduler": {"kind": schedule.kind, "step": step}, "rng": _rng_state()}

    def checkpoint_state() -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optim": optim_sd, "trainer": trainer_state()}

    resume_from = latest_checkpoint(run_dir) if cfg.checkpoint.resume else None
    if resume_from is not None:
        if ds_engine is not None:
            resumed = ds.load(ds_engine, resume_from, world_size, cfg.dist.zero_stage)["trainer"]
        else:
            state = checkpoint_state()
            load_checkpoint(resume_from, state)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            resumed = state["trainer"]
        step, tokens_seen = int(resumed["step"]), int(resumed["tokens"])
        loader.load_state_dict(resumed["loader"])
        _set_rng_state(resumed["rng"])
    claim_tokenizer(run_dir, train_data, resuming=resume_from is not None, coordinator=coordinator)

    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    flops_per_step = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    peak = peak_flops(device)
    progress = tqdm(total=cfg.train.steps, initial=step, disable=not coordinator, dynamic_ncols=True,
                    mininterval=1.0, desc="train")
    logger = MetricsLogger(run_dir, enabled=coordinator, wandb_cfg=cfg.wandb, config=to_dict(cfg),
                           progress=progress)
    progress.write(f"model {cfg.model.arch}: {n_params / 1e6:.2f}M parameters | {device} | "
                   f"{'resumed from ' + str(resume_from) if resume_from else 'fresh start'} | run {run_dir}")

    def save() -> None:
        if ds_engine is not None:
            ds.save(ds_engine, run_dir, step, {"trainer": trainer_state(), "strategy": "deepspeed"}, config_yaml,
                    cfg.checkpoint.keep_last, world_size, cfg.dist.zero_stage)
        else:
            save_checkpoint(run_dir, step, checkpoint_state(), config_yaml, cfg.checkpoint.keep_last)

    def validate() -> float | None:
        if val_data is None:
            return None
        # max_batches counts global batches of train.batch_size sequences, so the evaluated
        # windows do not depend on the world size or the micro-batch split.
        batches = iter_eval_batches(val_data, cfg.data.seq_len, micro_bs, cfg.eval.max_batches * accum_steps,
                                    rank=rank, world_size=world_size)
        loss_sum, count = evaluate_loss(model, batches, device, autocast)
        totals = all_reduce_sum(torch.stack([loss_sum, count]))
        return (totals[0] / totals[1]).item()

    model.train()
    last_loss, last_val, preempted = float("nan"), None, False
    window_start, window_tokens = time.perf_counter(), 0
    stop = StopSignal()
    try:
        stop.__enter__()
        while step < cfg.train.steps:
            lr = cfg.train.lr * schedule(step)
            for group in optimizer.param_groups:  # lr_scale: per CMS level / matrix rule (nl/optim)
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss_sum = torch.zeros((), device=device)
            inputs, targets = loader.next_batch()
            for micro in range(accum_steps):
                x = inputs[micro * micro_bs:(micro + 1) * micro_bs].to(device, non_blocking=True)
                y = targets[micro * micro_bs:(micro + 1) * micro_bs].to(device, non_blocking=True)
                with set_gradient_sync(model, micro == accum_steps - 1), autocast:
                    loss = token_loss_sum(model, x, y) / tokens_per_step
                    # DDP, FSDP and DeepSpeed average gradients over ranks; the sum over ranks is wanted.
                    if ds_engine is None:
                        (loss * world_size).backward()
                    else:  # no 1/GAS from DeepSpeed: the loss already is a share of the global batch
                        ds_engine.backward(loss * world_size, scale_wrt_gas=False)
                        if micro < accum_steps - 1:
                            ds_engine.step()  # accumulation only; the boundary step is below
                loss_sum += loss.detach()
            if ds_engine is None:
                max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
                grad_norm = full_norm(nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True))
            # One host sync per step, deliberately: a non-finite loss must stop the run before
            # the optimizer writes it into the weights (and so into any later checkpoint). The
            # same all-reduce tells every rank whether any of them was asked to stop.
            stop_flag = torch.tensor(float(stop.received is not None), device=device)
            reduced = all_reduce_sum(torch.stack([loss_sum, stop_flag]))
            if ds_engine is None:  # the grad norm rides along in the same device-to-host copy
                loss_value, stop_votes, norm_value = torch.cat([reduced, grad_norm.float().reshape(1)]).tolist()
            else:
                loss_value, stop_votes = reduced.tolist()
                # DeepSpeed clips and steps at the boundary in one call, so its grad norm is known
                # only after the weights changed: a non-finite norm stops the run just below,
                # before anything is saved (the last checkpoint stays intact). A non-finite loss
                # stops before DeepSpeed's optimizer step.
                norm_value = ds.boundary_step(ds_engine) if math.isfinite(loss_value) else float("nan")
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                last_ckpt = latest_checkpoint(run_dir)
                raise TrainingError(
                    f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} at step "
                    f"{step + 1} (loss={loss_value}, grad_norm={norm_value}); nothing was saved after it"
                    f"{f' and {last_ckpt} is intact' if last_ckpt else ''}. Lower train.lr, raise "
                    f"train.warmup_steps or check the data, then rerun to resume")
            if ds_engine is None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            last_loss = loss_value
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.3f}", refresh=False)

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "loss": loss_value, "lr": lr,
                          "grad_norm": norm_value, "tokens": tokens_seen,
                          "tokens_per_s": window_tokens / elapsed}
                if getattr(inner_optimizer, "last_internal_loss", None):  # DMGD: its memory's own objective
                    losses = inner_optimizer.last_internal_loss.values()
                    record["memory_loss"] = sum(losses) / len(losses)
                if peak is not None:
                    record["mfu"] = flops_per_step * (window_tokens / tokens_per_step) / elapsed / (peak * world_size)
                logger.log(record)
                window_start, window_tokens = time.perf_counter(), 0
            if cfg.eval.every > 0 and (step % cfg.eval.every == 0 or step == cfg.train.steps):
                last_val = validate()
                if last_val is not None:
                    logger.log({"step": step, "val_loss": last_val, "tokens": tokens_seen})
                window_start = time.perf_counter()  # keep validation out of tokens_per_s
            if (cfg.checkpoint.every > 0 and step % cfg.checkpoint.every == 0) or step == cfg.train.steps:
                save()
                window_start = time.perf_counter()
            elif stop_votes > 0:
                save()
            if stop_votes > 0 and step < cfg.train.steps:
                preempted = True
                progress.write(f"stop signal received: saved step {step} to {latest_checkpoint(run_dir)}; "
                               f"rerun the same command to resume")
                break
    finally:
        stop.__exit__()
        progress.close()
        logger.close()
    final_ckpt = latest_checkpoint(run_dir)
    return {"step": step, "loss": last_loss, "val_loss": last_val, "tokens": tokens_seen,
            "parameters": n_params, "run_dir": str(run_dir), "checkpoint": str(final_ckpt),
            "preempted": preempted, "world_size": world_size, "strategy": cfg.dist.strategy}


USER_ERRORS = (ConfigError, CheckpointError, TrainingError)
