"""Checkpoints in torch.distributed.checkpoint (DCP) format, written atomically.

Layout: RUN_DIR/checkpoints/step_00000100/ holds the DCP files (.metadata, *.distcp),
config.yaml (the resolved run config, so export never depends on a later edit of the run's
config) and checkpoint.json (what the config cannot say, e.g. the tokenizer fingerprint, which a
resume compares: nl/checkpoint/run_dir.py). A checkpoint is first written to checkpoints/.tmp-step_00000100 and renamed only
when complete, so a crash or a full disk during a save never damages the previous one.

dist.strategy=deepspeed writes its own format through the same atomic scheme (see
nl/distributed/deepspeed.py): such a directory holds the marker file deepspeed.json instead
of .metadata, and the two formats are not interchangeable (loading one as the other is
refused with a CheckpointError naming the fix).

The state is a nested dict, e.g. {"model": ..., "optim": ..., "trainer": {...}}; DCP stores
tensors shard-aware (the same call saves an FSDP-sharded model) and other values pickled.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

# torch.distributed.checkpoint is imported where a checkpoint is written or read: it costs ~1.6 s per process
# (DTensor's ops and sympy), which the CLIs that only read exports (nl.generate, nl.evaluate, nl.memory_health)
# would pay at every start.

_STEP_DIR = re.compile(r"^step_(\d{8})$")
DEEPSPEED_MARKER = "deepspeed.json"  # marks (and describes) a dist.strategy=deepspeed checkpoint
INFO_FILE = "checkpoint.json"  # what the config cannot say: e.g. the tokenizer's fingerprint


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the cause and the fix."""


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, path)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and ((p / ".metadata").is_file() or (p / DEEPSPEED_MARKER).is_file()):
            found.append((int(m.group(1)), p))
    return sorted(found)


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DEEPSPEED_MARKER).is_file()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint of `step` (latest when None), or a CheckpointError listing what exists."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"no checkpoint in {checkpoints_root(run_dir)}: train first "
                              f"(python train.py ... run.dir={run_dir})")
    if step is None:
        return ckpts[-1][1]
    for s, p in ckpts:
        if s == step:
            return p
    raise CheckpointError(f"no checkpoint for step {step} in {checkpoints_root(run_dir)}; "
                          f"available steps: {', '.join(str(s) for s, _ in ckpts)}")


def _is_coordinator() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _root_cause(e: BaseException) -> BaseException:
    """The first rank's original exception inside DCP's CheckpointException wrapper."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


def atomic_save(run_dir: str | Path, step: int, write: Callable[[Path], None], config_yaml: str,
                keep_last: int = 2, info: dict | None = None) -> Path:
    """Run `write(tmp_dir)` (every rank), add config.yaml (and `info` as checkpoint.json), rename
    tmp_dir to step_X, prune.

    The one place that makes a save atomic, for DCP and DeepSpeed checkpoints alike: a crash or
    a full disk inside `write` leaves the previous checkpoints untouched and no partial step_X.
    Pruning keeps the `keep_last` newest checkpoints up to this step, this one included; it never
    deletes the checkpoint just written nor any of a later step."""
    from torch.distributed.checkpoint.api import CheckpointException

    root = checkpoints_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    coordinator = _is_coordinator()
    if coordinator:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save
        tmp.mkdir()
    _barrier()
    try:
        write(tmp)
        if coordinator:
            (tmp / "config.yaml").write_text(config_yaml)
            if info is not None:
                (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    except (OSError, CheckpointException) as wrapped:
        e = _root_cause(wrapped)
        if not isinstance(e, OSError):
            raise
        if coordinator:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"disk full while saving checkpoint {final}; {kept}. Free space on "
                                  f"{root} (or lower checkpoint.keep_last) and rerun to resume") from None
        raise CheckpointError(f"could not write checkpoint {final} ({e}); {kept}") from None
    _barrier()
    if coordinator:
        if final.exists():  # same step saved again (e.g. a resumed run that was already done)
            shutil.rmtree(final)
        tmp.rename(final)
        earlier = [p for s, p in list_checkpoints(run_dir) if s < step]
        for old in earlier[:max(0, len(earlier) - (keep_last - 1))] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], config_yaml: str,
                    keep_last: int = 2, info: dict | None = None) -> Path:
    """Write `state` in DCP format as checkpoint `step` (collective: every rank passes its shards)."""

    import torch.distributed.checkpoint as dcp

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP warns when no process group is initialised
            dcp.save(state, checkpoint_id=str(tmp))

    return atomic_save(run_dir, step, write, config_yaml, keep_last, info)


def _check_shapes(path: Path, state: dict[str, Any]) -> None:
    """Compare saved tensor shapes with the live state before DCP loads anything."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - any unreadable metadata means a corrupt checkpoint
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); move it "
                              f"away to resume from the previous checkpoint") from None
    model_state = state.get("model", {})
    missing = [k for k in model_state if f"model.{k}" not in saved]
    if missing:
        raise CheckpointError(f"checkpoint {path} was written by a different model: it has no "
                              f"'{missing[0]}' ({len(missing)} missing). Use a new run.dir or the "
                              f"model.* settings the run was started with")
    for key, value in model_state.items():
        meta = saved[f"model.{key}"]
        if isinstance(meta, TensorStorageMetadata) and isinstance(value, torch.Tensor) \
                and tuple(meta.size) != tuple(value.shape):
            raise CheckpointError(f"checkpoint {path} was written by a different model shape: "
                                  f"'{key}' is {tuple(meta.size)} there but {tuple(value.shape)} "
                                  f"here. Use a new run.dir or the model.* settings the run was "
                                  f"started with")


def check_dcp_checkpoint(path: Path) -> None:
    """Refuse checkpoint `path` unless DCP (single / ddp / fsdp) can load it: not a deepspeed one."""
    if is_deepspeed_checkpoint(path):
        raise CheckpointError(f"checkpoint {path} was written by dist.strategy=deepspeed: resume it with "
                              f"dist.strategy=deepspeed (same ZeRO stage and world size), or export it "
                              f"(python -m nl.export) and start a new run.dir; conversion is not supported")


def load_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Load checkpoint `path` into `state` in place (tensors copied into existing ones)."""
    path = Path(path)
    check_dcp_checkpoint(path)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    _check_shapes(path, state)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as wrapped:  # noqa: BLE001 - any read failure
        e = _root_cause(wrapped)
        raise CheckpointError(f"checkpoint {path} could not be loaded ({type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or ['no detail'])[-1][:300]}); if it is corrupt, move it "
                              f"away to resume from the previous checkpoint") from None
