"""Evidence that HOPE's memories learn (issue 11): validation loss at equal parameters and tokens.

    python benchmarks/bench_learning.py [--variants hope transformer titans ...] [--seeds 0 1]
        [--steps 300] [--seq-len 128] [--out runs/bench_learning] [--jobs 2]
        [--set KEY=VALUE ...] [--define NAME PRESET KEY=VALUE ...] [--long-factor 4] [--dry-run]

Every variant is trained by the real trainer (`nl.trainer.train`) from a preset plus dotted
overrides, on the same data (`--data`, default the demo corpus `data/demo/tokens`, built by
`python data_prep/prepare_demo.py --root data/demo`), for the same steps, batch and sequence
length, so every run sees the same tokens in the same order for a given seed. Parameter counts
are matched to the HOPE preset's on the meta device: a variant more than `--param-tol` away gets
its width knob re-solved (`model.ffn_hidden` for arch transformer, `model.hope.cms_hidden` for
arch hope), unless its own overrides set that knob.

Reported per variant (mean over seeds; spread = half the range over seeds):
- validation loss on the held-out documents (the whole val split, windows of seq_len; its
  documents never appear in training), and its curve over steps (eval every steps/--evals);
- per-position loss on held-out sequences --long-factor times longer than the training context:
  non-overlapping windows of the val stream (the demo's held-out documents are Wikipedia lead
  sections, at most 336 tokens, so a window spans several documents joined by EOS, as the
  training windows do), averaged over windows at each position and bucketed by seq_len;
- training tokens/s (mean of the logged windows after the first; runs sharing the CPU slow
  each other, so compare rows of one invocation only).

Outputs under --out: results.md (the table, printed too), results.json, val_loss.png and
per_position.png, and runs/<variant>/seed<k>/ (each run's metrics.jsonl, checkpoint and
result.json). A run whose result.json was made with the same resolved config is reused, so
several invocations (e.g. one per core) can fill one --out, and a last one writes the table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from nl.config import ConfigError, load_config, to_yaml, valid_keys  # noqa: E402
from nl.data.shards import TokenShards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"hope": REPO / "configs/hope_tiny.yaml", "transformer": REPO / "configs/tiny.yaml"}
REFERENCE = "hope"  # the variant whose parameter count the others are matched to

# name -> (preset, overrides). Table 6 of arXiv 2512.24695 for the ablations; HOPE's inner
# momentum is off by default, so its ablation here is "with momentum".
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "transformer": ("transformer", ()),
    "hope": ("hope", ()),
    "hope-no-dgd": ("hope", ("model.hope.dgd=false",)),
    "hope-momentum": ("hope", ("model.hope.momentum=true",)),
    "hope-no-retention": ("hope", ("model.hope.retention=false",)),
    "hope-no-cms": ("hope", ("model.hope.cms_chunk_sizes=[1]",)),
    "hope-static-k": ("hope", ("model.hope.static_k=true",)),
    "hope-static-v": ("hope", ("model.hope.static_v=true",)),
    "hope-adaptive-q": ("hope", ("model.hope.adaptive_q=true",)),
    "hope-attention": ("hope", ("model.hope.mixer=attention",)),
    "titans": ("hope", ("model.hope.mixer=titans", "model.hope.dgd=false", "model.hope.momentum=true",
                        "model.hope.cms_chunk_sizes=[1]")),
    "hope-read-in-chunk": ("hope", ("model.hope.chunk_read=in_chunk",)),
    "hope-read-anchor": ("hope", ("model.hope.chunk_read=anchor",)),
    "hope-retention-zero": ("hope", ("model.hope.retention_target=zero",)),
}
WIDTH_KNOB = {"transformer": "model.ffn_hidden", "hope": "model.hope.cms_hidden"}
DRY_RUN = dict(steps=2, seeds=[0], variants=["transformer", "hope"], seq_len=32, long_sequences=2, val_batches=2,
               set=["train.batch_size=4", "train.micro_batch_size=0", "train.warmup_steps=1"])


def per_position_loss(model: nn.Module, sequences: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Next-token cross entropy at each position, averaged over sequences.

    sequences: [N, L+1] int64 token ids. Returns [L] float64 whose entry t is the mean over the N
    sequences of -log p(x_{t+1} | x_0..x_t), the model reading each sequence from its start.
    The model is run in eval mode under no_grad; its training mode is restored."""
    if sequences.dim() != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences must be [N, L+1] with L >= 1, got {tuple(sequences.shape)}")
    was_training = model.training
    model.eval()
    total = torch.zeros(sequences.shape[1] - 1, dtype=torch.float64)
    with torch.no_grad():
        for batch in sequences.split(batch_size):
            logits = model(batch[:, :-1])
            nll = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
            total += nll.view(batch.shape[0], -1).double().sum(0).cpu()
    model.train(was_training)
    return total / sequences.shape[0]


def bucket_means(values: list[float] | torch.Tensor, width: int) -> list[float]:
    """Means of consecutive buckets [0, w), [w, 2w), ... of `values` (the last may be shorter)."""
    values = [float(v) for v in values]
    return [sum(values[i:i + width]) / len(values[i:i + width]) for i in range(0, len(values), width)]


def held_out_sequences(val: TokenShards, length: int, count: int) -> torch.Tensor:
    """The first `count` non-overlapping windows of length+1 tokens of a split: [n, length+1] int64."""
    n = min(count, val.num_tokens // (length + 1))
    if n == 0:
        raise SystemExit(f"error: split {val.split!r} of {val.dir} has {val.num_tokens} tokens, fewer than one "
                         f"long sequence of {length + 1}: lower --long-factor or --seq-len")
    starts = np.arange(n, dtype=np.int64) * (length + 1)
    return torch.from_numpy(val.windows(starts, length + 1).astype(np.int64))


def parse_variants(names: list[str] | None, defines: list[list[str]]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The requested variants (name -> (preset, overrides)). Without --variants: every built-in
    variant whose keys this nl/config.py has (the others are named on stdout), plus the --define'd."""
    table = dict(VARIANTS)
    for spec in defines:
        name, preset, *overrides = spec
        if preset not in PRESETS and not Path(preset).is_file():
            raise SystemExit(f"error: --define {name}: preset {preset!r} is neither {' nor '.join(PRESETS)} "
                             f"nor a YAML file")
        table[name] = (preset, tuple(overrides))
    if names:
        unknown = [n for n in names if n not in table]
        if unknown:
            raise SystemExit(f"error: unknown variant(s) {', '.join(unknown)}; built in: {', '.join(VARIANTS)} "
                             f"(or add one with --define NAME PRESET KEY=VALUE ...)")
        return {n: table[n] for n in names}
    keys = set(valid_keys())
    chosen = {}
    for name, (preset, overrides) in table.items():
        missing = [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0] not in keys]
        if missing:
            print(f"skipping variant {name}: this nl/config.py has no {', '.join(missing)}")
        else:
            chosen[name] = (preset, overrides)
    return chosen


def build_config(preset: str, overrides: list[str]):
    path = PRESETS.get(preset, preset)
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


@functools.lru_cache(maxsize=None)
def arch_and_count(preset: str, overrides: tuple[str, ...]) -> tuple[str, int]:
    """(model.arch, parameter count on the meta device) of a preset with overrides."""
    from nl.models import build_model, count_parameters

    cfg = build_config(preset, list(overrides))
    return cfg.model.arch, count_parameters(build_model(cfg.model, device="meta"))


def match_width(preset: str, overrides: list[str], target: int) -> tuple[list[str], int]:
    """Overrides with the preset's width knob set so the count is nearest `target` (multiple of 8).

    The count is affine in the knob (SwiGLU widths), so two counts give the solution."""
    knob = WIDTH_KNOB[arch_and_count(preset, tuple(overrides))[0]]
    n = {h: arch_and_count(preset, (*overrides, f"{knob}={h}"))[1] for h in (64, 128)}
    slope = (n[128] - n[64]) / 64
    best = max(8, round((64 + (target - n[64]) / slope) / 8) * 8)
    matched = [*overrides, f"{knob}={best}"]
    return matched, arch_and_count(preset, tuple(matched))[1]


def plan_runs(variants, seeds, common: list[str], param_tol: float, variant_seeds=None) -> list[dict]:
    """One dict per (variant, seed): name, seed, preset, overrides (incl. a matched width), params,
    and same_as: the first variant with the same resolved config (e.g. a switch set to its
    default), whose run it shares, or None. `variant_seeds` (name -> seeds) replaces `seeds` per variant."""
    first_with_config: dict[str, str] = {}
    base = {name: [*common, *overrides] for name, (_, overrides) in variants.items()}
    ref_preset, ref_overrides = variants.get(REFERENCE, VARIANTS[REFERENCE])
    target = arch_and_count(ref_preset, (*common, *ref_overrides))[1]
    print(f"parameter target: {target:,} ({REFERENCE})")
    runs = []
    for name, (preset, _) in variants.items():
        overrides = base[name]
        arch, params = arch_and_count(preset, tuple(overrides))
        knob = WIDTH_KNOB[arch]
        own_knob = any(o.split("=", 1)[0] == knob for o in overrides)
        if abs(params / target - 1) > param_tol and not own_knob:
            overrides, params = match_width(preset, overrides, target)
        if abs(params / target - 1) > 0.05:
            raise SystemExit(f"error: variant {name} has {params:,} parameters, {params / target - 1:+.1%} from "
                             f"{REFERENCE}'s {target:,}: adjust its width (e.g. {knob}) in its overrides")
        print(f"  {name}: {params:,} parameters ({params / target - 1:+.2%})"
              f"{' with ' + overrides[-1] if overrides[-1].startswith(knob + '=') else ''}")
        same_as = first_with_config.setdefault(to_yaml(build_config(preset, overrides)), name)
        if same_as != name:
            print(f"  {name}: the same resolved config as {same_as}, whose runs it shares")
        shared_seeds = (variant_seeds or {}).get(same_as, seeds) if same_as != name else []
        runs.extend({"variant": name, "seed": s, "preset": preset, "overrides": overrides, "params": params,
                     "same_as": same_as if s in shared_seeds else None}
                    for s in (variant_seeds or {}).get(name, seeds))
    return runs


def run_one(run: dict, args_d: dict) -> dict:
    """Train one (variant, seed), evaluate it, write and return its result.json (reused if current)."""
    import nl.models.hope  # noqa: F401  registers arch 'hope' in this process (spawned workers too)
    from nl.checkpoint import find_checkpoint, load_checkpoint
    from nl.data.loader import iter_eval_batches
    from nl.evaluate import evaluate_loss
    from nl.models import build_model
    from nl.trainer import TrainingError, train

    out = Path(args_d["out"]) / "runs" / run["variant"] / f"seed{run['seed']}"
    steps, seq_len = args_d["steps"], args_d["seq_len"]
    cfg = build_config(run["preset"], [
        f"data.dir={args_d['data']}", f"data.seq_len={seq_len}", f"train.steps={steps}",
        f"train.seed={run['seed']}", "train.device=cpu", f"train.log_every={max(1, steps // 20)}",
        f"eval.every={max(1, steps // args_d['evals'])}", f"eval.max_batches={args_d['eval_batches']}",
        "checkpoint.every=0", "checkpoint.keep_last=1", "wandb.enabled=false", f"run.dir={out}",
        *run["overrides"]])
    long_len = args_d["long_factor"] * seq_len
    key = {"config": to_yaml(cfg), "long_len": long_len, "long_sequences": args_d["long_sequences"],
           "val_batches": args_d["val_batches"]}
    result_file = out / "result.json"
    if result_file.is_file():
        cached = json.loads(result_file.read_text())
        if cached.get("key") == key:
            print(f"reusing {result_file}", flush=True)
            return cached
    if out.exists():
        shutil.rmtree(out)  # another config's run: do not resume from it
    t0 = time.perf_counter()
    try:
        summary = train(cfg)
    except TrainingError as e:  # a diverged run is a result: reported in the table, not retried
        result = {"variant": run["variant"], "seed": run["seed"], "params": run["params"],
                  "overrides": run["overrides"], "diverged": str(e).split(" (")[0], "key": key}
        result_file.write_text(json.dumps(result) + "\n")
        print(f"{run['variant']} seed {run['seed']}: {result['diverged']}", flush=True)
        return result
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    curve = [[r["step"], r["val_loss"]] for r in records if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    speeds = speeds[1:] or speeds  # the first window holds start-up work

    model = build_model(cfg.model, device="cpu")
    state = {"model": model.state_dict()}
    load_checkpoint(find_checkpoint(out), state)
    model.load_state_dict(state["model"])
    val = TokenShards(cfg.data.dir, split="val", verify_checksums=False)
    batches = iter_eval_batches(val, seq_len, 8, max_batches=args_d["val_batches"])
    loss_sum, count = evaluate_loss(model, batches, torch.device("cpu"))
    per_pos = per_position_loss(model, held_out_sequences(val, long_len, args_d["long_sequences"]))
    result = {"variant": run["variant"], "seed": run["seed"], "params": summary["parameters"],
              "overrides": run["overrides"], "val_loss": (loss_sum / count).item(), "val_tokens": int(count),
              "val_curve": curve, "tokens_per_s": sum(speeds) / len(speeds), "wall_s": wall,
              "per_position": per_pos.tolist(), "key": key}
    result_file.write_text(json.dumps(result) + "\n")
    print(f"{run['variant']} seed {run['seed']}: val loss {result['val_loss']:.4f}, "
          f"{result['tokens_per_s']:.0f} tokens/s, {wall:.0f} s", flush=True)
    return result


def summarise(results: list[dict], variants: list[str], seq_len: int) -> list[dict]:
    """Per variant: seeds, params, val loss mean and half-range, per-position bucket means, tokens/s,
    over the runs that finished; `diverged` lists the others ("seed N: non-finite loss at step S")."""
    rows = []
    for name in variants:
        all_runs = [r for r in results if r["variant"] == name]
        rs = [r for r in all_runs if "diverged" not in r]
        diverged = [f"seed {r['seed']}: {r['diverged']}" for r in all_runs if "diverged" in r]
        if not rs:
            rows.append({"variant": name, "params": all_runs[0]["params"], "seeds": [], "diverged": diverged})
            continue
        losses = [r["val_loss"] for r in rs]
        per_pos = np.mean([r["per_position"] for r in rs], axis=0)
        curve_steps = [s for s, _ in rs[0]["val_curve"]]
        rows.append({"variant": name, "params": rs[0]["params"], "seeds": [r["seed"] for r in rs],
                     "diverged": diverged,
                     "val_loss": sum(losses) / len(losses), "spread": (max(losses) - min(losses)) / 2,
                     "buckets": bucket_means(per_pos, seq_len), "per_position": per_pos.tolist(),
                     "tokens_per_s": sum(r["tokens_per_s"] for r in rs) / len(rs),
                     "val_curve": [curve_steps, np.mean([[v for _, v in r["val_curve"]] for r in rs], axis=0).tolist()]})
    return rows


def markdown_table(rows: list[dict], seq_len: int) -> str:
    n_buckets = max(len(r.get("buckets", [])) for r in rows)
    heads = ["loss @ 0-T", "loss @ T-2T", *(f"loss @ {i}T-{i + 1}T" for i in range(2, n_buckets))][:n_buckets]
    lines = ["| variant | params | seeds | val loss (mean ± half-range) | " + " | ".join(heads)
             + f" | last / first bucket | tokens/s |",
             "|---" * (6 + n_buckets) + "|"]
    for r in rows:
        seeds = ",".join(map(str, r["seeds"])) + "".join(f" ({d})" for d in r["diverged"])
        if not r["seeds"]:
            lines.append(f"| {r['variant']} | {r['params'] / 1e6:.3f}M | {seeds.strip()} |" + " - |" * (3 + n_buckets))
            continue
        b = r["buckets"]
        lines.append(f"| {r['variant']} | {r['params'] / 1e6:.3f}M | {seeds} | "
                     f"{r['val_loss']:.4f} ± {r['spread']:.4f} | " + " | ".join(f"{v:.4f}" for v in b)
                     + f" | {b[-1] / b[0]:.3f} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines) + f"\n\nT = training seq_len = {seq_len}; buckets are positions in held-out sequences " \
                              f"of {n_buckets}T tokens. Diverged runs are named in the seeds column and left out " \
                              f"of the means.\n"


def plot(rows: list[dict], seq_len: int, out: Path, curve_note: str) -> list[Path]:
    """val_loss.png (val loss vs step) and per_position.png (smoothed loss vs position)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(f"error: the curves need matplotlib (pip install matplotlib); the table is in "
                         f"{out / 'results.md'}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    style = [{"color": colours(i % 10), "ls": ("-", "--")[i // 10 % 2]} for i in range(len(rows))]
    paths = [out / "val_loss.png", out / "per_position.png"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=80)
    for i, r in enumerate(rows):
        if not r["seeds"]:
            continue
        ax.plot(*r["val_curve"], marker="o", ms=3, label=r["variant"], **style[i])
    ax.set(xlabel="step", ylabel="validation loss (nats/token)", title=f"held-out validation loss during training ({curve_note})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(paths[0])
    plt.close(fig)

    # Moving mean: single positions are noisy over few sequences. The lower panel subtracts the
    # first variant's curve: every model reads the same tokens at each position, so the paired
    # difference shows degradation past the training length that the text's own ups and downs hide.
    window = max(1, seq_len // 4)
    shown = [(i, r) for i, r in enumerate(rows) if r["seeds"]]
    smooth = {i: np.convolve(r["per_position"], np.ones(window) / window, mode="valid") for i, r in shown}
    x = np.arange(len(next(iter(smooth.values())))) + window - 1
    base_i, base = shown[0]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), dpi=80, sharex=True, height_ratios=(3, 2))
    for i, r in shown:
        top.plot(x, smooth[i], label=r["variant"], lw=1, **style[i])
        bottom.plot(x, smooth[i] - smooth[base_i], lw=1, **style[i])
    for ax in (top, bottom):
        ax.axvline(seq_len, color="k", ls="--", lw=0.8, label="training length" if ax is top else None)
    top.set(ylabel=f"loss (moving mean over {window})", title="per-position loss past the training length")
    bottom.set(xlabel="position in held-out sequence", ylabel=f"minus {base['variant']}")
    top.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", help=f"default: all built in whose keys exist ({', '.join(VARIANTS)})")
    ap.add_argument("--define", nargs="+", action="append", default=[], metavar="NAME PRESET KEY=VALUE",
                    help="an extra variant: PRESET is hope, transformer or a YAML path, then dotted overrides")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variant-seeds", nargs="+", default=[], metavar="VARIANT=S1,S2",
                    help="seeds for a variant instead of --seeds (e.g. fewer to save time; the table lists them)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="overrides for every variant, e.g. train.batch_size=8 model.n_layers=2")
    ap.add_argument("--data", default="data/demo/tokens")
    ap.add_argument("--out", default="runs/bench_learning")
    ap.add_argument("--evals", type=int, default=4, help="validations during training (curve points)")
    ap.add_argument("--eval-batches", type=int, default=4,
                    help="global batches per validation during training (0 = whole split)")
    ap.add_argument("--val-batches", type=int, default=0,
                    help="batches of 8 windows for the final val loss (0 = the whole val split)")
    ap.add_argument("--long-factor", type=int, default=4, help="held-out sequence length / seq_len")
    ap.add_argument("--long-sequences", type=int, default=32)
    ap.add_argument("--param-tol", type=float, default=0.02,
                    help="re-solve a variant's width when its count is further than this from hope's")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes")
    ap.add_argument("--dry-run", action="store_true",
                    help="2 steps, seed 0, seq_len 32, batch 4; variants transformer and hope unless --variants")
    args = ap.parse_args(argv)
    if args.dry_run:
        for k, v in DRY_RUN.items():  # explicit --variants are kept
            if k == "set":
                args.set = [*args.set, *v]
            elif k != "variants" or not args.variants:
                setattr(args, k, v)
    data = Path(args.data)
    if not (data / "manifest.json").is_file():
        raise SystemExit(f"error: {data} is not a token directory: build the demo corpus with "
                         f"`python data_prep/prepare_demo.py --root data/demo` or pass --data")
    vocab = TokenShards(data, "train", verify_checksums=False).vocab_size
    common = [f"data.dir={data}", f"data.seq_len={args.seq_len}", f"model.vocab_size={vocab}", *args.set]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print(f"command: python benchmarks/bench_learning.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    variants = parse_variants(args.variants, args.define)
    import nl.models.hope  # noqa: F401  registers arch 'hope'
    try:
        variant_seeds = {name: [int(x) for x in seeds.split(",")]
                         for name, seeds in (item.split("=", 1) for item in args.variant_seeds)}
    except ValueError:
        raise SystemExit(f"error: --variant-seeds takes VARIANT=S1,S2 items, got {' '.join(args.variant_seeds)}") from None
    unknown = set(variant_seeds) - set(variants)
    if unknown:
        raise SystemExit(f"error: --variant-seeds names {', '.join(sorted(unknown))}, not among the variants run")
    runs = plan_runs(variants, args.seeds, common, args.param_tol, variant_seeds)
    args_d = dict(out=str(out), data=str(data), steps=args.steps, seq_len=args.seq_len, evals=args.evals,
                  eval_batches=args.eval_batches, val_batches=args.val_batches, long_factor=args.long_factor,
                  long_sequences=args.long_sequences)
    trained = [r for r in runs if r["same_as"] is None]
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(run_one, trained, [args_d] * len(trained)))
    else:
        results = [run_one(r, args_d) for r in trained]
    by_run = {(r["variant"], r["seed"]): r for r in results}
    results += [{**by_run[(r["same_as"], r["seed"])], "variant": r["variant"]} for r in runs if r["same_as"]]

    rows = summarise(results, list(variants), args.seq_len)
    header = (f"command: python benchmarks/bench_learning.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
              f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
              f"date {datetime.date.today()}\n"
              f"data: {data}, {args.steps} steps x batch x seq_len {args.seq_len} per run, same for every "
              f"variant; common overrides: {' '.join(args.set) or 'none'}\n\n")
    table = header + markdown_table(rows, args.seq_len)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(rows) + "\n")
    print("\n" + table)
    note = f"first {args.eval_batches} val batches" if args.eval_batches else "whole val split"
    for path in plot(rows, args.seq_len, out, note):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
