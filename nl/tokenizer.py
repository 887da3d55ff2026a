"""A thin wrapper over a sentencepiece model file (any .model works, e.g. a Llama-2-style 32K one)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from nl.data.shards import DataError


class Tokenizer:
    """Sentencepiece tokenizer loaded from `path`.

    `encode` adds no BOS/EOS: the data pipeline appends `eos_id` after every document itself.
    `fingerprint` is the sha256 hex of the serialized model proto, so a copy of the file (e.g. the
    one in a token directory or an export) has the same fingerprint as the original.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer model {self.path} does not exist: pass a sentencepiece .model file "
                            f"(train one with data_prep/train_tokenizer.py)")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{self.path} is not a sentencepiece model ({e}): pass a .model file written "
                            f"by sentencepiece (e.g. data_prep/train_tokenizer.py)") from None
        self.fingerprint: str = hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        eos = self._sp.eos_id()
        if eos < 0:
            raise DataError(f"tokenizer {self.path} has no EOS piece, which separates documents: "
                            f"use a model trained with an eos_id (data_prep/train_tokenizer.py does)")
        return eos

    @property
    def bos_id(self) -> int | None:
        """BOS id, or None when the model has no BOS piece."""
        bos = self._sp.bos_id()
        return bos if bos >= 0 else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added).

        Raises DataError for text UTF-8 cannot encode (a lone surrogate): readers of user text
        repair or refuse it first with the policy of `nl.text`."""
        try:
            return self._sp.encode(text, out_type=int)
        except RuntimeError:  # sentencepiece's binding says only "Unable to cast Python instance"
            bad = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None)
            if bad is None:
                raise
            raise DataError(f"text holds U+{ord(text[bad]):04X} at index {bad}, a lone UTF-16 surrogate that "
                            f"UTF-8 cannot encode: pass it through nl.text.clean_text first") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a list, a 1-D numpy array or tensor of ints)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._sp.decode(ids)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"
