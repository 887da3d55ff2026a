"""Data mixtures (data.sources): the sample order against the spec, world-size independence,
source frequencies, exact resume, per-source validation in a training run, refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from nl.checkpoint import list_checkpoints, load_checkpoint
from nl.config import load_config
from nl.data.mixture import MixtureLoader, data_sources, open_splits
from nl.data.shards import DataError, ShardWriter, TokenShards, write_manifest
from nl.tokenizer import Tokenizer
from nl.trainer import train

T = 8  # seq_len of the loader tests
BASES = (0, 20000, 40000)  # source k's stream is BASES[k], BASES[k]+1, ...: a window names its source


def token_dir_of(root: Path, tokenizer: Path, train_tokens: np.ndarray, val_tokens: np.ndarray | None = None,
                 shard_tokens: int = 100) -> Path:
    root.mkdir()
    splits = {}
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if tokens is not None:
            writer = ShardWriter(root, split, np.dtype("<u2"), shard_tokens)
            writer.write(tokens, num_documents=1)
            splits[split] = writer.close()
    write_manifest(root, Tokenizer(tokenizer), splits)
    return root


@pytest.fixture(scope="module")
def labelled(token_dir, tmp_path_factory) -> list[TokenShards]:
    """Three sources of 30, 11 and 50 windows of T+1 tokens (the second wraps its epoch often)."""
    root = tmp_path_factory.mktemp("mix")
    sizes = (30, 11, 50)
    return [TokenShards(token_dir_of(root / f"s{k}", token_dir / "tokenizer.model",
                                     BASES[k] + np.arange(n * T + 1)))
            for k, n in enumerate(sizes)]


def decode(x: torch.Tensor) -> list[tuple[int, int]]:
    """(source, window) of each row of an input batch."""
    out = []
    for first in x[:, 0].tolist():
        k = max(i for i, b in enumerate(BASES) if first >= b)
        out.append((k, (first - BASES[k]) // T))
    return out


def reference_order(seed: int, weights: list[float], num_windows: list[int], count: int) -> list[tuple[int, int]]:
    """(source, window) of global samples 0..count-1, straight from the equations of nl/data/mixture.py."""
    block = 1 << 16
    cum = np.cumsum(np.asarray(weights, dtype=np.float64) / math.fsum(weights))
    cum[-1] = 1.0
    seen = [0] * len(weights)
    out = []
    for s in range(count):
        u = np.random.default_rng([seed, 1, s // block]).random(block)[s % block]
        k = int(sum(c <= u for c in cum))
        j = seen[k]
        seen[k] += 1
        perm = np.random.default_rng([seed, 2, k, j // num_windows[k]]).permutation(num_windows[k])
        out.append((k, int(perm[j % num_windows[k]])))
    return out


def collect(loader: MixtureLoader, steps: int) -> list[list[tuple[int, int]]]:
    batches = []
    for _ in range(steps):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (loader.local_batch_size, T) and torch.equal(y, x + 1)
        assert torch.equal(x, x[:, :1] + torch.arange(T))  # whole windows of one source
        batches.append(decode(x))
    return batches


def gathered(labelled, weights, world_size: int, steps: int, seed: int = 4, state: dict | None = None):
    """Global batches assembled from `world_size` simulated ranks (optionally resumed from `state`)."""
    ranks = [MixtureLoader(labelled, weights, T, 12, rank=r, world_size=world_size, seed=seed)
             for r in range(world_size)]
    if state is not None:
        for loader in ranks:
            loader.load_state_dict(json.loads(json.dumps(state)))  # plain ints/str survive any format
    per_rank = [collect(loader, steps) for loader in ranks]
    assert all(loader.state_dict() == ranks[0].state_dict() for loader in ranks)
    return [sum(parts, []) for parts in zip(*per_rank)], ranks[0]


def test_order_follows_the_spec_and_is_the_same_at_world_size_1_2_4(labelled):
    weights = [0.5, 0.2, 0.3]
    single, _ = gathered(labelled, weights, 1, 10)
    assert sum(single, []) == reference_order(4, weights, [30, 11, 50], 120)
    for world_size in (2, 4):
        assert gathered(labelled, weights, world_size, 10)[0] == single
    # Every source runs through a permutation of its windows per epoch.
    source1 = [w for k, w in sum(single, []) if k == 1]
    assert len(source1) > 22 and sorted(source1[:11]) == sorted(source1[11:22]) == list(range(11))
    # Weights are relative: scaling them keeps the order; another seed changes it.
    assert gathered(labelled, [5.0, 2.0, 3.0], 1, 10)[0] == single
    assert gathered(labelled, weights, 1, 10, seed=5)[0] != single


def test_source_frequencies_match_the_weights(labelled):
    weights = [0.6, 0.1, 0.3]
    loader = MixtureLoader(labelled, weights, T, 12, seed=1)
    n = 300_000  # > 4 draw blocks
    freq = np.bincount(loader.source_ids(0, n), minlength=3) / n
    p = np.asarray(weights)
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n)), freq
    # Batches follow the same draws; the per-source counts are recounted exactly on resume.
    batches = collect(loader, 50)
    counts = np.bincount([k for b in batches for k, _ in b], minlength=3)
    assert counts.tolist() == loader.windows_seen.tolist() == np.bincount(loader.source_ids(0, 600)).tolist()
    assert np.all(np.abs(counts / 600 - p) < 5 * np.sqrt(p * (1 - p) / 600))


def test_resume_is_exact_mid_epoch_and_at_another_world_size(labelled):
    weights = [0.5, 0.2, 0.3]
    ref, _ = gathered(labelled, weights, 1, 9)
    # 3 steps at world size 2 (36 samples: every source mid-epoch), then world size 1, then 4.
    first, at2 = gathered(labelled, weights, 2, 3)
    assert first == ref[:3]
    state = at2.state_dict()
    assert set(state) == {"seed", "samples_seen", "seq_len", "fingerprint"} and state["samples_seen"] == 36
    then, at1 = gathered(labelled, weights, 1, 3, state=state)
    assert then == ref[3:6]
    last, _ = gathered(labelled, weights, 4, 3, state=at1.state_dict())
    assert last == ref[6:9]

    with pytest.raises(DataError, match="does not match the mixture .*resume with the same data.sources"):
        MixtureLoader(labelled, [0.4, 0.3, 0.3], T, 12, seed=4).load_state_dict(state)
    with pytest.raises(DataError, match="does not match the mixture"):
        MixtureLoader(labelled[:2], [0.5, 0.2], T, 12, seed=4).load_state_dict(state)
    with pytest.raises(DataError, match="seed 4, this run has 3"):
        MixtureLoader(labelled, weights, T, 12, seed=3).load_state_dict(state)


def test_refusals_name_the_fix(labelled, token_dir, tmp_path):
    def sources(*overrides: str):
        return data_sources(load_config("configs/tiny.yaml", list(overrides)).data)

    a, b = str(labelled[0].dir), str(labelled[1].dir)
    both = f"data.sources=[{{dir: {a}, weight: 0.7}}, {{dir: {b}, weight: 0.3}}]"
    assert [(s.name, s.weight) for s in sources(both)] == [("s0", 0.7), ("s1", 0.3)]
    assert [s.name for s in sources(both, "data.dir=''")] == ["s0", "s1"]
    assert sources() == []  # data.dir alone
    cases = [
        ((f"data.dir={token_dir}", both), "data.dir=.* and data.sources are both set: .*set data.dir to ''"),
        ((f"data.sources=[{{dir: {a}, weight: 0.0}}]",), r"data.sources\[0\] .* has weight 0.0: .* > 0"),
        ((f"data.sources=[{{dir: {a}}}, {{dir: {b}, weight: -1}}]",), r"data.sources\[1\] .* has weight -1.0"),
        ((f"data.sources=[{{dir: {a}, weight: .nan}}]",), "has weight nan"),
        (("data.sources=[{weight: 1.0}]",), r"data.sources\[0\] has no dir"),
        ((f"data.sources=[{{dir: {a}}}, {{dir: {b}, name: s0}}]",),
         "2 sources are named 's0'.*give each a distinct name"),
    ]
    for overrides, message in cases:
        with pytest.raises(DataError, match=message):
            sources(*overrides)
    with pytest.raises(DataError, match="weight must be a finite number > 0"):
        MixtureLoader(labelled[:2], [1.0, 0.0], T, 12)

    # Another tokenizer: the manifest names another fingerprint.
    other = tmp_path / "other"
    shutil.copytree(labelled[1].dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "f" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config("configs/tiny.yaml", [f"data.sources=[{{dir: {a}}}, {{dir: {other}}}]", "data.dir=''"])
    with pytest.raises(DataError, match="other was tokenized with another tokenizer .* re-tokenize it with"):
        open_splits(data_sources(cfg.data), "train")
    with pytest.raises(DataError, match="another tokenizer"):
        MixtureLoader([labelled[0], TokenShards(other)], [1.0, 1.0], T, 12)
    with pytest.raises(DataError, match="both set"):  # train() refuses before any work
        train(load_config("configs/tiny.yaml", [f"data.dir={token_dir}", both, f"run.dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


CYCLE = np.arange(100, 108)  # source "pattern" repeats this cycle: far easier than real text


@pytest.fixture(scope="module")
def pattern_dir(token_dir, tmp_path_factory) -> Path:
    return token_dir_of(tmp_path_factory.mktemp("mixrun") / "pattern", token_dir / "tokenizer.model",
                        np.tile(CYCLE, 2000), np.tile(CYCLE, 200))


def run_overrides(token_dir: Path, pattern_dir: Path, run: Path, steps: int = 20) -> list[str]:
    return ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "data.seq_len=32", "data.dir=''",
            f"data.sources=[{{dir: {token_dir}, weight: 0.7}}, {{dir: {pattern_dir}, weight: 0.3}}]",
            f"train.steps={steps}", "train.batch_size=8", "train.micro_batch_size=2", "train.lr=3e-3",
            "train.warmup_steps=2", "train.log_every=1", f"eval.every={steps // 2}", "eval.max_batches=2",
            f"checkpoint.every={steps // 2}", "checkpoint.keep_last=3", "dist.timeout_s=60", f"run.dir={run}"]


def records(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def crash_after_first_checkpoint(run: Path) -> None:
    shutil.rmtree(list_checkpoints(run)[-1][1])
    (run / "metrics.jsonl").write_text("")


def test_training_logs_val_loss_per_source_and_resumes_exactly(token_dir, pattern_dir, tmp_path):
    run = tmp_path / "run"
    config = load_config("configs/tiny.yaml", run_overrides(token_dir, pattern_dir, run))
    summary = train(config)
    full, full_val = records(run)
    assert [r["step"] for r in full_val] == [10, 20]
    for r in full_val:
        assert set(r) == {"step", "tokens", "val_loss", "val_loss/tokens", "val_loss/pattern"}
        assert r["val_loss"] == pytest.approx(0.7 * r["val_loss/tokens"] + 0.3 * r["val_loss/pattern"], rel=1e-12)
    assert full_val[-1]["val_loss/pattern"] < full_val[-1]["val_loss/tokens"] - 1.0
    assert summary["val_loss"] == full_val[-1]["val_loss"]

    # val_loss/pattern from the final weights, computed here: the first 16 val windows
    # (eval.max_batches=2 global batches of 8), mean token cross-entropy.
    from nl.models import build_model

    model = build_model(config.model)
    state = {"model": model.state_dict()}
    load_checkpoint(list_checkpoints(run)[-1][1], state)
    model.load_state_dict(state["model"])
    stream = torch.from_numpy(np.tile(CYCLE, 200).astype(np.int64))
    windows = torch.stack([stream[i * 32:i * 32 + 33] for i in range(16)])
    with torch.no_grad():
        logits = model.eval()(windows[:, :-1])
    expected = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert full_val[-1]["val_loss/pattern"] == pytest.approx(expected.item(), rel=1e-5)

    # Crash after the step-10 checkpoint, rerun: the same losses bit for bit.
    crash_after_first_checkpoint(run)
    train(load_config("configs/tiny.yaml", run_overrides(token_dir, pattern_dir, run)))
    resumed, resumed_val = records(run)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[10:]]
    assert resumed_val == full_val[1:]


@pytest.mark.slow  # ~25 s: a 2-rank launch and two single-process runs
def test_two_ranks_equal_one_and_their_checkpoint_resumes_at_world_size_1(token_dir, pattern_dir, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    proc = subprocess.run(["bash", "launch/torchrun.sh", "2", "--config", "configs/tiny.yaml",
                           *run_overrides(token_dir, pattern_dir, two, steps=10), "dist.strategy=ddp"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(load_config("configs/tiny.yaml", run_overrides(token_dir, pattern_dir, one, steps=10)))
    (loss2, val2), (loss1, val1) = records(two), records(one)
    np.testing.assert_allclose([r["loss"] for r in loss2], [r["loss"] for r in loss1], rtol=1e-5)
    for a, b in zip(val2, val1):
        assert set(a) == set(b) and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)

    crash_after_first_checkpoint(two)  # the 2-rank run's step-5 checkpoint, continued by one process
    train(load_config("configs/tiny.yaml", run_overrides(token_dir, pattern_dir, two, steps=10)))
    np.testing.assert_allclose([r["loss"] for r in records(two)[0]], [r["loss"] for r in loss1[5:]], rtol=1e-5)
