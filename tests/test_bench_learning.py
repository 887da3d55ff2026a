"""benchmarks/bench_learning.py: the dry run writes a table with one row per variant, and the
per-position loss equals a hand computation on a small fixed model."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from torch import nn

from conftest import REPO, run_script

_spec = importlib.util.spec_from_file_location("bench_learning", REPO / "benchmarks/bench_learning.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


class PrefixCountModel(nn.Module):
    """logits[b, t, :] = table[x_t] + counts of each token in x_0..x_t, times `scale`.

    The prediction at t depends on the whole prefix, so a per-position loss that mixed up
    positions or did not read each sequence from its start would differ from the hand value."""

    def __init__(self, table: torch.Tensor, scale: float):
        super().__init__()
        self.table, self.scale = table, scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        counts = nn.functional.one_hot(ids, self.table.shape[0]).cumsum(1).float()
        return self.table[ids] + self.scale * counts


def test_per_position_loss_equals_hand_computation():
    table = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5], [-2.0, 1.0, 0.25]])
    seqs = [[0, 1, 2, 1, 1], [2, 2, 0, 1, 0], [1, 0, 0, 2, 2]]
    model = PrefixCountModel(table, scale=0.7).train()

    got = bench.per_position_loss(model, torch.tensor(seqs), batch_size=2)  # batches of 2 and 1

    expected = []
    for t in range(4):
        nlls = []
        for s in seqs:
            counts = [s[:t + 1].count(j) for j in range(3)]
            logits = [float(table[s[t], j]) + 0.7 * counts[j] for j in range(3)]
            log_z = math.log(sum(math.exp(v) for v in logits))
            nlls.append(log_z - logits[s[t + 1]])
        expected.append(sum(nlls) / len(nlls))
    assert got.dtype == torch.float64 and got.shape == (4,)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert model.training  # mode restored


def test_bucket_means():
    assert bench.bucket_means([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.5, 3.5, 5.0]


def test_unknown_variant_is_refused_with_the_choices(token_dir, capsys):
    with pytest.raises(SystemExit, match="unknown variant.*built in: transformer, hope"):
        bench.main(["--variants", "hope-nope", "--data", str(token_dir), "--out", "/tmp/unused-bench-out"])


def test_dry_run_table_has_every_variant_at_matched_parameters(token_dir, tmp_path):
    proc = run_script("benchmarks/bench_learning.py", "--dry-run", "--data", str(token_dir), "--out", str(tmp_path))

    table = (tmp_path / "results.md").read_text()
    assert table in proc.stdout
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) == {"variant", "transformer", "hope"}
    results = {r["variant"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert abs(results["transformer"]["params"] / results["hope"]["params"] - 1) < 0.05
    for r in results.values():
        assert r["seeds"] == [0]
        assert len(r["per_position"]) == 4 * 32 and len(r["buckets"]) == 4  # 4 x seq_len, buckets of seq_len
        assert all(math.isfinite(v) for v in [r["val_loss"], *r["buckets"]])
    for png in ("val_loss.png", "per_position.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_diverged_run_is_named_in_the_table_and_left_out_of_the_mean():
    ok = {"variant": "a", "seed": 0, "params": 1000, "val_loss": 5.0, "per_position": [4.0, 6.0, 5.0, 7.0],
          "tokens_per_s": 10.0, "val_curve": [[1, 6.0], [2, 5.5]]}
    results = [ok, {"variant": "a", "seed": 1, "params": 1000, "diverged": "non-finite loss at step 7"},
               {"variant": "b", "seed": 0, "params": 1000, "diverged": "non-finite loss at step 3"}]
    rows = bench.summarise(results, ["a", "b"], seq_len=2)
    assert rows[0]["seeds"] == [0] and rows[0]["val_loss"] == 5.0 and rows[0]["buckets"] == [5.0, 6.0]
    lines = bench.markdown_table(rows, 2).splitlines()
    assert lines[2].startswith("| a | 0.001M | 0 (seed 1: non-finite loss at step 7) | 5.0000 ± 0.0000 | 5.0000 | 6.0000 | 1.200 |")
    assert lines[3] == "| b | 0.001M | (seed 0: non-finite loss at step 3) | - | - | - | - | - |"


def test_variants_with_the_same_config_share_runs_and_take_their_own_seeds():
    variants = {"hope": bench.VARIANTS["hope"], "hope-same": ("hope", ("model.hope.momentum=false",)),
                "hope-momentum": bench.VARIANTS["hope-momentum"]}
    common = ["model.vocab_size=256", "model.n_layers=1", "model.dim=32", "model.n_heads=2"]
    runs = bench.plan_runs(variants, [0, 1], common, 0.02, {"hope-same": [1, 5], "hope-momentum": [2]})
    plan = [(r["variant"], r["seed"], r["same_as"]) for r in runs]
    assert plan == [("hope", 0, None), ("hope", 1, None), ("hope-same", 1, "hope"), ("hope-same", 5, None),
                    ("hope-momentum", 2, None)]
