"""Token shard format: a directory of flat token files plus a manifest.

Layout of a tokenized directory (written by `data_prep/tokenize_corpus.py`):

    manifest.json          format version, tokenizer identity, dtype, per-split shard list
    tokenizer.model        a copy of the sentencepiece model used to tokenize
    train_00000.bin ...    raw little-endian token ids (uint16 if vocab_size <= 65535 else uint32)
    val_00000.bin ...

Each split is one token stream: its shards concatenated in order, every document followed by
the tokenizer's EOS id. `manifest.json`:

    {"format_version": 1,
     "tokenizer": {"fingerprint": sha256-hex, "vocab_size": int, "eos_id": int, "file": "tokenizer.model"},
     "dtype": "uint16" | "uint32",
     "splits": {"train": {"num_tokens": int, "num_documents": int,
                          "shards": [{"file": "train_00000.bin", "num_tokens": int, "sha256": hex}, ...]},
                "val": {...}},
     "part": {...}}        only in a part of a multi-machine run (data_prep/tokenize_corpus.py
                           --num-shards); data_prep/merge_shards.py reads it
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

if TYPE_CHECKING:
    from nl.tokenizer import Tokenizer

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_TOKENIZE_HINT = ("python data_prep/tokenize_corpus.py --input {input} --tokenizer tokenizer.model "
                  "--output {dir}")


_TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")  # what tokenize_corpus reads (nl.data.sources)


def _tokens_dir(text: Path) -> Path:
    """Where to suggest tokenizing `text` (a file or directory of text) into: beside it, NAME_tokens."""
    return text.with_name(f"{text.stem if text.is_file() else text.name}_tokens")


class DataError(ValueError):
    """Bad data input (missing/corrupt shards, unreadable corpus, ...); the message says how to fix it."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Little-endian storage dtype for token ids of a `vocab_size` vocabulary."""
    return _DTYPES["uint16"] if vocab_size <= 65535 else _DTYPES["uint32"]


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Writes one split's token stream as `{split}_00000.bin`, `{split}_00001.bin`, ... in `out_dir`.

    Each shard holds at most `shard_tokens` tokens; a shard file is only created once it has a
    token, so an empty split has no shards. `close()` returns the split's manifest entry.
    """

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        if shard_tokens < 1:
            raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}: pass a positive --shard-tokens")
        self.out_dir, self.split, self.dtype, self.shard_tokens = Path(out_dir), split, dtype, shard_tokens
        self.num_tokens = 0
        self.num_documents = 0
        self._shards: list[dict] = []
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._shard_count = 0

    def write(self, tokens: np.ndarray, num_documents: int) -> None:
        """Append `tokens` (1-D ids, EOS already after each document) holding `num_documents` documents."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        pos = 0
        while pos < len(tokens):
            if self._file is None:
                name = f"{self.split}_{len(self._shards):05d}.bin"
                self._shards.append({"file": name, "num_tokens": 0, "sha256": ""})
                self._file = open(self.out_dir / name, "wb")
            take = min(len(tokens) - pos, self.shard_tokens - self._shard_count)
            chunk = tokens[pos:pos + take].tobytes()
            self._file.write(chunk)
            self._hash.update(chunk)
            self._shard_count += take
            pos += take
            if self._shard_count == self.shard_tokens:
                self._finish_shard()
        self.num_tokens += len(tokens)
        self.num_documents += num_documents

    def _finish_shard(self) -> None:
        assert self._file is not None
        self._file.close()
        self._shards[-1].update(num_tokens=self._shard_count, sha256=self._hash.hexdigest())
        self._file, self._hash, self._shard_count = None, hashlib.sha256(), 0

    def close(self) -> dict:
        """Finish the last shard; returns {"num_tokens", "num_documents", "shards"} for the manifest."""
        if self._file is not None:
            self._finish_shard()
        return {"num_tokens": self.num_tokens, "num_documents": self.num_documents, "shards": self._shards}


def write_manifest(out_dir: Path, tokenizer: Tokenizer, splits: dict[str, dict], extra: dict | None = None) -> dict:
    """Copy the tokenizer into `out_dir` and write manifest.json for `splits` (from ShardWriter.close).

    extra: further top-level keys (a part of a multi-machine run adds "part"; readers ignore it)."""
    out_dir = Path(out_dir)
    shutil.copyfile(tokenizer.path, out_dir / TOKENIZER_FILE)
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id, "file": TOKENIZER_FILE},
        "dtype": dtype_for_vocab(tokenizer.vocab_size).name,
        "splits": splits,
        **(extra or {}),
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _read_manifest(root: Path) -> dict:
    if root.is_file():
        if root.suffix.lower() in _TEXT_SUFFIXES:
            raise DataError(f"{root} is a raw text file, not a token directory: tokenize it with "
                            f"`{_TOKENIZE_HINT.format(input=root, dir=_tokens_dir(root))}` "
                            f"and point data.dir there")
        raise DataError(f"{root} is a file, not a token directory: point data.dir at a directory written by "
                        f"data_prep/tokenize_corpus.py")
    if not root.is_dir():
        raise DataError(f"token directory {root} does not exist: create it with "
                        f"`{_TOKENIZE_HINT.format(input='corpus.jsonl', dir=root)}`")
    path = root / MANIFEST_FILE
    if not path.is_file():
        # Never suggest --overwrite here: this folder is not ours (it may hold the user's corpus).
        text = next((p for p in root.rglob("*") if p.suffix.lower() in _TEXT_SUFFIXES), None)
        new_dir = _tokens_dir(root)
        if text is not None:
            raise DataError(f"{root} has no {MANIFEST_FILE}: it holds text (e.g. {text.name}), not tokens; "
                            f"tokenize it into a new directory with `python data_prep/tokenize_corpus.py "
                            f"--input {root} --tokenizer tokenizer.model --output {new_dir}` and point "
                            f"data.dir there")
        out = root if not any(root.iterdir()) else new_dir
        raise DataError(f"{root} has no {MANIFEST_FILE}, so it is not a token directory: create one with "
                        f"`{_TOKENIZE_HINT.format(input='corpus.jsonl', dir=out)}`"
                        + ("" if out == root else " and point data.dir there"))
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}): re-run data_prep/tokenize_corpus.py") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise DataError(f"{path} has format_version {version!r}, this code reads {FORMAT_VERSION}: "
                        f"re-run data_prep/tokenize_corpus.py with this version of nl")
    return manifest


class TokenShards:
    """One split of a token directory, validated and memory-mapped as one token stream.

    `window(start, length)` reads `stream[start:start+length]` across shard boundaries. For a
    sequence length T the split holds `num_windows(T) = (num_tokens - 1) // T` training windows of
    T+1 tokens: window i = stream[i*T : i*T + T + 1] (inputs = [:-1], targets = [1:]).
    """

    def __init__(self, dir: str | Path, split: str = "train", verify_checksums: bool = True):
        self.dir = Path(dir)
        self.split = split
        self.manifest = _read_manifest(self.dir)
        try:
            tok = self.manifest["tokenizer"]
            self.fingerprint: str = tok["fingerprint"]
            self.vocab_size: int = int(tok["vocab_size"])
            self.eos_id: int = int(tok["eos_id"])
            self.tokenizer_path = self.dir / tok["file"]
            dtype_name = self.manifest["dtype"]
            splits = self.manifest["splits"]
            entry = splits.get(split)
            shards = entry["shards"] if entry is not None else None
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{self.dir / MANIFEST_FILE} is malformed (missing {e}): "
                            f"re-run data_prep/tokenize_corpus.py") from None
        if entry is None:
            raise DataError(f"{self.dir} has no split {split!r} (it has: {', '.join(sorted(splits))}): "
                            f"use one of those or re-tokenize with a --val-fraction > 0")
        if dtype_name not in _DTYPES:
            raise DataError(f"{self.dir / MANIFEST_FILE} names dtype {dtype_name!r}; supported: "
                            f"{', '.join(_DTYPES)}: re-run data_prep/tokenize_corpus.py")
        self.dtype: np.dtype = _DTYPES[dtype_name]
        if not self.tokenizer_path.is_file():
            raise DataError(f"{self.tokenizer_path} is missing (the token directory is incomplete): "
                            f"re-run data_prep/tokenize_corpus.py")
        self._maps: list[np.memmap] = []
        starts = [0]
        for shard in shards:
            path, n = self.dir / shard["file"], int(shard["num_tokens"])
            self._check_shard(path, n, shard["sha256"], verify_checksums)
            if n > 0:  # np.memmap cannot map an empty file
                self._maps.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)))
                starts.append(starts[-1] + n)
        self.num_tokens = starts[-1]
        if self.num_tokens != int(entry["num_tokens"]):
            raise DataError(f"{self.dir / MANIFEST_FILE}: split {split!r} lists {entry['num_tokens']} tokens "
                            f"but its shards hold {self.num_tokens}: re-run data_prep/tokenize_corpus.py")
        # _starts[i] = stream offset of shard i; the last entry is num_tokens.
        self._starts = np.asarray(starts, dtype=np.int64)

    def _check_shard(self, path: Path, num_tokens: int, sha256: str, verify: bool) -> None:
        fix = f"re-run `{_TOKENIZE_HINT.format(input='corpus.jsonl', dir=self.dir)} --overwrite`"
        if not path.is_file():
            raise DataError(f"shard {path} is missing: the token directory is incomplete; {fix}")
        size, expected = path.stat().st_size, num_tokens * self.dtype.itemsize
        if size < expected:
            raise DataError(f"shard {path} is truncated ({size} bytes, expected {expected}): {fix}")
        if size > expected:
            raise DataError(f"shard {path} has {size} bytes, expected {expected} (overwritten?): {fix}")
        if verify and file_sha256(path) != sha256:
            raise DataError(f"shard {path} is corrupt (sha256 mismatch): {fix}")

    @property
    def data_fingerprint(self) -> str:
        """sha256 hex identifying this split's exact token stream (tokenizer + shard checksums)."""
        entry = self.manifest["splits"][self.split]
        ident = {"tokenizer": self.fingerprint, "dtype": self.dtype.name, "split": self.split,
                 "shards": [[s["num_tokens"], s["sha256"]] for s in entry["shards"]]}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def num_windows(self, seq_len: int) -> int:
        """Number of training windows of seq_len+1 tokens (consecutive windows overlap by one token)."""
        return max(0, (self.num_tokens - 1) // seq_len)

    def check_seq_len(self, seq_len: int, min_windows: int = 1) -> None:
        """Raise DataError unless the split fills at least `min_windows` windows of seq_len+1 tokens."""
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}: set data.seq_len to a positive value")
        if self.num_windows(seq_len) < min_windows:
            raise DataError(f"seq_len {seq_len} needs at least {min_windows * seq_len + 1} tokens "
                            f"({min_windows} windows), split {self.split!r} of {self.dir} has "
                            f"{self.num_tokens}: lower data.seq_len or add data")

    def window(self, start: int, length: int) -> np.ndarray:
        """stream[start:start+length] as a new [length] array of `self.dtype`."""
        return self.windows(np.asarray([start]), length)[0]

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows stream[s:s+length] for each s in `starts` ([n] ints) as a new [n, length] array.

        One slice copy per shard a row touches: no per-token Python work.
        """
        starts = np.asarray(starts, dtype=np.int64)
        if len(starts) and (length < 0 or starts.min() < 0 or starts.max() + length > self.num_tokens):
            raise IndexError(f"window [{starts.min()}, {starts.max() + length}) is outside split "
                             f"{self.split!r} of {self.num_tokens} tokens")
        out = np.empty((len(starts), length), dtype=self.dtype)
        shard_of = np.searchsorted(self._starts, starts, side="right") - 1
        for row, (start, shard) in enumerate(zip(starts.tolist(), shard_of.tolist())):
            pos = 0
            while pos < length:
                offset = start + pos - int(self._starts[shard])
                mm = self._maps[shard]
                take = min(length - pos, len(mm) - offset)
                out[row, pos:pos + take] = mm[offset:offset + take]
                pos += take
                shard += 1
        return out

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.dir)!r}, split={self.split!r}, num_tokens={self.num_tokens}, "
                f"shards={len(self._maps)}, vocab_size={self.vocab_size})")
