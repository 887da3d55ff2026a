"""python -m nl.continual: phases in sequence, each from the previous phase's weights; the loss matrix,
forgetting, and one-line refusals of bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_script
from nl.config import ConfigError
from nl.continual import forgetting, main, run_continual
from nl.data.shards import DataError
from test_train import read_metrics, small_cfg


@pytest.fixture(scope="module")
def domains(tmp_path_factory, small_corpus, token_dir) -> list[Path]:
    """The small corpus split in two by document index, each tokenized with token_dir's tokenizer."""
    root = tmp_path_factory.mktemp("domains")
    lines = small_corpus.read_text().splitlines()
    out = []
    for name, part in (("first", lines[:750]), ("second", lines[750:])):
        (root / f"{name}.jsonl").write_text("\n".join(part) + "\n")
        run_script("data_prep/tokenize_corpus.py", "--input", str(root / f"{name}.jsonl"), "--tokenizer",
                   str(token_dir / "tokenizer.model"), "--output", str(root / name), "--val-fraction", "0.05")
        out.append(root / name)
    return out


@pytest.fixture(scope="module")
def other_tokenizer_domain(tmp_path_factory, small_corpus) -> Path:
    """Part of the same text tokenized with another (512-piece) tokenizer."""
    root = tmp_path_factory.mktemp("other")
    part = root / "part.jsonl"
    part.write_text("\n".join(small_corpus.read_text().splitlines()[:300]) + "\n")
    run_script("data_prep/train_tokenizer.py", "--input", str(part), "--vocab-size", "512",
               "--output", str(root / "tok.model"))
    run_script("data_prep/tokenize_corpus.py", "--input", str(part), "--tokenizer", str(root / "tok.model"),
               "--output", str(root / "tokens"), "--val-fraction", "0.1")
    return root / "tokens"


def first_batch_loss(export_dir: Path, domain: Path, cfg) -> float:
    """Mean next-token loss of the export on the first training batch the trainer draws from `domain`,
    computed here from the loader and the model's logits."""
    from nl.data.loader import TokenLoader
    from nl.data.shards import TokenShards
    from nl.export import load_pretrained

    model = load_pretrained(export_dir)
    loader = TokenLoader(TokenShards(domain), cfg.data.seq_len, cfg.train.batch_size, seed=cfg.train.seed)
    x, y = loader.next_batch()
    with torch.no_grad():
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()


def test_forgetting_is_final_minus_best_loss():
    matrix = [[2.0, 5.0, 6.0],
              [3.0, 4.0, 6.5],
              [2.5, 4.5, 3.0]]
    # by hand: 2.5 - min(2, 3, 2.5), 4.5 - min(5, 4, 4.5), 3.0 - min(6, 6.5, 3)
    assert forgetting(matrix) == pytest.approx([0.5, 0.5, 0.0])


@pytest.mark.parametrize("arch", ["transformer", "hope"])
def test_two_phases_matrix_and_phase_two_starts_from_phase_one(arch, domains, tmp_path):
    run = tmp_path / "continual"
    hope = ["model.hope.chunk_size=8", "model.hope.memory_chunk_size=8", "model.hope.cms_chunk_sizes=[1,2]"]
    cfg = small_cfg(domains[0], tmp_path / "unused", "eval.every=6", "train.lr=1e-2", *(hope if arch == "hope" else []), arch=arch)
    result = run_continual(cfg, domains, steps_per_domain=6, run_dir=run)

    loss = np.array(result["loss"])
    assert loss.shape == (2, 2) and np.isfinite(loss).all()
    assert loss.max() < math.log(1024)  # both phases learned something (ln V at init)
    assert result["forgetting"] == pytest.approx([loss[1, 0] - loss[:, 0].min(), loss[1, 1] - loss[:, 1].min()])
    assert json.loads((run / "continual.json").read_text())["loss"] == result["loss"]

    # Phase 2 starts from phase 1's weights: its first training loss is the phase-1 export's loss on
    # phase 2's first batch (a fresh init would give ~ln V), and it trains on domain 2 for 6 steps.
    phase1_export = run / "phase_1" / "export"
    rows, _ = read_metrics(run / "phase_2")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[0]["loss"] == pytest.approx(first_batch_loss(phase1_export, domains[1], cfg), abs=1e-4)
    assert rows[0]["loss"] < math.log(1024) - 0.3

    # The diagonal is each phase's own validation at its last step (the same windows).
    for k in (1, 2):
        assert loss[k - 1, k - 1] == pytest.approx(read_metrics(run / f"phase_{k}")[1][-1]["val_loss"], abs=1e-5)

    # Each matrix entry is what nl.evaluate reports for that export and domain (the same windows:
    # eval.max_batches=2 batches of 8 sequences, in micro-batches of 4).
    from nl.evaluate import main as evaluate_main

    for j, domain in enumerate(domains):
        ref = evaluate_main(["--model", str(run / "phase_2" / "export"), "--data", str(domain),
                             "--batch-size", "4", "--max-batches", "4"])
        assert loss[1, j] == pytest.approx(ref["val_loss"], abs=1e-5)


def test_rerun_resumes_without_retraining(domains, tmp_path, capsys):
    run = tmp_path / "continual"
    argv = ["--config", "configs/tiny.yaml", "--domains", *map(str, domains), "--steps-per-domain", "3",
            "--run-dir", str(run), "model.dim=32", "model.n_layers=2", "model.n_heads=2", "data.seq_len=32",
            "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1", "eval.every=0", "eval.max_batches=1"]
    first = main(argv)
    out = capsys.readouterr().out
    assert "| after phase | first | second |" in out and "| forgetting |" in out
    printed = json.loads(out.strip().splitlines()[-1])
    assert printed["loss"] == first["loss"] and printed["forgetting"] == first["forgetting"]
    again = main(argv)
    assert again["loss"] == first["loss"]
    for k in (1, 2):
        rows, _ = read_metrics(run / f"phase_{k}")
        assert [r["step"] for r in rows] == [1, 2, 3]  # nothing trained twice


def test_mismatched_tokenizers_refused(domains, other_tokenizer_domain, tmp_path):
    cfg = small_cfg(domains[0], tmp_path / "unused")
    with pytest.raises(DataError, match="another tokenizer.*tokenize every domain with the same tokenizer"):
        run_continual(cfg, [domains[0], other_tokenizer_domain], 2, tmp_path / "run")
    assert not (tmp_path / "run" / "phase_1").exists()  # refused before any training
    proc = run_script("-m", "nl.continual", "--domains", str(domains[0]), str(other_tokenizer_domain),
                      "--steps-per-domain", "2", "--run-dir", str(tmp_path / "run"), check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: domain ")


@pytest.mark.parametrize("second, args, message", [
    (None, ["--steps-per-domain", "2"], "needs at least 2"),
    ("second", ["--steps-per-domain", "0"], "--steps-per-domain must be >= 1"),
    ("second", ["--steps-per-domain", "2", "data.dir=x"], "data.dir is set per phase by --domains"),
    ("second", ["--steps-per-domain", "2", "train.steps=9"], "train.steps is set per phase by --steps-per-domain"),
    ("missing", ["--steps-per-domain", "2"], "is not a token directory"),
    ("second", ["--steps-per-domain", "2", "dist.strategy=ddp"], "runs in one process"),
])
def test_one_line_errors(second, args, message, domains, tmp_path):
    extra = {None: [], "second": [str(domains[1])], "missing": [str(tmp_path / "nope")]}[second]
    with pytest.raises(SystemExit) as e:
        main(["--domains", str(domains[0]), *extra, "--run-dir", str(tmp_path / "run"), *args])
    text = str(e.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_domain_without_val_split_refused(domains, small_corpus, token_dir, tmp_path):
    part = tmp_path / "part.jsonl"
    part.write_text("\n".join(small_corpus.read_text().splitlines()[:50]) + "\n")
    run_script("data_prep/tokenize_corpus.py", "--input", str(part), "--tokenizer", str(token_dir / "tokenizer.model"),
               "--output", str(tmp_path / "noval"), "--val-fraction", "0")
    with pytest.raises(DataError, match="has 0 val tokens.*larger --val-fraction"):
        run_continual(small_cfg(domains[0], tmp_path / "unused"), [domains[0], tmp_path / "noval"], 2,
                      tmp_path / "run")
    assert not (tmp_path / "run" / "phase_1").exists()  # refused before any training


def test_mixture_config_refused(domains, tmp_path):
    cfg = small_cfg(domains[0], tmp_path / "unused", f"data.sources=[{{dir: {domains[0]}}}]")
    with pytest.raises(ConfigError, match="data.sources is set"):
        run_continual(cfg, domains, 2, tmp_path / "run")


def test_benchmark_topic_rule():
    import importlib.util

    spec = importlib.util.spec_from_file_location("continual_domains", REPO / "benchmarks" / "continual_domains.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.topic("Ada Lovelace\n\nAda King, Countess of Lovelace (1815–1852) was an English mathematician.") \
        == "people"
    assert bench.topic("Jean Sibelius\n\nJean Sibelius was a Finnish composer of the late Romantic period.") == "people"
    assert bench.topic("Samarkand\n\nSamarkand is a major city located in southeastern Uzbekistan.") == "places"
    assert bench.topic("Polymer\n\nA polymer is a substance consisting of very large molecules.") == "general"
