"""In-context Continuum Memory System level (HOPE_SPEC.md section 3, the in-context reading of NeurIPS Eq. 31).

One CMS level's MLP f_W(u) = W2 (silu(W1 u) * W3 u) (SwiGLU; W1, W3 [hidden, d], W2 [d, hidden]) gets,
per sequence, fast weights W_j = (W1, W3, W2)_j, with W_0 the outer parameters. The level's chunk
size C splits the sequence into chunks j = tokens [jC, (j+1)C); every token of chunk j reads W_j
(causal: chunk j sees only the updates made at the end of chunks < j):

    y_t = f_{W_j}(u_t)                                  (u_t: the level's normalised input)

Inner objective, one per token (a reconstruction of the level's input with a learned per-channel
gain s; the target is a constant inside the inner step, the outer gradient flows through it):

    L_t(W) = 1/2 || f_W(u_t) - s * u_t ||^2
    e_t = f_{W_j}(u_t) - s * u_t,   a_t = W1 u_t,  b_t = W3 u_t,  h_t = silu(a_t) * b_t,  g_t = W2^T e_t
    dL_t/dW2 = e_t h_t^T,  dL_t/dW1 = (g_t * b_t * silu'(a_t)) u_t^T,  dL_t/dW3 = (g_t * silu(a_t)) u_t^T

At the boundary (j+1)C (NeurIPS Eq. 31: the errors accumulated since the last update), a normalised
gradient step with retention toward the outer weights (the Titans memories' retention_target=init):

    W2_{j+1} = W2_0 + alpha (W2_j - W2_0) - eta sum_t e_t h_t^T / max(sum_t ||h_t||^2, eps)
    Wi_{j+1} = Wi_0 + alpha (Wi_j - Wi_0) - eta sum_t dL_t/dWi / max(sum_t ||u_t||^2, eps)   (i = 1, 3)

(sums over the chunk's C tokens). The normalisation makes W2's step, for C = 1, move the output on h_t
by exactly -eta e_t (normalised LMS, as the Titans memories' normalized_step); over a chunk the step
along any direction is at most eta times that, so alpha - eta in [-1, 1] keeps W2's deviation from W_0
from growing (eta <= 1 is enforced by the config).

`cms_reference` runs this token by token from the equations; `cms_chunked` applies the level to a
whole chunk as one batched matmul with that chunk's weights and updates at the boundary (a loop over
chunks, none over tokens). Both start from, and return, a `CMSState` (fast weights and the partial
sums of the current chunk): prefill + one-token steps equal the full forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (W1, W3, W2): [.., hidden, d], [.., hidden, d], [.., d, hidden]

EPS = 1e-12  # floor of the normaliser sum ||x||^2 (a chunk of all-zero inputs takes no step)


@dataclass(frozen=True)
class ContextConfig:
    chunk_size: int      # C: tokens between two updates
    lr: float            # eta, the inner step size (normalised step)
    retention: float     # alpha per update, toward the outer weights W_0


@dataclass
class CMSState:
    """Everything a level carries from token to token (constant size in the sequence length).

    pos: tokens consumed; cur: fast weights W_j of the current chunk ([B, O, I], or the outer [O, I]
    while no update happened yet); acc: partial sums of the current chunk, (G1, G3, G2 like the
    weights, sum ||u||^2 [B], sum ||h||^2 [B]), or None at a boundary; init: the outer weights W_0."""

    pos: int
    cur: Weights
    acc: tuple[torch.Tensor, ...] | None
    init: Weights


def initial_state(init: Weights) -> CMSState:
    return CMSState(0, tuple(init), None, tuple(init))


def _silu_grad(a: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


def _chunk(W: Weights, u: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Outputs and the summed gradient terms of tokens u [B, n, d] that all read W.

    Returns (y [B, n, d], (G1, G3, G2, sum ||u||^2 [B], sum ||h||^2 [B]))."""
    w1, w3, w2 = W
    a, b = u @ w1.mT, u @ w3.mT
    sa = F.silu(a)
    h = sa * b
    y = h @ w2.mT
    e = y - scale * u
    g = e @ w2
    da, db = g * b * _silu_grad(a), g * sa
    sums = (da.mT @ u, db.mT @ u, e.mT @ h, u.pow(2).sum((-2, -1)), h.pow(2).sum((-2, -1)))
    return y, sums


def _add(acc: tuple[torch.Tensor, ...] | None, sums: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return sums if acc is None else tuple(x + s for x, s in zip(acc, sums))


def _update(W: Weights, W0: Weights, acc: tuple[torch.Tensor, ...], cfg: ContextConfig) -> Weights:
    G1, G3, G2, nu, nh = acc
    nu, nh = nu.clamp_min(EPS)[:, None, None], nh.clamp_min(EPS)[:, None, None]
    return tuple(w0 + cfg.retention * (w - w0) - cfg.lr * g / n
                 for w, w0, g, n in zip(W, W0, (G1, G3, G2), (nu, nu, nh)))


def cms_chunked(u: torch.Tensor, scale: torch.Tensor, state: CMSState,
                cfg: ContextConfig) -> tuple[torch.Tensor, CMSState]:
    """Chunk-parallel form. u: [B, T, d] normalised level inputs; scale: [d] the target gain s; state: from
    `initial_state(outer weights)` or a previous call (any position: a partial chunk is completed first).

    Returns (y [B, T, d] = f_W(u) with each token's chunk weights, the state after token T)."""
    C, T = cfg.chunk_size, u.shape[1]
    W, acc, pos = state.cur, state.acc, state.pos
    outs, t = [], 0
    while t < T:
        n = min(C - pos % C, T - t)  # up to the next boundary
        y, sums = _chunk(W, u[:, t:t + n], scale)
        outs.append(y)
        acc, pos, t = _add(acc, sums), pos + n, t + n
        if pos % C == 0:
            W, acc = _update(W, state.init, acc, cfg), None
    return torch.cat(outs, dim=1), CMSState(pos, W, acc, state.init)


def cms_reference(u: torch.Tensor, scale: torch.Tensor, state: CMSState,
                  cfg: ContextConfig) -> tuple[torch.Tensor, CMSState]:
    """Token by token, straight from the equations (slow: a Python loop over tokens). As `cms_chunked`."""
    B = u.shape[0]
    W = tuple(w.expand(B, *w.shape[-2:]) for w in state.cur)  # one copy per sequence: [B, O, I]
    acc, pos = state.acc, state.pos
    outs = []
    for t in range(u.shape[1]):
        w1, w3, w2 = W
        ut = u[:, t]  # [B, d]
        a, b = torch.einsum("bod,bd->bo", w1, ut), torch.einsum("bod,bd->bo", w3, ut)
        h = F.silu(a) * b
        y = torch.einsum("bdh,bh->bd", w2, h)
        e = y - scale * ut
        g = torch.einsum("bdh,bd->bh", w2, e)
        grads = (torch.einsum("bh,bd->bhd", g * b * _silu_grad(a), ut), torch.einsum("bh,bd->bhd", g * F.silu(a), ut),
                 torch.einsum("bd,bh->bdh", e, h), (ut * ut).sum(-1), (h * h).sum(-1))
        acc, pos = _add(acc, grads), pos + 1
        outs.append(y)
        if pos % cfg.chunk_size == 0:
            W, acc = _update(W, state.init, acc, cfg), None
    return torch.stack(outs, dim=1), CMSState(pos, W, acc, state.init)


def weights_norm(W: Weights) -> torch.Tensor:
    """Frobenius norm over the three matrices: [.., O, I] each -> [..]."""
    return torch.sqrt(sum(w.pow(2).sum((-2, -1)) for w in W))
