"""Export a training checkpoint to a standalone directory, and load it back.

    python -m nl.export --run RUN_DIR [--step N] --output DIR

DIR gets model.safetensors (weights, tied weights stored once), config.json (the model
config plus provenance: step, seq_len, tokenizer fingerprint) and tokenizer.model.
`nl.load_pretrained(DIR)` rebuilds the model with identical logits, no training code needed.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model, save_model
from torch import nn

from nl.checkpoint import find_checkpoint, is_deepspeed_checkpoint, load_checkpoint
from nl.config import Config, ModelConfig, config_from_dict
from nl.models import build_model

EXPORT_FORMAT_VERSION = 1


def _checkpoint_config(ckpt: Path) -> Config:
    return config_from_dict(OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml")))


def export(run_dir: str | Path, output: str | Path, step: int | None = None) -> Path:
    """Write checkpoint `step` (latest when None) of `run_dir` as a standalone model dir."""
    from nl.data.shards import TokenShards

    ckpt = find_checkpoint(run_dir, step)
    cfg = _checkpoint_config(ckpt)
    model = build_model(cfg.model, device="cpu")
    if is_deepspeed_checkpoint(ckpt):  # dist.strategy=deepspeed: consolidate the ZeRO shards (fp32)
        from nl.distributed.deepspeed import consolidated_state_dict

        model.load_state_dict(consolidated_state_dict(ckpt))
    else:
        state = {"model": model.state_dict()}
        load_checkpoint(ckpt, state)
        model.load_state_dict(state["model"])

    data = TokenShards(cfg.data.dir, split="train", verify_checksums=False)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    save_model(model, str(output / "model.safetensors"))
    shutil.copyfile(data.tokenizer_path, output / "tokenizer.model")
    meta = {
        "format_version": EXPORT_FORMAT_VERSION,
        "model": OmegaConf.to_container(cfg.model),
        "seq_len": cfg.data.seq_len,
        "step": int(ckpt.name.split("_")[-1]),
        "tokenizer_fingerprint": data.fingerprint,
        "source_checkpoint": str(ckpt.resolve()),
    }
    (output / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return output


def load_export_config(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an exported model (no config.json): create one with "
                                f"python -m nl.export --run RUN_DIR --output {path}")
    return json.loads((path / "config.json").read_text())


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported model (eval mode) from DIR/config.json and DIR/model.safetensors."""
    meta = load_export_config(path)
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"])
    model = build_model(model_cfg, device=device)
    load_model(model, str(Path(path) / "model.safetensors"), device=str(device))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the training run directory (run.dir)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--output", required=True, help="directory to write")
    args = ap.parse_args(argv)
    out = export(args.run, args.output, args.step)
    print(f"exported {args.run} -> {out} (model.safetensors, config.json, tokenizer.model)")


if __name__ == "__main__":
    main()
