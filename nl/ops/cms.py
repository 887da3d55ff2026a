"""In-context Continuum Memory System level (HOPE_SPEC.md section 3, the in-context reading of NeurIPS Eq. 31).

One CMS level is y = x + W2 h(u), u = RMSNorm(x), h(u) = silu(W1 u) * W3 u (SwiGLU). Read as a key-value
memory (the keys h(u) select, W2 holds the values), its value matrix W2 [d, hidden] gets, per sequence,
fast weights W_j with W_0 = the outer W2 (W1, W3 and the norm stay outer parameters). The level's chunk
size C splits the sequence into chunks j = tokens [jC, (j+1)C); every token of chunk j reads W_j
(causal: chunk j sees only the updates made at the end of chunks < j):

    y_t = W_j h_t,   h_t = h(u_t)

Inner objective, one per token: reconstruct the level's input with a learned per-channel gain s (the
target v_t = s * u_t is a constant inside the inner step; the outer gradient flows through it):

    L_t(W) = 1/2 || W h_t - v_t ||^2,   e_t = W_j h_t - v_t,   dL_t/dW = e_t h_t^T

At the boundary (j+1)C (NeurIPS Eq. 31: the errors accumulated since the last update), a normalised
gradient step (normalised LMS over the chunk) with retention toward the outer weights (as the Titans
memories' retention_target=init):

    W_{j+1} = W_0 + alpha (W_j - W_0) - eta sum_t e_t h_t^T / max(sum_t ||h_t||^2, eps)

(sums over the chunk's C tokens). For C = 1 the step moves the output on h_t by exactly -eta e_t; over a
chunk the Gram matrix sum h h^T / sum ||h||^2 has eigenvalues in [0, 1], so the deviation D = W - W_0 - D*
evolves by a factor alpha - eta lambda in [alpha - eta, alpha] along each direction: with 0 < eta <= 1 and
0 < alpha <= 1 (the config enforces both) the step never amplifies it.

`cms_reference` runs this token by token from the equations; `cms_chunked` applies the level to a
whole chunk as one batched matmul with that chunk's weights and updates at the boundary (a loop over
chunks, none over tokens). Both start from, and return, a `CMSState` (fast weights and the partial
sums of the current chunk): prefill + one-token steps equal the full forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-12  # floor of the normaliser sum ||h||^2 (a chunk of all-zero keys takes no step)


@dataclass(frozen=True)
class ContextConfig:
    chunk_size: int      # C: tokens between two updates
    lr: float            # eta, the inner step size (normalised step), in (0, 1]
    retention: float     # alpha per update, toward the outer weights W_0, in (0, 1]


@dataclass
class CMSState:
    """Everything a level carries from token to token (constant size in the sequence length).

    pos: tokens consumed; cur: fast weights W_j of the current chunk ([B, d, hidden], or the outer
    [d, hidden] while no update happened yet); acc: partial sums of the current chunk, (sum e h^T
    [B, d, hidden], sum ||h||^2 [B]), or None at a boundary; init: the outer weights W_0 [d, hidden]."""

    pos: int
    cur: torch.Tensor
    acc: tuple[torch.Tensor, torch.Tensor] | None
    init: torch.Tensor


def initial_state(init: torch.Tensor) -> CMSState:
    return CMSState(0, init, None, init)


def _add(acc, sums):
    return sums if acc is None else (acc[0] + sums[0], acc[1] + sums[1])


def _update(W: torch.Tensor, W0: torch.Tensor, acc, cfg: ContextConfig) -> torch.Tensor:
    G, n = acc
    return W0 + cfg.retention * (W - W0) - cfg.lr * G / n.clamp_min(EPS)[:, None, None]


def cms_chunked(h: torch.Tensor, v: torch.Tensor, state: CMSState,
                cfg: ContextConfig) -> tuple[torch.Tensor, CMSState]:
    """Chunk-parallel form. h: [B, T, hidden] keys; v: [B, T, d] targets; state: from `initial_state(W_0)`
    or a previous call (any position: a partial chunk is completed first).

    Returns (y [B, T, d], y_t = W_j h_t with each token's chunk weights; the state after token T)."""
    C, T = cfg.chunk_size, h.shape[1]
    W, acc, pos = state.cur, state.acc, state.pos
    outs, t = [], 0
    while t < T:
        n = min(C - pos % C, T - t)  # up to the next boundary
        hc = h[:, t:t + n]
        y = hc @ W.mT
        e = y - v[:, t:t + n]
        outs.append(y)
        acc, pos, t = _add(acc, (e.mT @ hc, hc.pow(2).sum((-2, -1)))), pos + n, t + n
        if pos % C == 0:
            W, acc = _update(W, state.init, acc, cfg), None
    return torch.cat(outs, dim=1), CMSState(pos, W, acc, state.init)


def cms_reference(h: torch.Tensor, v: torch.Tensor, state: CMSState,
                  cfg: ContextConfig) -> tuple[torch.Tensor, CMSState]:
    """Token by token, straight from the equations (slow: a Python loop over tokens). As `cms_chunked`."""
    W = state.cur.expand(h.shape[0], *state.cur.shape[-2:])  # one copy per sequence: [B, d, hidden]
    acc, pos = state.acc, state.pos
    outs = []
    for t in range(h.shape[1]):
        ht = h[:, t]
        y = torch.einsum("bdk,bk->bd", W, ht)
        e = y - v[:, t]
        acc, pos = _add(acc, (torch.einsum("bd,bk->bdk", e, ht), (ht * ht).sum(-1))), pos + 1
        outs.append(y)
        if pos % cfg.chunk_size == 0:
            W, acc = _update(W, state.init, acc, cfg), None
    return torch.stack(outs, dim=1), CMSState(pos, W, acc, state.init)
