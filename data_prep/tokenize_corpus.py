"""Tokenize a corpus into token shards + manifest.json (the format of nl/data/shards.py).

    python data_prep/tokenize_corpus.py --input corpus.jsonl --tokenizer data/mine/tokenizer.model \\
        --output data/mine/tokens --val-fraction 0.01

Each document is encoded and followed by the tokenizer's EOS id. Whole documents go to the val
split: document i is val when blake2b(seed, i) / 2**64 < val_fraction, except that document 0
is always train and (when val_fraction > 0) document 1 always val, so a corpus of >= 2
documents has both splits. The output is identical for any --num-workers. It is built in a
temporary sibling directory and renamed at the end, so a crash leaves no half-valid output.

Several machines (a slurm array): `--num-shards N --shard-index I` makes this run a part: it reads
the whole input in order but encodes only the documents whose index i (over the non-empty
documents of all inputs, in order) has i % N == I; val membership is still decided by the hash of
i, so it is the same for every N. A part directory is a token directory plus, per split, a
`{split}_docs.bin` index (one record per document: global index uint64, token count uint32,
little-endian) and a "part" entry in manifest.json. data_prep/merge_shards.py then interleaves
the N parts by global document index into one token directory equal, file for file, to a
single-machine run. Modulo rather than contiguous ranges: no machine needs the document count
before it starts, and a hub dataset streams the same way as a file; the price is that every
machine reads (and skips) all of the others' documents: ~35x cheaper than encoding them (demo
corpus: 0.03 CPU s to read it, 1.15 to encode it), but a fixed cost per machine (README).

--overwrite replaces only a token directory this tool wrote: a manifest.json and the files it
names (tokenizer.model, train_NNNNN.bin, val_NNNNN.bin), nothing else. Any other non-empty
--output (a folder of text, say) is refused and left untouched. Text is decoded by the policy of
nl/text.py (BOM dropped; invalid UTF-8 replaced with a warning, or refused with --strict-text).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
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

from nl.cli import one_line_errors  # noqa: E402
from nl.data.shards import (FORMAT_VERSION, MANIFEST_FILE, TOKENIZER_FILE, DataError, ShardWriter,  # noqa: E402
                             dtype_for_vocab, write_manifest)
from nl.data.sources import iter_sourced_documents  # noqa: E402
from nl.text import warn  # noqa: E402
from nl.tokenizer import Tokenizer  # noqa: E402

BATCH_DOCS = 256  # documents per worker task: large enough to amortise IPC, small enough to stream
BATCH_CHARS = 1 << 20

_worker: dict = {}  # per-process encoding state, set by _init_worker
_SHARD_NAME = re.compile(r"(train|val)_(\d{5}|docs)\.bin")  # ShardWriter's names and a part's document index
DOC_DTYPE = np.dtype([("index", "<u8"), ("num_tokens", "<u4")])  # a part's {split}_docs.bin record


def owned_files(output: Path) -> list[Path]:
    """The files of the existing directory `output` that --overwrite may delete.

    Only a token directory written by this tool qualifies: its manifest.json and the tokenizer
    and shard files it names, under this tool's file names, and nothing else beside them (so a
    hand-edited manifest cannot point the deletion at other files). Raises DataError otherwise.
    """
    entries = sorted(p.name for p in output.iterdir())
    refuse = (f"--overwrite only replaces a token directory written by tokenize_corpus: choose a new "
              f"or empty --output (nothing was changed in {output})")
    try:
        manifest = json.loads((output / MANIFEST_FILE).read_text(encoding="utf-8"))
        assert manifest["format_version"] == FORMAT_VERSION
        names = {MANIFEST_FILE, manifest["tokenizer"]["file"]}
        names |= {shard["file"] for split in manifest["splits"].values() for shard in split["shards"]}
        names |= set(manifest.get("part", {}).get("documents", {}).values())
    except (OSError, ValueError, AssertionError, KeyError, TypeError, AttributeError):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise DataError(f"--output {output} is not a token directory (no valid {MANIFEST_FILE}; it holds "
                        f"{shown}): {refuse}") from None
    ours = {n for n in names if n in (MANIFEST_FILE, TOKENIZER_FILE) or _SHARD_NAME.fullmatch(n)}
    foreign = [n for n in entries if n not in ours]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DataError(f"--output {output} holds files its {MANIFEST_FILE} does not list ({shown}): "
                        f"{refuse}, or move those files away")
    return [output / n for n in entries]


def is_val(index: int, seed: int, val_fraction: float) -> bool:
    """Whether document `index` goes to the val split (see the module docstring)."""
    if index == 0 or val_fraction <= 0:
        return False
    if index == 1:
        return True
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def _init_worker(tokenizer_path: str, seed: int, val_fraction: float, stride: int = 1) -> None:
    """stride: the distance between the global indices of a job's documents (--num-shards)."""
    tok = Tokenizer(tokenizer_path)
    _worker.update(tok=tok, eos=tok.eos_id, dtype=dtype_for_vocab(tok.vocab_size), seed=seed,
                   val_fraction=val_fraction, stride=stride)


def _encode_batch(job: tuple[int, list[tuple[str, str]]]) -> tuple[dict[bool, np.ndarray], dict[bool, np.ndarray], int]:
    """(first global index, (where, text) docs) -> (tokens, document records, utf-8 bytes), the first
    two keyed by is-val: tokens a 1-D array (EOS after each document), records a DOC_DTYPE array.
    Document k of the job has global index first + k * stride (see _init_worker).

    Raises DataError naming the document's file and line, which crosses the process boundary
    (a raw worker traceback would not say which input to look at)."""
    tok, eos = _worker["tok"], _worker["eos"]
    ids: dict[bool, list[int]] = {False: [], True: []}
    records: dict[bool, list[tuple[int, int]]] = {False: [], True: []}
    n_bytes = 0
    first, docs = job
    for k, (where, doc) in enumerate(docs):
        index = first + k * _worker["stride"]
        val = is_val(index, _worker["seed"], _worker["val_fraction"])
        try:
            encoded = tok.encode(doc)
            n_bytes += len(doc.encode("utf-8"))
        except (DataError, ValueError, RuntimeError) as e:
            raise DataError(f"{where}: could not encode this document ({e})") from None
        ids[val].extend(encoded)
        ids[val].append(eos)
        records[val].append((index, len(encoded) + 1))
    dtype = _worker["dtype"]
    return ({v: np.array(ids[v], dtype=dtype) for v in ids}, {v: np.array(records[v], dtype=DOC_DTYPE) for v in ids},
            n_bytes)


def _batches(docs: Iterator[tuple[str, str]], num_shards: int = 1, shard_index: int = 0,
             counter: list[int] | None = None) -> Iterator[tuple[int, list[tuple[str, str]]]]:
    """Group the documents i with i % num_shards == shard_index into (first i, (where, text) docs) jobs.

    counter[0] ends as the number of documents read (of every shard), the corpus size a part records."""
    batch: list[tuple[str, str]] = []
    first, chars, index = 0, 0, -1
    for index, doc in enumerate(docs):
        if index % num_shards != shard_index:
            continue
        if not batch:
            first = index
        batch.append(doc)
        chars += len(doc[1])
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield first, batch
            batch, chars = [], 0
    if batch:
        yield first, batch
    if counter is not None:
        counter[0] = index + 1


def _encode_all(jobs: Iterator[tuple], num_workers: int, initargs: tuple) -> Iterator[tuple]:
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
                    seed: int = 0, overwrite: bool = False, progress: bool = True, strict_text: bool = False,
                    hub_split: str = "train", hub_config: str | None = None, num_shards: int | None = None,
                    shard_index: int = 0, documents: Iterator[tuple[str, str]] | None = None) -> dict:
    """Write the token directory `output`; returns the manifest plus "text_bytes" and "seconds".

    overwrite: replace `output` if it is a token directory this tool wrote (see `owned_files`);
    any other non-empty `output` raises DataError before anything is read or written.
    strict_text: refuse text that is not valid UTF-8 (DataError naming file and line) instead of
    replacing it with U+FFFD and a warning.
    hub_split, hub_config: split and configuration of hub dataset inputs (streamed).
    num_shards, shard_index: write part `shard_index` of `num_shards` (see the module docstring);
    None: the whole corpus, no part files.
    documents: (where, text) pairs to read instead of `inputs` (any iterable, e.g. a generator;
    `inputs` is then only recorded). Memory stays bounded: documents are read as encoded."""
    output = Path(output).absolute()  # absolute, so the temp sibling below has a parent and a name
    num_workers = num_workers or os.cpu_count() or 1
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if num_workers < 1:
        raise DataError(f"--num-workers must be >= 1, got {num_workers}")
    if num_shards is not None and not (num_shards >= 1 and 0 <= shard_index < num_shards):
        raise DataError(f"--shard-index must be in [0, --num-shards) and --num-shards >= 1, got "
                        f"--num-shards {num_shards} --shard-index {shard_index}")
    check_output(output, overwrite)
    tok = Tokenizer(tokenizer)
    dtype = dtype_for_vocab(tok.vocab_size)
    _ = tok.eos_id  # fail now, not in a worker, if the model has no EOS piece

    tmp = output.with_name(f".{output.name}.partial-{os.getpid()}")  # per process: concurrent runs never mix
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    part = num_shards is not None
    doc_files: dict = {}
    try:
        writers = {False: ShardWriter(tmp, "train", dtype, shard_tokens),
                   True: ShardWriter(tmp, "val", dtype, shard_tokens)}
        doc_files = {v: open(tmp / f"{'val' if v else 'train'}_docs.bin", "wb") for v in (False, True)} if part else {}
        initargs = (str(tok.path), seed, val_fraction, num_shards or 1)
        text_bytes = 0
        read = [0]
        if documents is None:
            documents = iter_sourced_documents(inputs, text_field, strict_text, hub_split, hub_config)
        jobs = _batches(iter(documents), num_shards or 1, shard_index, read)
        with tqdm(desc="tokenize", unit="doc", disable=not progress, mininterval=1.0, dynamic_ncols=True) as bar, \
                closing(_encode_all(jobs, num_workers, initargs)) as results:  # closing stops the pool on error
            for ids, records, n_bytes in results:
                for v in (False, True):
                    writers[v].write(ids[v], len(records[v]))
                    if part:
                        doc_files[v].write(records[v].tobytes())
                text_bytes += n_bytes
                bar.update(len(records[False]) + len(records[True]))
        for f in doc_files.values():
            f.close()
        splits = {"train": writers[False].close(), "val": writers[True].close()}
        if read[0] == 0 or (not part and splits["train"]["num_documents"] == 0):
            raise DataError(f"no documents found in {' '.join(inputs)}: check --input and --text-field")
        extra = {"part": {"index": shard_index, "num_parts": num_shards, "corpus_documents": read[0],
                          "seed": seed, "val_fraction": val_fraction,
                          "source": {"inputs": list(inputs), "text_field": text_field, "hub_split": hub_split,
                                     "hub_config": hub_config},
                          "documents": {"train": "train_docs.bin", "val": "val_docs.bin"}}} if part else {}
        manifest = write_manifest(tmp, tok, splits, extra)
        _replace_dir(tmp, output)
    except BaseException:
        for f in doc_files.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)  # our own temp dir
        raise
    return {**manifest, "text_bytes": text_bytes, "seconds": time.perf_counter() - start}


def check_output(output: Path, overwrite: bool) -> None:
    """Raise DataError unless `output` (absolute) may be written: new, empty, or (with `overwrite`)
    a token directory this tool wrote. Nothing is changed."""
    if output.is_symlink():
        raise DataError(f"--output {output} is a symbolic link: pass the directory it points to, or a new path")
    if output.exists() and not output.is_dir():
        raise DataError(f"--output {output} is a file: choose a directory path")
    if output.is_dir() and any(output.iterdir()):
        owned_files(output)  # refuses anything but our own token directory, --overwrite or not
        if not overwrite:
            raise DataError(f"output directory {output} is not empty: pass --overwrite to replace it "
                            f"or choose another --output")


def _replace_dir(new: Path, output: Path) -> None:
    """Move `new` to `output`, deleting the old `output` file by file (only `owned_files`).

    Checked again here because the folder may have changed during a long tokenization. The old
    directory is moved aside first, so it is never half-deleted while `output` is missing."""
    if output.exists():
        old_files = owned_files(output) if any(output.iterdir()) else []
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(new, output)
        for file in old_files:
            (old / file.name).unlink(missing_ok=True)
        try:
            old.rmdir()
        except OSError:  # a file appeared there since the check: keep it
            warn(f"kept {old}: files were added to the old --output during tokenization")
    else:
        os.replace(new, output)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True,
                    help=".txt/.jsonl/.parquet files, dirs, datasets save_to_disk dirs, or hub dataset names")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece FILE.model")
    ap.add_argument("--output", required=True, help="token directory to create")
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--num-workers", type=int, default=os.cpu_count(), help="encoding processes (default: all cores)")
    ap.add_argument("--text-field", default="text", help="jsonl key / parquet or datasets column (default: text)")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000, help="max tokens per shard file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the train/val document split")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --output if it is a token directory written by this tool (never anything else)")
    ap.add_argument("--strict-text", action="store_true",
                    help="refuse text that is not valid UTF-8 instead of replacing it with U+FFFD (and a warning)")
    ap.add_argument("--hub-split", default="train", help="split of hub dataset inputs (default: train)")
    ap.add_argument("--hub-config", default=None, help="configuration (subset) of hub dataset inputs")
    ap.add_argument("--num-shards", type=int, default=None,
                    help="split the work over N machines: write part --shard-index of N (merge with "
                         "data_prep/merge_shards.py)")
    ap.add_argument("--shard-index", type=int, default=None, help="this machine's part, 0..N-1")
    args = ap.parse_args(argv)
    if (args.num_shards is None) != (args.shard_index is None):
        sys.exit("error: --num-shards and --shard-index go together: pass both (e.g. --num-shards 8 "
                 "--shard-index $SLURM_ARRAY_TASK_ID) or neither")
    with one_line_errors():  # DataError, or an output path that cannot be created
        m = tokenize_corpus(args.input, args.tokenizer, args.output, args.val_fraction, args.num_workers,
                            args.text_field, args.shard_tokens, args.seed, args.overwrite,
                            strict_text=args.strict_text, hub_split=args.hub_split, hub_config=args.hub_config,
                            num_shards=args.num_shards, shard_index=args.shard_index or 0)
    train, val = m["splits"]["train"], m["splits"]["val"]
    print(f"tokenized {train['num_documents'] + val['num_documents']} documents ({m['text_bytes'] / 1e6:.1f} MB) "
          f"in {m['seconds']:.1f}s: train {train['num_tokens']} tokens ({len(train['shards'])} shards), "
          f"val {val['num_tokens']} tokens ({val['num_documents']} documents) -> {args.output}")


if __name__ == "__main__":
    main()
