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
sums of the current chunk): prefill + one-token steps equal the full forward. For the backward,
`cms_chunked` keeps ~sqrt(T / C) copies of W per sequence (segments recomputed under
torch.utils.checkpoint), `chunk_loop` and `cms_reference` one or two per chunk or token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

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


def chunk_loop(h: torch.Tensor, v: torch.Tensor, state: CMSState,
               cfg: ContextConfig) -> tuple[torch.Tensor, CMSState]:
    """The chunk loop of `cms_chunked` (same arguments and results), its whole graph kept for the backward:
    per chunk the weights W_j and the step lr * G ([B, d, hidden] each), so 2 T / C copies of W per sequence."""
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


def _segment(h, v, cur, G, N, init, pos: int, cfg: ContextConfig):
    """`chunk_loop` on flat tensor arguments: torch.utils.checkpoint saves top-level tensors through the
    saved-tensor hooks, so an enclosing activation checkpoint (the block's) drops them as well."""
    y, st = chunk_loop(h, v, CMSState(pos, cur, None if G is None else (G, N), init), cfg)
    return (y, st.cur, *(st.acc or (None, None)))


def cms_chunked(h: torch.Tensor, v: torch.Tensor, state: CMSState,
                cfg: ContextConfig) -> tuple[torch.Tensor, CMSState]:
    """Chunk-parallel form. h: [B, T, hidden] keys; v: [B, T, d] targets; state: from `initial_state(W_0)`
    or a previous call (any position: a partial chunk is completed first).

    Returns (y [B, T, d], y_t = W_j h_t with each token's chunk weights; the state after token T).

    With autograd recording, the n chunks run in segments of K = ceil(sqrt(n)) chunks, each under
    torch.utils.checkpoint (non-reentrant): the backward keeps the fast weights at segment starts, ~sqrt(n)
    copies of W per sequence instead of `chunk_loop`'s 2 n, and recomputes one segment at a time (one more
    forward of the loop; its 2 K copies live only during that segment's backward). The same operations on
    the same values: outputs, states and gradients are those of `chunk_loop`."""
    C, T = cfg.chunk_size, h.shape[1]
    first = min(C - state.pos % C, T)  # tokens up to the first boundary
    n = 1 + -(-(T - first) // C)  # chunks touched
    K = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (h, v, state.cur, state.init))
    if not grad or n <= K:
        return chunk_loop(h, v, state, cfg)
    outs, t, end = [], 0, first + (K - 1) * C  # segments end on chunk boundaries: K chunks each
    G, N = state.acc or (None, None)
    W, pos = state.cur, state.pos
    while t < T:
        end = min(end, T)
        y, W, G, N = torch.utils.checkpoint.checkpoint(_segment, h[:, t:end], v[:, t:end], W, G, N, state.init,
                                                       pos, cfg, use_reentrant=False)
        outs.append(y)
        pos, t, end = pos + end - t, end, end + K * C
    return torch.cat(outs, dim=1), CMSState(pos, W, None if G is None else (G, N), state.init)


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
