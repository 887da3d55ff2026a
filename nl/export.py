"""Export a training checkpoint to a standalone directory, and load it back.

    python -m nl.export --run RUN_DIR [--step N] --output DIR [--tokenizer FILE]

DIR gets model.safetensors (weights, tied weights stored once), config.json (the model
config plus provenance: step, seq_len, tokenizer fingerprint) and tokenizer.model, all readable
by group and others (0644 under the usual umask 022). Everything comes from the run directory:
the model config from the checkpoint's config.yaml, the tokenizer from the copy the run made of
it when it started (RUN_DIR/tokenizer.model, checked against RUN_DIR/tokenizer.json; see
nl/provenance.py). The data directory is never opened, so an export works from any working
directory after the data has been deleted, moved or re-tokenized. A run started before runs
recorded their tokenizer is refused unless --tokenizer names its tokenizer.model.
`nl.load_pretrained(DIR)` rebuilds the model with identical logits, no training code needed.

DIR may be new, empty, or an earlier export (its config.json has nl's keys): that export is replaced,
no file of it survives that this one does not rewrite (other files in DIR are left alone). Any other
non-empty DIR is refused before anything is written. The export is written in a hidden folder beside
DIR and moved into place once complete, so a failed export leaves DIR as it was.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model, save_model
from torch import nn

from nl.checkpoint import find_checkpoint, is_deepspeed_checkpoint, load_checkpoint
from nl.cli import one_line_errors
from nl.config import Config, ConfigError, ModelConfig, config_from_dict
from nl.data.shards import DataError
from nl.hf import hf_config_keys, write_llama, write_remote_code, write_tokenizer
from nl.models import build_model
from nl.provenance import run_tokenizer
from nl.tokenizer import Tokenizer

EXPORT_FORMAT_VERSION = 1

# Every path an export writes in DIR, by this version or an earlier one: replacing an earlier export
# removes exactly these first (then llama/ when it is left empty). The tokenizer names include those
# other transformers versions save; _sp_convert is write_tokenizer's scratch folder.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "_sp_convert")
EXPORT_FILES = ("model.safetensors", "config.json", "tokenizer.model", "configuration_nl.py", "modeling_nl.py",
                *_TOKENIZER_FILES,
                *(f"llama/{name}" for name in ("config.json", "model.safetensors", *_TOKENIZER_FILES)))


def _checkpoint_config(ckpt: Path) -> Config:
    return config_from_dict(OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml")))


def _readable(path: Path, mode: int = 0o666) -> None:
    """Give `path` the mode a plain open() (mode 0o666) or mkdir() (0o777) would: safetensors writes a
    0600 temp file and renames it, mkdtemp makes a 0700 folder."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _is_export(folder: Path) -> bool:
    """Whether `folder`/config.json was written by nl.export (it has nl's keys)."""
    try:
        meta = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"format_version", "model", "tokenizer_fingerprint"} <= meta.keys()


def _check_output(output: Path) -> None:
    """Refuse an --output that is a file, or a non-empty folder that holds no export."""
    if output.exists() and not output.is_dir():
        raise DataError(f"--output {output} is a file: pass a directory (it is created if missing)")
    if output.is_dir() and any(output.iterdir()) and not _is_export(output):
        raise DataError(f"--output {output} is a non-empty folder that holds no nl export: pass a new or empty "
                        f"folder (an earlier export there would be replaced)")


@contextmanager
def _staging_folder(output: Path) -> Iterator[Path]:
    """A new hidden folder beside `output` (same file system, so moving it into place is a rename),
    removed on exit: whatever is still in it was not published."""
    target = output.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".nl-export", dir=target.parent))
    except OSError as e:  # report the folder asked for, not the hidden one
        raise OSError(e.errno, e.strerror, str(output)) from None
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(stage: Path, output: Path) -> None:
    """Make the complete export in `stage` the content of `output`: a rename when `output` is new;
    otherwise the earlier export's files (EXPORT_FILES) are removed and the new ones moved in."""
    if not output.exists():
        _readable(stage, 0o777)
        os.replace(stage, output)
        return
    for name in EXPORT_FILES:
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    if (output / "llama").is_dir() and not any((output / "llama").iterdir()):
        (output / "llama").rmdir()
    _move_into(stage, output)


def _move_into(source: Path, target: Path) -> None:
    for entry in source.iterdir():
        if entry.is_dir() and (target / entry.name).is_dir():  # llama/ still holding a user's own files
            _move_into(entry, target / entry.name)
        else:
            shutil.move(entry, target / entry.name)


def export(run_dir: str | Path, output: str | Path, step: int | None = None,
           tokenizer: str | Path | None = None) -> Path:
    """Write checkpoint `step` (latest when None) of `run_dir` as a standalone model dir.

    `tokenizer`: a tokenizer.model to ship instead of the run's copy (for runs that predate the
    copy, or whose copy was lost; it must match the run's recorded fingerprint when there is one).
    Raises CheckpointError (no such run/step) or DataError (tokenizer missing or not the run's)."""
    ckpt = find_checkpoint(run_dir, step)
    output = Path(output)
    _check_output(output)
    cfg = _checkpoint_config(ckpt)
    tok = run_tokenizer(run_dir, tokenizer)
    if tok.vocab_size != cfg.model.vocab_size:
        raise DataError(f"{tok.path} has {tok.vocab_size} pieces but the model of {ckpt} has "
                        f"model.vocab_size={cfg.model.vocab_size}: pass the tokenizer the run was trained with")
    model = build_model(cfg.model, device="cpu")
    if is_deepspeed_checkpoint(ckpt):  # dist.strategy=deepspeed: consolidate the ZeRO shards (fp32)
        from nl.distributed.deepspeed import consolidated_state_dict

        model.load_state_dict(consolidated_state_dict(ckpt))
    else:
        state = {"model": model.state_dict()}
        load_checkpoint(ckpt, state)
        model.load_state_dict(state["model"])

    with _staging_folder(output) as stage:
        _write_export(stage, model, cfg, ckpt, tok)
        _publish(stage, output)
    return output


def _write_export(output: Path, model: nn.Module, cfg: Config, ckpt: Path, tok: Tokenizer) -> None:
    """The export's files in the existing, empty folder `output`."""
    save_model(model, str(output / "model.safetensors"))
    _readable(output / "model.safetensors")
    shutil.copyfile(tok.path, output / "tokenizer.model")
    meta = {
        "format_version": EXPORT_FORMAT_VERSION,
        "model": OmegaConf.to_container(cfg.model),
        "seq_len": cfg.data.seq_len,
        # how the run saw its windows: with "reset" each EOS-terminated document alone (nl.evaluate follows it)
        "document_boundaries": cfg.data.document_boundaries,
        "step": int(ckpt.name.split("_")[-1]),
        "tokenizer_fingerprint": tok.fingerprint,
        "source_checkpoint": str(ckpt.resolve()),
    }
    meta.update(hf_config_keys(meta["model"], tok.bos_id, tok.eos_id))
    (output / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_remote_code(output)
    if cfg.model.arch == "transformer":
        write_llama(model, meta["model"], cfg.data.seq_len, tok.bos_id, tok.eos_id, output / "llama")
        _readable(output / "llama" / "model.safetensors")
    if importlib.util.find_spec("transformers") is not None:  # the tokenizer conversion needs it
        write_tokenizer(tok.path, output)
        if cfg.model.arch == "transformer":
            write_tokenizer(tok.path, output / "llama")


def _export_advice(run: Path, step: int | None = None) -> str:
    """`python -m nl.export ...` for training run `run` (a checkpoint step if given), its output under exports/
    beside the current folder, or beside the run when the current folder is inside it (never into the run)."""
    name = run.resolve().name + (f"_step{step}" if step is not None else "")
    output = Path("exports") / name
    if Path.cwd().resolve().is_relative_to(run.resolve()):
        output = Path(os.path.relpath(run.resolve().parent / "exports" / name))
    return f"python -m nl.export --run {run}{f' --step {step}' if step is not None else ''} --output {output}"


def check_export_dir(path: str | Path) -> None:
    """Raise DataError when `path` is a training run (config.yaml, checkpoints/), its checkpoints/ folder or one
    checkpoint of it rather than an export: the advice exports that run (at that step) beside the other
    exports, never into the run folder itself."""
    path = Path(path)
    if (path / "config.json").is_file():
        return  # an export
    resolved = path.resolve()
    step = re.fullmatch(r"step_(\d+)", resolved.name)
    if step and resolved.parent.name == "checkpoints":  # RUN/checkpoints/step_N
        run = Path(os.path.normpath(path / ".." / ".."))
        what, advice = f"a checkpoint of training run {run}", _export_advice(run, int(step[1]))
    elif resolved.name == "checkpoints" and (path / ".." / "config.yaml").is_file():
        run = Path(os.path.normpath(path / ".."))
        what, advice = f"the checkpoints of training run {run}", _export_advice(run)
    elif (path / "config.yaml").is_file() or (path / "checkpoints").is_dir():
        what, advice = "a training run", _export_advice(path)
    else:
        return  # neither: the caller's message covers a missing export
    raise DataError(f"{path} is {what}, not an exported model: export it with `{advice}` and pass that as --model")


def load_export_config(path: str | Path) -> dict:
    """DIR/config.json of an export; DataError, in one line, for a training run folder or a missing export.
    Every nl reader of an export opens it here (load_pretrained too); nl.lm_eval's Hugging Face loader,
    which reads no nl config, calls check_export_dir itself."""
    path = Path(path)
    check_export_dir(path)
    if not (path / "config.json").is_file():
        empty = not path.exists() or (path.is_dir() and not any(path.iterdir()))
        output = path if empty else Path("exports") / "NAME"  # nl.export refuses a non-empty non-export folder
        raise DataError(f"{path} is not an exported model (no config.json): create one with "
                        f"python -m nl.export --run RUN_DIR --output {output}")
    return json.loads((path / "config.json").read_text())


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported model (eval mode) from DIR/config.json and DIR/model.safetensors."""
    meta = load_export_config(path)
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"])
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise DataError(f"{weights} is missing (the export is incomplete): re-run python -m nl.export")
    model = build_model(model_cfg, device=device)
    load_model(model, str(weights), device=str(device))
    return model.eval()


def load_init_weights(model: nn.Module, path: str | Path, tokenizer_fingerprint: str | None = None) -> None:
    """Copy the weights of export `path` (DIR/model.safetensors) into `model` in place (train.init_from).

    Every parameter must exist in both with the same shape (a tied LM head is stored once), and
    the export's tokenizer must be `tokenizer_fingerprint` (the training data's) when given.
    Raises ConfigError, in one line, for a missing export or any mismatch."""
    from safetensors import safe_open

    weights = Path(path) / "model.safetensors"
    if not weights.is_file() or not (Path(path) / "config.json").is_file():
        raise ConfigError(f"train.init_from={path} has no model.safetensors and config.json: pass a directory "
                          f"written by python -m nl.export")
    theirs_tok = load_export_config(path).get("tokenizer_fingerprint")
    if tokenizer_fingerprint and theirs_tok and theirs_tok != tokenizer_fingerprint:
        raise ConfigError(f"train.init_from={path} was trained with another tokenizer (fingerprint {theirs_tok[:12]}) "
                          f"than data.dir's ({tokenizer_fingerprint[:12]}): tokenize the data with its tokenizer.model")
    own = model.state_dict()
    with safe_open(str(weights), framework="pt") as f:
        theirs = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    stored = {own[name].data_ptr() for name in theirs if name in own}
    for name, shape in theirs.items():
        if name not in own or tuple(own[name].shape) != shape:
            here = tuple(own[name].shape) if name in own else "absent"
            raise ConfigError(f"train.init_from={path} does not fit this model: {name} is {shape} there, {here} "
                              f"here; set model.* to the export's (its config.json 'model')")
    missing = [name for name, t in own.items() if name not in theirs and t.data_ptr() not in stored]
    if missing:
        raise ConfigError(f"train.init_from={path} does not fit this model: it has no {missing[0]} "
                          f"({len(missing)} missing); set model.* to the export's (its config.json 'model')")
    device = next(model.parameters()).device
    load_model(model, str(weights), device=str(device))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the training run directory (run.dir)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--output", required=True,
                    help="directory to write: new, empty, or an earlier export (replaced); other folders are refused")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer.model to ship instead of the run's copy (runs that predate the copy)")
    args = ap.parse_args(argv)
    with one_line_errors():
        out = export(args.run, args.output, args.step, args.tokenizer)
    print(f"exported {args.run} -> {out} (model.safetensors, config.json, tokenizer.model)")
    if not (out / "tokenizer.json").is_file():
        print("Hugging Face tokenizer files skipped: transformers is not installed "
              "(pip install 'transformers==5.23.0', then export again)")


if __name__ == "__main__":
    main()
