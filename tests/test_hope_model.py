"""HOPE model: layer-level chunked == reference (outputs and every parameter's gradient, float64),
causality of every variant, presets' sizes, meta construction, CMS level names, overfitting a
fixed batch, and recurrent decoding == the full forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nl.models.hope  # noqa: F401  (registers arch 'hope' until nl/models/__init__.py imports it)
from nl.config import HopeConfig, ModelConfig, load_config
from nl.models import MODEL_REGISTRY, build_model, count_parameters, flops_per_token, matmul_parameters
from nl.models.hope import SelfModifyingTitans, cms_level_of, restore_after_adaptation
from nl.ops import delta_rule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

VARIANTS = {
    "hope": {},
    "linear_memory": {"memory_type": "linear"},
    "no_dgd": {"dgd": False},
    "no_momentum": {"momentum": False},
    "no_retention": {"retention": False},
    "no_cms": {"cms_chunk_sizes": [1]},
    "static_k": {"static_k": True},
    "static_v": {"static_v": True},
    "adaptive_q": {"adaptive_q": True},
    "hope_attention": {"mixer": "attention"},
    "titans": {"mixer": "titans", "dgd": False, "cms_chunk_sizes": [1]},
    "literal_eq88": {"retention_target": "zero", "normalized_step": False, "normalize_v": False},
    "anchor_read": {"chunk_read": "anchor"},
}


def small(chunk: int = 4, **hope) -> ModelConfig:
    # Inner momentum on in the base: the variants below switch single features off (HopeConfig's
    # default is off; 'no_momentum' covers it).
    hc = dict(chunk_size=chunk, memory_chunk_size=chunk, cms_chunk_sizes=[1, 4], cms_hidden=32, momentum=True)
    hc.update(hope)
    return ModelConfig(arch="hope", vocab_size=64, dim=16, n_layers=2, n_heads=2, hope=HopeConfig(**hc))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------- layer: chunked == reference ---

@pytest.mark.parametrize("memory_type", ["linear", "mlp"])
@pytest.mark.parametrize("chunk", [1, 2, 4, 8, 16])
def test_layer_chunked_equals_reference_in_every_parameter_gradient(memory_type, chunk):
    """The whole SelfModifyingTitans layer (projections, convs, memories' initial states, gate
    readouts, output norm/gate/projection), T = 19, memory chunk != generator chunk."""
    cfg = small(chunk, memory_type=memory_type, memory_chunk_size=max(1, chunk // 2))
    torch.manual_seed(0)
    layer = SelfModifyingTitans(cfg).double()
    layer.init_weights(0.3, 0.3)  # large weights: every path contributes visibly
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    results = []
    for reference in (True, False):
        layer.reference = reference
        layer.zero_grad()
        y = layer(x)
        (y * torch.sin(torch.arange(y.numel(), dtype=torch.float64)).view_as(y)).sum().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (y_ref, g_ref), (y_chk, g_chk) = results
    assert rel(y_chk, y_ref) < 1e-6
    assert len(g_ref) >= 15
    for name in g_ref:
        assert g_ref[name].abs().sum() > 0, f"{name} gets no gradient"
        assert rel(g_chk[name], g_ref[name]) < 1e-6, (name, rel(g_chk[name], g_ref[name]))


# ------------------------------------------------------------------- full model ---------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_causal_for_every_variant(variant):
    """Perturbing token t changes no logit before t (and does change logits from t on)."""
    model = build_model(small(4, **VARIANTS[variant]), seed=0).double()
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))
    t = 6
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 1) % 64
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_build_what_they_say(variant):
    model = build_model(small(4, **VARIANTS[variant]), device="meta")
    names = [n for n, _ in model.named_parameters()]
    mixer = model.layers[0].mixer
    levels = {cms_level_of(n) for n in names} - {None}
    assert levels == set(range(len(model.cms_chunk_sizes)))
    if variant == "hope_attention":
        assert not any("memory_init" in n for n in names)
        return
    gens = set(mixer.generators)
    expected = {"hope": {"k", "v", "eta", "alpha"}, "no_retention": {"k", "v", "eta"},
                "static_k": {"v", "eta", "alpha"}, "static_v": {"k", "eta", "alpha"},
                "adaptive_q": {"q", "k", "v", "eta", "alpha"}, "titans": set()}
    assert gens == expected.get(variant, {"k", "v", "eta", "alpha"})
    assert set(mixer.proj) == ({"q", "k", "v"} - gens) | ({"z"} if gens else set())
    assert ("w_mu" in mixer.readout) == (mixer.rcfg.momentum and bool(gens))
    assert mixer.rcfg.dgd == (variant not in ("no_dgd", "titans"))
    assert len(mixer._layer_shapes()) == (1 if variant == "linear_memory" else 2)


def test_built_on_meta_without_buffers_and_registered():
    assert "hope" in MODEL_REGISTRY
    model = build_model(small(), device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert list(model.buffers()) == []
    model = build_model(small(), seed=3)
    again = build_model(small(), seed=3)
    for (n, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q), n


def test_cms_levels_are_named_and_grouped():
    model = build_model(small(cms_chunk_sizes=[1, 4, 16]), device="meta")
    assert cms_level_of("layers.3.cms.levels.1.mlp.w1.weight") == 1
    assert cms_level_of("_orig_mod.layers.0.cms.levels.2.norm.weight") == 2
    assert cms_level_of("layers.0.mixer.wo.weight") is None
    groups = model.cms_level_params()
    assert sorted(groups, key=lambda k: -1 if k is None else k) == [None, 0, 1, 2]
    assert len(groups[1]) == 2 * 4  # per block: norm, w1, w2, w3
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    assert model.cms_chunk_sizes == [1, 4, 16]


@pytest.mark.parametrize("name,target", [("340m", 340e6), ("760m", 760e6), ("1.3b", 1.3e9)])
def test_presets_count_within_5_percent(name, target):
    cfg = load_config(CONFIGS / f"hope_{name}.yaml")
    assert cfg.model.arch == "hope"
    n = count_parameters(build_model(cfg.model, device="meta"))
    assert abs(n / target - 1) < 0.05, n


def test_tiny_preset_builds_and_runs():
    cfg = load_config(CONFIGS / "hope_tiny.yaml", ["model.vocab_size=256"])
    model = build_model(cfg.model, seed=0)
    logits = model(torch.randint(0, 256, (1, 40)))
    assert logits.shape == (1, 40, 256) and logits.dtype == torch.float32


def test_tiny_hope_overfits_a_fixed_batch():
    cfg = load_config(CONFIGS / "hope_tiny.yaml", ["model.vocab_size=128", "model.dim=64", "model.n_layers=2"])
    model = build_model(cfg.model, seed=0)
    ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.5  # ~ln(128) = 4.85 at init
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------- inference ----------

@pytest.mark.parametrize("variant", ["hope", "linear_memory", "no_momentum", "adaptive_q", "titans"])
def test_incremental_decoding_equals_full_forward(variant):
    """Prefill (chunked) 7 tokens, then step token by token across several chunk boundaries."""
    model = build_model(small(4, **VARIANTS[variant]), seed=0).double()
    ids = torch.randint(0, 64, (2, 18), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
    logits, states = model.prefill(ids[:, :7])
    assert rel(logits, full[:, :7]) < 1e-10
    for t in range(7, 18):
        step_logits, states = model.step(ids[:, t], states)
        assert rel(step_logits, full[:, t]) < 1e-9, t
    # the state has constant size: it does not grow with the context
    sizes = [sum(w.numel() for m in s.rec.cur.values() for w in m) for s in states]
    _, states_long = model.prefill(ids)
    assert sizes == [sum(w.numel() for m in s.rec.cur.values() for w in m) for s in states_long]


def test_generate_greedy_matches_argmax_of_forward():
    model = build_model(small(4), seed=0)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        for t in range(5, 11):
            assert torch.equal(model(out[:, :t])[:, -1].argmax(-1), out[:, t])
    sampled = model.generate(prompt, 4, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 9)


def test_hope_attention_refuses_recurrent_decoding():
    model = build_model(small(4, mixer="attention"), seed=0)
    with pytest.raises(RuntimeError, match="KV cache"):
        model.prefill(torch.zeros(1, 3, dtype=torch.long))


def test_restore_after_adaptation_undoes_weight_updates():
    model = build_model(small(4), seed=0)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with restore_after_adaptation(model):
        model.train()
        model.layers[0].mixer.memory_init["memory_0"].requires_grad_(False)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        assert not torch.equal(model.output.weight, before["output.weight"])
    assert not model.training and all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sequence_shorter_than_one_chunk():
    """Regression: T <= chunk size (a single chunk) used to index the generators' anchor wrongly."""
    import torch
    from nl.config import load_config
    from nl.models import build_model

    cfg = load_config("configs/hope_tiny.yaml", ["model.vocab_size=50", "model.dim=32", "model.n_heads=2",
                                                 "model.n_layers=1", "model.hope.chunk_size=64",
                                                 "model.hope.memory_chunk_size=64"]).model
    model = build_model(cfg, seed=0)
    x = torch.randint(0, 50, (3, 10))
    logits = model(x)
    assert logits.shape == (3, 10, 50) and torch.isfinite(logits).all()
    _, states = model.prefill(x)
    step_logits, _ = model.step(x[:, -1], states)
    assert step_logits.shape == (3, 50)


# ------------------------------------------------------- FLOPs for MFU ------------------

def _solve_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """Forward substitution with a unit lower-triangular [.., c, c] and [.., c, O] right-hand sides."""
    c, O = b_shape[-2], b_shape[-1]
    batch = 1
    for n in torch.broadcast_shapes(a_shape[:-2], b_shape[:-2]):
        batch *= n
    return batch * c * (c - 1) * O


def _cpu_attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV over the full square (torch counts SDPA's CUDA kernels, not the CPU one)."""
    B, H, T, dh = q_shape
    return 2 * (2 * B * H * T * k_shape[2] * dh)


COUNT_EXTRA = {torch.ops.aten.linalg_solve_triangular: _solve_flops,
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_flops_per_token_equals_counted_forward_flops(variant, monkeypatch):
    """The MFU formula against torch's FlopCounterMode on a real forward pass: every matmul, conv,
    attention and triangular solve of the model, counted by shape, must equal the formula's
    forward part (2 N + F_mix) exactly, with T = 22 leaving a partial last chunk.

    Model FLOPs count the DGD solve as forward substitution (c (c - 1) O); the fast path forms an
    explicit inverse instead (more FLOPs, faster), so the count is taken with LAPACK's solve,
    which test_hope_ops shows gives the same values."""
    from torch.utils.flop_counter import FlopCounterMode

    def lapack_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(A, B, upper=False, unitriangular=True)

    monkeypatch.setattr(delta_rule, "_solve_unit_lower", lapack_solve)

    cfg = small(8, memory_chunk_size=4, **VARIANTS[variant])
    model = build_model(cfg, seed=0)
    B, T = 3, 22
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    counter = FlopCounterMode(display=False, custom_mapping=COUNT_EXTRA)
    with counter, torch.no_grad():
        model(ids)
    counted = counter.get_total_flops() / (B * T)
    mixing = model.mixing_flops_per_token(T)
    assert mixing > 0
    assert counted == pytest.approx(2 * matmul_parameters(model) + mixing, rel=1e-12)
    assert flops_per_token(cfg, T) == pytest.approx(6 * matmul_parameters(model) + 3 * mixing, rel=1e-12)


def test_transformer_flops_per_token_equals_counted_forward_flops():
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(arch="transformer", vocab_size=64, dim=16, n_layers=2, n_heads=2)
    model = build_model(cfg, seed=0)
    B, T = 3, 22
    counter = FlopCounterMode(display=False, custom_mapping=COUNT_EXTRA)
    with counter, torch.no_grad():
        model(torch.randint(0, 64, (B, T)))
    mixing = model.mixing_flops_per_token(T)
    assert mixing == 4 * 2 * 16 * T
    assert counter.get_total_flops() / (B * T) == pytest.approx(2 * matmul_parameters(model) + mixing, rel=1e-12)
