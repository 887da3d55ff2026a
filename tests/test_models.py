"""Model layer: shared layers against float64 formulas, the Transformer++ and the registry."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nl.config import ModelConfig, load_config
from nl.models import MODEL_REGISTRY, build_model, count_parameters, flops_per_token
from nl.models.layers import RMSNorm, SwiGLU, apply_rope, precompute_rope, resolve_ffn_hidden

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def small(**overrides) -> ModelConfig:
    fields = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4)
    fields.update(overrides)
    return ModelConfig(**fields)


# ---------------------------------------------------------------- layers ------------

def test_rmsnorm_matches_float64_formula_and_keeps_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16) * 7
    x[0] *= 3e-4  # rows whose mean square is comparable to eps
    x64, w64 = x.double(), norm.weight.double()
    expected = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-5) * w64
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-6, atol=1e-6)
    y16 = norm(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.double(), expected, rtol=2e-2, atol=2e-2)


def test_swiglu_matches_float64_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(12, 20).double()
    assert all(m.bias is None for m in (ffn.w1, ffn.w2, ffn.w3))
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    gate, up = x @ ffn.w1.weight.T, x @ ffn.w3.weight.T
    expected = (gate / (1 + torch.exp(-gate)) * up) @ ffn.w2.weight.T
    torch.testing.assert_close(ffn(x), expected)


def test_ffn_hidden_default_is_llama_rounding():
    assert resolve_ffn_hidden(128, 0, 64) == 384  # 8/3 * 128 = 341.3 -> 384
    assert resolve_ffn_hidden(1024, 0, 64) == 2752  # 2730.7 -> 2752
    assert resolve_ffn_hidden(96, 0, 64) == 256  # 8/3 * 96 = 256 exactly
    assert resolve_ffn_hidden(1024, 2368, 64) == 2368


def test_rope_scores_depend_only_on_offset():
    torch.manual_seed(0)
    head_dim, T = 16, 12
    cos, sin = precompute_rope(head_dim, T, theta=10000.0)
    assert cos.shape == sin.shape == (T, head_dim // 2)
    q_vec, k_vec = torch.randn(head_dim), torch.randn(head_dim)
    q, k = apply_rope(q_vec.expand(1, T, 1, head_dim), k_vec.expand(1, T, 1, head_dim), cos, sin)
    scores = q[0, :, 0] @ k[0, :, 0].T  # [T, T]: the same q and k vectors placed at every position
    for offset in range(-3, 4):
        diag = torch.diagonal(scores, offset)
        torch.testing.assert_close(diag, diag[0].expand_as(diag), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, 2)[0])  # it does rotate
    # Position 0 is the identity, and the rotation keeps norms.
    torch.testing.assert_close(q[0, 0, 0], q_vec)
    torch.testing.assert_close(q.norm(dim=-1), q_vec.norm().expand(1, T, 1))


# ---------------------------------------------------------------- transformer -------

def test_forward_shape_dtype_and_causality():
    cfg = small()
    model = build_model(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    logits = model(x)
    assert logits.shape == (2, 10, cfg.vocab_size) and logits.dtype == torch.float32
    t = 6
    x2 = x.clone()
    x2[:, t] = (x2[:, t] + 1) % cfg.vocab_size
    logits2 = model(x2)
    torch.testing.assert_close(logits2[:, :t], logits[:, :t], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits2[:, t:], logits[:, t:], atol=1e-4)  # the change is seen from t on
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == cfg.n_layers


def test_tied_embeddings_share_storage_and_count_once():
    untied = count_parameters(build_model(small(), device="meta"))
    model = build_model(small(tie_embeddings=True), seed=0)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert count_parameters(model) == untied - 256 * 64
    with torch.no_grad():
        model.tok_embeddings.weight[3, 0] = 42.0
    assert model.output.weight[3, 0] == 42.0


@pytest.mark.parametrize("name,target", [("340m", 340e6), ("760m", 760e6), ("1.3b", 1.3e9)])
def test_preset_parameter_counts_within_5_percent(name, target):
    cfg = load_config(CONFIGS / f"transformer_{name}.yaml")
    assert cfg.model.vocab_size == 32000 and cfg.data.seq_len == 4096
    model = build_model(cfg.model, device="meta")
    assert next(model.parameters()).is_meta
    assert abs(count_parameters(model) / target - 1) < 0.05


def test_tiny_preset_size():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.vocab_size=8192"])
    assert 1e6 <= count_parameters(build_model(cfg.model, device="meta")) <= 10e6


def test_seed_determines_weights():
    a, b, c = (build_model(small(), seed=s).state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attention.wq.weight"], c["layers.0.attention.wq.weight"])
    rng = torch.get_rng_state()
    build_model(small(), seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # a seeded build leaves the caller's RNG alone


def test_init_weights_statistics_and_initial_loss():
    cfg = ModelConfig(vocab_size=8192, dim=128, n_layers=4, n_heads=4)  # the tiny preset
    model = build_model(cfg, seed=0)
    params = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    std = cfg.init_std
    assert params["layers.0.attention.wq.weight"].std().item() == pytest.approx(std, rel=0.05)
    assert params["layers.0.feed_forward.w2.weight"].std().item() == pytest.approx(std / math.sqrt(8), rel=0.05)
    assert params["layers.0.attention.wo.weight"].std().item() == pytest.approx(std / math.sqrt(8), rel=0.05)
    assert torch.equal(params["norm.weight"], torch.ones(128))
    x = torch.randint(0, cfg.vocab_size, (4, 64))
    with torch.no_grad():
        loss = F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5


def test_adamw_overfits_a_fixed_batch():
    cfg = small()
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_flops_per_token_hand_computation():
    V, d, L, H, T, hidden = 100, 32, 3, 4, 64, 96  # resolve_ffn_hidden(32, 0, 32) = 96
    cfg = ModelConfig(vocab_size=V, dim=d, n_layers=L, n_heads=H, ffn_multiple_of=32)
    per_layer = 4 * d * d + 3 * d * hidden  # attention and SwiGLU weights (norm gains are elementwise)
    n = L * per_layer + V * d  # + LM head (the input embedding is a lookup)
    assert flops_per_token(cfg, T) == 6 * n + 12 * L * d * T
    tied = ModelConfig(vocab_size=V, dim=d, n_layers=L, n_heads=H, ffn_multiple_of=32, tie_embeddings=True)
    assert flops_per_token(tied, T) == flops_per_token(cfg, T)  # the head matmul is counted either way


# ---------------------------------------------------------------- registry ----------

def test_build_errors_are_explicit():
    with pytest.raises(ValueError, match="valid archs: .*transformer"):
        build_model(small(arch="nope"))
    with pytest.raises(ValueError, match="not divisible by model.n_heads"):
        build_model(small(dim=66, n_heads=4))
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(small(vocab_size=0))
    assert "transformer" in MODEL_REGISTRY
