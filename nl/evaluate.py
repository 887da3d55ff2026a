"""Validation loss and perplexity of a model.

    python -m nl.evaluate --model EXPORT_DIR --data TOKEN_DIR        # val split of token shards
    python -m nl.evaluate --model EXPORT_DIR --data TOKEN_DIR OTHER  # several: pooled, and each reported
    python -m nl.evaluate --model EXPORT_DIR --data notes.txt more/  # raw text, model's tokenizer
    python -m nl.evaluate --model EXPORT_DIR --data posts.jsonl --text-field body

Prints one JSON object: {"val_loss", "perplexity", "tokens", "windows", "seq_len", "document_boundaries",
"data"}, plus "per_data" (each token directory's "val_loss" and "tokens") for several token directories;
the pooled loss weighs every token alike, and --max-batches counts per directory. A model trained
with data.document_boundaries=reset is evaluated that way unless --document-boundaries says otherwise.
A --seq-len past the position budget of a model that reads positions through RoPE (Transformer++,
HOPE with mixer=attention: its trained seq_len, nl.niah.position_budget) gets one warning on stderr
and runs anyway; HOPE's recurrent mixers have no budget. User mistakes (missing export or data, bad arguments) end in one line `error: ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nl.cli import one_line_errors, parse_device
from nl.data.shards import DataError


def token_loss_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the next-token cross entropy, in fp32.

    inputs, targets: [B, T] int64 -> scalar."""
    logits = model(inputs)  # [B, T, V]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  device: torch.device, autocast: contextlib.AbstractContextManager | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss, token count) over `batches`, as device tensors (no host sync).

    Under torch.distributed each rank passes its own slice and the caller all-reduces."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for inputs, targets in batches:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast or contextlib.nullcontext():
            loss_sum += token_loss_sum(model, inputs, targets).double()
        count += targets.numel()
    model.train(was_training)
    return loss_sum, count


def text_windows(token_stream: np.ndarray, seq_len: int, batch_size: int,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows of seq_len+1 tokens from a 1-D stream, batched in order."""
    n = (len(token_stream) - 1) // seq_len
    if n == 0:
        raise DataError(f"the text has {len(token_stream)} tokens, fewer than seq_len+1="
                         f"{seq_len + 1}: pass more text or a smaller --seq-len")
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))[:, None] * seq_len + np.arange(seq_len + 1)
        w = torch.from_numpy(token_stream[idx].astype(np.int64))
        yield w[:, :-1], w[:, 1:]


def _tokenize_text(paths: list[str], tokenizer, strict_text: bool = False, text_field: str = "text") -> np.ndarray:
    """Token stream of raw text files (EOS after each document), decoded by the policy of nl.text.

    text_field: the .jsonl key / parquet or datasets column holding the text."""
    from nl.data.sources import iter_documents

    ids: list[int] = []
    for doc in iter_documents(paths, text_field=text_field, strict=strict_text):
        ids.extend(tokenizer.encode(doc))
        ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=np.int64)


def _check_split_fits(shards, seq_len: int) -> None:
    """Raise DataError (with the --split / --seq-len that would work) unless the split fills one window."""
    if shards.num_windows(seq_len) >= 1:
        return
    fixes = [f"--split {name}" for name, entry in sorted(shards.manifest["splits"].items())
             if name != shards.split and (int(entry["num_tokens"]) - 1) // seq_len >= 1]
    if shards.num_tokens >= 2:
        fixes.append(f"--seq-len {shards.num_tokens - 1}")
    fix = f"pass {' or '.join(fixes)}" if fixes else "pass more data (or raw text files)"
    raise DataError(f"split {shards.split!r} of {shards.dir} has {shards.num_tokens} tokens, fewer than "
                    f"seq_len+1={seq_len + 1}: {fix}")


def _token_dir_batches(data: str, args, tokenizer, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Eval batches of one token directory, after checking its tokenizer and size (one-line errors)."""
    from nl.data.loader import iter_eval_batches
    from nl.data.shards import TokenShards

    shards = TokenShards(data, split=args.split)
    if shards.fingerprint != tokenizer.fingerprint:
        raise DataError(f"{data} was tokenized with a different tokenizer than the model's "
                        f"({shards.fingerprint[:12]} vs {tokenizer.fingerprint[:12]}); re-tokenize it "
                        f"with {Path(args.model) / 'tokenizer.model'} or pass raw text files")
    _check_split_fits(shards, seq_len)
    return iter_eval_batches(shards, seq_len, args.batch_size, max_batches=args.max_batches)


def warn_past_position_budget(export_cfg: dict, used: int, what: str) -> None:
    """One `warning:` line on stderr when `used` positions run past the export's position budget
    (nl.niah.position_budget: the trained seq_len of a RoPE reader; none for HOPE's recurrent mixers).
    what: the words naming the length, e.g. "--seq-len 1024"."""
    from nl.niah import position_budget
    from nl.text import warn

    budget = position_budget(export_cfg.get("model", {}), int(export_cfg.get("seq_len", 0)))
    if budget is not None and used > budget:
        warn(f"{what} is past this model's position budget, its trained seq_len {budget}: "
             f"RoPE positions beyond training are extrapolated")


@one_line_errors()
def main(argv: list[str] | None = None) -> dict:
    from nl.data.shards import MANIFEST_FILE
    from nl.export import load_pretrained, load_export_config
    from nl.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a directory written by `python -m nl.export`")
    ap.add_argument("--data", required=True, nargs="+",
                    help="tokenize_corpus output dirs (their --split, pooled; each also reported), or "
                         ".txt/.jsonl/.parquet files and folders of them")
    ap.add_argument("--split", default="val", help="split of a token dir (default: val)")
    ap.add_argument("--seq-len", type=int, default=0, help="default: the training seq_len")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batches", type=int, default=0, help="0 = all")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--document-boundaries", choices=("none", "reset"), default=None,
                    help="reset: each EOS-terminated document of a window on its own (memories, conv caches, "
                         "attention); default: what the model was trained with (the export's config.json)")
    ap.add_argument("--text-field", default="text",
                    help="the .jsonl key / parquet column holding the text of raw --data (default: text)")
    ap.add_argument("--strict-text", action="store_true",
                    help="refuse raw text that is not valid UTF-8 instead of replacing it with U+FFFD (and a warning)")
    args = ap.parse_args(argv)
    for name, low in (("seq_len", 0), ("batch_size", 1), ("max_batches", 0)):
        if getattr(args, name) < low:
            ap.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")

    device = parse_device(args.device)
    export_cfg = load_export_config(args.model)
    model = load_pretrained(args.model, device=device)
    tokenizer = Tokenizer(Path(args.model) / "tokenizer.model")
    seq_len = args.seq_len or export_cfg["seq_len"]
    warn_past_position_budget(export_cfg, seq_len, f"--seq-len {seq_len}")
    boundaries = args.document_boundaries or export_cfg.get("document_boundaries", "none")
    if boundaries == "reset":  # as in training with data.document_boundaries=reset
        from nl.models.documents import document_reset

        try:
            document_reset(model, tokenizer.eos_id)
        except ValueError as e:
            raise DataError(f"--document-boundaries reset: {e}") from None

    twice = [d for i, d in enumerate(args.data) if Path(d).resolve() in {Path(e).resolve() for e in args.data[:i]}]
    if twice:  # it would count twice in the pooled loss
        raise DataError(f"--data lists {twice[0]} more than once: give each input once")
    token_dirs = [d for d in args.data if (Path(d) / MANIFEST_FILE).is_file()]
    if token_dirs and len(token_dirs) < len(args.data):
        text = next(d for d in args.data if d not in token_dirs)
        if not Path(text).exists():  # a mistyped path, not raw text (nor a hub id: token directories are local)
            raise DataError(f"input {text} does not exist: check the path")
        raise DataError(f"--data mixes token directories ({token_dirs[0]}) and raw text ({text}): "
                        f"evaluate them in separate runs")
    per_data = []
    if token_dirs:  # each directory on its own, then pooled: token-weighted over all their windows
        checked = [(d, _token_dir_batches(d, args, tokenizer, seq_len)) for d in token_dirs]  # all, before any runs
        loss_sum = count = 0
        for d, batches in checked:
            d_sum, d_count = evaluate_loss(model, batches, device)
            per_data.append({"data": d, "val_loss": (d_sum / d_count).item(), "tokens": int(d_count.item())})
            loss_sum, count = loss_sum + d_sum, count + d_count
    else:
        stream = _tokenize_text(args.data, tokenizer, args.strict_text, args.text_field)
        batches = text_windows(stream, seq_len, args.batch_size)
        if args.max_batches:
            batches = (b for i, b in zip(range(args.max_batches), batches))
        loss_sum, count = evaluate_loss(model, batches, device)
    val_loss = (loss_sum / count).item()
    result = {"val_loss": val_loss, "perplexity": math.exp(val_loss), "tokens": int(count.item()),
              "windows": int(count.item()) // seq_len, "seq_len": seq_len, "document_boundaries": boundaries,
              "data": args.data}
    if len(per_data) > 1:
        result["per_data"] = per_data
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
