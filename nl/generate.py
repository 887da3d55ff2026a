"""Sample text from an exported model.

    python -m nl.generate --model EXPORT_DIR --prompt "The history of" [--max-new-tokens 64]
        [--temperature 0.8] [--top-k 50] [--seed 0]

HOPE models decode recurrently (prefill the prompt, then one token at a time with the inner
memories as constant-size state: no KV cache). Models without recurrent state (Transformer++,
Hope-Attention) re-run the forward pass on the growing sequence.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn


@torch.no_grad()
def sample(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue prompts [B, T] by max_new_tokens tokens -> [B, T + max_new_tokens]."""
    if getattr(model, "mixer", None) not in (None, "attention") and hasattr(model, "generate"):
        return model.generate(input_ids, max_new_tokens, temperature, top_k, generator)
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(ids)[:, -1].float()
        if temperature == 0:
            token = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        ids = torch.cat([ids, token], dim=1)
    return ids


def main(argv: list[str] | None = None) -> str:
    from nl.export import load_pretrained
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
    args = ap.parse_args(argv)

    model = load_pretrained(args.model, device=args.device)
    tokenizer = Tokenizer(Path(args.model) / "tokenizer.model")
    from nl.text import clean_text

    # sys.argv carries bytes the locale could not decode as lone surrogates: the text policy repairs them.
    prompt_text = clean_text(args.prompt, "--prompt", args.strict_text)
    prompt = torch.tensor([tokenizer.encode(prompt_text)], dtype=torch.long, device=args.device)
    if prompt.numel() == 0:
        raise SystemExit("error: the prompt encodes to no tokens; pass some text")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = sample(model, prompt, args.max_new_tokens, args.temperature, args.top_k, generator)
    text = tokenizer.decode(out[0].tolist())
    print(text)
    return text


if __name__ == "__main__":
    main()
