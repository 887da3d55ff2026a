"""GPU memory sizing: activation bytes per layer measured exactly on CPU, and the peak memory per
preset they imply on an 80 GB and a 141 GB card for each activation-checkpointing mode and micro-batch.

    python benchmarks/bench_memory.py [--presets configs/hope_340m.yaml ...] [--variants hope titans ...]
        [--seq-lens 128 256 512] [--precision preset|fp32|bf16] [--fake] [--cards 80 141] [--margin 0.1]
        [--world-size 1] [--shard] [--set model.hope.chunk_size=32 ...] [--no-in-context]

MEASUREMENT (exact). One block at the preset's width runs forward with autograd on, under the
preset's precision (bf16: torch.autocast, as the trainer does), on CPU. Every storage created inside
the forward is recorded (a TorchDispatchMode); afterwards, holding only the block's output, the bytes
of the storages still alive are what the autograd graph keeps for backward. This counts tensors kept
by closures too (e.g. the tuple arguments of torch.utils.checkpoint: HOPE's per-chunk memory states),
which `torch.autograd.graph.saved_tensors_hooks` never sees; `saved_tensor_bytes` gives that count
for comparison (column "hooks see": its share of the kept bytes, at B=2, T1). Each storage is counted
once; parameters and the shared rotary tables are not counted (autocast's bf16 weight copies are).
The block's input counts (it is the previous block's output, kept if the block saves it); its output
does not (the next block's input).
Measured at B = 2, 3 and every --seq-lens T, the bytes are fit exactly (the last two T) as
    bytes(B, T) = fixed + per_position * T + B * (per_seq + per_token * T)
(fixed: e.g. autocast's bf16 weight copies; per_position: e.g. HOPE's per-chunk states of the unbatched
initial memories; bytes are linear in B from B = 2 on, B = 1 can keep less: b = 1 is over-estimated).
per_token is checked to be flat in T: the last column gives its spread over the --seq-lens pairs.
Modes: AC none (the plain block) and full (the block under checkpoint_wrapper, as nl.distributed
applies it); every_n is composed from the two. HOPE variants also with model.hope.recompute_chunks
on and off. The head (final RMSNorm, LM head, fp32 logits, cross entropy) is measured the same way.
--fake runs the same code on FakeTensorMode (shapes and dtypes, no arithmetic: seconds instead of
minutes at bf16, whose arithmetic is slow on CPUs without bf16 units); tests/test_bench_scripts.py
checks that fake and real tensors give the same bytes.

ESTIMATE (not a measurement) of the peak per rank at micro-batch b and the preset's T:
    static  = N * (4 param + 4 grad + 8 AdamW) + N_slow * 4     [/ world size with --shard: FSDP2/ZeRO-3]
              (fp32 master weights and grads; N_slow: parameters of CMS levels stepped every C > 1
               steps, which keep a gradient accumulator; DDP's gradient buckets, + 4 N, are not included)
    layers  = (L - L_ac) * A(b) + L_ac * K(b) + A(b)
              (A: bytes of a plain block, K: of a checkpointed one; L_ac = 0 | L | ceil(L / n) for
               none | full | every_n; the last A(b) is the backward working set of one block:
               recomputed activations under AC, gradients of activations otherwise)
    head    = H(b) + b * T * V * 8   (H: measured; the fp32 gradients of log-probs and of the logits)
    peak    = static + layers + head + 1 GiB (CUDA context, cuBLAS/NCCL workspaces)

IN-CONTEXT CMS (per hope_* preset; --no-in-context skips it, --variants with no value prints only it):
each CMS level of one block at the preset's T, B = 2, with model.hope.cms_mode=in_context and
cms_chunk_sizes reused as in-context chunk sizes, kept bytes per token (measured as above, always on
FakeTensorMode) for the model's path (nl.ops.cms.cms_chunked: segments of K = ceil(sqrt(T / C)) chunks
recomputed in backward), for the stored chunk loop it replaced (nl.ops.cms.chunk_loop: every chunk's
weights kept) and for the outer level. Not linear in T (sqrt), so outside the fit and the estimate.

A configuration fits a card of G GB (1e9 bytes) when peak <= (1 - margin) * G. The caching allocator's
fragmentation, NCCL buffers and compile workspaces are in the margin, not in the formula.
Prints markdown tables with the command, machine and date.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import platform
import sys
from unittest import mock
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from nl.config import ModelConfig, load_config  # noqa: E402
from nl.models import build_model, count_parameters  # noqa: E402
import nl.models.hope as hope_model  # noqa: E402
from nl.models.hope import HopeBlock, cms_level_of  # noqa: E402
from nl.models.layers import RMSNorm, precompute_rope  # noqa: E402
from nl.models.transformer import TransformerBlock  # noqa: E402
from nl.ops.cms import chunk_loop  # noqa: E402

DEFAULT_PRESETS = [f"configs/{a}_{s}.yaml" for a in ("hope", "transformer") for s in ("340m", "760m", "1.3b")]
# Variants measured at a hope_* preset's shape (overrides of model.hope); transformer_* presets are themselves.
VARIANTS = {
    "hope": [],
    "hope_attention": ["model.hope.mixer=attention"],
    # The Titans baseline as nl/models/hope.py defines it: static q/k/v, one MLP memory, no CMS.
    "titans": ["model.hope.mixer=titans", "model.hope.dgd=false", "model.hope.momentum=true",
               "model.hope.cms_chunk_sizes=[1]"],
}
CUDA_RESERVE = 2**30  # CUDA context and library workspaces, outside the caching allocator's count


class _Liveness(TorchDispatchMode):
    """Records, by weak reference, the storage of every tensor an op returns while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int, torch.dtype]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                old = self.storages.get(s._cdata)
                if old is None or old[0].expired():  # a freed storage's address can be reused
                    self.storages[s._cdata] = (StorageWeakRef(s), s.nbytes(), t.dtype)
                elif s.nbytes() != old[1]:  # resized in place (out= and resize_ ops return it)
                    self.storages[s._cdata] = (old[0], s.nbytes(), old[2])
        return out


def kept_bytes(run: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> dict[torch.dtype, int]:
    """Bytes, by dtype, of the storages created during `run()` that are still alive while only its
    output is held: what the autograd graph keeps for backward, however it keeps it (saved tensors,
    closures, ctx attributes). The output's storage and those of `exclude` are not counted; each
    storage is counted once, whole (a view keeps its base alive)."""
    mode = _Liveness()
    with mode:
        out = run()
    skip = {t.untyped_storage()._cdata for t in (out, *exclude)}
    kept: dict[torch.dtype, int] = {}
    for key, (ref, nbytes, dtype) in mode.storages.items():
        if key not in skip and not ref.expired():
            kept[dtype] = kept.get(dtype, 0) + nbytes
    del out
    return kept


def saved_tensor_bytes(run: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the unique storages autograd packs through `saved_tensors_hooks` during `run()` and
    still holds at its end (graph pieces that die inside the forward free theirs; those of `exclude`
    and of the output not counted). Misses what a graph keeps outside saved tensors."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, tuple[StorageWeakRef, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in skip:
            seen[s._cdata] = (StorageWeakRef(s), s.nbytes())
        return t.detach()  # the tensor itself would tie a saved output to its grad_fn: a cycle that keeps
                           # graph pieces alive which die without hooks

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    seen.pop(out.untyped_storage()._cdata, None)  # the output is the next block's input, as in kept_bytes
    total = sum(nbytes for ref, nbytes in seen.values() if not ref.expired())
    del out
    return total


def _autocast(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _make_block(cfg: ModelConfig) -> tuple[nn.Module, bool]:
    """One block of cfg.arch at cfg's width (weights initialised), and whether it takes rotary tables."""
    std = float(cfg.init_std)
    block = TransformerBlock(cfg) if cfg.arch == "transformer" else HopeBlock(cfg)
    block.init_weights(std, std / math.sqrt(2 * cfg.n_layers))
    uses_rope = cfg.arch == "transformer" or cfg.hope.mixer == "attention"
    return block, uses_rope


def block_bytes(cfg: ModelConfig, B: int, T: int, bf16: bool, ac: bool,
                hooks: bool = False) -> tuple[dict[torch.dtype, int], int | None]:
    """(kept bytes by dtype, saved-tensor-hook bytes if `hooks`) of one block's forward at [B, T, dim]
    (AC: the block under checkpoint_wrapper, as nl.distributed.apply_activation_checkpointing does)."""
    torch.manual_seed(0)
    block, uses_rope = _make_block(cfg)
    if ac:
        block = checkpoint_wrapper(block, preserve_rng_state=False)
    rope = precompute_rope(cfg.dim // cfg.n_heads, T, float(cfg.rope_theta))
    x0 = torch.randn(B, T, cfg.dim, requires_grad=True)

    def run() -> torch.Tensor:
        with _autocast(bf16):
            x = x0 * 1.0  # the block input, created inside so that it counts when the block keeps it
            if cfg.arch == "transformer":
                return block(x, *rope)
            return block(x, rope if uses_rope else None)

    exclude = [*block.parameters(), *rope, x0]
    return kept_bytes(run, exclude), (saved_tensor_bytes(run, exclude) if hooks else None)


def head_bytes(cfg: ModelConfig, B: int, T: int, bf16: bool) -> int:
    """Kept bytes of the head as the trainer runs it: RMSNorm, LM head, fp32 logits, summed cross entropy."""
    torch.manual_seed(0)
    norm, output = RMSNorm(cfg.dim, cfg.norm_eps), nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
    nn.init.normal_(output.weight, std=float(cfg.init_std))
    h0 = torch.randn(B, T, cfg.dim, requires_grad=True)
    targets = torch.randint(0, cfg.vocab_size, (B * T,))

    def run() -> torch.Tensor:
        with _autocast(bf16):
            logits = output(norm(h0 * 1.0)).float()
        return F.cross_entropy(logits.flatten(0, 1), targets, reduction="sum")

    return sum(kept_bytes(run, [*norm.parameters(), *output.parameters(), h0, targets]).values())


def cms_level_bytes(cfg: ModelConfig, level: int, B: int, T: int, bf16: bool, stored: bool = False) -> int:
    """Kept bytes of CMS level `level` of one cfg block at [B, T, dim] (autocast as `block_bytes`). An
    in-context level runs the model's path (segments recomputed in backward), or with `stored`
    nl.ops.cms.chunk_loop (every chunk's weights kept: the path before segmentation)."""
    torch.manual_seed(0)
    block, _ = _make_block(cfg)
    lvl = block.cms.levels[level]
    x0 = torch.randn(B, T, cfg.dim, requires_grad=True)

    def run() -> torch.Tensor:
        with _autocast(bf16):
            return lvl(x0 * 1.0)

    loop = mock.patch.object(hope_model, "cms_chunked", chunk_loop) if stored else contextlib.nullcontext()
    with loop:
        return sum(kept_bytes(run, [*lvl.parameters(), x0]).values())


def _report_in_context(preset: str, args) -> None:
    """Per-layer kept bytes of the CMS at the preset's shape and T with cms_mode=in_context (cms_chunk_sizes
    reused as in-context chunk sizes), stored vs segmented, against the outer mode; FakeTensorMode (the
    stored path at T = 4096 would need tens of GB per sequence)."""
    cfg = load_config(preset, args.set)
    ctx = load_config(preset, [*args.set, "model.hope.cms_mode=in_context", "model.hope.cms_context_chunk_sizes=[]"])
    bf16 = args.precision == "bf16" or (args.precision == "preset" and cfg.train.precision == "bf16")
    T, B, sizes = cfg.data.seq_len, FIT_BATCHES[0], list(cfg.model.hope.cms_chunk_sizes)
    print(f"\n### {Path(preset).stem} / CMS in context: chunk sizes {sizes}, T={T}, "
          f"{'bf16 autocast' if bf16 else 'fp32'} (recurrence fp32), B={B}, FakeTensorMode\n")
    print("| level | C | segments of K chunks | outer KB/token | in context, stored KB/token | "
          "in context, segments KB/token | stored / segments |")
    print("|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0, 0.0]
    with _fake_mode():
        for l, C in enumerate(sizes):
            n = -(-T // C)
            row = [cms_level_bytes(c.model, l, B, T, bf16, stored) / (B * T)
                   for c, stored in ((cfg, False), (ctx, True), (ctx, False))]
            totals = [a + b for a, b in zip(totals, row)]
            print(f"| {l} | {C} | {math.isqrt(n - 1) + 1} | " + " | ".join(f"{r / 1e3:.1f}" for r in row)
                  + f" | {row[1] / row[2]:.1f}x |")
    mb = [t * T / 1e6 for t in totals]
    with torch.device("meta"):
        w_numel = HopeBlock(ctx.model).cms.levels[0].mlp.w2.weight.numel()  # d x hidden
    # While one segment runs its backward it holds its K chunks' W_j and step (2 K copies of W, fp32) per
    # sequence: not kept across layers, so outside the table; the largest over the levels.
    working = max(2 * (math.isqrt(-(-T // C) - 1) + 1) for C in sizes) * w_numel * 4 / 1e6
    print(f"| all | | | {totals[0] / 1e3:.1f} | {totals[1] / 1e3:.1f} | {totals[2] / 1e3:.1f} | "
          f"{totals[1] / totals[2]:.1f}x |\n\nPer sequence per layer at T={T}: outer {mb[0]:.1f} MB, in context "
          f"stored {mb[1]:.1f} MB, segments {mb[2]:.1f} MB kept, + {working:.1f} MB (estimate: 2 K copies of W) "
          f"while one segment's backward runs.")


@dataclass
class Fit:
    """bytes(B, T) = fixed + per_position * T + B * (per_seq + per_token * T), exact through the measured points."""

    fixed: float
    per_position: float  # bytes per position shared by the batch (e.g. per-chunk states not yet batched)
    per_seq: float
    per_token: float
    flat_spread: float  # max/min - 1 of per_token over consecutive --seq-lens pairs (0 = flat)

    def __call__(self, B: int, T: int) -> float:
        return self.fixed + self.per_position * T + B * (self.per_seq + self.per_token * T)


FIT_BATCHES = (2, 3)  # bytes are linear in B from B = 2 on (B = 1 can keep less: broadcast initial states)


def fit(measure: Callable[[int, int], float], seq_lens: list[int]) -> Fit:
    """Fit from measure(B, T) at B = 2, 3 and every T of `seq_lens` (>= 2 increasing values)."""
    B0, B1 = FIT_BATCHES
    m = {(B, T): measure(B, T) for B in FIT_BATCHES for T in seq_lens}
    per_batch = {T: (m[B1, T] - m[B0, T]) / (B1 - B0) for T in seq_lens}  # = per_seq + per_token * T
    slopes = [(per_batch[b] - per_batch[a]) / (b - a) for a, b in zip(seq_lens, seq_lens[1:])]
    per_token = slopes[-1]
    T1, T2 = seq_lens[-2], seq_lens[-1]
    per_seq = per_batch[T2] - per_token * T2
    per_position = (m[B0, T2] - m[B0, T1]) / (T2 - T1) - B0 * per_token
    fixed = m[B0, T2] - per_position * T2 - B0 * (per_seq + per_token * T2)
    spread = max(slopes) / min(slopes) - 1 if min(slopes) > 0 else float("inf")
    return Fit(fixed, per_position, per_seq, per_token, spread)


@dataclass
class LayerMemory:
    """Fits of one block without AC (plain) and under checkpoint_wrapper (ac), and of the head."""

    plain: Fit
    ac: Fit
    head: Fit
    plain_dtypes: dict[torch.dtype, int]  # kept bytes by dtype at (FIT_BATCHES[0], T1), plain block
    hooks: int  # saved-tensor-hook bytes at (FIT_BATCHES[0], T1), plain block


def measure_layers(cfg: ModelConfig, bf16: bool, seq_lens: list[int], fake: bool) -> LayerMemory:
    mode = _fake_mode() if fake else contextlib.nullcontext()
    with mode:
        dtypes, hooks = block_bytes(cfg, FIT_BATCHES[0], seq_lens[0], bf16, ac=False, hooks=True)
        plain = fit(lambda B, T: sum(block_bytes(cfg, B, T, bf16, ac=False)[0].values()), seq_lens)
        ac = fit(lambda B, T: sum(block_bytes(cfg, B, T, bf16, ac=True)[0].values()), seq_lens)
        head_lens = sorted({max(4, T // 8) for T in seq_lens})  # no sequence mixing in the head: short T is enough
        head_lens = head_lens if len(head_lens) > 1 else seq_lens
        head = fit(lambda B, T: head_bytes(cfg, B, T, bf16), head_lens)
    return LayerMemory(plain, ac, head, dtypes, hooks or 0)


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def static_bytes(cfg, world_size: int, shard: bool) -> tuple[float, int]:
    """(parameter + gradient + optimizer-state bytes per rank, parameter count N) for AdamW in fp32."""
    meta = build_model(cfg.model, device="meta")
    n = count_parameters(meta)
    slow = 0
    if cfg.model.arch == "hope" and cfg.optim.cms.enabled:
        sizes = list(cfg.model.hope.cms_chunk_sizes)
        slow = sum(p.numel() for name, p in meta.named_parameters()
                   if (lvl := cms_level_of(name)) is not None and sizes[lvl] > 1)
    total = 16.0 * n + 4.0 * slow
    return (total / world_size if shard else total), n


def peak_bytes(static: float, mem: LayerMemory, n_layers: int, ac_layers: int, B: int, T: int, vocab: int) -> float:
    """The ESTIMATE of the module docstring for micro-batch B at sequence length T."""
    layers = (n_layers - ac_layers) * mem.plain(B, T) + ac_layers * mem.ac(B, T) + mem.plain(B, T)
    head = mem.head(B, T) + B * T * vocab * 8
    return static + layers + head + CUDA_RESERVE


def ac_modes(n_layers: int, every_n: int) -> list[tuple[str, int]]:
    """(name, number of checkpointed blocks) for each mode of dist.activation_checkpointing."""
    return [("none", 0), ("full", n_layers), (f"every_{every_n}", -(-n_layers // every_n))]


def largest_fitting(estimate: Callable[[int], float], card_gb: float, margin: float, candidates: list[int]) -> int:
    """The largest micro-batch among `candidates` whose estimate fits the card with the margin (0: none fits)."""
    fits = [b for b in candidates if estimate(b) <= (1 - margin) * card_gb * 1e9]
    return max(fits, default=0)


def preset_peak(preset: str, overrides: list[str] = (), seq_lens: list[int] = (128, 256), fake: bool = True,
                world_size: int = 1, shard: bool = False) -> float:
    """The peak ESTIMATE (bytes per rank) of a preset as configured: its precision, micro-batch,
    dist.activation_checkpointing and model.hope.recompute_chunks."""
    cfg = load_config(preset, list(overrides))
    bf16 = cfg.train.precision == "bf16"
    L, T = cfg.model.n_layers, cfg.data.seq_len
    micro = cfg.train.micro_batch_size or cfg.train.batch_size // world_size
    ac_layers = dict(ac_modes(L, cfg.dist.ac_every_n))[
        cfg.dist.activation_checkpointing.replace("every_n", f"every_{cfg.dist.ac_every_n}")]
    mem = measure_layers(cfg.model, bf16, list(seq_lens), fake)
    return peak_bytes(static_bytes(cfg, world_size, shard)[0], mem, L, ac_layers, micro, T, cfg.model.vocab_size)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="variants measured at each hope_* preset's shape (none: only the in-context CMS table)")
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[128, 256, 512],
                    help="T of the measured blocks (>= 2 values, increasing)")
    ap.add_argument("--precision", default="preset", choices=["preset", "fp32", "bf16"])
    ap.add_argument("--fake", action="store_true", help="measure on FakeTensorMode (same bytes, no arithmetic)")
    ap.add_argument("--cards", nargs="+", type=float, default=[80.0, 141.0], help="card sizes in GB (1e9 bytes)")
    ap.add_argument("--margin", type=float, default=0.10)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--shard", action="store_true", help="parameters, grads and optimizer state sharded "
                    "over --world-size ranks (dist.strategy=fsdp, or deepspeed ZeRO-3)")
    ap.add_argument("--micro-batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every preset")
    ap.add_argument("--in-context", action=argparse.BooleanOptionalAction, default=True,
                    help="per hope_* preset, also the CMS table with cms_mode=in_context (FakeTensorMode)")
    args = ap.parse_args(argv)
    seq_lens = sorted(set(args.seq_lens))
    if len(seq_lens) < 2:
        ap.error("--seq-lens needs at least two different values (the per-token slope and its flatness)")

    print(f"`python benchmarks/bench_memory.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ")
    print(f"{platform.node()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"measured on {'FakeTensorMode' if args.fake else 'CPU tensors'}; peak memory is an ESTIMATE "
          f"(formula in the script docstring), fits = <= {1 - args.margin:.0%} of the card")
    for preset in args.presets:
        base = load_config(preset, args.set)
        variants = args.variants if base.model.arch == "hope" else [base.model.arch]
        for variant in variants:
            overrides = [*args.set, *VARIANTS.get(variant, [])]
            _report(preset, variant, overrides, args, seq_lens)
        if args.in_context and base.model.arch == "hope":
            _report_in_context(preset, args)


def _report(preset: str, variant: str, overrides: list[str], args, seq_lens: list[int]) -> None:
    cfg = load_config(preset, overrides)
    bf16 = args.precision == "bf16" or (args.precision == "preset" and cfg.train.precision == "bf16")
    T, L, V = cfg.data.seq_len, cfg.model.n_layers, cfg.model.vocab_size
    local_batch = cfg.train.batch_size // args.world_size
    candidates = [b for b in args.micro_batches if local_batch % b == 0]
    static, n = static_bytes(cfg, args.world_size, args.shard)
    recompute = [True, False] if cfg.model.arch == "hope" and cfg.model.hope.mixer != "attention" else [None]
    print(f"\n### {Path(preset).stem} / {variant}: {n / 1e6:.1f}M parameters, {L} layers, T={T}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, static {static / 1e9:.1f} GB/rank "
          f"({'sharded over ' + str(args.world_size) if args.shard else 'unsharded'}), "
          f"per-rank batch {local_batch} (train.micro_batch_size={cfg.train.micro_batch_size})\n")
    mb_cols = " | ".join(f"b={b}" for b in candidates)
    max_cols = " | ".join(f"max b {c:g} GB" for c in args.cards)
    print(f"| recompute_chunks | AC | kept KB/token/layer | hooks see | fixed MB/layer | "
          f"KB/position/layer | KB/seq/layer | {mb_cols} | {max_cols} | flat |")
    print("|" + "---|" * (8 + len(candidates) + len(args.cards)))
    for rc in recompute:
        c = cfg if rc is None else load_config(preset, [*overrides, f"model.hope.recompute_chunks={rc}"])
        mem = measure_layers(c.model, bf16, seq_lens, args.fake)
        tokens = FIT_BATCHES[0] * seq_lens[0]
        hooks_share = mem.hooks / sum(mem.plain_dtypes.values())  # both at (B=2, T1), fixed bytes included
        for name, ac_layers in ac_modes(L, cfg.dist.ac_every_n):
            def estimate(b: int) -> float:
                return peak_bytes(static, mem, L, ac_layers, b, T, V)
            # Per-layer average over the model's blocks in this mode.
            avg = {k: ((L - ac_layers) * getattr(mem.plain, k) + ac_layers * getattr(mem.ac, k)) / L
                   for k in ("per_token", "fixed", "per_position", "per_seq")}
            hooks = f"{hooks_share:.0%}" if ac_layers == 0 else "-"
            cells = " | ".join(f"{estimate(b) / 1e9:.1f}" for b in candidates)
            fits = " | ".join(str(largest_fitting(estimate, g, args.margin, candidates)) for g in args.cards)
            spread = max(mem.plain.flat_spread, mem.ac.flat_spread)
            print(f"| {'-' if rc is None else ('on' if rc else 'off')} | {name} | {avg['per_token'] / 1e3:.1f} | "
                  f"{hooks} | {avg['fixed'] / 1e6:.1f} | {avg['per_position'] / 1e3:.2f} | "
                  f"{avg['per_seq'] / 1e3:.1f} | "
                  f"{cells} | {fits} | {spread:.1%} |")
        dtypes = ", ".join(f"{str(k).replace('torch.', '')} {v / tokens / 1e3:.1f}" for k, v in
                           sorted(mem.plain_dtypes.items(), key=lambda kv: str(kv[0])))
        print(f"\nrecompute_chunks={'-' if rc is None else rc}: plain block at B={FIT_BATCHES[0]}, T={seq_lens[0]} "
              f"keeps KB/token by dtype: {dtypes} (incl. fixed); head {mem.head.per_token / 1e3:.1f} KB/token "
              f"+ logits grads {V * 8 / 1e3:.0f} KB/token")


if __name__ == "__main__":
    main()
