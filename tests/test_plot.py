"""python -m nl.plot: the summary table's numbers, duplicate steps after a resume, tokens from
config.yaml, the figure (a valid PNG of the documented size with every run drawn), and a
one-line error for each kind of bad input."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest

from conftest import run_script
from nl.plot import load_run, main

C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two cycle colours


def write_run(run_dir: Path, records: list[dict], batch_size: int = 4, seq_len: int = 16,
              config: bool = True) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config:  # the shape train.py saves: the sections nl.plot reads, among others
        (run_dir / "config.yaml").write_text(
            f"model:\n  arch: hope\n  dim: 32\ndata:\n  seq_len: {seq_len}\n"
            f"train:\n  steps: 8\n  batch_size: {batch_size}\n  lr: 0.001\n")
    return run_dir


def alpha_records() -> list[dict]:
    """8 steps, no `tokens` field, crashed after step 6 and resumed from its step-4 checkpoint,
    so steps 5 and 6 (train) and 6 (eval) appear twice: the second records must win."""
    def train(step, loss, speed, m0, m1):
        return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": speed,
                "memory/block0/norm_ratio": m0, "memory/block1/norm_ratio": m1}
    before_crash = [train(1, 4.9, 100.0, 0.9, 0.1), train(2, 4.8, 300.0, 0.8, 0.2),
                    train(3, 4.7, 200.0, 0.7, 0.3), train(4, 4.6, 250.0, 0.6, 0.4),
                    {"step": 4, "val_loss": 4.8},
                    train(5, 4.5, 150.0, 0.5, 0.5), train(6, 4.4, 400.0, 0.4, 0.6),
                    {"step": 6, "val_loss": 4.5}]
    after_resume = [train(5, 4.0, 1000.0, 0.45, 0.55), train(6, 3.9, 1100.0, 0.35, 0.45),
                    {"step": 6, "val_loss": 4.6},
                    train(7, 3.8, 1200.0, 0.3, 0.5), train(8, 3.7, 1300.0, 0.25, 0.5),
                    {"step": 8, "val_loss": 4.7}]
    return before_crash + after_resume


def beta_records() -> list[dict]:
    """Records with their own `tokens` (which win over config.yaml's 4 x 16), no evaluation."""
    return [{"step": s, "loss": loss, "tokens": 1000 * s, "tokens_per_s": speed}
            for s, loss, speed in [(10, 6.0, 10.0), (20, 5.0, 30.0), (30, 4.5, 20.0)]]


def parse_table(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].strip("|").split("|")) == {"---"}
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_table_has_each_runs_final_metrics_with_duplicates_resolved(tmp_path, capsys):
    alpha = write_run(tmp_path / "alpha", alpha_records())
    beta = write_run(tmp_path / "beta", beta_records())
    table_file = tmp_path / "out" / "summary.md"
    main([str(alpha), str(beta), "--table", str(table_file)])
    printed = capsys.readouterr().out
    assert table_file.read_text() == printed
    rows = parse_table(printed)
    a, b = rows
    assert a == {
        "run": "alpha", "steps": "8", "tokens": str(8 * 4 * 16),
        "final train loss": "3.7000",
        "best val loss": "4.6000",  # steps 4, 6, 8 -> 4.8, 4.6 (re-logged; 4.5 was replaced), 4.7
        "final val loss": "4.7000",
        "best val ppl": f"{math.exp(4.6):.2f}", "final val ppl": f"{math.exp(4.7):.2f}",
        # steps 1-4 before the crash, 5-8 after it: median of 100 200 250 300 1000 1100 1200 1300
        "tokens/s (median)": "650",
        "memory norm": "0.25..0.5",  # final norm_ratio of block 0 and block 1
    }
    assert b == {
        "run": "beta", "steps": "30", "tokens": "30000", "final train loss": "4.5000",
        "best val loss": "-", "final val loss": "-", "best val ppl": "-", "final val ppl": "-",
        "tokens/s (median)": "20", "memory norm": "-",
    }


def test_memory_keys_are_one_column_per_kind_with_their_range(tmp_path, capsys):
    """A 4-block HOPE logs 4 x 8 memory/ keys: the table has one `memory <kind>` column for each kind
    (norm, eta, alpha, share first), min..max of the final values over blocks and memories."""
    def record(step: int) -> dict:
        stats = {f"memory/block{b}/{name}": step * (10 * b + i + 1) / 1000
                 for b in range(4) for i, name in enumerate(["norm_k", "norm_v", "norm_q", "eta", "alpha", "share",
                                                                "cms0_norm", "cms1_dev"])}
        return {"step": step, "loss": 3.0, "tokens_per_s": 10.0, **stats}

    main([str(write_run(tmp_path / "hope", [record(1), record(2)]))])
    [row] = parse_table(capsys.readouterr().out)
    memory = {k: v for k, v in row.items() if k.startswith("memory")}
    assert list(memory) == ["memory norm", "memory eta", "memory alpha", "memory share", "memory cms_dev",
                            "memory cms_norm"]
    assert memory == {"memory norm": "0.002..0.066", "memory eta": "0.008..0.068", "memory alpha": "0.01..0.07",
                      "memory share": "0.012..0.072", "memory cms_norm": "0.014..0.074",
                      "memory cms_dev": "0.016..0.076"}


def test_duplicate_steps_keep_the_last_record_and_tokens_come_from_config(tmp_path):
    run = load_run(write_run(tmp_path / "alpha", alpha_records(), batch_size=3, seq_len=10))
    assert [r["step"] for r in run.train] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["loss"] for r in run.train] == [4.9, 4.8, 4.7, 4.6, 4.0, 3.9, 3.8, 3.7]
    assert [(r["step"], r["val_loss"]) for r in run.evals] == [(4, 4.8), (6, 4.6), (8, 4.7)]
    assert [r["tokens"] for r in run.train] == [30 * s for s in range(1, 9)]
    assert run.series("memory/block0/norm_ratio") == ([30 * s for s in range(1, 9)],
                                                     [0.9, 0.8, 0.7, 0.6, 0.45, 0.35, 0.3, 0.25])


def test_a_line_cut_short_by_a_crash_is_skipped_with_a_note(tmp_path, capsys):
    run_dir = write_run(tmp_path / "r", beta_records())
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines.insert(1, '{"step": 15, "loss": 5.5, "tok')  # a write interrupted mid-line
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run = load_run(run_dir)
    assert [r["step"] for r in run.train] == [10, 20, 30]
    assert "skipped 1 line(s)" in capsys.readouterr().err


def test_figure_is_a_png_of_the_documented_size_with_every_run_drawn(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="nl.plot draws with matplotlib (requirements.txt pins it)")
    from PIL import Image  # a matplotlib dependency

    alpha = write_run(tmp_path / "alpha", alpha_records())
    beta = write_run(tmp_path / "beta", beta_records())
    both = tmp_path / "figs" / "both.png"
    main([str(alpha), str(beta), "--output", str(both)])
    # 3 panels + 2 memory/ keys = 5 panels: 2 columns x 3 rows of 500 x 350 px
    assert png_size(both) == (1000, 1050)
    with Image.open(both) as im:
        im.verify()
    with Image.open(both) as im:
        pixels = list(im.convert("RGB").getdata())
    assert pixels.count(C0) > 500 and pixels.count(C1) > 100, (pixels.count(C0), pixels.count(C1))

    alone = tmp_path / "beta.png"
    main([str(beta), "--output", str(alone)])
    assert png_size(alone) == (1000, 700)  # 3 panels: 2 rows
    assert "| beta |" in capsys.readouterr().out


def test_a_real_tiny_run(token_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="nl.plot draws with matplotlib (requirements.txt pins it)")
    from test_train import small_cfg

    from nl.trainer import train

    run_dir = tmp_path / "tiny"
    summary = train(small_cfg(token_dir, run_dir, "train.steps=12", "eval.every=6", "checkpoint.every=0"))
    capsys.readouterr()
    main([str(run_dir), str(write_run(tmp_path / "beta", beta_records())),
          "--output", str(tmp_path / "cmp.png")])
    row = parse_table(capsys.readouterr().out)[0]
    assert row["run"] == "tiny" and row["steps"] == "12" and row["tokens"] == str(12 * 8 * 32)
    assert row["final train loss"] == f"{summary['loss']:.4f}"
    assert row["final val loss"] == f"{summary['val_loss']:.4f}"
    assert png_size(tmp_path / "cmp.png") == (1000, 700)


@pytest.mark.parametrize("case", ["missing", "file", "no_metrics", "empty", "garbage", "no_tokens",
                                  "bad_format"])
def test_bad_input_is_one_line_naming_the_fix(tmp_path, case, capsys):
    target = tmp_path / "run"
    extra: list[str] = []
    if case == "file":
        target.write_text("x")
    elif case == "no_metrics":
        target.mkdir()
    elif case == "empty":
        write_run(target, [])
    elif case == "garbage":
        target.mkdir()
        (target / "metrics.jsonl").write_text("not json\n\n")
    elif case == "no_tokens":
        write_run(target, [{"step": 1, "loss": 3.0}], config=False)
    elif case == "bad_format":
        write_run(target, beta_records())
        extra = ["--output", str(tmp_path / "fig.xyz")]
    with pytest.raises(SystemExit) as exc:
        main([str(target), *extra])
    message = str(exc.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    expected = {"missing": "does not exist", "file": "is not a directory", "no_metrics": "has no metrics.jsonl",
                "empty": "has no loss or val_loss records", "garbage": "has no loss or val_loss records",
                "no_tokens": "restore the run's config.yaml", "bad_format": "end the name with one of"}[case]
    assert expected in message
    assert not (tmp_path / "fig.xyz").exists()


def test_cli_error_has_no_traceback(tmp_path):
    proc = run_script("-m", "nl.plot", str(tmp_path / "nowhere"), "--output", str(tmp_path / "f.png"),
                      check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'} does not exist: pass a training run directory (the run's run.dir)"]


def test_without_matplotlib_the_figure_is_refused_and_the_table_still_works(tmp_path, monkeypatch, capsys):
    run_dir = write_run(tmp_path / "beta", beta_records())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit) as exc:
        main([str(run_dir), "--output", str(tmp_path / "f.png")])
    assert str(exc.value.code).startswith("error: drawing needs matplotlib: pip install matplotlib")
    assert not (tmp_path / "f.png").exists()
    main([str(run_dir)])
    assert parse_table(capsys.readouterr().out)[0]["steps"] == "30"
