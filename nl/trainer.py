"""The training loop: data -> model -> loss -> optimizer (nl/optim) -> metrics and checkpoints.

One obvious path (nanoGPT style). The global batch is `train.batch_size` sequences; each
rank takes batch_size / world_size of them and splits those into micro-batches of
`train.micro_batch_size`. Every micro-batch loss is a token-loss SUM divided by the global
token count, so gradients do not depend on the micro-batch split or the world size.
What differs between strategies (backward, clipping, the optimizer step, checkpoint save and
load: plain PyTorch for single/ddp/fsdp, the ZeRO engine for deepspeed) sits behind one small
interface (nl/distributed/strategy.py), so this loop has no branch on the engine underneath.
Which checkpoint a run starts from, and whether it may, is nl/checkpoint/run_dir.py's job.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nl.checkpoint import CheckpointError, list_checkpoints
from nl.checkpoint.run_dir import config_changes, current_config, saved_config, select_start
from nl.config import Config, ConfigError, to_dict, to_yaml
from nl.data.loader import TokenLoader, iter_eval_batches
from nl.data.mixture import MixtureLoader, Source, data_sources, open_splits
from nl.data.shards import TokenShards
from nl.distributed import all_reduce_sum, init_distributed, parallelize
from nl.distributed.strategy import build_strategy, check_checkpoint, check_strategy
from nl.evaluate import evaluate_loss, token_loss_sum
from nl.export import load_init_weights
from nl.lm_eval import InLoopTasks
from nl.metrics import MetricsLogger, check_wandb, peak_flops, progress_enabled
from nl.models import build_model, count_parameters, flops_per_token
from nl.models.documents import document_reset
from nl.optim import build_optimizer, check_supported
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


def _make_run_dir(run_dir: Path) -> Path:
    """Create run.dir (and its parents) if missing; a path that cannot be a directory is refused in one line."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={run_dir} is an existing file, not a directory: choose another run.dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run.dir={run_dir} cannot be created ({e.strerror or e}): choose a run.dir in a "
                          f"writable location") from None
    return run_dir


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _open_data(cfg: Config) -> tuple[list[Source], list[TokenShards], dict[str, TokenShards]]:
    """(sources, their train splits, val splits by source name) of data.dir (one source named "")
    or data.sources (nl/data/mixture.py: one tokenizer for all). A source's val split is used when
    periodic validation is on and it holds more than seq_len tokens."""
    sources = data_sources(cfg.data) or [Source("", cfg.data.dir, 1.0)]
    train = open_splits(sources, "train", cfg.data.verify_checksums)
    if not cfg.data.sources:
        train[0].check_seq_len(cfg.data.seq_len, min_windows=cfg.train.batch_size)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = train[0].vocab_size
    elif cfg.model.vocab_size != train[0].vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but {train[0].dir} was tokenized with "
                          f"a {train[0].vocab_size}-token vocabulary: set model.vocab_size=0 (use the "
                          f"data's) or re-tokenize with the model's tokenizer")
    val = {}
    for source, split in zip(sources, train):
        if cfg.eval.every > 0 and "val" in split.manifest["splits"] \
                and split.manifest["splits"]["val"]["num_tokens"] > cfg.data.seq_len:
            val[source.name] = TokenShards(source.dir, split="val", verify_checksums=cfg.data.verify_checksums)
    return sources, train, val


class StopSignal:
    """SIGINT (Ctrl-C), SIGTERM and SIGUSR1 (slurm pre-emption) ask for a save at the next step
    boundary; a second SIGINT aborts at once (KeyboardInterrupt), saving nothing more.

    Repeated SIGTERM / SIGUSR1 do not abort: schedulers may repeat them, then escalate to SIGKILL."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt(f"second interrupt after {signal.Signals(self.received).name}")
        self.received = self.received or signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _divergence_error(run_dir: Path, step: int, loss_value: float, norm_value: float | None) -> TrainingError:
    """The non-finite loss / grad-norm error: which checkpoints remain and how to go back before one."""
    what = "loss" if not math.isfinite(loss_value) else "gradient norm"
    kept = list_checkpoints(run_dir)
    head = (f"non-finite {what} at step {step} (loss={loss_value}, grad_norm={norm_value}); nothing was saved "
            f"after it. ")
    if not kept:
        return TrainingError(head + "No checkpoint was saved before it: lower train.lr, raise train.warmup_steps "
                                    "or check the data, then rerun (a fresh start)")
    steps = ", ".join(str(s) for s, _ in kept)
    earlier = f"checkpoint.load_step={kept[-2][0]}" if len(kept) > 1 else "checkpoint.resume=false " \
        "checkpoint.overwrite=true (a fresh start)"
    return TrainingError(
        head + f"Checkpoints kept: steps {steps}; {kept[-1][1]} is intact but may already carry the divergence "
        f"(weights drift before the loss shows it, so resuming it can fail at the same step). Lower train.lr, "
        f"raise train.warmup_steps or check the data, then rerun with {earlier} to go back before it")


def _announce_changes(say, changes: list, saved: dict, cfg: Config, step: int) -> None:
    """One log line per config key changed since the checkpoint; the lr jump if the schedule moved."""
    for key, old, new in changes:
        say(f"resume: {key} changed {old} -> {new} since the checkpoint")
    keys = ("train.lr", "train.steps", "train.warmup_steps", "train.schedule", "train.min_lr_ratio",
            "train.decay_fraction")
    if not any(k in keys for k, _, _ in changes) or step >= cfg.train.steps:
        return
    old = saved["train.lr"] * LRSchedule(saved["train.steps"], saved["train.warmup_steps"], saved["train.schedule"],
                                         saved["train.min_lr_ratio"], saved["train.decay_fraction"])(step)
    new = cfg.train.lr * LRSchedule(cfg.train.steps, cfg.train.warmup_steps, cfg.train.schedule,
                                    cfg.train.min_lr_ratio, cfg.train.decay_fraction)(step)
    say(f"resume: the lr schedule is recomputed for the new settings ({cfg.train.schedule} over "
        f"{cfg.train.steps} steps): lr at step {step + 1} is {new:.3e} (the old schedule's: {old:.3e})")


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def triton_compile_notice(cfg, device: torch.device) -> str | None:
    """The line printed at start when HOPE's chunk step will run as compiled Triton kernels (model.hope.kernel
    triton or auto, on CUDA, Triton installed), else None: the first step compiles them for each new shape, and
    at the 340m-1.3b shapes that takes many minutes of ptxas (docs/BENCHMARKS.md "Kernels compiled for sm_90"),
    which would otherwise look like a hung run."""
    from nl.ops.delta_rule import triton_available

    if cfg.model.arch != "hope" or cfg.model.hope.kernel == "torch" or device.type != "cuda" or not triton_available():
        return None  # (kernel=triton without CUDA runs in Triton's interpreter: nothing is compiled)
    return ("model.hope.kernel: HOPE's Triton kernels compile during the first step for each new shape (at the "
            "340m shape over 20 minutes on a 2-core host from a cold cache); they are cached in TRITON_CACHE_DIR "
            "(default ~/.triton/cache): set it to shared storage on a cluster, or use model.hope.kernel=torch")


def train(cfg: Config) -> dict:
    """Train (or resume) the run described by `cfg`; returns a summary of the final state.

    From the start, SIGINT / SIGTERM / SIGUSR1 stop the run at the next step boundary with a
    checkpoint (summary["stopped_by"] names the signal); a second SIGINT raises KeyboardInterrupt."""
    with StopSignal() as stop:
        return _train(cfg, stop)


def _train(cfg: Config, stop: StopSignal) -> dict:
    env = init_distributed(cfg, resolve_device(cfg.train.device))
    rank, world_size, coordinator, device = env.rank, env.world_size, env.coordinator, env.device
    autocast = autocast_for(device, cfg.train.precision)
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    micro_bs, accum_steps = _batch_split(cfg, world_size)
    check_supported(cfg)
    sources, train_splits, val_data = _open_data(cfg)
    train_data = train_splits[0]  # its tokenizer is every source's
    # Every refusal that needs no run.dir state comes before run.dir is created or written, so a
    # refused start leaves no run.dir behind and changes nothing in an existing one.
    build_model(cfg.model, device="meta")  # the model's refusals (e.g. model.n_heads=0)
    check_strategy(cfg, micro_bs, accum_steps, use_bf16)  # e.g. deepspeed not installed, train.compile with it
    check_wandb(cfg.wandb)  # wandb.enabled=true without the package
    # eval.tasks: lm-eval names checked on every rank now, so a typo stops the run before step 1.
    in_loop_tasks = InLoopTasks(cfg, train_data.tokenizer_path) if cfg.eval.tasks else None
    # train.init_from applies to a fresh start only (a resume loads its checkpoint). A fresh start is
    # exactly a start with no checkpoint to resume (select_start below returns one, or refuses, iff
    # checkpoint.resume=true and run.dir holds checkpoints), so the export is loaded, or refused for
    # another shape or tokenizer, now. The model is built as below (same seed, no random draws between).
    base_model = None
    if cfg.train.init_from and not (cfg.checkpoint.resume and list_checkpoints(Path(cfg.run.dir))):
        torch.manual_seed(cfg.train.seed)
        base_model = build_model(cfg.model, device=device, seed=cfg.train.seed)
        load_init_weights(base_model, cfg.train.init_from, train_data.fingerprint)

    run_dir = _make_run_dir(Path(cfg.run.dir))
    # Which checkpoint to start from, refused in one line before anything is built or written when
    # the run.dir holds another run, the checkpoint was trained with other state-shaping settings, or
    # this strategy cannot load it (e.g. a deepspeed checkpoint resumed with dist.strategy=fsdp).
    saved, changes = {}, []

    def compare(path: Path) -> None:
        nonlocal saved, changes
        check_checkpoint(path, cfg, world_size)
        saved = saved_config(path) or {}
        changes = config_changes(path, saved, current_config(cfg, train_data.fingerprint)) if saved else []

    resume_from = select_start(cfg, compare)
    assert base_model is None or resume_from is None, "train.init_from was loaded for a start that resumes"
    claim_tokenizer(run_dir, train_data, resuming=resume_from is not None, coordinator=coordinator)
    config_yaml = to_yaml(cfg)

    if base_model is None:  # (with train.init_from on a fresh start: built and loaded above)
        torch.manual_seed(cfg.train.seed)
        base_model = build_model(cfg.model, device=device, seed=cfg.train.seed)
    if cfg.data.document_boundaries == "reset":  # each document of a window alone (nl/models/documents.py)
        document_reset(base_model, train_data.eos_id)
    n_params = count_parameters(base_model)  # before sharding: FSDP2 parameters hold only a shard
    model = parallelize(base_model, cfg, env, use_bf16)
    inner_optimizer = build_optimizer(model, cfg)  # ours (nl/optim), also under DeepSpeed
    strategy = build_strategy(model, inner_optimizer, cfg, env, micro_bs, accum_steps, use_bf16)
    model, optimizer = strategy.model, strategy.optimizer  # optimizer: its param_groups carry the lr
    if not strategy.autocast_ok:
        autocast = contextlib.nullcontext()
    diagnostics = getattr(base_model, "diagnostics", None)  # dict of 0-dim tensors from the last forward
    schedule = LRSchedule(cfg.train.steps, cfg.train.warmup_steps, cfg.train.schedule,
                          cfg.train.min_lr_ratio, cfg.train.decay_fraction)
    if cfg.data.sources:
        loader = MixtureLoader(train_splits, [s.weight for s in sources], cfg.data.seq_len, cfg.train.batch_size,
                               rank=rank, world_size=world_size, seed=cfg.train.seed)
    else:
        loader = TokenLoader(train_data, cfg.data.seq_len, cfg.train.batch_size, rank=rank,
                             world_size=world_size, seed=cfg.train.seed)
    step, tokens_seen = 0, 0

    def trainer_state() -> dict:
        return {"step": step, "tokens": tokens_seen, "loader": loader.state_dict(),
                "scheduler": {"kind": schedule.kind, "step": step}, "rng": _rng_state()}

    if resume_from is not None:
        resumed = strategy.load(resume_from, trainer_state())
        step, tokens_seen = int(resumed["step"]), int(resumed["tokens"])
        loader.load_state_dict(resumed["loader"])
        _set_rng_state(resumed["rng"])

    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    flops_per_step = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    peak = peak_flops(device)
    progress = tqdm(total=cfg.train.steps, initial=step, disable=not (coordinator and progress_enabled(cfg.run.progress)),
                    dynamic_ncols=True, mininterval=1.0, desc="train")
    logger = MetricsLogger(run_dir, enabled=coordinator, wandb_cfg=cfg.wandb, config=to_dict(cfg),
                           progress=progress, start_step=step)
    if coordinator:  # now that the checkpoint loaded and the logger started: a refused start keeps the old ones
        for name, text in {"config.yaml": config_yaml, **strategy.run_files}.items():
            (run_dir / name).write_text(text)

    def say(line: str) -> None:  # rank 0 only; through the bar so it stays intact
        if coordinator:
            progress.write(line)

    say(f"model {cfg.model.arch}: {n_params / 1e6:.2f}M parameters | {device} | "
        f"{'resumed from ' + str(resume_from) if resume_from else 'fresh start'} | run {run_dir}")
    if (notice := triton_compile_notice(cfg, device)) is not None:
        say(notice)
    _announce_changes(say, changes, saved, cfg, step)
    unvalidated = [s.name for s in sources if s.name not in val_data]
    if cfg.data.sources and cfg.eval.every > 0 and unvalidated:
        say(f"validation: source(s) {', '.join(unvalidated)} have no val split of more than data.seq_len tokens: "
            + ("val_loss weights the others" if val_data else "no val_loss"))
    elif cfg.eval.every > 0 and not val_data:
        say(f"validation: data.dir {cfg.data.dir} has no val split of more than data.seq_len tokens: no val_loss "
            f"(tokenize with --val-fraction > 0, or set eval.every=0)")
    last_saved = resume_from

    def save() -> Path:
        info = {"step": step, "tokenizer_fingerprint": train_data.fingerprint}
        return strategy.save(run_dir, step, trainer_state(), config_yaml, cfg.checkpoint.keep_last, info)

    def validate() -> dict[str, float]:
        """{"val_loss": mean token loss} ({} without val data); with data.sources also
        "val_loss/<name>" per source, and val_loss is their weighted mean over the sources with val data."""
        if not val_data:
            return {}
        sums = []
        for split in val_data.values():
            # max_batches counts global batches of train.batch_size sequences (per source), so the
            # evaluated windows do not depend on the world size or the micro-batch split.
            batches = iter_eval_batches(split, cfg.data.seq_len, micro_bs, cfg.eval.max_batches * accum_steps,
                                        rank=rank, world_size=world_size)
            sums.extend(evaluate_loss(model, batches, device, autocast))
        totals = all_reduce_sum(torch.stack(sums)).tolist()  # one collective for every source
        losses = {name: totals[2 * i] / totals[2 * i + 1] for i, name in enumerate(val_data)}
        if not cfg.data.sources:
            return {"val_loss": losses[""]}
        weights = {s.name: s.weight for s in sources if s.name in losses}
        overall = sum(weights[n] * loss for n, loss in losses.items()) / sum(weights.values())
        return {"val_loss": overall, **{f"val_loss/{n}": loss for n, loss in losses.items()}}

    def evaluate_tasks() -> dict[str, float]:
        """eval.tasks on rank 0's unwrapped model; the other ranks wait. lm-eval reseeds the global RNG:
        the training RNG state is put back, so the run's random numbers do not depend on eval.tasks."""
        rng = _rng_state()
        results = in_loop_tasks(base_model) if coordinator else {}
        _set_rng_state(rng)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return results

    model.train()
    last_loss, last_val, stopped_by = None, None, None
    window_start, window_tokens = time.perf_counter(), 0
    try:
        while step < cfg.train.steps:
            lr = cfg.train.lr * schedule(step)
            for group in optimizer.param_groups:  # lr_scale: per CMS level / matrix rule (nl/optim)
                group["lr"] = lr * group.get("lr_scale", 1.0)
            log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps
            loss_sum = torch.zeros((), device=device)
            inputs, targets = loader.next_batch()
            for micro in range(accum_steps):
                x = inputs[micro * micro_bs:(micro + 1) * micro_bs].to(device, non_blocking=True)
                y = targets[micro * micro_bs:(micro + 1) * micro_bs].to(device, non_blocking=True)
                last_micro = micro == accum_steps - 1
                with strategy.gradient_sync(last_micro):
                    with autocast:
                        loss = token_loss_sum(model, x, y) / tokens_per_step
                    # DDP, FSDP and DeepSpeed average gradients over ranks; the sum over ranks is wanted.
                    strategy.backward(loss * world_size, last_micro)
                loss_sum += loss.detach()
            grad_norm = strategy.clip_gradients()  # None where the engine clips inside its step
            diag = diagnostics() if log_now and diagnostics is not None else {}
            # One host sync per step, deliberately: a non-finite loss must stop the run before
            # the optimizer writes it into the weights (and so into any later checkpoint). The
            # same all-reduce tells every rank whether any of them was asked to stop; the grad
            # norm and the model's diagnostics ride along in the same device-to-host copy.
            stop_flag = torch.tensor(float(stop.received is not None), device=device)
            local = ([] if grad_norm is None else [grad_norm]) + list(diag.values())
            host = torch.cat([all_reduce_sum(torch.stack([loss_sum, stop_flag])),
                              *(t.detach().float().reshape(1).to(device) for t in local)]).tolist()
            loss_value, stop_votes = host[0], host[1]
            norm_value = host[2] if grad_norm is not None else None
            if not math.isfinite(loss_value) or (norm_value is not None and not math.isfinite(norm_value)):
                raise _divergence_error(run_dir, step + 1, loss_value, norm_value)
            # DeepSpeed clips and steps at the boundary in one call, so its grad norm is known only
            # after the weights changed: a non-finite one stops the run just below, before any save.
            norm_value = strategy.step(norm_value)
            if not math.isfinite(norm_value):
                raise _divergence_error(run_dir, step + 1, loss_value, norm_value)
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            last_loss = loss_value
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.3f}", refresh=False)

            if log_now:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "loss": loss_value, "lr": lr,
                          "grad_norm": norm_value, "tokens": tokens_seen,
                          "tokens_per_s": window_tokens / elapsed}
                if getattr(inner_optimizer, "last_internal_loss", None):  # DMGD: its memory's own objective
                    losses = inner_optimizer.last_internal_loss.values()
                    record["memory_loss"] = sum(losses) / len(losses)
                if peak is not None:
                    record["mfu"] = flops_per_step * (window_tokens / tokens_per_step) / elapsed / (peak * world_size)
                record.update(zip(diag, host[len(host) - len(diag):]))
                logger.log(record)
                window_start, window_tokens = time.perf_counter(), 0
            if cfg.eval.every > 0 and (step % cfg.eval.every == 0 or step == cfg.train.steps):
                val_losses = validate()
                last_val = val_losses.get("val_loss")
                if in_loop_tasks is not None:
                    val_losses.update(evaluate_tasks())
                if val_losses:
                    logger.log({"step": step, **val_losses, "tokens": tokens_seen})
                window_start = time.perf_counter()  # keep validation out of tokens_per_s
            if (cfg.checkpoint.every > 0 and step % cfg.checkpoint.every == 0) or step == cfg.train.steps \
                    or stop_votes > 0:
                last_saved = save()
                window_start = time.perf_counter()
            if stop_votes > 0 and step < cfg.train.steps:
                stopped_by = signal.Signals(stop.received or signal.SIGTERM).name  # a peer's signal: TERM
                say(f"stop signal received ({stopped_by}): saved step {step} to {last_saved}; "
                    f"rerun the same command to resume")
                break
    finally:
        progress.close()
        logger.close()
    if last_loss is None:  # nothing left to train (a finished run rerun): the last recorded values
        last_loss, last_val = logger.last("loss"), logger.last("val_loss")
    return {"step": step, "loss": _finite_or_none(last_loss), "val_loss": _finite_or_none(last_val),
            "tokens": tokens_seen, "parameters": n_params, "run_dir": str(run_dir),
            "checkpoint": str(last_saved) if last_saved else None, "preempted": stopped_by is not None,
            "stopped_by": stopped_by, "world_size": world_size, "strategy": cfg.dist.strategy}


USER_ERRORS = (ConfigError, CheckpointError, TrainingError)
