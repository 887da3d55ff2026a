"""dist.strategy=deepspeed: a DeepSpeed ZeRO engine (stage dist.zero_stage) around our model.

The only module that imports deepspeed (lazily, inside the functions), so the single / ddp /
fsdp path never needs it. Install: DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed.

- The DeepSpeed config is generated from ours (`build_ds_config`): batch split, gradient
  clipping, bf16 and the ZeRO stage. It has no "optimizer" or "scheduler" section: we pass our
  torch AdamW (an optimizer named in the config would JIT-compile fused_adam) and set the lr
  of every param group each step, as the loop does for the other strategies. A user JSON at
  dist.deepspeed_config is deep-merged over it (its keys win); the merged config is written
  to RUN_DIR/ds_config.json.
- Checkpoints go through `engine.save_checkpoint` into the same atomic scheme as DCP ones:
  checkpoints/.tmp-step_X/ then renamed to checkpoints/step_X/. The directory holds DeepSpeed's
  files under the tag "ds", config.yaml, and the marker deepspeed.json (strategy, ZeRO stage,
  world size) by which `nl.checkpoint.list_checkpoints` finds it. Trainer state (step, tokens,
  loader, RNG) travels in DeepSpeed's client_state.
- Resume needs the same strategy and ZeRO stage; ZeRO-1/2/3 checkpoints also resume at another
  world size. ZeRO-1/2 (`_load_resharded`): the module and client_state load as usual, then every
  rank rebuilds its flat partition of the fp32 master weights and of each per-coordinate
  optimizer state from all saved ranks' partitions. ZeRO-3 (`_load_resharded_zero3`) partitions
  each parameter on its own, so every parameter's full fp32 value and per-coordinate state are
  joined from the saved slices and re-cut for this rank, the working (bit16) partitions follow
  the fp32 master, and client_state comes from saved rank 0's model-states file. In both, state
  that is not partition-shaped (step counters, DMGD's memory, identical on every rank) comes from
  rank 0. ZeRO-0 at another world size, another stage, or a checkpoint of another strategy are
  refused with a CheckpointError naming the fix (no DeepSpeed universal-checkpoint conversion).
  Export (`python -m nl.export`) reads any deepspeed checkpoint, at any world size.
"""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nl.checkpoint import DEEPSPEED_MARKER, CheckpointError, _is_coordinator, atomic_save
from nl.config import Config, ConfigError

TAG = "ds"  # DeepSpeed's sub-directory inside every step_X checkpoint


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"dist.strategy=deepspeed needs the deepspeed package ({e}): install it with "
                          f"DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8 "
                          f"(or `make setup`), or use dist.strategy=ddp/fsdp") from None
    return deepspeed


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def build_ds_config(cfg: Config, micro_bs: int, accum_steps: int, bf16: bool) -> dict:
    """The DeepSpeed config of this run: generated from ours, then the user JSON merged over it."""
    stage = int(cfg.dist.zero_stage)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"dist.zero_stage={stage} is not one of 0, 1, 2, 3")
    ds = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro_bs,
        "gradient_accumulation_steps": accum_steps,
        "gradient_clipping": float(cfg.train.grad_clip),
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": {"stage": stage},
        # our optimizers (nl/optim) work on ZeRO's flat partitions: element-wise rules only, the
        # others are refused by nl.optim.check_supported before the engine is built
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.dist.deepspeed_config:
        path = Path(cfg.dist.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except OSError as e:
            raise ConfigError(f"dist.deepspeed_config={path} cannot be read ({e.strerror}): give the path "
                              f"of a DeepSpeed JSON config or leave it empty") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"dist.deepspeed_config={path} is not valid JSON ({e})") from None
        if not isinstance(user, dict):
            raise ConfigError(f"dist.deepspeed_config={path} must hold a JSON object")
        for section in ("optimizer", "scheduler"):
            if section in user:
                raise ConfigError(f"dist.deepspeed_config={path} has an '{section}' section: remove it; the "
                                  f"optimizer and lr schedule come from optim.* and train.* (a DeepSpeed "
                                  f"optimizer would also JIT-compile fused_adam)")
        ds = _deep_merge(ds, user)
    return ds


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, cfg: Config):
    """deepspeed.initialize on the process group init_distributed created; returns the engine."""
    deepspeed = _import_deepspeed()
    # Joins the existing torch.distributed group (gloo on CPU, nccl on CUDA). The first call
    # JIT-compiles DeepSpeed's shared-memory comm op on CPU (~30 s; cached afterwards).
    deepspeed.init_distributed(timeout=timedelta(seconds=cfg.dist.timeout_s))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def _marker(path: Path) -> dict:
    return json.loads((path / DEEPSPEED_MARKER).read_text())


def save(engine, run_dir: str | Path, step: int, client_state: dict[str, Any], config_yaml: str,
         keep_last: int, world_size: int, zero_stage: int, info: dict | None = None) -> Path:
    """engine.save_checkpoint through nl.checkpoint.atomic_save (collective)."""

    def write(tmp: Path) -> None:
        engine.save_checkpoint(str(tmp), tag=TAG, client_state=client_state, save_latest=False)
        if _is_coordinator():
            (tmp / DEEPSPEED_MARKER).write_text(json.dumps(
                {"strategy": "deepspeed", "tag": TAG, "zero_stage": zero_stage, "world_size": world_size,
                 "step": step}, indent=2) + "\n")

    return atomic_save(run_dir, step, write, config_yaml, keep_last, info)


def check_config(cfg: Config, micro_bs: int, accum_steps: int, bf16: bool) -> None:
    """This run's refusals that need nothing built: deepspeed not installed, a bad dist.zero_stage or
    dist.deepspeed_config (nl/trainer.py makes them before run.dir is created or written)."""
    build_ds_config(cfg, micro_bs, accum_steps, bf16)
    _import_deepspeed()


def check_checkpoint(path: Path, world_size: int, zero_stage: int) -> None:
    """Refuse checkpoint `path` unless this engine can load it: written by deepspeed with the same ZeRO
    stage (ZeRO-0: also the same world size). Reads only the marker, so a resume is refused before
    anything is built."""
    if not (path / DEEPSPEED_MARKER).is_file():
        raise CheckpointError(f"checkpoint {path} was written by dist.strategy=single/ddp/fsdp (DCP format), "
                              f"not deepspeed: resume it with dist.strategy=fsdp (or ddp/single), or start "
                              f"a new run.dir; conversion is not supported")
    meta = _marker(path)
    saved_world = int(meta["world_size"])
    reshard = saved_world != world_size
    saved_stage = int(meta["zero_stage"])
    if saved_stage != zero_stage or (reshard and zero_stage == 0):
        where = "on any world size" if saved_stage in (1, 2, 3) else f"on {saved_world} ranks"
        raise CheckpointError(f"checkpoint {path} was written by deepspeed ZeRO-{saved_stage} on "
                              f"{saved_world} ranks, this run is ZeRO-{zero_stage} on {world_size}: "
                              f"resume with dist.zero_stage={saved_stage} {where}, "
                              f"or export it (python -m nl.export) and start a new run.dir")


def load(engine, path: str | Path, world_size: int, zero_stage: int) -> dict:
    """Load checkpoint `path` into the engine (weights, optimizer); returns its client_state."""
    path = Path(path)
    check_checkpoint(path, world_size, zero_stage)
    meta = _marker(path)
    saved_world = int(meta["world_size"])
    reshard = saved_world != world_size
    tag = meta.get("tag", TAG)
    try:
        if reshard and zero_stage == 3:
            load_path, client_state = path, _load_resharded_zero3(engine, path / tag, saved_world)
        else:
            load_path, client_state = engine.load_checkpoint(str(path), tag=tag, load_module_strict=True,
                                                             load_optimizer_states=not reshard)
            if reshard and load_path is not None:
                _load_resharded(engine, path / tag, saved_world)
    except Exception as e:  # noqa: BLE001 - any read failure
        raise CheckpointError(f"checkpoint {path} could not be loaded ({type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or ['no detail'])[-1][:300]}); if it is corrupt, "
                              f"move it away to resume from the previous checkpoint") from None
    if load_path is None or not client_state or "trainer" not in client_state:
        raise CheckpointError(f"checkpoint {path} has no DeepSpeed state under tag '{TAG}': it is incomplete; "
                              f"move it away to resume from the previous checkpoint")
    return client_state


def _optim_states_file(ckpt_dir: Path, rank: int) -> Path:
    """Saved rank `rank`'s ZeRO optimizer-states file; DeepSpeed prefixes it with 'bf16_' in bf16 runs."""
    name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    return ckpt_dir / name if (ckpt_dir / name).is_file() else ckpt_dir / f"bf16_{name}"


def _load_resharded(engine, ckpt_dir: Path, saved_world: int) -> None:
    """ZeRO-1/2 at a new world size: this rank's partition of the fp32 master weights and of every
    per-coordinate optimizer state, cut from the concatenation of all saved ranks' partitions.

    DeepSpeed flattens each param group into one buffer, pads it at the end to a multiple of the
    alignment, and gives rank r the r-th equal slice; `group_paddings` says how much of each saved
    slice is padding. State tensors of any other shape (step counters, DMGD's memory MLP, which
    every rank holds identically) are taken from saved rank 0."""
    import torch.distributed as dist

    zero = engine.optimizer
    inner = zero.optimizer
    saved = [torch.load(_optim_states_file(ckpt_dir, r), map_location="cpu", weights_only=False)["optimizer_state_dict"]
             for r in range(saved_world)]
    rank = dist.get_rank(group=zero.dp_process_group) if dist.is_initialized() else 0
    for g, group in enumerate(inner.param_groups):
        flat_param = group["params"][0]
        n_local = flat_param.numel()
        parts = [sd["single_partition_of_fp32_groups"][g] for sd in saved]
        n_true = sum(p.numel() for p in parts) - sum(int(sd["group_paddings"][g]) for sd in saved)
        start = rank * n_local
        keep = max(0, min(n_local, n_true - start))

        def local_slice(partitions: list[torch.Tensor]) -> torch.Tensor:
            out = torch.zeros(n_local, dtype=partitions[0].dtype)
            out[:keep] = torch.cat([p.flatten() for p in partitions])[start:start + keep]
            return out

        zero.single_partition_of_fp32_groups[g].data.copy_(local_slice(parts))
        states = [sd["base_optimizer_state"]["state"].get(g) for sd in saved]
        if states[0] is None:  # the group had not stepped yet
            continue
        new_state = {}
        for key, value in states[0].items():
            if torch.is_tensor(value) and value.shape == parts[0].shape:
                new_state[key] = local_slice([st[key] for st in states]).to(flat_param.device)
            else:
                new_state[key] = value.clone().to(flat_param.device) if torch.is_tensor(value) else copy.deepcopy(value)
        inner.state[flat_param] = new_state
    # The module (full weights, bit16 under bf16) was loaded from the model-states file; relink
    # DeepSpeed's per-parameter views onto the replaced optimizer state, as its own load does.
    zero._link_all_hp_params()


def _load_resharded_zero3(engine, ckpt_dir: Path, saved_world: int) -> dict:
    """ZeRO-3 at a new world size: everything read from the saved files; returns the client_state.

    ZeRO-3 partitions each parameter on its own: with k = ceil(numel / world), rank r holds its
    elements [r*k, (r+1)*k) (the last slice zero-padded), and a sub-group's flat fp32 buffer, like
    each per-coordinate optimizer state, is its parameters' slices end to end. So a parameter's
    full value is its slices on all saved ranks, concatenated, and this rank cuts its new slice
    from that. Sub-groups (zero_optimization.sub_group_size) may split differently at another world
    size, so the cut goes parameter by parameter. Other state (step counters, DMGD's memory) comes
    from saved rank 0's sub-group that held the sub-group's first parameter. DeepSpeed's own load
    is not used: it opens this rank's model-states file, absent when the world grows, and its
    weights-only path needs a 'latest' file."""
    import torch.distributed as dist

    zero = engine.optimizer
    inner = zero.optimizer

    def read(file: Path) -> dict:
        return torch.load(file, map_location="cpu", weights_only=False)

    # Every saved rank wrote a model-states file; rank 0's client_state is used, as ZeRO-1/2 resumes do.
    model_state = read(ckpt_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    saved = [read(_optim_states_file(ckpt_dir, r))["optimizer_state_dict"] for r in range(saved_world)]
    params = [p for group in zero.fp16_groups for p in group]
    saved_shapes = [tuple(s) for group in model_state["param_shapes"] for s in group.values()]
    if saved_shapes != [tuple(p.ds_shape) for p in params]:
        raise RuntimeError("its parameter shapes differ from this model's")

    # Per parameter, in ZeRO's order: its full fp32 value and per-coordinate states, and the other
    # state of the saved sub-group it was in.
    full: list[dict[str, torch.Tensor]] = []
    other: list[dict[str, Any]] = []
    for j, group in enumerate(model_state["param_shapes"]):
        per_rank = [{"fp32": sd["fp32_flat_groups"][j], **sd["optimizer_state_dict"]["state"].get(j, {})}
                    for sd in saved]
        n_flat = per_rank[0]["fp32"].numel()
        coords = [key for key, v in per_rank[0].items() if torch.is_tensor(v) and v.shape == (n_flat,)]
        offset = 0
        for shape in group.values():
            n = shape.numel()
            k = -(-n // saved_world)
            full.append({key: torch.cat([st[key][offset:offset + k] for st in per_rank])[:n] for key in coords})
            other.append({key: v for key, v in per_rank[0].items() if key not in coords})
            offset += k
        if offset != n_flat:
            raise RuntimeError(f"saved sub-group {j} holds {n_flat} elements, its parameters' slices {offset}")

    rank = dist.get_rank(group=zero.dp_process_group) if dist.is_initialized() else 0
    zero.checkpoint_event_prologue()  # every parameter partitioned: its data lives in ds_tensor only
    engine.module.load_state_dict(model_state["module"], strict=True)  # buffers; parameters are empty here
    i = 0
    for group, flat in zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat):
        first = i
        local: dict[str, list[torch.Tensor]] = {key: [] for key in full[first]}
        for p in group:
            k = p.partition_numel()
            for key, value in full[i].items():
                piece = value.new_zeros(k)
                cut = value[rank * k:(rank + 1) * k]
                piece[:cut.numel()] = cut
                local[key].append(piece)
            # the working (bit16 under bf16) partition from the fp32 master, as DeepSpeed does
            p.ds_tensor.data.copy_(local["fp32"][-1])
            i += 1
        new = {key: torch.cat(pieces).to(flat.device) for key, pieces in local.items()}
        if new["fp32"].numel() != flat.numel():
            raise RuntimeError(f"ZeRO-3 partition of {flat.numel()} elements, expected {new['fp32'].numel()}")
        flat.data.copy_(new.pop("fp32"))
        rest = {key: v.clone().to(flat.device) if torch.is_tensor(v) else copy.deepcopy(v)
                for key, v in other[first].items()}
        if new or rest:  # else the saved sub-group had not stepped yet
            inner.state[flat] = {**new, **rest}
    zero.checkpoint_event_epilogue()  # as DeepSpeed's load ends: re-gather the persistent (small) parameters
    engine.global_steps = model_state["global_steps"]
    engine.global_samples = model_state["global_samples"]
    engine.skipped_steps = model_state["skipped_steps"]
    return model_state


def consolidated_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 model state dict of deepspeed checkpoint `path` (any stage, any world size), offline."""
    path = Path(path)
    meta = _marker(path)
    tag = meta.get("tag", TAG)
    if int(meta["zero_stage"]) == 0:  # no ZeRO partitions: the module states hold the weights
        state = torch.load(path / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k.replace("_checkpoint_wrapped_module.", ""): v.float() for k, v in state["module"].items()}
    _import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    # named_parameters() keeps activation checkpointing's wrapper prefix; state_dict() does not.
    return {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in state.items()}


def boundary_step(engine) -> float:
    """The accumulation-boundary engine.step() (clip + optimizer step); returns the global grad norm.

    ZeRO optimizers report the norm themselves; with stage 0 in fp32 DeepSpeed steps our torch
    optimizer directly and tracks none, so it is computed from the (all-reduced) gradients first."""
    pre_norm = None
    if not hasattr(engine.optimizer, "_global_grad_norm"):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        pre_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = pre_norm if norm is None else norm
    return float(norm) if norm is not None else float("nan")
