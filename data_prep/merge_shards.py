"""Merge the N parts of a multi-machine tokenization into one token directory.

    python data_prep/tokenize_corpus.py ... --num-shards 3 --shard-index I --output parts/part_I   # I = 0, 1, 2
    python data_prep/merge_shards.py --parts parts/part_* --output data/mine/tokens

Each split's documents are interleaved by their global index (recorded in the parts'
`{split}_docs.bin`), so the merged directory equals, file for file (shards and their sha256),
what one machine would have written with the same --shard-tokens: a training run cannot tell
the two apart. The copy streams in windows of documents (bounded memory) and checks that every
document ends with the tokenizer's EOS.

Refused, before anything is written: a directory that is not a part, parts with different
tokenizers (fingerprint), dtypes, part counts, seeds, val fractions or inputs, two parts with the
same index (overlap), missing parts, and a part whose document count does not fit the corpus
size (an interrupted or altered part). The parts are left as they are; delete them after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import nl` without installing

import numpy as np  # noqa: E402

from data_prep.tokenize_corpus import DOC_DTYPE, _replace_dir, check_output  # noqa: E402
from nl.cli import one_line_errors  # noqa: E402
from nl.data.shards import DataError, ShardWriter, TokenShards, write_manifest  # noqa: E402
from nl.tokenizer import Tokenizer  # noqa: E402

WINDOW_DOCS = 8192  # global document indices copied per step: bounds the merge's memory
SPLITS = ("train", "val")


def _read_part(path: Path) -> dict:
    """A part's manifest "part" entry plus its open splits and document records; DataError if not a part."""
    shards = {split: TokenShards(path, split) for split in SPLITS}  # validates files and checksums
    manifest = shards["train"].manifest
    part = manifest.get("part")
    if not isinstance(part, dict):
        raise DataError(f"{path} is not a part directory (its manifest has no \"part\" entry): pass the "
                        f"--output directories of `tokenize_corpus.py --num-shards N --shard-index I`")
    docs = {}
    for split in SPLITS:
        file = path / part["documents"][split]
        size = file.stat().st_size if file.is_file() else -1
        if size < 0 or size % DOC_DTYPE.itemsize:
            raise DataError(f"{file} is missing or truncated: re-run part {part['index']} of tokenize_corpus")
        docs[split] = (np.memmap(file, dtype=DOC_DTYPE, mode="r") if size else np.zeros(0, DOC_DTYPE))
        entry = manifest["splits"][split]
        if len(docs[split]) != entry["num_documents"] or int(docs[split]["num_tokens"].sum(dtype=np.int64)) \
                != entry["num_tokens"]:
            raise DataError(f"{file} does not match {path}/manifest.json (documents or tokens differ): "
                            f"re-run part {part['index']} of tokenize_corpus")
    return {**part, "dir": path, "shards": shards, "docs": docs, "dtype": manifest["dtype"],
            "fingerprint": manifest["tokenizer"]["fingerprint"]}


def check_parts(parts: list[dict]) -> None:
    """Raise DataError unless `parts` are exactly the parts 0..N-1 of one tokenization."""
    first = parts[0]
    for key, what in (("fingerprint", "tokenizer (fingerprint)"), ("dtype", "dtype"), ("num_parts", "--num-shards"),
                      ("seed", "--seed"), ("val_fraction", "--val-fraction"), ("source", "inputs"),
                      ("corpus_documents", "corpus size (documents read)")):
        for other in parts[1:]:
            if other[key] != first[key]:
                raise DataError(f"{first['dir']} and {other['dir']} differ in {what} ({first[key]!r} vs "
                                f"{other[key]!r}): they are not parts of one tokenization; re-run the odd "
                                f"part with the same arguments")
    n, seen = first["num_parts"], {}
    for part in parts:
        if part["index"] in seen:
            raise DataError(f"{seen[part['index']]} and {part['dir']} are both part {part['index']} of {n} "
                            f"(overlap): pass each part once")
        seen[part["index"]] = part["dir"]
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise DataError(f"missing part{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {n}: "
                        f"run tokenize_corpus --num-shards {n} --shard-index I for each and pass all {n}")
    total = first["corpus_documents"]
    for part in parts:
        count = sum(len(d) for d in part["docs"].values())
        expected = len(range(part["index"], total, n))
        if count != expected:
            raise DataError(f"{part['dir']} holds {count} documents, part {part['index']} of {n} of a "
                            f"{total}-document corpus has {expected}: re-run that part")


def _merge_split(parts: list[dict], split: str, writer: ShardWriter, eos: int) -> None:
    """Write `split` of all parts to `writer` in global document order, WINDOW_DOCS indices at a time."""
    total = parts[0]["corpus_documents"]
    doc_pos = [0] * len(parts)  # next document record of each part
    tok_pos = [0] * len(parts)  # its first token in the part's stream
    for lo in range(0, total, WINDOW_DOCS):
        blocks, indices, lengths, src = [], [], [], []
        base = 0
        for p, part in enumerate(parts):
            docs = part["docs"][split]
            candidates = docs[doc_pos[p]:doc_pos[p] + WINDOW_DOCS]
            take = np.asarray(candidates[:int(np.searchsorted(candidates["index"], lo + WINDOW_DOCS))])
            n_tok = int(take["num_tokens"].sum(dtype=np.int64))
            if n_tok:
                blocks.append(part["shards"][split].window(tok_pos[p], n_tok))
            lens = take["num_tokens"].astype(np.int64)
            indices.append(take["index"])
            lengths.append(lens)
            src.append(base + np.cumsum(lens) - lens)  # start of each document in the window's buffer
            base += n_tok
            doc_pos[p] += len(take)
            tok_pos[p] += n_tok
        if base == 0:
            continue
        buffer = np.concatenate(blocks)
        order = np.argsort(np.concatenate(indices), kind="stable")
        lens, starts = np.concatenate(lengths)[order], np.concatenate(src)[order]
        out_starts = np.cumsum(lens) - lens
        gather = np.repeat(starts - out_starts, lens) + np.arange(base)  # out[j] = buffer[gather[j]]
        merged = buffer[gather]
        if not (merged[out_starts + lens - 1] == eos).all():
            raise DataError(f"split {split!r}: a document does not end with EOS {eos} (a part's _docs.bin "
                            f"does not match its shards): re-run the parts")
        writer.write(merged, len(lens))


def merge_shards(part_dirs: list[str | Path], output: str | Path, shard_tokens: int = 100_000_000,
                 overwrite: bool = False) -> dict:
    """Merge the part directories into the token directory `output`; returns its manifest plus "seconds".

    Raises DataError (nothing written) for the refusals listed in the module docstring, and for an
    `output` that tokenize_corpus would refuse (see `check_output`)."""
    output = Path(output).absolute()
    if not part_dirs:
        raise DataError("no part directories given: pass --parts DIR...")
    check_output(output, overwrite)
    start = time.perf_counter()
    parts = [_read_part(Path(d).absolute()) for d in part_dirs]
    check_parts(parts)
    parts.sort(key=lambda part: part["index"])
    tok = Tokenizer(parts[0]["shards"]["train"].tokenizer_path)
    dtype = parts[0]["shards"]["train"].dtype
    tmp = output.with_name(f".{output.name}.partial-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        splits = {}
        for split in SPLITS:
            writer = ShardWriter(tmp, split, dtype, shard_tokens)
            _merge_split(parts, split, writer, tok.eos_id)
            splits[split] = writer.close()
        manifest = write_manifest(tmp, tok, splits)
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temp dir
        raise
    return {**manifest, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", required=True, help="the N part directories (any order)")
    ap.add_argument("--output", required=True, help="token directory to create")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000,
                    help="max tokens per shard file (as tokenize_corpus; equal values give equal files)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --output if it is a token directory written by these tools (never anything else)")
    args = ap.parse_args(argv)
    with one_line_errors():  # DataError, or an output path that cannot be created
        m = merge_shards(args.parts, args.output, args.shard_tokens, args.overwrite)
    train, val = m["splits"]["train"], m["splits"]["val"]
    print(f"merged {len(args.parts)} parts in {m['seconds']:.1f}s: train {train['num_tokens']} tokens "
          f"({train['num_documents']} documents, {len(train['shards'])} shards), val {val['num_tokens']} tokens "
          f"({val['num_documents']} documents) -> {args.output}")


if __name__ == "__main__":
    main()
