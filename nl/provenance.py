"""The run directory owns its tokenizer: a copy and a fingerprint record, written when the run starts.

    RUN_DIR/tokenizer.model   a byte copy of the data directory's tokenizer.model
    RUN_DIR/tokenizer.json    {"fingerprint": sha256 hex of the serialized sentencepiece proto (the
                               scheme of `nl.Tokenizer.fingerprint` and manifest.json),
                               "vocab_size": int, "eos_id": int, "data_dir": absolute data.dir}

A fresh start (rank 0) writes both; a resume refuses data tokenized with another tokenizer; a
resumed run that predates the record gets one then. `nl.export` ships the copy after checking it
against the record, so an export never opens the data directory, which may since have been
deleted, moved or re-tokenized.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from nl.data.shards import DataError
from nl.tokenizer import Tokenizer

if TYPE_CHECKING:
    from nl.data.shards import TokenShards

TOKENIZER_COPY = "tokenizer.model"
TOKENIZER_RECORD = "tokenizer.json"


def read_tokenizer_record(run_dir: str | Path) -> dict | None:
    """RUN_DIR/tokenizer.json as a dict, or None for a run started before runs recorded it."""
    path = Path(run_dir) / TOKENIZER_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        record = f"not JSON: {e}"
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
        raise DataError(f"{path} is malformed ({record if isinstance(record, str) else 'no fingerprint'}); "
                        f"it records the run's tokenizer: restore it, or delete it and pass --tokenizer with "
                        f"the run's tokenizer.model")
    return record


def _write_atomic(path: Path, write) -> None:
    """write(tmp) then rename over `path`: a reader (another rank) never sees a half-written file."""
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def _record(run_dir: Path, data: TokenShards) -> None:
    tokenizer = Tokenizer(data.tokenizer_path)
    if tokenizer.fingerprint != data.fingerprint:
        raise DataError(f"{data.tokenizer_path} is not the tokenizer {data.dir}/manifest.json names "
                        f"(fingerprint {tokenizer.fingerprint[:12]} vs {data.fingerprint[:12]}): the token "
                        f"directory was altered; re-run data_prep/tokenize_corpus.py")
    _write_atomic(run_dir / TOKENIZER_COPY, lambda tmp: shutil.copyfile(data.tokenizer_path, tmp))
    record = {"fingerprint": data.fingerprint, "vocab_size": tokenizer.vocab_size,
              "eos_id": tokenizer.eos_id, "data_dir": str(Path(data.dir).resolve())}
    _write_atomic(run_dir / TOKENIZER_RECORD, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def claim_tokenizer(run_dir: str | Path, data: TokenShards, resuming: bool, coordinator: bool = True) -> None:
    """At run start: record the data's tokenizer as the run's, or check a resume against the record.

    Fresh start: rank 0 (`coordinator`) writes the copy and record, replacing any earlier ones.
    Resume: every rank compares `data.fingerprint` with the record and raises DataError (one line
    naming both directories and the fix) on a difference; rank 0 records a run that has no record.
    """
    run_dir = Path(run_dir)
    record = read_tokenizer_record(run_dir) if resuming else None
    if record is not None:
        if record["fingerprint"] != data.fingerprint:
            raise DataError(f"{data.dir} was tokenized with another tokenizer (fingerprint "
                            f"{data.fingerprint[:12]}) than run {run_dir} was trained with "
                            f"({record['fingerprint'][:12]}, from {record.get('data_dir')}; a copy is "
                            f"{run_dir / TOKENIZER_COPY}): point data.dir at data tokenized with it, or "
                            f"start a new run.dir")
        return
    if coordinator:
        _record(run_dir, data)


def run_tokenizer(run_dir: str | Path, override: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a run: its recorded copy, checked against the record.

    `override`: a tokenizer file to use instead of the copy (to repair a run whose copy is lost,
    or to export a run that predates the record); with a record it must match its fingerprint.
    Raises DataError with the fix when the copy is missing, altered, or there is no record."""
    run_dir = Path(run_dir)
    record = read_tokenizer_record(run_dir)
    copy = run_dir / TOKENIZER_COPY
    path = Path(override) if override is not None else copy
    if record is None and override is None:
        raise DataError(f"run {run_dir} has no tokenizer record ({TOKENIZER_RECORD}; it was started before "
                        f"runs recorded their tokenizer): pass --tokenizer with the tokenizer.model it was "
                        f"trained with (e.g. DATA_DIR/tokenizer.model of its data.dir)")
    if override is not None and not path.is_file():
        raise DataError(f"--tokenizer {path} does not exist: pass the tokenizer.model run {run_dir} was trained with")
    if not path.is_file():
        raise DataError(f"the run's tokenizer {path} is missing: restore it from the token directory the run "
                        f"trained on ({record['data_dir']}/{TOKENIZER_COPY} if unchanged) or pass --tokenizer PATH")
    tokenizer = Tokenizer(path)
    fingerprint = tokenizer.fingerprint
    if record is not None and fingerprint != record["fingerprint"]:
        raise DataError(f"{path} is not the tokenizer run {run_dir} was trained with (fingerprint "
                        f"{fingerprint[:12]}, recorded {record['fingerprint'][:12]} in "
                        f"{run_dir / TOKENIZER_RECORD}): restore the original or pass --tokenizer with it")
    return tokenizer
