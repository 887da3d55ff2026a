"""Sample text from an exported model.

    python -m nl.generate --model EXPORT_DIR --prompt "The history of" [--max-new-tokens 64]
        [--temperature 0.8] [--top-k 50] [--seed 0] [--no-stop-at-eos]

Generation stops at the end-of-document token (the tokenizer's EOS) by default: the text ends
there instead of running on into an unrelated document; --no-stop-at-eos continues to
--max-new-tokens. User mistakes (missing export, bad arguments) end in one line `error: ...`.

HOPE models decode recurrently (prefill the prompt, then one token at a time with the inner
memories as constant-size state: no KV cache). Models without recurrent state (Transformer++,
Hope-Attention) re-run the forward pass on the growing sequence; they read positions through RoPE
and are trusted up to their trained seq_len (nl.niah.position_budget): a prompt plus --max-new-tokens
running past it gets one warning on stderr and runs anyway.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from nl.cli import one_line_errors, parse_device


def next_token(logits: torch.Tensor, temperature: float, top_k: int,
               generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits [B, V] (fp32) -> [B] int64: argmax when temperature == 0, else a
    draw from softmax(logits / temperature), restricted to the top_k most likely when top_k > 0."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def sample(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, generator: torch.Generator | None = None, eos_id: int | None = None,
           stop_at_eos: bool = True) -> torch.Tensor:
    """Continue prompts [B, T] (int64) by at most max_new_tokens tokens -> [B, T + n] int64.

    Stopping (eos_id given and stop_at_eos): a sequence is finished once it emits eos_id; every
    later position of that row holds eos_id (padding), and the loop ends as soon as every row is
    finished, so n <= max_new_tokens and n is the longest row's length. eos_id None or
    stop_at_eos=False: n = max_new_tokens, EOS or not (the text runs on into a new document).
    HOPE with a recurrent mixer decodes with prefill/step (constant-size state); other models
    (Transformer++, Hope-Attention) re-run forward() on the growing sequence."""
    recurrent = getattr(model, "mixer", None) not in (None, "attention") and hasattr(model, "step")
    if recurrent:
        logits, state = model.prefill(input_ids)
        logits = logits[:, -1]
    else:
        logits = model(input_ids)[:, -1].float()
    stop = stop_at_eos and eos_id is not None
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    out = [input_ids]
    for i in range(max_new_tokens):
        token = next_token(logits, temperature, top_k, generator)
        if stop:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        out.append(token[:, None])
        if i + 1 == max_new_tokens or (stop and bool(finished.all())):
            break
        if recurrent:
            logits, state = model.step(token, state)
        else:
            logits = model(torch.cat(out, dim=1))[:, -1].float()
    return torch.cat(out, dim=1)


@one_line_errors()
def main(argv: list[str] | None = None) -> str:
    from nl.evaluate import warn_past_position_budget
    from nl.export import load_export_config, load_pretrained
    from nl.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a directory written by `python -m nl.export`")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--strict-text", action="store_true",
                    help="refuse a prompt that is not valid UTF-8 instead of replacing the bad bytes with U+FFFD")
    ap.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_false",
                    help="keep sampling past the end-of-document token")
    args = ap.parse_args(argv)
    for name in ("max_new_tokens", "temperature", "top_k"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    args.device = parse_device(args.device)

    model = load_pretrained(args.model, device=args.device)
    tokenizer = Tokenizer(Path(args.model) / "tokenizer.model")
    from nl.text import clean_text

    # sys.argv carries bytes the locale could not decode as lone surrogates: the text policy repairs them.
    prompt_text = clean_text(args.prompt, "--prompt", args.strict_text)
    prompt = torch.tensor([tokenizer.encode(prompt_text)], dtype=torch.long, device=args.device)
    if prompt.numel() == 0:
        raise SystemExit("error: the prompt encodes to no tokens; pass some text")
    n_prompt = prompt.shape[1]
    warn_past_position_budget(load_export_config(args.model), n_prompt + args.max_new_tokens,
                              f"the prompt's {n_prompt} tokens + up to {args.max_new_tokens} new tokens")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = sample(model, prompt, args.max_new_tokens, args.temperature, args.top_k, generator,
                 eos_id=tokenizer.eos_id, stop_at_eos=args.stop_at_eos)
    text = tokenizer.decode(out[0].tolist())
    print(text)
    return text


if __name__ == "__main__":
    main()
