"""Memory health of a HOPE model over a long text: inner-memory norms and per-position loss by position.

    python -m nl.memory_health --model EXPORT_DIR --text FILE [FILE ...] [--text-field KEY] [--tokens N] --output health.png

Runs one chunked forward over the first N tokens of the text (the documents joined with EOS, decoded
by nl.text's policy) with every memory's norm recorded at the end of each of its chunks, and prints
(and plots, with --output) each memory's norm relative to its value after the first token, per
block, next to the per-position next-token loss. A memory that fades (ratio -> 0) or blows up
(-> inf) shows here; docs/HOPE.md "Memories that live" gives the band we hold them to ([0.1, 10]).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nl.cli import UsageError, one_line_errors, parse_device
from nl.ops.titans import memory_norm

BAND = (0.1, 10.0)  # the health band of a memory's norm relative to its first-token value


@dataclass
class MemoryTrace:
    """positions[name]: token counts at the memory's chunk ends [n_chunks]; ratio[(block, name)]:
    the memory's norm there over its norm after the first token, [B, H, n_chunks] (float64);
    loss: next-token loss at each position, [B, T - 1]; share[block]: the share of the read the
    memory adds to the query (docs/HOPE.md)."""

    positions: dict[str, list[int]] = field(default_factory=dict)
    ratio: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None
    share: dict[int, float] = field(default_factory=dict)

    def extremes(self) -> dict[str, tuple[float, float]]:
        """'block<i>/<memory>' -> (min, max) of the ratio over sequences, heads and positions; NaN -> inf."""
        out = {}
        for (b, name), r in self.ratio.items():
            r = torch.nan_to_num(r, nan=math.inf)
            out[f"block{b}/{name}"] = (r.min().item(), r.max().item())
        return out

    def healthy(self, band: tuple[float, float] = BAND) -> bool:
        return all(band[0] <= lo and hi <= band[1] for lo, hi in self.extremes().values())


@torch.no_grad()
def memory_trace(model: nn.Module, input_ids: torch.Tensor) -> MemoryTrace:
    """Trace every inner memory of a HOPE model (self-modifying or Titans mixer) over input_ids [B, T].

    One forward of the chunked path with trace on, plus a one-token prefill for the first-token
    norms. Raises ValueError for a model without recurrent memories (Transformer++, Hope-Attention)."""
    mixers = [getattr(block, "mixer", None) for block in getattr(model, "layers", [])]
    if not mixers or not all(hasattr(m, "trace") for m in mixers):
        raise ValueError("this model has no inner memories to trace (only HOPE with mixer=self_modifying or "
                         "titans has them)")
    for m in mixers:
        m.trace = True
    try:
        logits = model(input_ids)
        stats = [dict(m.last_stats) for m in mixers]
        _, first = model.prefill(input_ids[:, :1])
    finally:
        for m in mixers:
            m.trace = False
    trace = MemoryTrace()
    trace.loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(),
                                 reduction="none").view(input_ids.shape[0], -1)
    T = input_ids.shape[1]
    for b, (st, state) in enumerate(zip(stats, first)):
        trace.share[b] = float(st["share"])
        for key, norms in st.items():
            if not key.startswith("norm/"):
                continue
            name = key[len("norm/"):]
            C = m_chunk(mixers[b], name)
            trace.positions[name] = [min(C * (i + 1), T) for i in range(norms.shape[-1])]
            trace.ratio[(b, name)] = norms.double() / memory_norm(state.rec.cur[name]).double()[..., None]
    return trace


def m_chunk(mixer: nn.Module, name: str) -> int:
    return mixer.rcfg.memory_chunk_size if name == "memory" else mixer.rcfg.chunk_size


def plot(trace: MemoryTrace, output: Path, title: str = "") -> None:
    """Two panels against position: each memory's norm ratio (min-max band over sequences and heads
    shaded, median line), per block; the per-position loss (mean over sequences, smoothed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for (b, name), r in sorted(trace.ratio.items()):
        pos = trace.positions[name]
        flat = r.flatten(0, -2)
        line, = ax1.plot(pos, flat.median(0).values.numpy(), label=f"block {b} {name}", lw=1)
        ax1.fill_between(pos, flat.min(0).values.numpy(), flat.max(0).values.numpy(), alpha=0.15,
                         color=line.get_color())
    ax1.axhspan(*BAND, color="0.9", zorder=0)
    ax1.set(xlabel="position (tokens)", ylabel="memory norm / first-token norm", yscale="log",
            title="inner-memory norms (band: [0.1, 10])")
    ax1.legend(fontsize=6, ncol=2)
    loss = trace.loss.mean(0)
    width = max(1, loss.numel() // 64)
    smooth = loss[: loss.numel() // width * width].view(-1, width).mean(1)
    ax2.plot([width * (i + 0.5) for i in range(smooth.numel())], smooth.numpy())
    ax2.set(xlabel="position (tokens)", ylabel="next-token loss (nats)", title=f"per-position loss ({width}-token bins)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)


@one_line_errors()
def main(argv: list[str] | None = None) -> dict:
    from nl.evaluate import _tokenize_text
    from nl.export import load_pretrained
    from nl.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a directory written by `python -m nl.export` (a HOPE model)")
    ap.add_argument("--text", required=True, nargs="+", help=".txt / .jsonl / .parquet files or folders of them")
    ap.add_argument("--text-field", default="text",
                    help="the .jsonl key / parquet column holding the text (default: text)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens to run (default 4096)")
    ap.add_argument("--batch-size", type=int, default=1, help="sequences of --tokens each (default 1)")
    ap.add_argument("--output", default="", help="a .png for the plot (default: none, JSON only)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.tokens < 2 or args.batch_size < 1:
        ap.error("--tokens must be >= 2 and --batch-size >= 1")
    model = load_pretrained(args.model, device=parse_device(args.device)).eval()
    tokenizer = Tokenizer(Path(args.model) / "tokenizer.model")
    stream = _tokenize_text(args.text, tokenizer, text_field=args.text_field)
    need = args.tokens * args.batch_size
    if len(stream) < need:
        raise UsageError(f"the text has {len(stream)} tokens, fewer than --tokens x --batch-size = {need}: "
                         f"pass more text or lower --tokens")
    ids = torch.as_tensor(stream[:need]).view(args.batch_size, args.tokens).to(parse_device(args.device))
    try:
        trace = memory_trace(model, ids)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.output:
        plot(trace, Path(args.output), title=str(args.model))
    loss = trace.loss.mean(0)
    q = loss.numel() // 4
    result = {"tokens": args.tokens, "healthy": trace.healthy(), "band": list(BAND),
              "ratio_min_max": {k: [round(lo, 4), round(hi, 4)] for k, (lo, hi) in trace.extremes().items()},
              "share": trace.share,
              "loss_by_quarter": [round(loss[i * q:(i + 1) * q].mean().item(), 4) for i in range(4)]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
