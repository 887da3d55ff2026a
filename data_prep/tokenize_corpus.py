"""Tokenize a corpus into token shards + manifest.json (the format of nl/data/shards.py).

    python data_prep/tokenize_corpus.py --input corpus.jsonl --tokenizer data/mine/tokenizer.model \\
        --output data/mine/tokens --val-fraction 0.01

Each document is encoded and followed by the tokenizer's EOS id. Whole documents go to the val
split: document i is val when blake2b(seed, i) / 2**64 < val_fraction, except that document 0
is always train and (when val_fraction > 0) document 1 always val, so a corpus of >= 2
documents has both splits. The output is identical for any --num-workers. It is built in a
temporary sibling directory and renamed at the end, so a crash leaves no half-valid output.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import closing
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import nl` without installing

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nl.data.shards import DataError, ShardWriter, dtype_for_vocab, write_manifest  # noqa: E402
from nl.data.sources import iter_documents  # noqa: E402
from nl.tokenizer import Tokenizer  # noqa: E402

BATCH_DOCS = 256  # documents per worker task: large enough to amortise IPC, small enough to stream
BATCH_CHARS = 1 << 20

_worker: dict = {}  # per-process encoding state, set by _init_worker


def is_val(index: int, seed: int, val_fraction: float) -> bool:
    """Whether document `index` goes to the val split (see the module docstring)."""
    if index == 0 or val_fraction <= 0:
        return False
    if index == 1:
        return True
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def _init_worker(tokenizer_path: str, seed: int, val_fraction: float) -> None:
    tok = Tokenizer(tokenizer_path)
    _worker.update(tok=tok, eos=tok.eos_id, dtype=dtype_for_vocab(tok.vocab_size), seed=seed,
                   val_fraction=val_fraction)


def _encode_batch(job: tuple[int, list[str]]) -> tuple[np.ndarray, int, np.ndarray, int, int]:
    """(first doc index, docs) -> (train tokens, train docs, val tokens, val docs, utf-8 bytes of text)."""
    first, docs = job
    tok, eos = _worker["tok"], _worker["eos"]
    ids: dict[bool, list[int]] = {False: [], True: []}
    counts = {False: 0, True: 0}
    n_bytes = 0
    for i, doc in enumerate(docs):
        val = is_val(first + i, _worker["seed"], _worker["val_fraction"])
        ids[val].extend(tok.encode(doc))
        ids[val].append(eos)
        counts[val] += 1
        n_bytes += len(doc.encode("utf-8"))
    dtype = _worker["dtype"]
    return (np.array(ids[False], dtype=dtype), counts[False], np.array(ids[True], dtype=dtype), counts[True],
            n_bytes)


def _batches(docs: Iterator[str]) -> Iterator[tuple[int, list[str]]]:
    """Group documents into (first document index, documents) jobs."""
    batch: list[str] = []
    first, chars = 0, 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield first, batch
            first, batch, chars = first + len(batch), [], 0
    if batch:
        yield first, batch


def _encode_all(jobs: Iterator[tuple[int, list[str]]], num_workers: int, initargs: tuple) -> Iterator[tuple]:
    """_encode_batch over `jobs`, results in job order, on `num_workers` processes (1: in this one)."""
    if num_workers == 1:
        _init_worker(*initargs)
        yield from map(_encode_batch, jobs)
        return
    # A bounded window of in-flight jobs instead of Pool.imap: imap's feeder thread reads the
    # whole input ahead, which for a large corpus means holding all of it in memory.
    with Pool(num_workers, initializer=_init_worker, initargs=initargs) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.apply_async(_encode_batch, (job,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def tokenize_corpus(inputs: list[str], tokenizer: str | Path, output: str | Path, val_fraction: float = 0.01,
                    num_workers: int | None = None, text_field: str = "text", shard_tokens: int = 100_000_000,
                    seed: int = 0, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the token directory `output`; returns the manifest plus "text_bytes" and "seconds"."""
    output = Path(output).absolute()  # absolute, so the temp sibling below has a parent and a name
    num_workers = num_workers or os.cpu_count() or 1
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if num_workers < 1:
        raise DataError(f"--num-workers must be >= 1, got {num_workers}")
    if output.exists() and not output.is_dir():
        raise DataError(f"--output {output} is a file: choose a directory path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise DataError(f"output directory {output} is not empty: pass --overwrite to replace it "
                        f"or choose another --output")
    tok = Tokenizer(tokenizer)
    dtype = dtype_for_vocab(tok.vocab_size)
    _ = tok.eos_id  # fail now, not in a worker, if the model has no EOS piece

    tmp = output.with_name(f".{output.name}.partial-{os.getpid()}")  # per process: concurrent runs never mix
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    try:
        writers = {False: ShardWriter(tmp, "train", dtype, shard_tokens),
                   True: ShardWriter(tmp, "val", dtype, shard_tokens)}
        initargs = (str(tok.path), seed, val_fraction)
        text_bytes = 0
        jobs = _batches(iter_documents(inputs, text_field))
        with tqdm(desc="tokenize", unit="doc", disable=not progress, mininterval=1.0, dynamic_ncols=True) as bar, \
                closing(_encode_all(jobs, num_workers, initargs)) as results:  # closing stops the pool on error
            for train_ids, n_train, val_ids, n_val, n_bytes in results:
                writers[False].write(train_ids, n_train)
                writers[True].write(val_ids, n_val)
                text_bytes += n_bytes
                bar.update(n_train + n_val)
        splits = {"train": writers[False].close(), "val": writers[True].close()}
        if splits["train"]["num_documents"] == 0:
            raise DataError(f"no documents found in {' '.join(inputs)}: check --input and --text-field")
        manifest = write_manifest(tmp, tok, splits)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**manifest, "text_bytes": text_bytes, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl/.parquet files, dirs, or datasets")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece FILE.model")
    ap.add_argument("--output", required=True, help="token directory to create")
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--num-workers", type=int, default=os.cpu_count(), help="encoding processes (default: all cores)")
    ap.add_argument("--text-field", default="text", help="jsonl key / parquet or datasets column (default: text)")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000, help="max tokens per shard file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the train/val document split")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    args = ap.parse_args(argv)
    try:
        m = tokenize_corpus(args.input, args.tokenizer, args.output, args.val_fraction, args.num_workers,
                            args.text_field, args.shard_tokens, args.seed, args.overwrite)
    except DataError as e:
        sys.exit(f"error: {e}")
    train, val = m["splits"]["train"], m["splits"]["val"]
    print(f"tokenized {train['num_documents'] + val['num_documents']} documents ({m['text_bytes'] / 1e6:.1f} MB) "
          f"in {m['seconds']:.1f}s: train {train['num_tokens']} tokens ({len(train['shards'])} shards), "
          f"val {val['num_tokens']} tokens ({val['num_documents']} documents) -> {args.output}")


if __name__ == "__main__":
    main()
