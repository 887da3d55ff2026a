"""The read-out memory on fla's chunk_gated_delta_rule (nl/ops/fla_dispatch.py) == our chunk path, outputs,
end state and every input's gradient, in fp32. Without CUDA fla's kernels run under Triton's interpreter
(TRITON_INTERPRET=1, set here before triton imports); its two gaps are bridged here, in test code:
`@triton.autotune` benchmarks on a GPU driver (one config is kept) and loop induction variables are
Python ints (fla calls `.to()` on them: they get a no-op `.to`)."""

from __future__ import annotations

import builtins
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit decorates: before triton imports
pytest.importorskip("triton")
pytest.importorskip("fla.ops.gated_delta_rule", reason="fla-core is optional (pip install fla-core)")

from nl.ops import fla_dispatch, titans  # noqa: E402
from nl.ops.titans import RecurrenceConfig, titans_chunked  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


class _InductionVar(int):
    """A loop counter of an interpreted kernel: compiled Triton gives a tensor, the interpreter an int."""

    def to(self, *args, **kwargs):
        return self


def _int_range(*args):
    return map(_InductionVar, builtins.range(*args))


@pytest.fixture
def fla_on_this_device(monkeypatch):
    """fla dispatch allowed on this device; under the interpreter, one autotune config per fla kernel and
    range() in fla's modules yielding counters with .to()."""
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setattr(fla_dispatch, "DEVICES", (DEVICE,))
    if INTERPRETED:
        for name, module in list(sys.modules.items()):
            if not name.startswith("fla.") or module is None:
                continue
            monkeypatch.setattr(module, "range", _int_range, raising=False)
            for obj in list(vars(module).values()):
                while hasattr(obj, "fn"):  # heuristics / autotune wrappers around the jitted kernel
                    if isinstance(obj, Autotuner) and len(obj.configs) > 1:
                        monkeypatch.setattr(obj, "configs", obj.configs[:1])
                    obj = obj.fn


def titans_inputs(B=1, H=2, T=70, d=8, seed=0):
    """Titans baseline inputs: static q, k, v [B, H, T, d], eta and alpha logits [B, H, T], a linear
    memory's initial state [H, d, d] (near the identity); all leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    static = {"q": torch.randn(B, H, T, d, generator=g), "k": torch.randn(B, H, T, d, generator=g),
              "v": torch.randn(B, H, T, d, generator=g) * 0.5,
              "eta": torch.randn(B, H, T, generator=g) - 1.0, "alpha": torch.randn(B, H, T, generator=g) + 3.0}
    W = torch.eye(d).expand(H, d, d) + 0.1 * torch.randn(H, d, d, generator=g)
    leaves = {**static, "W": W}
    return {n: t.to(DEVICE).requires_grad_() for n, t in leaves.items()}


def run(leaves: dict, cfg: RecurrenceConfig):
    static = {n: leaves[n] for n in ("q", "k", "v", "eta", "alpha")}
    o, state = titans_chunked(None, static, {"memory": (leaves["W"],)}, {}, cfg)
    S = state.cur["memory"][0]
    torch.manual_seed(1)
    # S_T enters the loss too: its gradient path is checked
    ((o * torch.randn_like(o)).sum() + (S * torch.randn_like(S)).sum()).backward()
    grads = {n: t.grad.clone() for n, t in leaves.items()}
    for t in leaves.values():
        t.grad = None
    return o.detach(), S.detach(), grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dgd, retention_target", [(False, "zero"), (True, "init")])
def test_fla_path_equals_our_chunk_path(fla_on_this_device, monkeypatch, dgd, retention_target):
    """T = 70 spans two of fla's 64-token chunks; the Titans baseline literally (no DGD, forgetting toward
    zero) and with DGD's decay and retention toward M_0 (both mappings of fla_dispatch's docstring)."""
    calls = []
    monkeypatch.setattr(titans, "titans_memory_fla", lambda *a: calls.append(1) or fla_dispatch.titans_memory_fla(*a))
    leaves = titans_inputs()
    base = dict(chunk_size=1, memory_chunk_size=1, eta_max=0.5, dgd=dgd, momentum=False, retention=True,
                retention_target=retention_target, target="value")
    ours = run(leaves, RecurrenceConfig(**base, kernel="torch"))
    assert not calls
    fla = run(leaves, RecurrenceConfig(**base, kernel="auto"))
    assert calls == [1]
    assert rel(fla[0], ours[0]) < 1e-5 and rel(fla[1], ours[1]) < 1e-5
    for name, g in ours[2].items():
        assert g.abs().sum() > 0, name
        assert rel(fla[2][name], g) < 1e-5, (name, rel(fla[2][name], g))


@pytest.mark.parametrize("change, reason", [
    ({"target": "self"}, "target=self"), ({"momentum": True}, "momentum"),
    ({"memory_chunk_size": 4}, "memory_chunk_size=4")])
def test_variants_that_are_not_a_gated_delta_rule_stay_on_our_path(change, reason):
    cfg = dict(chunk_size=1, memory_chunk_size=1, dgd=False, momentum=False, target="value", kernel="auto")
    cfg.update(change)
    assert reason in fla_dispatch.fla_unsupported(RecurrenceConfig(**cfg), 1)
    ok = RecurrenceConfig(chunk_size=1, memory_chunk_size=1, momentum=False, target="value", kernel="auto")
    assert fla_dispatch.fla_unsupported(ok, 1) is None
    assert "memory_type=mlp" in fla_dispatch.fla_unsupported(ok, 2)
    assert "traces" in fla_dispatch.fla_unsupported(ok, 1, trace=True)
    # kernel=torch, or a device fla does not run on, keep our path
    assert not fla_dispatch.use_fla(RecurrenceConfig(**{**cfg, **{"target": "value", "momentum": False,
                                                                   "memory_chunk_size": 1, "kernel": "torch"}}),
                                    1, torch.device("cuda"), False)
    assert not fla_dispatch.use_fla(ok, 1, torch.device("cpu"), False)
