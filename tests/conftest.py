"""Shared fixtures: a small real-text token directory built once per test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HOME", "/tmp/nl-test-hf-home")  # never touch the user's HF cache
os.environ.setdefault("WANDB_MODE", "offline")
if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET once, when triton.language is first imported (its own @jit functions
    # included): set it before any test module imports triton, so the kernel tests run on the interpreter
    # whichever file imports triton first (a late setting breaks them: "Cannot call @triton.jit'd outside
    # of the scope of a kernel").
    os.environ.setdefault("TRITON_INTERPRET", "1")


def run_script(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a repo script (`data_prep/x.py`, `-m nl.export`, ...) with this interpreter."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """~1,500 Wikipedia lead sections of the demo corpus as .jsonl (about 0.8 MB)."""
    from nl.data.sources import write_demo_corpus

    root = tmp_path_factory.mktemp("corpus")
    full = write_demo_corpus(root / "demo.jsonl")
    lines = full.read_text().splitlines()[:1500]
    small = root / "small.jsonl"
    small.write_text("\n".join(lines) + "\n")
    return small


@pytest.fixture(scope="session")
def token_dir(tmp_path_factory, small_corpus) -> Path:
    """Tokenizer (1,024-piece BPE) and token shards of `small_corpus`, via the real CLIs."""
    root = tmp_path_factory.mktemp("tokens")
    model = root / "tok.model"
    run_script("data_prep/train_tokenizer.py", "--input", str(small_corpus), "--vocab-size", "1024",
               "--output", str(model))
    out = root / "tokens"
    run_script("data_prep/tokenize_corpus.py", "--input", str(small_corpus), "--tokenizer", str(model),
               "--output", str(out), "--val-fraction", "0.05", "--num-workers", "2")
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["vocab_size"] == 1024
    return out
