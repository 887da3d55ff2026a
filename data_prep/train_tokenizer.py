"""Train a sentencepiece BPE tokenizer (byte fallback, unk=0 bos=1 eos=2, no pad) on a corpus.

    python data_prep/train_tokenizer.py --input corpus.jsonl more_texts/ --vocab-size 8192 \\
        --output data/mine/tokenizer.model

Inputs are anything `nl.data.sources.iter_documents` reads (.txt/.jsonl/.parquet files,
directories of them, datasets save_to_disk dirs, hub names). Documents are fed line by line;
training uses the first --max-chars characters, so for a huge corpus pass a representative
sample. Normalization is off (identity) so that decode(encode(text)) == text. Text is decoded
by the policy of nl/text.py (BOM dropped; invalid UTF-8 replaced with a warning, or refused
with --strict-text).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import nl` without installing

from nl.cli import one_line_errors  # noqa: E402
from nl.data.shards import DataError  # noqa: E402
from nl.data.sources import iter_sourced_documents  # noqa: E402

# Long lines are cut into pieces of this many characters: sentencepiece silently drops any
# sentence longer than max_sentence_length bytes (4 bytes per character at most in UTF-8).
MAX_LINE_CHARS = 4096


def _sentences(inputs: list[str], text_field: str, max_chars: int, stats: dict, strict: bool) -> Iterator[str]:
    """Non-blank lines of the documents, long lines cut, stopping after `max_chars` characters.

    An error while reading is kept in stats["error"] and ends the stream: sentencepiece turns an
    exception raised in its sentence iterator into a RuntimeError that loses the message."""
    try:
        yield from _lines(inputs, text_field, max_chars, stats, strict)
    except Exception as e:  # noqa: BLE001 - re-raised by train_tokenizer once sentencepiece returns
        stats["error"] = e


def _lines(inputs: list[str], text_field: str, max_chars: int, stats: dict, strict: bool) -> Iterator[str]:
    for where, doc in iter_sourced_documents(inputs, text_field, strict):
        stats["documents"] += 1
        stats["where"] = where
        for line in doc.splitlines():
            if not line.strip():
                continue
            for i in range(0, len(line), MAX_LINE_CHARS):
                piece = line[i:i + MAX_LINE_CHARS]
                stats["lines"] += 1
                stats["chars"] += len(piece)
                yield piece
                if stats["chars"] >= max_chars:
                    return


def train_tokenizer(inputs: list[str], vocab_size: int, output: str | Path, text_field: str = "text",
                    max_chars: int = 100_000_000, strict_text: bool = False, overwrite: bool = False) -> dict:
    """Train and write `output` (PREFIX.model, plus PREFIX.vocab); returns counts of what was used.

    An existing `output` is refused unless overwrite (as tokenize_corpus refuses an existing shard folder): token
    shards and runs made with the old tokenizer would no longer match it.

    strict_text: refuse text that is not valid UTF-8 (DataError naming file and line) instead of
    replacing it with U+FFFD and a warning. Raises DataError for any input problem."""
    import sentencepiece as spm

    output = Path(output)
    if output.suffix != ".model":
        raise DataError(f"--output {output} must end in .model (sentencepiece writes PREFIX.model and "
                        f"PREFIX.vocab): e.g. --output {output.with_suffix('.model')}")
    if vocab_size < 260:
        raise DataError(f"--vocab-size {vocab_size} is too small: byte fallback needs 256 byte pieces "
                        f"plus unk/bos/eos; use at least 512")
    if output.exists() and not overwrite:
        raise DataError(f"--output {output} exists (shards and runs made with it would no longer match a new one): "
                        f"pass --overwrite to replace it, or choose another path")
    output.parent.mkdir(parents=True, exist_ok=True)
    stats: dict = {"documents": 0, "lines": 0, "chars": 0, "where": None, "error": None}
    start = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(inputs, text_field, max_chars, stats, strict_text),
            model_prefix=str(output.with_suffix("")),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            character_coverage=0.9995,  # rarer characters fall back to byte pieces
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=4 * MAX_LINE_CHARS,
            input_sentence_size=0,  # use every line given: --max-chars already bounds the sample
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        if stats["error"] is not None:
            raise stats["error"] from None
        if stats["chars"] == 0:
            raise DataError(f"no text found in {' '.join(inputs)}: check --input and --text-field") from None
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "vocab" in message.lower():  # e.g. "Vocabulary size too high (5000). Please set it to a value <= 900."
            raise DataError(f"sentencepiece training failed: {message}: lower --vocab-size or give more text") from None
        at = f" (last document read: {stats['where']})" if stats["where"] else ""
        raise DataError(f"sentencepiece training failed: {message}{at}") from None
    if stats["error"] is not None:  # sentencepiece trained on the text before the error: drop that model
        output.unlink(missing_ok=True)
        output.with_suffix(".vocab").unlink(missing_ok=True)
        raise stats["error"]
    return {**{k: v for k, v in stats.items() if k not in ("where", "error")},
            "seconds": time.perf_counter() - start, "output": str(output)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl/.parquet files, dirs, or datasets")
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--output", required=True, help="FILE.model (FILE.vocab is written alongside)")
    ap.add_argument("--text-field", default="text", help="jsonl key / parquet or datasets column (default: text)")
    ap.add_argument("--max-chars", type=int, default=100_000_000,
                    help="train on at most this many characters (default: 100M)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output tokenizer")
    ap.add_argument("--strict-text", action="store_true",
                    help="refuse text that is not valid UTF-8 instead of replacing it with U+FFFD (and a warning)")
    args = ap.parse_args(argv)
    with one_line_errors():  # DataError, or an output path that cannot be created
        s = train_tokenizer(args.input, args.vocab_size, args.output, args.text_field, args.max_chars,
                            strict_text=args.strict_text, overwrite=args.overwrite)
    print(f"trained BPE tokenizer (vocab {args.vocab_size}) on {s['chars'] / 1e6:.1f}M chars "
          f"({s['documents']} documents, {s['lines']} lines) in {s['seconds']:.1f}s -> {s['output']}")


if __name__ == "__main__":
    main()
