"""A run directory belongs to one run: which checkpoint a run starts from, and whether it may.

- Fresh start (checkpoint.resume=false) where RUN_DIR/checkpoints/ holds checkpoints: refused,
  unless checkpoint.overwrite=true, which deletes them first. Otherwise the new run's checkpoints
  would mix with the old run's (keep_last, export and the summary would pick the old weights).
- Resume: from the latest checkpoint, or from checkpoint.load_step=N. The checkpoints after N
  belong to the continuation being abandoned (after a divergence they may carry it), so they move
  to RUN_DIR/checkpoints_abandoned/: a later resume or export cannot pick them up, and nothing
  is deleted (remove that folder when it is no longer wanted).
- Resume compares the checkpoint's config.yaml with this run's config (`config_changes`): a
  change to anything that shapes the saved state (every model.* key, the tokenizer, the
  optimizer's state layout) is refused in one line; other changes are returned for the log.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf

from nl.checkpoint import (INFO_FILE, CheckpointError, _barrier, _is_coordinator, checkpoints_root,
                           find_checkpoint, list_checkpoints)
from nl.config import Config, to_dict

ABANDONED_DIR = "checkpoints_abandoned"

# Optimizer settings that change the structure of its saved state (which tensors exist, their
# shapes, which parameter groups hold which parameters); the other optim.* keys are values
# (betas, decay, lr scales) that may change between resumes.
OPTIM_STATE_KEYS = ("optim.name", "optim.dmgd.hidden", "optim.cms.enabled", "optim.cms.groups",
                    "optim.decay_embeddings", "optim.decay_norms_and_biases")
# Switches of one invocation, about where to start: never compared nor announced.
INVOCATION_KEYS = ("checkpoint.resume", "checkpoint.overwrite", "checkpoint.load_step")
TOKENIZER_KEY = "data.tokenizer_fingerprint"  # not a config key: from the data manifest, via checkpoint.json


def shapes_state(key: str) -> bool:
    """Whether a change of config key `key` makes a checkpoint unusable (refused on resume)."""
    return key.startswith("model.") or key in OPTIM_STATE_KEYS or key == TOKENIZER_KEY


def select_start(cfg: Config, check: Callable[[Path], None] = lambda path: None) -> Path | None:
    """The checkpoint this run resumes from (None: a fresh start), applying the rules above.

    `check(path)` vets the checkpoint before anything is moved (e.g. `config_changes`).
    Collective: every rank calls it; only the coordinator deletes or moves, between barriers.
    Raises CheckpointError for a fresh start over an existing run or a missing load_step."""
    run_dir, ck = Path(cfg.run.dir), cfg.checkpoint
    if ck.overwrite and ck.resume:
        raise CheckpointError("checkpoint.overwrite=true replaces the run in run.dir with a fresh start: pass it "
                              "with checkpoint.resume=false, or drop it to resume")
    existing = list_checkpoints(run_dir)
    if not ck.resume:
        if ck.load_step:
            raise CheckpointError(f"checkpoint.load_step={ck.load_step} needs checkpoint.resume=true")
        if existing and not ck.overwrite:
            raise CheckpointError(
                f"run.dir {run_dir} holds a run up to step {existing[-1][0]} ({len(existing)} checkpoint(s) in "
                f"{checkpoints_root(run_dir)}): pass checkpoint.overwrite=true to delete them and start afresh, "
                f"checkpoint.resume=true to continue that run, or choose another run.dir")
        _barrier()  # every rank has listed before the coordinator deletes
        if existing and _is_coordinator():
            shutil.rmtree(checkpoints_root(run_dir))
        _barrier()
        return None
    if not existing:
        if ck.load_step:
            find_checkpoint(run_dir, ck.load_step)  # raises: no checkpoint at all
        return None
    start = find_checkpoint(run_dir, ck.load_step or None)  # raises, listing the steps available
    check(start)
    if not ck.load_step:
        return start
    later = [p for s, p in existing if s > ck.load_step]
    _barrier()
    if later and _is_coordinator():
        abandoned = run_dir / ABANDONED_DIR
        abandoned.mkdir(exist_ok=True)
        for p in later:
            target, n = abandoned / p.name, 1
            while target.exists():  # abandoned once before: keep both
                n += 1
                target = abandoned / f"{p.name}.{n}"
            p.rename(target)
    _barrier()
    return start


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def saved_config(path: Path) -> dict[str, Any] | None:
    """Checkpoint `path`'s config as flat dotted keys (+ the tokenizer fingerprint when recorded).

    Keys the saved file lacks (a checkpoint older than the key) take the schema default, which is
    what that run used; keys this code no longer knows are left out. None without config.yaml."""
    file = path / "config.yaml"
    if not file.is_file():
        return None
    flat = _flatten(to_dict(OmegaConf.structured(Config)))
    saved = _flatten(OmegaConf.to_container(OmegaConf.load(file), resolve=True))
    flat.update({k: v for k, v in saved.items() if k in flat})
    info = path / INFO_FILE
    if info.is_file():
        fingerprint = json.loads(info.read_text()).get("tokenizer_fingerprint")
        if fingerprint:
            flat[TOKENIZER_KEY] = fingerprint
    return flat


def current_config(cfg: Config, tokenizer_fingerprint: str | None) -> dict[str, Any]:
    flat = _flatten(to_dict(cfg))
    if tokenizer_fingerprint:
        flat[TOKENIZER_KEY] = tokenizer_fingerprint
    return flat


def config_changes(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) of every allowed change, in key order.

    Raises CheckpointError in one line naming every refused key (see `shapes_state`) and the fix."""
    changed = [(k, saved[k], current[k]) for k in sorted(current)
               if k in saved and saved[k] != current[k] and k not in INVOCATION_KEYS]
    refused = [(k, a, b) for k, a, b in changed if shapes_state(k)]
    if refused:
        diffs = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, a, b in refused)
        raise CheckpointError(
            f"checkpoint {path} does not fit this run (a different model shape, tokenizer or optimizer state "
            f"layout): {diffs}. Resume "
            f"with the checkpoint's values (its config.yaml), or start another run.dir (or replace this run: "
            f"checkpoint.resume=false checkpoint.overwrite=true)")
    return changed


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 16 else text[:12] + "..."
