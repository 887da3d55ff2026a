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
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
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

EXPORT_FORMAT_VERSION = 1


def _checkpoint_config(ckpt: Path) -> Config:
    return config_from_dict(OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml")))


def _readable(path: Path) -> None:
    """Give `path` the mode a plain open() would: safetensors writes a 0600 temp file and renames it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def export(run_dir: str | Path, output: str | Path, step: int | None = None,
           tokenizer: str | Path | None = None) -> Path:
    """Write checkpoint `step` (latest when None) of `run_dir` as a standalone model dir.

    `tokenizer`: a tokenizer.model to ship instead of the run's copy (for runs that predate the
    copy, or whose copy was lost; it must match the run's recorded fingerprint when there is one).
    Raises CheckpointError (no such run/step) or DataError (tokenizer missing or not the run's)."""
    ckpt = find_checkpoint(run_dir, step)
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

    output = Path(output)
    if output.exists() and not output.is_dir():
        raise DataError(f"--output {output} is a file: pass a directory (it is created if missing)")
    output.mkdir(parents=True, exist_ok=True)
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
    return output


def load_export_config(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DataError(f"{path} is not an exported model (no config.json): create one with "
                        f"python -m nl.export --run RUN_DIR --output {path}")
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
    ap.add_argument("--output", required=True, help="directory to write")
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
