"""benchmarks/bench_memory.py (the activation-byte measurement and the sizing estimate) and
benchmarks/bench_gpu.py (its --dry-run and the device peak table)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench_memory = _load("bench_memory")
bench_gpu = _load("bench_gpu")


# ---------------------------------------------------------------- bench_memory: the measurement

def test_kept_bytes_equals_hand_count_linear_silu():
    """Linear(d_in -> d_out) then SiLU at [B, T]: autograd keeps the Linear's input (for the weight
    gradient) and the SiLU's input (its derivative needs it): 4 B (T d_in + T d_out) bytes in fp32.
    The weight is a parameter, the SiLU output is the layer's output: neither counts."""
    B, T, d_in, d_out = 3, 5, 7, 11
    lin = nn.Linear(d_in, d_out)
    x0 = torch.randn(B, T, d_in, requires_grad=True)

    def run():
        return F.silu(lin(x0 * 1.0))

    hand = 4 * B * T * (d_in + d_out)
    kept = bench_memory.kept_bytes(run, [*lin.parameters(), x0])
    assert kept == {torch.float32: hand}
    assert bench_memory.saved_tensor_bytes(run, [*lin.parameters(), x0]) == hand


def test_kept_bytes_relu_keeps_only_the_input():
    """ReLU saves its output, which is the layer's output: only the Linear's input is kept (4 B T d_in)."""
    B, T, d_in, d_out = 2, 3, 4, 6
    lin = nn.Linear(d_in, d_out, bias=False)
    x0 = torch.randn(B, T, d_in, requires_grad=True)
    kept = bench_memory.kept_bytes(lambda: torch.relu(lin(x0 * 1.0)), [lin.weight, x0])
    assert kept == {torch.float32: 4 * B * T * d_in}


def test_kept_bytes_sees_tensors_held_by_checkpoint_closures():
    """torch.utils.checkpoint saves its tensor arguments as saved tensors, but a tuple argument only
    through the recompute closure: the hooks miss it, the liveness count does not."""
    n = 10
    x0 = torch.randn(n, requires_grad=True)

    def run():
        a, s = x0 * 2.0, x0 * 3.0  # two new storages of n floats
        return torch.utils.checkpoint.checkpoint(lambda a, st: a * st[0], a, (s,), use_reentrant=False)

    assert bench_memory.kept_bytes(run, [x0]) == {torch.float32: 2 * 4 * n}
    assert bench_memory.saved_tensor_bytes(run, [x0]) == 4 * n


def _tiny(arch: str, **hope):
    from nl.config import HopeConfig, ModelConfig

    return ModelConfig(arch=arch, vocab_size=64, dim=32, n_layers=2, n_heads=2,
                       hope=HopeConfig(chunk_size=8, memory_chunk_size=8, memory_hidden=8, cms_hidden=32,
                                       cms_chunk_sizes=[1, 4], **hope))


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("arch, hope", [("transformer", {}), ("hope", {}), ("hope", {"recompute_chunks": False}),
                                        ("hope", {"mixer": "titans", "dgd": False, "momentum": True})])
def test_fake_tensors_keep_the_same_bytes_as_real_ones(arch, hope, bf16):
    """--fake measures on FakeTensorMode: the same bytes, by dtype, as real CPU tensors (AC off and on)."""
    cfg = _tiny(arch, **hope)
    for ac in (False, True):
        real = bench_memory.block_bytes(cfg, 2, 24, bf16, ac)[0]
        with bench_memory._fake_mode():
            fake = bench_memory.block_bytes(cfg, 2, 24, bf16, ac)[0]
        assert fake == real and sum(real.values()) > 0


def test_fit_predicts_an_unmeasured_shape():
    """The fit from B = 2, 3 and T = 16, 32 predicts the bytes at B = 5, T = 48 exactly (HOPE, with its
    per-chunk states), and per_token is flat over the T pairs."""
    cfg = _tiny("hope")

    def measure(B, T):
        return sum(bench_memory.block_bytes(cfg, B, T, False, False)[0].values())

    f = bench_memory.fit(measure, [16, 32, 40])
    assert f.flat_spread == pytest.approx(0.0, abs=1e-12)
    assert f(5, 48) == pytest.approx(measure(5, 48), rel=1e-12)


def test_estimate_and_largest_fitting_micro_batch():
    """The formula of the docstring on made-up fits, and the largest micro-batch under the margin."""
    zero = bench_memory.Fit(0, 0, 0, 0, 0)
    plain = bench_memory.Fit(fixed=1e6, per_position=0, per_seq=0, per_token=1e3, flat_spread=0)
    ac = bench_memory.Fit(fixed=0, per_position=0, per_seq=0, per_token=10, flat_spread=0)
    mem = bench_memory.LayerMemory(plain, ac, zero, {}, 0)
    L, T, V, static = 4, 100, 10, 5e9
    # AC on 2 of 4 blocks, b = 3: 2 plain + 2 checkpointed + 1 working block; logits grads 8 B each.
    hand = static + 3 * (1e6 + 3 * 1e3 * T) + 2 * 3 * 10 * T + 3 * T * V * 8 + 2**30
    assert bench_memory.peak_bytes(static, mem, L, 2, 3, T, V) == pytest.approx(hand)
    est = {1: 10e9, 2: 60e9, 4: 71e9, 8: 73e9}
    assert bench_memory.largest_fitting(est.__getitem__, 80, 0.1, [1, 2, 4, 8]) == 4  # 71 <= 72 < 73
    assert bench_memory.largest_fitting(est.__getitem__, 10, 0.1, [1, 2, 4, 8]) == 0
    assert bench_memory.ac_modes(24, 5) == [("none", 0), ("full", 24), ("every_5", 5)]


def test_bench_memory_runs_on_a_tiny_preset(capsys):
    bench_memory.main(["--presets", str(ROOT / "configs/hope_tiny.yaml"), "--variants", "hope",
                       "--set", "model.vocab_size=64", "model.dim=32", "model.n_heads=2", "model.n_layers=2",
                       "model.hope.cms_hidden=32", "--seq-lens", "16", "32", "--fake", "--micro-batches", "1", "2"])
    out = capsys.readouterr().out
    assert "| on | full |" in out and "| off | every_2 |" in out and "ESTIMATE" in out


# ---------------------------------------------------------------- bench_gpu

@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM5
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce RTX 4090", 165.0),
    ("NVIDIA GeForce GTX 1080", None),
])
def test_peak_table_lookup(name, tflops):
    """Dense bf16 peaks from the vendors' datasheets (half their sparse figures)."""
    assert bench_gpu.peak_bf16_tflops(name) == tflops


def test_bench_gpu_dry_run(capsys):
    rows = bench_gpu.main(["--dry-run", "--presets", str(ROOT / "configs/hope_340m.yaml"),
                           str(ROOT / "configs/transformer_340m.yaml"), "--compile", "off", "--kernels", "torch"])
    out = capsys.readouterr().out
    assert {(r["preset"], r["ac"]) for r in rows} == {(p, a) for p in ("hope_340m", "transformer_340m")
                                                     for a in ("none", "full")}
    for r in rows:
        assert r["error"] is None and r["micro_batch"] == 2 and r["tokens_per_s"] > 0
        assert r["mfu"] is None and r["peak_gb"] is None  # no CUDA: no peak FLOP/s, no allocator stats
    assert "| hope_340m |" in out and "tokens/s" in out


@pytest.mark.slow
@pytest.mark.parametrize("preset", [f"{a}_{s}" for a in ("hope", "transformer") for s in ("340m", "760m", "1.3b")])
def test_presets_fit_80gb_with_margin(preset):
    """Each 340m-1.3b preset, as configured (micro-batch, AC, recompute_chunks, bf16), is estimated to
    fit 90% of an 80 GB card on one GPU; the HOPE presets also with every activation in fp32 (the
    headroom kept for the inner recurrence moving to fp32 under autocast)."""
    path = str(ROOT / "configs" / f"{preset}.yaml")
    assert bench_memory.preset_peak(path) <= 0.9 * 80e9
    if preset.startswith("hope"):
        assert bench_memory.preset_peak(path, ["train.precision=fp32"]) <= 0.9 * 80e9


def test_bench_gpu_row_of_a_failing_configuration(capsys, monkeypatch):
    """An error in one configuration (e.g. a backward that fails under bf16) is printed in its row;
    the other rows still run."""
    real_step = bench_gpu._Run.step

    def step(self, b):
        if self.cfg.dist.activation_checkpointing == "full":
            raise RuntimeError("expected m1 and m2 to have the same dtype\nmore")
        real_step(self, b)

    monkeypatch.setattr(bench_gpu._Run, "step", step)
    rows = bench_gpu.main(["--dry-run", "--presets", str(ROOT / "configs/transformer_340m.yaml"),
                           "--compile", "off", "--kernels", "torch"])
    assert [r["error"] for r in rows] == [None, "RuntimeError: expected m1 and m2 to have the same dtype"]
    assert rows[0]["tokens_per_s"] > 0
    assert "| full | off | torch | failed: RuntimeError: expected m1 and m2" in capsys.readouterr().out


def test_bench_budget_mixer_mode_times_both_trees_in_one_process():
    """bench_budget --mixer imports each tree's nl in turn in one process (here this tree twice, as now and as
    base) and prints the min and median ratio row; run as a subprocess so its module swapping stays out of
    this test process."""
    import subprocess
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_budget.py"), "--base", str(ROOT), "--mixer",
                          "--seq-len", "16", "--batch", "1", "--rounds", "2"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    row = out.stdout.strip().splitlines()[-1].split("|")
    assert [c.strip() for c in row[1:4]] == ["16", "1", "2"], out.stdout
    now_over_base = float(row[6])
    assert 0 < now_over_base < 10, out.stdout


def test_gpu_session_runs_every_step_and_writes_a_summary(tmp_path):
    """benchmarks/gpu_session.sh with a stand-in for python that records its arguments and fails the kernel
    tests: every step still runs, each logs to OUT, the summary gives each step's exit status, the kernel tests
    are the Triton ones, and every bench_gpu.py call parses with bench_gpu's own arguments and names presets
    that exist."""
    import os
    import subprocess
    calls, stub = tmp_path / "calls.txt", tmp_path / "python"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{calls}"\ncase "$*" in *test_triton_kernels*) exit 3;; esac\n')
    stub.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), str(out)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": str(stub)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = ["versions", "kernel_tests", "transformer_340m", "hope_340m_torch", "warm_triton", "hope_tiny_kernels"]
    summary = (out / "summary.md").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == [f"- {s}" for s in steps]
    assert "kernel_tests: exit 3 " in summary[1] and all(": exit 0 " in line for line in summary[2:]), summary
    assert all((out / f"{s}.log").exists() for s in steps)
    lines = calls.read_text().splitlines()
    pytest_line = next(line for line in lines if line.startswith("-m pytest"))
    assert pytest_line.endswith("tests/test_triton_kernels.py") and " -k " in pytest_line and " -n 8 " in pytest_line
    bench = [line.split()[1:] for line in lines if line.startswith("benchmarks/bench_gpu.py")]
    assert len(bench) == 4
    # the background warm-up compiles the same tiny Triton configuration the timed step then runs
    tiny_runs = sorted((bench_gpu.parser().parse_args(a) for a in bench if "configs/hope_tiny.yaml" in a),
                       key=lambda a: a.steps)
    warm, tiny = tiny_runs  # the warm-up (one step, started in the background) and the timed run
    assert warm.kernels == ["triton"] and warm.presets == tiny.presets and warm.max_micro_batch == tiny.max_micro_batch
    for argv in bench:
        args = bench_gpu.parser().parse_args(argv)
        assert args.compile == ["off"] and all((ROOT / p).exists() for p in args.presets), argv
