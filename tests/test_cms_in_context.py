"""In-context CMS (model.hope.cms_mode=in_context|both): the chunk-parallel level equals an independent
token-by-token reference (outputs, final fast weights, every outer gradient; float64), causality,
per-sequence state, decoding state (prefill + step == forward), restore_after_adaptation, the outer
schedule alongside (both), checkpoint/resume, export/generation, stability at 4 x seq_len, diagnostics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nl.ops.cms import CMSState, ContextConfig, cms_chunked, cms_reference, initial_state


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def independent_reference(u, scale, W0, C, lr, retention):
    """From the equations, with the inner gradient by autograd (not the closed form under test):
    tokens of chunk j read W_j; at each boundary W_{j+1} = W_0 + alpha (W_j - W_0) - eta G / N, G the sum
    of the chunk's gradients of 1/2 ||f_W(u_t) - s u_t||^2 (target constant), N the sum of the squared
    norms of the layer's inputs (u for W1, W3; h for W2). Per sequence, one at a time."""
    ys, finals = [], []
    for b in range(u.shape[0]):
        W = list(W0)
        grads, n_u, n_h, out = [0, 0, 0], 0, 0, []
        for t in range(u.shape[1]):
            x = u[b, t]
            h = F.silu(W[0] @ x) * (W[1] @ x)
            y = W[2] @ h
            out.append(y)
            # dL/dW = (dy/dW)^T e with e = y - s u_t: the target is a constant of the inner gradient, and the
            # outer gradient still flows through e (into s and u), as for the Titans memories' targets
            g = torch.autograd.grad(y, W, grad_outputs=y - scale * x, create_graph=True)
            grads = [a + gi for a, gi in zip(grads, g)]
            n_u, n_h = n_u + x.dot(x), n_h + h.dot(h)
            if (t + 1) % C == 0:
                W = [w0 + retention * (w - w0) - lr * gi / n for w, w0, gi, n in
                     zip(W, W0, grads, (n_u, n_u, n_h))]
                grads, n_u, n_h = [0, 0, 0], 0, 0
        ys.append(torch.stack(out))
        finals.append(W)
    return torch.stack(ys), [torch.stack([f[i] for f in finals]) for i in range(3)]


def _inputs(B=2, T=19, d=6, hidden=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, d, generator=g, dtype=torch.float64).requires_grad_()
    scale = (0.5 + torch.rand(d, generator=g, dtype=torch.float64)).requires_grad_()
    W0 = [(0.4 * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()
          for shape in ((hidden, d), (hidden, d), (d, hidden))]
    return u, scale, W0


@pytest.mark.parametrize("C", [1, 3, 16, 19])
@pytest.mark.parametrize("form", ["chunked", "reference"])
def test_level_equals_independent_reference_outputs_weights_and_outer_gradients(C, form):
    """T = 19: C = 3 and 16 do not divide it (a partial last chunk, its partial sums left in the state)."""
    cfg = ContextConfig(chunk_size=C, lr=0.7, retention=0.9)
    u, scale, W0 = _inputs()
    run = cms_chunked if form == "chunked" else cms_reference
    y, state = run(u, scale, initial_state(tuple(W0)), cfg)
    y_ref, W_ref = independent_reference(u, scale, W0, C, cfg.lr, cfg.retention)
    assert rel(y, y_ref) < 1e-10
    B = u.shape[0]
    for w, w_ref in zip(state.cur, W_ref):
        assert rel(w.expand(B, *w.shape[-2:]), w_ref) < 1e-10
    assert state.pos == 19 and (state.acc is None) == (19 % C == 0)
    # every outer gradient (inputs, target gain, initial weights), through all the updates
    probe = torch.randn_like(y)
    loss = (y * probe).sum() + sum((w * w).sum() for w in state.cur)
    loss_ref = (y_ref * probe).sum() + sum((w * w).sum() for w in W_ref)
    leaves = [u, scale, *W0]
    grads = torch.autograd.grad(loss, leaves)
    grads_ref = torch.autograd.grad(loss_ref, leaves)
    for g, g_ref in zip(grads, grads_ref):
        assert rel(g, g_ref) < 1e-10


@pytest.mark.parametrize("C", [1, 3, 16])
def test_level_is_causal_and_per_sequence(C):
    """Perturbing token t of sequence 0 changes no output before t, and nothing of sequence 1."""
    cfg = ContextConfig(chunk_size=C, lr=0.3, retention=0.9)
    u, scale, W0 = _inputs(T=24)
    with torch.no_grad():
        y, _ = cms_chunked(u, scale, initial_state(tuple(W0)), cfg)
        assert torch.isfinite(y).all()
        for t in (0, 5, 16, 23):
            v = u.clone()
            v[0, t] += 1.0
            y2, _ = cms_chunked(v, scale, initial_state(tuple(W0)), cfg)
            assert torch.equal(y2[0, :t], y[0, :t]) and torch.equal(y2[1], y[1])
            later = (y2[0, t:] - y[0, t:]).abs().amax(-1)
            assert later[0] > 0  # the perturbed token itself
            if C == 1 and t < 23:
                assert later[1] > 0  # the next token reads the update made from it


@pytest.mark.parametrize("C", [1, 4])
def test_chunked_continues_from_any_state(C):
    """Prefill 7 tokens, then one token at a time (partial chunks in the state) == one call over all."""
    cfg = ContextConfig(chunk_size=C, lr=0.5, retention=0.95)
    u, scale, W0 = _inputs(T=13)
    with torch.no_grad():
        y, final = cms_chunked(u, scale, initial_state(tuple(W0)), cfg)
        parts, state = [], initial_state(tuple(W0))
        for piece in (u[:, :7], *u[:, 7:].split(1, dim=1)):
            out, state = cms_chunked(piece, scale, state, cfg)
            parts.append(out)
    assert rel(torch.cat(parts, 1), y) < 1e-12 and state.pos == 13
    for w, w_ref in zip(state.cur, final.cur):
        assert rel(w, w_ref) < 1e-12
