"""Run metrics: a stdout line, RUN_DIR/metrics.jsonl, and wandb when enabled.

Every record is one JSON object per line; train records carry step, loss, lr, grad_norm,
tokens, tokens_per_s (and mfu where the device's peak FLOP/s is known); eval records carry
step and val_loss.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from nl.config import ConfigError

# Dense bf16 peak FLOP/s (no sparsity) by device-name substring, for MFU.
_PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
    "V100": 125e12,  # fp16 tensor cores; V100 has no bf16
}


def peak_flops(device: torch.device) -> float | None:
    """The device's peak dense bf16 FLOP/s, or None when unknown (CPUs included)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def truncate_records(path: Path, step: int) -> list[dict]:
    """Keep only the records of steps <= `step` in the JSON-lines file `path`; returns them.

    A run resumed from step S re-does the steps after S: their old records (and a line cut off
    by a crash) go, so the file holds one record per step after any number of resumes."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a crashed write
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
            kept.append(record)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)
    return kept


class MetricsLogger:
    """Writes metrics to stdout, RUN_DIR/metrics.jsonl and (optionally) wandb.

    Only the coordinator rank should construct one with `enabled=True`. `start_step` is the step
    the run starts from: records of later steps already in metrics.jsonl are dropped (re-done)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, wandb_cfg: Any = None,
                 config: dict | None = None, progress: Any = None, start_step: int = 0):
        self.enabled = enabled
        self.progress = progress  # a tqdm bar: printing goes through it so the bar stays intact
        self._wandb = None
        if enabled and _wandb_wanted(wandb_cfg):  # first: a wandb that cannot start changes no metrics
            import wandb  # optional dependency, imported only when used

            os.environ.setdefault("WANDB_MODE", wandb_cfg.mode)
            wandb_dir = Path(run_dir) / "wandb"
            before = set(wandb_dir.iterdir()) if wandb_dir.is_dir() else None
            try:
                self._wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name or None,
                                         dir=str(run_dir), config=config, mode=wandb_cfg.mode,
                                         resume="allow")
            except Exception as e:  # noqa: BLE001 - e.g. no API key for mode=online, a bad WANDB_* variable
                # what the failed start wrote (its logs under run_dir/wandb) goes: the run folder stays as it was
                for new in ([wandb_dir] if before is None else sorted(set(wandb_dir.iterdir()) - before)):
                    if new.is_dir():
                        shutil.rmtree(new, ignore_errors=True)
                    else:
                        new.unlink(missing_ok=True)
                detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())[:300]
                raise ConfigError(f"wandb could not start ({type(e).__name__}: {detail}): fix what it names "
                                  f"(`wandb login` for wandb.mode=online, or the WANDB_* environment variable), "
                                  f"or set wandb.mode=offline or wandb.enabled=false") from None
        path = Path(run_dir) / "metrics.jsonl"
        self.previous = truncate_records(path, start_step) if enabled else []
        self._file = open(path, "a") if enabled else None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        line = " ".join(_fmt(k, v) for k, v in record.items() if not k.startswith("memory/"))
        line += _memory_summary(record)
        if self.progress is not None:
            self.progress.write(line)
        else:
            print(line, flush=True)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def last(self, key: str) -> Any:
        """The latest value of `key` among the records kept from before this start (None if none)."""
        return next((r[key] for r in reversed(self.previous) if key in r), None)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_wanted(wandb_cfg: Any) -> bool:
    return wandb_cfg is not None and wandb_cfg.enabled and wandb_cfg.mode != "disabled"


def check_wandb(wandb_cfg: Any) -> None:
    """wandb.enabled=true without the wandb package installed: refused in one line (nl/trainer.py asks
    before run.dir is created or written)."""
    if _wandb_wanted(wandb_cfg) and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb.enabled=true but the wandb package is not installed: pip install wandb, or "
                          "set wandb.enabled=false")


def progress_enabled(switch: bool, stream: Any = None) -> bool:
    """Whether to draw a progress bar: run.progress, TQDM_DISABLE unset, and `stream` a terminal.

    A bar in a redirected log is a line of carriage returns per refresh, so none there."""
    stream = sys.stderr if stream is None else stream
    disabled = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")
    return switch and not disabled and hasattr(stream, "isatty") and stream.isatty()


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key in ("lr",):
            return f"{key}={value:.3e}"
        if key in ("tokens_per_s",):
            return f"{key}={value:,.0f}"
        return f"{key}={value:.4f}"
    return f"{key}={value}"


def _memory_summary(record: dict[str, Any]) -> str:
    """The console's digest of the per-block `memory/` diagnostics (all of them go to metrics.jsonl and
    wandb): the range over blocks and memories of the norm ratios, and of the memories' read share."""
    norms = [v for k, v in record.items() if k.startswith("memory/") and k.rsplit("/", 1)[-1].startswith("norm_")]
    shares = [v for k, v in record.items() if k.startswith("memory/") and k.endswith("/share")]
    if not norms:
        return ""
    out = f" memory_norm={min(norms):.3g}..{max(norms):.3g}"
    return out + (f" memory_share={min(shares):.3f}..{max(shares):.3f}" if shares else "")
