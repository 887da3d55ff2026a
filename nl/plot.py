"""Compare training runs: curves on one figure and a markdown table of final metrics.

    python -m nl.plot runs/hope runs/transformer --output compare.png
    python -m nl.plot runs/hope runs/transformer --output compare.png --table summary.md
    python -m nl.plot runs/hope                               # the table only

The figure has one panel per quantity, x = tokens seen, one line per run: training loss,
validation loss, tokens/s, then one panel per `memory/...` key found in any run's
metrics.jsonl. Tokens come from each record's `tokens` field, else step x train.batch_size x
data.seq_len from the run's config.yaml. After a crash and resume a run's metrics.jsonl can
hold a step twice: the last record of each kind (train, eval) per step wins.
The summary table is always printed; --table also writes it to a file. It has one row per run and
one column per kind of `memory/` key (norm, eta, alpha, share, ...): the range min..max of that kind's
final values over blocks and memories, as the console prints them; each key's own curve is in the figure.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Figure layout: PANEL_COLUMNS panels per row, each PANEL_INCHES at DPI, so a figure with
# n panels is PANEL_COLUMNS * 500 px wide and ceil(n / PANEL_COLUMNS) * 350 px high.
PANEL_COLUMNS = 2
PANEL_INCHES = (5.0, 3.5)
DPI = 100
MEMORY_PREFIX = "memory/"
MEMORY_KINDS = ("norm", "eta", "alpha", "share")  # the table's first memory columns; other kinds follow, sorted


class PlotError(ValueError):
    """Bad input to nl.plot; the message names the problem and the fix."""


@dataclass
class Run:
    """One run's metrics, deduplicated and sorted by step.

    train: records with `loss`; evals: records with `val_loss`; each carries `tokens` (int)."""

    name: str
    path: Path
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)

    def memory_keys(self) -> list[str]:
        return sorted({k for r in self.train + self.evals for k in r if k.startswith(MEMORY_PREFIX)})

    def series(self, key: str, records: list[dict] | None = None) -> tuple[list[int], list[float]]:
        """(tokens, values) of `key` over the records that carry it."""
        rows = [r for r in (records if records is not None else self.train + self.evals) if key in r]
        rows.sort(key=lambda r: r["step"])
        return [r["tokens"] for r in rows], [float(r[key]) for r in rows]


def _tokens_per_step(run_dir: Path) -> int | None:
    """train.batch_size (global, in sequences) x data.seq_len from config.yaml, or None."""
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        return int(cfg["train"]["batch_size"]) * int(cfg["data"]["seq_len"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    """Read RUN_DIR/metrics.jsonl (and config.yaml when a record lacks `tokens`).

    Raises PlotError for a missing directory, a missing or empty metrics file, or records
    whose token count can be neither read nor derived. Lines that are not JSON (a write cut
    short by a crash) are skipped with a note on stderr."""
    path = Path(run_dir)
    if not path.exists():
        raise PlotError(f"{path} does not exist: pass a training run directory (the run's run.dir)")
    if not path.is_dir():
        raise PlotError(f"{path} is not a directory: pass the run directory that holds metrics.jsonl")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise PlotError(f"{path} has no metrics.jsonl: pass a run directory written by train.py "
                        f"(run.dir), after its first logged step")
    records, bad_lines = [], []
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad_lines.append(number)
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
        else:
            bad_lines.append(number)
    if bad_lines:
        print(f"note: {metrics}: skipped {len(bad_lines)} line(s) that are not metric records "
              f"(line {', '.join(map(str, bad_lines[:5]))}{', ...' if len(bad_lines) > 5 else ''})",
              file=sys.stderr)
    # Later lines win: a resumed run re-logs the steps after its checkpoint.
    train_by_step = {r["step"]: r for r in records if "loss" in r}
    evals_by_step = {r["step"]: r for r in records if "val_loss" in r}
    if not train_by_step and not evals_by_step:
        raise PlotError(f"{metrics} has no loss or val_loss records: the run has not logged a step "
                        f"yet (train.log_every, eval.every); rerun when it has")
    per_step = None
    for r in [*train_by_step.values(), *evals_by_step.values()]:
        if "tokens" not in r:
            per_step = per_step or _tokens_per_step(path)
            if per_step is None:
                raise PlotError(f"{metrics} has records without `tokens` and {path / 'config.yaml'} "
                                f"is missing or lacks train.batch_size / data.seq_len: restore the "
                                f"run's config.yaml")
            r["tokens"] = r["step"] * per_step
    return Run(name=name or path.name, path=path,
               train=[train_by_step[s] for s in sorted(train_by_step)],
               evals=[evals_by_step[s] for s in sorted(evals_by_step)])


def load_runs(run_dirs: list[str]) -> list[Run]:
    """Runs named by their directory's name, or by the path as given where names collide."""
    names = [Path(d).name for d in run_dirs]
    return [load_run(d, name if names.count(name) == 1 else str(d)) for d, name in zip(run_dirs, names)]


def summarize(run: Run) -> dict:
    """Final metrics of one run as numbers (None where the run has no such record)."""
    last = max([*run.train, *run.evals], key=lambda r: r["step"])
    vals = [r["val_loss"] for r in run.evals]
    speeds = [r["tokens_per_s"] for r in run.train if "tokens_per_s" in r]
    row = {
        "run": run.name,
        "steps": last["step"],
        "tokens": last["tokens"],
        "train_loss": run.train[-1]["loss"] if run.train else None,
        "best_val_loss": min(vals) if vals else None,
        "final_val_loss": vals[-1] if vals else None,
        "tokens_per_s_median": statistics.median(speeds) if speeds else None,
    }
    row["best_val_ppl"] = _exp(row["best_val_loss"])
    row["final_val_ppl"] = _exp(row["final_val_loss"])
    finals: dict[str, list[float]] = {}
    for key in run.memory_keys():
        finals.setdefault(memory_kind(key), []).append(run.series(key)[1][-1])
    for kind, values in finals.items():
        row[f"{MEMORY_PREFIX}{kind}"] = (min(values), max(values))
    return row


def memory_kind(key: str) -> str:
    """The kind of a `memory/` key, its last part without block, memory or level: memory/block3/norm_k ->
    norm, memory/block0/eta -> eta, memory/block1/cms0_dev -> cms_dev."""
    stat = key.rsplit("/", 1)[-1]
    return "norm" if stat.startswith("norm_") else re.sub(r"\d+", "", stat)


def _exp(x: float | None) -> float | None:
    if x is None:
        return None
    return math.exp(x) if x < 700 else math.inf  # exp overflows a float past ~709


_COLUMNS = [  # (summary key, header, format)
    ("run", "run", "{}"),
    ("steps", "steps", "{}"),
    ("tokens", "tokens", "{}"),
    ("train_loss", "final train loss", "{:.4f}"),
    ("best_val_loss", "best val loss", "{:.4f}"),
    ("final_val_loss", "final val loss", "{:.4f}"),
    ("best_val_ppl", "best val ppl", "{:.2f}"),
    ("final_val_ppl", "final val ppl", "{:.2f}"),
    ("tokens_per_s_median", "tokens/s (median)", "{:.0f}"),
]


def summary_table(runs: list[Run]) -> str:
    """A markdown table, one row per run; one `memory <kind>` column (min..max over blocks and memories)
    per kind of memory/ key in any run ('-' = absent)."""
    rows = [summarize(r) for r in runs]
    kinds = {k[len(MEMORY_PREFIX):] for row in rows for k in row if k.startswith(MEMORY_PREFIX)}
    order = [k for k in MEMORY_KINDS if k in kinds] + sorted(kinds - set(MEMORY_KINDS))
    columns = _COLUMNS + [(f"{MEMORY_PREFIX}{k}", f"memory {k}", "{0[0]:.3g}..{0[1]:.3g}") for k in order]
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = ["-" if row.get(k) is None else fmt.format(row[k]).replace("|", "\\|") for k, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_runs(runs: list[Run], output: str | Path) -> Path:
    """Draw the comparison figure to `output` (format from its suffix) with the Agg renderer.

    Size: PANEL_COLUMNS * 500 px by ceil(panels / PANEL_COLUMNS) * 350 px, panels = 3 +
    the number of distinct memory/ keys. Raises PlotError for an unknown image format."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional dependency
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    output = Path(output)
    fig = Figure(figsize=(1, 1), dpi=DPI)
    canvas = FigureCanvasAgg(fig)  # an explicit canvas: no pyplot, no global backend switch
    formats = canvas.get_supported_filetypes()
    if output.suffix.lstrip(".").lower() not in formats:
        raise PlotError(f"--output {output}: unknown image format {output.suffix or '(no suffix)'}; "
                        f"end the name with one of {', '.join('.' + f for f in sorted(formats))}")

    memory = sorted({k for run in runs for k in run.memory_keys()})
    panels = [("training loss", "loss", "train"), ("validation loss", "val_loss", "evals"),
              ("tokens/s", "tokens_per_s", "train")] + [(k, k, "all") for k in memory]
    n_rows = math.ceil(len(panels) / PANEL_COLUMNS)
    fig.set_size_inches(PANEL_INCHES[0] * PANEL_COLUMNS, PANEL_INCHES[1] * n_rows)
    axes = fig.subplots(n_rows, PANEL_COLUMNS, squeeze=False).flatten()
    colors = [f"C{i % 10}" for i in range(len(runs))]  # one colour per run on every panel
    for ax, (title, key, which) in zip(axes, panels):
        drawn = False
        for run, color in zip(runs, colors):
            records = {"train": run.train, "evals": run.evals, "all": None}[which]
            tokens, values = run.series(key, records)
            if tokens:
                # Sparse series (evaluations, short runs) get markers so single points show.
                ax.plot(tokens, values, color=color, label=run.name, marker="o" if len(tokens) <= 20 else None,
                        markersize=3)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"no {key} records", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles, labels = [], []
    for ax in axes:  # one legend for the figure: the runs, in the order given
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    if handles:
        axes[0].legend(handles, labels, fontsize=8)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    return output


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run directories (run.dir)")
    ap.add_argument("--output", default=None, help="figure to write (.png, .pdf, .svg, ...); "
                    "default: no figure, the table only")
    ap.add_argument("--table", default=None, help="also write the markdown summary table to this file")
    args = ap.parse_args(argv)
    try:
        runs = load_runs(args.runs)
        if args.output:
            try:
                import matplotlib  # noqa: F401  (optional dependency)
            except ImportError:
                raise PlotError("drawing needs matplotlib: pip install matplotlib "
                                "(or `pip install -e .[plot]`), or drop --output for the table only")
            plot_runs(runs, args.output)
    except PlotError as e:
        sys.exit(f"error: {e}")
    table = summary_table(runs)
    print(table, end="")
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table)
    if args.output:
        print(f"wrote {args.output}" + (f" and {args.table}" if args.table else ""), file=sys.stderr)
    return table


if __name__ == "__main__":
    main()
