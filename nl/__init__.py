"""nl: pretraining for Nested Learning (HOPE) models and a Transformer++ baseline."""

from __future__ import annotations

__version__ = "0.1.0"


def load_pretrained(path, device="cpu"):
    """Rebuild a model written by `python -m nl.export` (see nl.export.load_pretrained)."""
    from nl.export import load_pretrained as _load

    return _load(path, device=device)


def __getattr__(name: str):
    # Lazy, so `import nl` stays light (no sentencepiece import until it is used).
    if name == "Tokenizer":
        from nl.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'nl' has no attribute {name!r}")


__all__ = ["load_pretrained", "Tokenizer", "__version__"]
