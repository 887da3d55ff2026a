"""The Titans baseline's gradient step stays contractive at chunk size > 1 (issue 11).

mixer=titans takes a plain gradient step (dgd=false) with momentum, and in the chunk form every gradient of
a chunk of C tokens is taken at the chunk's anchor (Titans' mini-batch step, arXiv 2501.00663 Sec. 3.3).
Along a direction shared by C keys the chunk then steps C times and momentum re-applies the same stale
gradient: at chunk 16 with eta_max 1/3 and mu up to 1 that is not contractive (the learning benchmark's
Titans runs went non-finite). The bound for C, the momentum cap and the refusal are checked here against
references written from the recurrence, not from nl.models.hope.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nl.config import ConfigError, load_config
from nl.models import build_model
from nl.models.hope import chunk_step_limit, contractive_eta_max, recurrence_config
from nl.ops.delta_rule import memory_apply
from nl.ops.titans import RecurrenceConfig, memory_norm, titans_chunked

REPO = Path(__file__).resolve().parents[1]
TITANS = ["model.hope.mixer=titans", "model.hope.dgd=false", "model.hope.momentum=true", "model.hope.cms_chunk_sizes=[1]"]


def titans_cfg(*extra: str):
    return load_config(REPO / "configs/hope_tiny.yaml", ["model.vocab_size=64", *TITANS, *extra])


def spectral_radius_limit(C: int, alpha: float, mu: float) -> float:
    """Largest h with the (e, S) chunk map of one unit-curvature direction stable, from the Jury conditions of
    its 2x2 matrix. Per token S_t = mu S_{t-1} - h e_A, e_t = alpha e_{t-1} + S_t (gradient at the anchor e_A);
    summed over the chunk: e_C = (alpha^C - h A) e_A + B_S S_0, S_C = -h b e_A + mu^C S_0, with
    b = sum_{j<C} mu^j, A = sum_t alpha^(C-t) sum_{j<t} mu^j, B_S = sum_t alpha^(C-t) mu^t."""
    b = sum(mu ** j for j in range(C))
    A = sum(alpha ** (C - t) * sum(mu ** j for j in range(t)) for t in range(1, C + 1))
    B_S = sum(alpha ** (C - t) * mu ** t for t in range(1, C + 1))
    p = mu ** C
    # trace = alpha^C + p - h A, det = alpha^C p + h (b B_S - p A); stable iff |det| <= 1 and |trace| <= 1 + det
    limits = [2.0]
    for lhs, rhs in (((1 + alpha ** C) * (1 + p), A * (1 + p) - b * B_S),   # 1 + trace + det >= 0
                     (1 - alpha ** C * p, b * B_S - p * A),                   # det <= 1
                     (1 + alpha ** C * p, p * A - b * B_S)):                  # det >= -1
        if rhs > 0:
            limits.append(lhs / rhs)
        elif lhs < 0:
            return 0.0
    return min(limits)


@pytest.mark.parametrize("C,retention,momentum_max", [(16, False, 0.0), (16, True, 0.0), (2, True, 0.0),
                                                      (16, False, 0.5), (16, True, 0.5), (4, True, 0.7)])
def test_chunk_step_limit_matches_the_jury_conditions(C, retention, momentum_max):
    alphas = [i / 400 for i in range(401)] if retention else [1.0]
    mus = [momentum_max * i / 100 for i in range(101)]
    expected = min(spectral_radius_limit(C, a, m) for a in alphas for m in mus)
    assert chunk_step_limit(C, retention, momentum_max) == pytest.approx(expected, rel=2e-3)
    if momentum_max == 0 and not retention:
        assert chunk_step_limit(C, retention, momentum_max) == pytest.approx(2 / C)  # C aligned steps: 1 - C h


def test_momentum_up_to_one_leaves_no_contractive_chunk_step():
    assert chunk_step_limit(16, True, 1.0) == 0.0
    assert spectral_radius_limit(16, 1.0, 1.0 - 1e-9) < 1e-6


def test_titans_auto_gates_sit_at_the_chunk_bound():
    rcfg = recurrence_config(titans_cfg().model)
    assert rcfg.momentum_max == 0.5 and rcfg.memory_chunk_size == 16
    assert rcfg.eta_max == pytest.approx(contractive_eta_max(rcfg))
    assert rcfg.eta_max == pytest.approx(min(spectral_radius_limit(16, i / 400, 0.5 * j / 100)
                                             for i in range(401) for j in range(101)), rel=2e-3)
    # chunk 1 is the exact recurrence (Titans Eqs. 11-12 token by token): no cap, the one-token bound min(1/3, 1)
    exact = recurrence_config(titans_cfg("model.hope.memory_chunk_size=1").model)
    assert exact.momentum_max == 1.0 and exact.eta_max == pytest.approx(1 / 3)
    # HOPE (DGD, self target) at chunk 16: its chunk bound, alpha = 1 worst, e_C = (3 (1 - eta)^16 - 2) e_A;
    # no momentum, no cap. With momentum the cap applies with DGD too: mu -> 1 leaves no contractive eta.
    hope = recurrence_config(load_config(REPO / "configs/hope_tiny.yaml", ["model.vocab_size=64"]).model)
    assert hope.eta_max == pytest.approx(1 - 3 ** (-1 / 16), rel=1e-6) and hope.momentum_max == 1.0
    hope_mom = recurrence_config(load_config(REPO / "configs/hope_tiny.yaml", ["model.vocab_size=64",
                                                                               "model.hope.momentum=true"]).model)
    assert hope_mom.momentum_max == 0.5 and hope_mom.eta_max < hope.eta_max
    assert chunk_step_limit(16, True, 1.0, 1.0, 2.0) == 0.0


def test_non_contractive_titans_configs_are_refused():
    with pytest.raises(ConfigError, match=r"eta_max=0.2 .*chunk size 16.*<= 0.0698.*smaller chunk sizes") as e:
        build_model(titans_cfg("model.hope.eta_max=0.2").model)
    assert "normalize_v" not in str(e.value)  # Titans' target is v_t: normalize_v would not lift its bound
    with pytest.raises(ConfigError, match=r"momentum_max=1.0 leaves no contractive eta_max.*momentum_max < 1"):
        build_model(titans_cfg("model.hope.momentum_max=1.0").model)
    with pytest.raises(ConfigError, match=r"eta_max=0.1 .*chunk size 16.*<= 0.0623"):  # HOPE w/o DGD: c_max = 2
        build_model(load_config(REPO / "configs/hope_tiny.yaml", ["model.vocab_size=64", "model.hope.dgd=false",
                                                                  "model.hope.eta_max=0.1"]).model)
    build_model(titans_cfg("model.hope.eta_max=0.05").model)  # below the bound: accepted


def adversarial_inputs(T: int, d: int = 8, dtype=torch.float64):
    """One head: every key the same unit vector (plus 1e-3 noise), values random, gate logits at +30 so that
    eta = eta_max, alpha = 1 and mu = momentum_max on every token: the worst case of the chunk map."""
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.ones(1, 1, T, d, dtype=dtype) + 1e-3 * torch.randn(1, 1, T, d, generator=g,
                                                                                              dtype=dtype), dim=-1)
    static = {"q": torch.randn(1, 1, T, d, generator=g, dtype=dtype), "k": k,
              "v": torch.randn(1, 1, T, d, generator=g, dtype=dtype),
              **{n: torch.full((1, 1, T), 30.0, dtype=dtype) for n in ("eta", "alpha", "mu")}}
    return static


@pytest.mark.parametrize("memory_type", ["linear", "mlp"])
def test_titans_memory_stays_bounded_over_a_long_sequence_of_similar_keys(memory_type):
    """At the auto gates (chunk 16) 4,096 tokens of near-identical keys leave the memory bounded; the old
    gates (eta_max 1/3, mu up to 1) blow up on the same input."""
    d, T = 8, 4096
    static = adversarial_inputs(T, d)
    g = torch.Generator().manual_seed(1)
    states = {"memory": (torch.eye(d, dtype=torch.float64)[None],) if memory_type == "linear" else
              (0.1 * torch.randn(1, d, 2 * d, generator=g, dtype=torch.float64),
               torch.randn(1, 2 * d, d, generator=g, dtype=torch.float64) / math.sqrt(2 * d))}
    auto = recurrence_config(titans_cfg().model)
    old = RecurrenceConfig(16, 16, 1 / 3, dgd=False, momentum=True, retention=True, retention_target="zero",
                           target="value", normalized_step=False)
    norms = {}
    for name, cfg in (("auto", auto), ("old", old)):
        with torch.no_grad():
            _, rec = titans_chunked(None, static, states, {}, cfg, trace=True)
        norms[name] = rec.stats["norm/memory"].max().item()
    start = memory_norm(states["memory"]).item()
    target_scale = static["v"].norm(dim=-1).max().item()  # the memory regresses onto v: its norm may reach ~|v|
    assert math.isfinite(norms["auto"]) and norms["auto"] < 10 * (start + target_scale), norms
    assert not math.isfinite(norms["old"]) or norms["old"] > 1e6, norms


def test_momentum_max_scales_mu_in_titans_eqs_11_12():
    """Titans Eq. 11 with the capped surprise decay mu_t = momentum_max * sigmoid(.), token by token (chunk 1),
    written from the equations with autograd gradients."""
    T, d = 12, 4
    g = torch.Generator().manual_seed(3)
    static = {n: torch.randn(2, 2, T, d, generator=g, dtype=torch.float64) for n in ("q", "k", "v")}
    static.update({n: torch.randn(2, 2, T, generator=g, dtype=torch.float64) for n in ("eta", "alpha", "mu")})
    W0 = torch.eye(d, dtype=torch.float64).repeat(2, 1, 1) + 0.1 * torch.randn(2, d, d, generator=g, dtype=torch.float64)
    cfg = RecurrenceConfig(1, 1, 0.5, dgd=False, momentum=True, retention=True, retention_target="zero",
                           target="value", normalized_step=False, momentum_max=0.3)
    with torch.no_grad():
        o, _ = titans_chunked(None, static, {"memory": (W0,)}, {}, cfg)
    unit = lambda x: x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    M, S, outs = W0.expand(2, 2, d, d).clone(), torch.zeros(2, 2, d, d, dtype=torch.float64), []
    for t in range(T):
        q, k, v = unit(static["q"][:, :, t]), unit(static["k"][:, :, t]), static["v"][:, :, t]
        outs.append(torch.einsum("bhoi,bhi->bho", M, q))
        grad = torch.func.grad(lambda W: 0.5 * (torch.einsum("bhoi,bhi->bho", W, k) - v).pow(2).sum())(M)
        mu = 0.3 * torch.sigmoid(static["mu"][:, :, t])[..., None, None]
        S = mu * S - 0.5 * torch.sigmoid(static["eta"][:, :, t])[..., None, None] * grad
        M = torch.sigmoid(static["alpha"][:, :, t])[..., None, None] * M + S
    assert (o - torch.stack(outs, dim=2)).abs().max() < 1e-12


@pytest.mark.slow
def test_titans_benchmark_config_trains_past_the_old_divergence(tmp_path):
    """The learning benchmark's Titans run (2 blocks, batch 4, seq 128, 100 steps at lr 1e-3, seed 0) went
    non-finite at step 25 before the chunk bound; it now trains all 100 steps (~1-2 min on 2 CPU cores)."""
    data = REPO / "data/demo/tokens"
    if not (data / "manifest.json").is_file():
        pytest.skip("needs the demo corpus: python data_prep/prepare_demo.py --root data/demo")
    from nl.trainer import train
    cfg = load_config(REPO / "configs/hope_tiny.yaml", [
        f"data.dir={data}", "data.seq_len=128", "train.steps=100", "train.seed=0", "train.device=cpu",
        "train.log_every=5", "eval.every=1000", "checkpoint.every=0", "wandb.enabled=false", f"run.dir={tmp_path}",
        "model.n_layers=2", "train.batch_size=4", "train.micro_batch_size=0", "train.warmup_steps=10",
        "model.hope.cms_hidden=504", *TITANS])
    summary = train(cfg)
    assert summary["step"] == 100 and summary["loss"] is not None and summary["loss"] < 7.5
