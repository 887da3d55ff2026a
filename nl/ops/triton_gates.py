"""The per-token normalisations and gates of the self-modifying Titans recurrence as fused Triton kernels
(`titans._derive` with model.hope.kernel=triton): one launch forward and one backward per call, where the
PyTorch forms launch 5 (l2norm) and 4-5 (gate) ops forward and more backward; launches per hope_340m block
at T=4096 went from 13,304 to 9,725 with them (benchmarks/bench_launches.py, docs/BENCHMARKS.md).

    l2norm(x) = x / sqrt(||x||^2 + eps)                        x [*, C, d] -> [*b, C, d]   (`titans.l2norm`)
    gate(x, w, b) = scale * sigmoid(x . w + b)        (activation "sigmoid": eta = eta_max * sigmoid(.))
                  = logsigmoid(x . w + b) + offset    (activation "logsigmoid": log alpha, log mu)
                                                       x [*, C, d], w [*, 1, d], b [*, 1] -> [*b, C]

One program per batch element (up to 3 batch dims; inputs read through their batch strides, so a gate
vector w [H, 1, d] is read in place by every sequence). The backward kernels recompute the forward from
the inputs: l2norm's dx = r (dy - y (y . dy)), r = (||x||^2 + eps)^-1/2; the gate's dz = dy * act'(z),
dx = dz w, and per program dw = sum_t dz_t x_t and db = sum_t dz_t (summed over the sequences that share w
by the caller). Registered with torch.library.custom_op (`nl::l2norm`, `nl::gate` and their backward ops):
one opaque call each for torch.compile and FSDP2. Triton is imported here: import this module lazily.

`qkv_gates` (`nl::qkv_gates`) does all of a generator chunk's in one kernel, read from the stacked generator
outputs: q, k, v (l2norm) and eta, alpha, mu (gates), one program per (sequence, head); its backward runs one
program per head and sums the readout's gradient over the sequences in the program. The chunk loop
(`titans_chunked`) uses it; `l2norm` and `gate` serve the rest of `_derive` with kernel=triton: the static
inputs of the Titans baseline and the per-token decoding step (`titans_step`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nl.ops.triton_dgd import _block, batch_offset, batch_strided, grid

ACTIVATIONS = ("sigmoid", "logsigmoid")


@triton.jit
def _l2norm_kernel(X, Y, C, D, N1, N2, s_X_0, s_X_1, s_X_2, EPS: tl.constexpr, BC: tl.constexpr,
                   BD: tl.constexpr):
    n = tl.program_id(0)
    rd = tl.arange(0, BD)
    x_base = X + batch_offset(n, N1, N2, s_X_0, s_X_1, s_X_2)
    for c0 in range(0, C, BC):  # rows in blocks of BC: any sequence length with a bounded tile
        rc = c0 + tl.arange(0, BC)
        m = (rc < C)[:, None] & (rd < D)[None, :]
        p = rc[:, None] * D + rd[None, :]
        x = tl.load(x_base + p, mask=m, other=0.)
        r = 1 / tl.sqrt(tl.sum(x * x, 1) + EPS)
        tl.store(Y + n * C * D + p, x * r[:, None], mask=m)


@triton.jit
def _l2norm_bwd_kernel(X, DY, DX, C, D, N1, N2, s_X_0, s_X_1, s_X_2, EPS: tl.constexpr, BC: tl.constexpr,
                       BD: tl.constexpr):
    n = tl.program_id(0)
    rd = tl.arange(0, BD)
    x_base = X + batch_offset(n, N1, N2, s_X_0, s_X_1, s_X_2)
    for c0 in range(0, C, BC):
        rc = c0 + tl.arange(0, BC)
        m = (rc < C)[:, None] & (rd < D)[None, :]
        p = rc[:, None] * D + rd[None, :]
        x = tl.load(x_base + p, mask=m, other=0.)
        dy = tl.load(DY + n * C * D + p, mask=m, other=0.)
        r = 1 / tl.sqrt(tl.sum(x * x, 1) + EPS)
        y = x * r[:, None]
        tl.store(DX + n * C * D + p, r[:, None] * (dy - y * tl.sum(y * dy, 1)[:, None]), mask=m)


@triton.jit
def _gate_kernel(X, W, B, Y, C, D, N1, N2, s_X_0, s_X_1, s_X_2, s_W_0, s_W_1, s_W_2, s_B_0, s_B_1, s_B_2,
                 scale, offset, LOGSIGMOID: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
    n = tl.program_id(0)
    rd = tl.arange(0, BD)
    md = rd < D
    x_base = X + batch_offset(n, N1, N2, s_X_0, s_X_1, s_X_2)
    w = tl.load(W + batch_offset(n, N1, N2, s_W_0, s_W_1, s_W_2) + rd, mask=md, other=0.)
    b = tl.load(B + batch_offset(n, N1, N2, s_B_0, s_B_1, s_B_2))
    for c0 in range(0, C, BC):
        rc = c0 + tl.arange(0, BC)
        mc = rc < C
        x = tl.load(x_base + rc[:, None] * D + rd[None, :], mask=mc[:, None] & md[None, :], other=0.)
        z = tl.sum(x * w[None, :], 1) + b
        if LOGSIGMOID:  # log sigmoid(z) = min(z, 0) - log(1 + exp(-|z|)), stable for any z
            y = tl.minimum(z, 0.) - tl.log(1 + tl.exp(-tl.abs(z))) + offset
        else:
            y = scale * tl.sigmoid(z)
        tl.store(Y + n * C + rc, y, mask=mc)


@triton.jit
def _gate_bwd_kernel(X, W, B, DY, DX, DW, DB, C, D, N1, N2, s_X_0, s_X_1, s_X_2, s_W_0, s_W_1, s_W_2,
                     s_B_0, s_B_1, s_B_2, scale, LOGSIGMOID: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
    n = tl.program_id(0)
    rd = tl.arange(0, BD)
    md = rd < D
    x_base = X + batch_offset(n, N1, N2, s_X_0, s_X_1, s_X_2)
    w = tl.load(W + batch_offset(n, N1, N2, s_W_0, s_W_1, s_W_2) + rd, mask=md, other=0.)
    b = tl.load(B + batch_offset(n, N1, N2, s_B_0, s_B_1, s_B_2))
    dw = tl.zeros([BD], dtype=w.dtype)
    db = tl.zeros([BC], dtype=w.dtype)
    for c0 in range(0, C, BC):
        rc = c0 + tl.arange(0, BC)
        mc = rc < C
        m = mc[:, None] & md[None, :]
        x = tl.load(x_base + rc[:, None] * D + rd[None, :], mask=m, other=0.)
        dy = tl.load(DY + n * C + rc, mask=mc, other=0.)
        s = tl.sigmoid(tl.sum(x * w[None, :], 1) + b)
        if LOGSIGMOID:
            dz = dy * (1 - s)
        else:
            dz = dy * scale * s * (1 - s)
        tl.store(DX + n * C * D + rc[:, None] * D + rd[None, :], dz[:, None] * w[None, :], mask=m)
        dw += tl.sum(dz[:, None] * x, 0)
        db += dz
    tl.store(DW + n * D + rd, dw, mask=md)
    tl.store(DB + n, tl.sum(db, 0))


def _rows(C: int) -> int:
    """Rows per block of the l2norm and gate kernels: the chunk (at most 64), looped over longer inputs."""
    return min(_block(C), 64)


def _check(*tensors: torch.Tensor) -> None:
    if tensors[0].dtype not in (torch.float32, torch.float64) or len({t.dtype for t in tensors}) != 1:
        raise TypeError(f"triton_gates: float32 or float64 inputs of one dtype, got {[t.dtype for t in tensors]}")


def _batch(*shapes: torch.Size) -> torch.Size:
    batch = torch.broadcast_shapes(*shapes)
    if len(batch) > 3:
        raise ValueError(f"triton_gates: at most 3 batch dims, got {tuple(batch)}")
    return batch


@torch.library.custom_op("nl::l2norm", mutates_args=())
def l2norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(||x||^2 + eps) over the last dim: x [*, C, d] (up to 3 batch dims) -> contiguous [*, C, d]."""
    _check(x)
    batch = _batch(x.shape[:-2])
    (xs, st), (C, D) = batch_strided(x, 2), x.shape[-2:]
    y = x.new_empty(*batch, C, D)
    N, N1, N2 = grid(batch)
    _l2norm_kernel[(N,)](xs, y, C, D, N1, N2, *st, EPS=eps, BC=_rows(C), BD=_block(D))
    return y


@l2norm.register_fake
def _(x, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("nl::l2norm_backward", mutates_args=())
def l2norm_backward(x: torch.Tensor, eps: float, dy: torch.Tensor) -> torch.Tensor:
    """The gradient of `l2norm` w.r.t. x, given dy contiguous like its output: [*, C, d]."""
    batch = _batch(x.shape[:-2])
    (xs, st), (C, D) = batch_strided(x, 2), x.shape[-2:]
    dx = x.new_empty(*batch, C, D)
    N, N1, N2 = grid(batch)
    _l2norm_bwd_kernel[(N,)](xs, dy, dx, C, D, N1, N2, *st, EPS=eps, BC=_rows(C), BD=_block(D))
    return dx


@l2norm_backward.register_fake
def _(x, eps, dy):
    return x.new_empty(x.shape)


def _l2norm_setup(ctx, inputs, output) -> None:
    x, ctx.eps = inputs
    ctx.save_for_backward(x)


def _l2norm_bwd(ctx, dy):
    (x,) = ctx.saved_tensors
    return l2norm_backward(x, ctx.eps, dy.contiguous()), None


l2norm.register_autograd(_l2norm_bwd, setup_context=_l2norm_setup)


def _gate_batch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Size:
    return _batch(x.shape[:-2], w.shape[:-2], b.shape[:-1])


@torch.library.custom_op("nl::gate", mutates_args=())
def gate(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, activation: str, scale: float,
         offset: float) -> torch.Tensor:
    """A gate per token from x [*, C, d], w [*, 1, d], b [*, 1] (batch dims broadcast to [*b], up to 3):
    scale * sigmoid(x . w + b) (activation "sigmoid") or logsigmoid(x . w + b) + offset ("logsigmoid").
    Returns [*b, C]. Raises ValueError for another activation."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"gate: activation={activation!r}, expected one of {ACTIVATIONS}")
    _check(x, w, b)
    batch = _gate_batch(x, w, b)
    C, D = x.shape[-2:]
    (xs, sx), (ws, sw), (bs, sb) = batch_strided(x, 2), batch_strided(w, 2), batch_strided(b, 1)
    y = x.new_empty(*batch, C)
    N, N1, N2 = grid(batch)
    _gate_kernel[(N,)](xs, ws, bs, y, C, D, N1, N2, *sx, *sw, *sb, scale, offset,
                       LOGSIGMOID=activation == "logsigmoid", BC=_rows(C), BD=_block(D))
    return y


@gate.register_fake
def _(x, w, b, activation, scale, offset):
    return x.new_empty(*_gate_batch(x, w, b), x.shape[-2])


@torch.library.custom_op("nl::gate_backward", mutates_args=())
def gate_backward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, activation: str, scale: float,
                  dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `gate` w.r.t. x, w and b, each over the whole batch: [*b, C, d], [*b, 1, d], [*b, 1]
    (the caller sums those of broadcast inputs); dy [*b, C] contiguous."""
    batch = _gate_batch(x, w, b)
    C, D = x.shape[-2:]
    (xs, sx), (ws, sw), (bs, sb) = batch_strided(x, 2), batch_strided(w, 2), batch_strided(b, 1)
    dx, dw, db = x.new_empty(*batch, C, D), w.new_empty(*batch, 1, D), b.new_empty(*batch, 1)
    N, N1, N2 = grid(batch)
    _gate_bwd_kernel[(N,)](xs, ws, bs, dy, dx, dw, db, C, D, N1, N2, *sx, *sw, *sb, scale,
                           LOGSIGMOID=activation == "logsigmoid", BC=_rows(C), BD=_block(D))
    return dx, dw, db


@gate_backward.register_fake
def _(x, w, b, activation, scale, dy):
    batch = _gate_batch(x, w, b)
    return x.new_empty(*batch, *x.shape[-2:]), w.new_empty(*batch, 1, x.shape[-1]), b.new_empty(*batch, 1)


def _gate_setup(ctx, inputs, output) -> None:
    x, w, b, ctx.activation, ctx.scale, _ = inputs
    ctx.save_for_backward(x, w, b)


def _gate_bwd(ctx, dy):
    x, w, b = ctx.saved_tensors
    grads = gate_backward(x, w, b, ctx.activation, ctx.scale, dy.contiguous())
    # an input shared along a batch dim (w and b by the sequences): its gradient summed back to its shape
    return (*[g.sum_to_size(t.shape) for g, t in zip(grads, (x, w, b))], None, None, None)


gate.register_autograd(_gate_bwd, setup_context=_gate_setup)


# ------------------------------------------------ q, k, v and the gates of a generator chunk, one kernel ----
# Rows of the packed readout `wb` [H, 3, d + 1] (w | b per gate): eta's, alpha's and mu's (mu reads A_eta(z)).
GATE_ROWS = ("eta", "alpha", "mu")


@triton.jit
def _logsigmoid(z):
    return tl.minimum(z, 0.) - tl.log(1 + tl.exp(-tl.abs(z)))  # stable for any z


@triton.jit
def _readout(wb, rd, md, D):
    """Head h's packed readout row by row (`GATE_ROWS`): (w_eta [BD], b_eta, w_alpha, b_alpha, w_mu, b_mu)."""
    return (tl.load(wb + rd, mask=md, other=0.), tl.load(wb + D),
            tl.load(wb + (D + 1) + rd, mask=md, other=0.), tl.load(wb + (D + 1) + D),
            tl.load(wb + 2 * (D + 1) + rd, mask=md, other=0.), tl.load(wb + 2 * (D + 1) + D))


@triton.jit
def _qkv_gates_kernel(XQ, XK, XV, XE, XA, WB, Qo, Ko, Vo, ETAo, LAo, LMo, H, C, D, s_q0, s_q1, s_k0, s_k1,
                      s_v0, s_v1, s_e0, s_e1, s_a0, s_a1, scale, offset, EPS: tl.constexpr, NORM_V: tl.constexpr,
                      RETENTION: tl.constexpr, MOMENTUM: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
    n = tl.program_id(0)  # one (sequence, head); each source [B, H, C, D] read through its (sequence, head) strides
    b, h = n // H, n % H
    rd = tl.arange(0, BD)
    md = rd < D
    w_e, b_e, w_a, b_a, w_m, b_m = _readout(WB + h * 3 * (D + 1), rd, md, D)
    for c0 in range(0, C, BC):
        rc = c0 + tl.arange(0, BC)
        mc = rc < C
        m = mc[:, None] & md[None, :]
        p = rc[:, None] * D + rd[None, :]
        out = n * C * D + p
        x = tl.load(XQ + b * s_q0 + h * s_q1 + p, mask=m, other=0.)
        tl.store(Qo + out, x / tl.sqrt(tl.sum(x * x, 1) + EPS)[:, None], mask=m)
        x = tl.load(XK + b * s_k0 + h * s_k1 + p, mask=m, other=0.)
        tl.store(Ko + out, x / tl.sqrt(tl.sum(x * x, 1) + EPS)[:, None], mask=m)
        x = tl.load(XV + b * s_v0 + h * s_v1 + p, mask=m, other=0.)
        if NORM_V:
            x = x / tl.sqrt(tl.sum(x * x, 1) + EPS)[:, None]
        tl.store(Vo + out, x, mask=m)
        x = tl.load(XE + b * s_e0 + h * s_e1 + p, mask=m, other=0.)
        tl.store(ETAo + n * C + rc, scale * tl.sigmoid(tl.sum(x * w_e[None, :], 1) + b_e), mask=mc)
        if MOMENTUM:
            tl.store(LMo + n * C + rc, _logsigmoid(tl.sum(x * w_m[None, :], 1) + b_m) + offset, mask=mc)
        if RETENTION:
            x = tl.load(XA + b * s_a0 + h * s_a1 + p, mask=m, other=0.)
            tl.store(LAo + n * C + rc, _logsigmoid(tl.sum(x * w_a[None, :], 1) + b_a), mask=mc)
        else:  # alpha = 1
            tl.store(LAo + n * C + rc, tl.zeros([BC], dtype=x.dtype), mask=mc)


@triton.jit
def _l2norm_rows_bwd(x, dy, EPS: tl.constexpr):
    r = 1 / tl.sqrt(tl.sum(x * x, 1) + EPS)
    y = x * r[:, None]
    return r[:, None] * (dy - y * tl.sum(y * dy, 1)[:, None])


@triton.jit
def _qkv_gates_bwd_kernel(XQ, XK, XV, XE, XA, WB, dQ, dK, dV, dETA, dLA, dLM, dXQ, dXK, dXV, dXE, dXA, dWB,
                          B, H, C, D, s_q0, s_q1, s_k0, s_k1, s_v0, s_v1, s_e0, s_e1, s_a0, s_a1,
                          t_q0, t_k0, t_v0, t_e0, t_a0, u_q0, u_q1, u_k0, u_k1, u_v0, u_v1, u_e0, u_e1, u_a0, u_a1,
                          u_m0, u_m1, scale, EPS: tl.constexpr, NORM_V: tl.constexpr,
                          RETENTION: tl.constexpr, HAS_A: tl.constexpr, MOMENTUM: tl.constexpr,
                          BC: tl.constexpr, BD: tl.constexpr):
    """One program per head, looping over the sequences: the readout's gradient (shared by them) is summed on
    chip, in a fixed order (no atomics, no second launch). Source gradients dX* [B, H, C, D] with sequence
    stride t_*0 and head stride C D (slots of one contiguous [B, G, H, C, D] stack, or a contiguous static's). The
    output gradients are read through their (sequence, head) strides u_* (rows contiguous): slices, read in place."""
    h = tl.program_id(0)
    rd = tl.arange(0, BD)
    md = rd < D
    w_e, b_e, w_a, b_a, w_m, b_m = _readout(WB + h * 3 * (D + 1), rd, md, D)
    dw_e = tl.zeros([BD], dtype=w_e.dtype)
    dw_a = tl.zeros([BD], dtype=w_e.dtype)
    dw_m = tl.zeros([BD], dtype=w_e.dtype)
    db_e = tl.zeros([BC], dtype=w_e.dtype)
    db_a = tl.zeros([BC], dtype=w_e.dtype)
    db_m = tl.zeros([BC], dtype=w_e.dtype)
    for b in range(0, B):
        for c0 in range(0, C, BC):
            rc = c0 + tl.arange(0, BC)
            mc = rc < C
            m = mc[:, None] & md[None, :]
            p = rc[:, None] * D + rd[None, :]
            dst = h * C * D + p
            x = tl.load(XQ + b * s_q0 + h * s_q1 + p, mask=m, other=0.)
            dy = tl.load(dQ + b * u_q0 + h * u_q1 + p, mask=m, other=0.)
            tl.store(dXQ + b * t_q0 + dst, _l2norm_rows_bwd(x, dy, EPS), mask=m)
            x = tl.load(XK + b * s_k0 + h * s_k1 + p, mask=m, other=0.)
            dy = tl.load(dK + b * u_k0 + h * u_k1 + p, mask=m, other=0.)
            tl.store(dXK + b * t_k0 + dst, _l2norm_rows_bwd(x, dy, EPS), mask=m)
            dv = tl.load(dV + b * u_v0 + h * u_v1 + p, mask=m, other=0.)
            if NORM_V:
                dv = _l2norm_rows_bwd(tl.load(XV + b * s_v0 + h * s_v1 + p, mask=m, other=0.), dv, EPS)
            tl.store(dXV + b * t_v0 + dst, dv, mask=m)
            x = tl.load(XE + b * s_e0 + h * s_e1 + p, mask=m, other=0.)
            s = tl.sigmoid(tl.sum(x * w_e[None, :], 1) + b_e)
            dz = tl.load(dETA + b * u_e0 + h * u_e1 + rc, mask=mc, other=0.) * scale * s * (1 - s)
            dx = dz[:, None] * w_e[None, :]
            dw_e += tl.sum(dz[:, None] * x, 0)
            db_e += dz
            if MOMENTUM:  # d logsigmoid(z) / dz = 1 - sigmoid(z)
                s = tl.sigmoid(tl.sum(x * w_m[None, :], 1) + b_m)
                dz = tl.load(dLM + b * u_m0 + h * u_m1 + rc, mask=mc, other=0.) * (1 - s)
                dx += dz[:, None] * w_m[None, :]
                dw_m += tl.sum(dz[:, None] * x, 0)
                db_m += dz
            tl.store(dXE + b * t_e0 + dst, dx, mask=m)
            if RETENTION:
                x = tl.load(XA + b * s_a0 + h * s_a1 + p, mask=m, other=0.)
                s = tl.sigmoid(tl.sum(x * w_a[None, :], 1) + b_a)
                dz = tl.load(dLA + b * u_a0 + h * u_a1 + rc, mask=mc, other=0.) * (1 - s)
                tl.store(dXA + b * t_a0 + dst, dz[:, None] * w_a[None, :], mask=m)
                dw_a += tl.sum(dz[:, None] * x, 0)
                db_a += dz
            elif HAS_A:  # an alpha generator without retention: its output is unused
                tl.store(dXA + b * t_a0 + dst, tl.zeros([BC, BD], dtype=w_e.dtype), mask=m)
    dwb = dWB + h * 3 * (D + 1)
    tl.store(dwb + rd, dw_e, mask=md)
    tl.store(dwb + D, tl.sum(db_e, 0))
    tl.store(dwb + (D + 1) + rd, dw_a, mask=md)
    tl.store(dwb + (D + 1) + D, tl.sum(db_a, 0))
    tl.store(dwb + 2 * (D + 1) + rd, dw_m, mask=md)
    tl.store(dwb + 2 * (D + 1) + D, tl.sum(db_m, 0))


QKV_SOURCES = ("q", "k", "v", "eta", "alpha")


def _qkv_sources(gen: torch.Tensor, statics: list[torch.Tensor | None], index: list[int]) -> list[torch.Tensor | None]:
    """Per source in QKV_SOURCES, its [B, H, C, d] view: a slot of the generator stack (index >= 0) or the static."""
    return [gen[:, i] if i >= 0 else s for i, s in zip(index, statics)]


def _qkv_gates_check(gen, statics, wb, index, retention):
    """(B, H, C, D, sources); raises ValueError / TypeError on inputs `qkv_gates` does not take."""
    if gen.dim() != 5 or len(index) != 5 or len(statics) != 3 or index[3] < 0 or (retention and index[4] < 0):
        raise ValueError(f"qkv_gates: expected gen [B, G, H, C, d], 5 indices with eta's (and alpha's with retention) "
                         f"generated and 3 statics, got {tuple(gen.shape)}, {index}, {len(statics)}")
    sources = _qkv_sources(gen, [*statics, None, None], index)
    B, _, H, C, D = gen.shape
    for name, src in zip(QKV_SOURCES, sources):
        if (src is None) != (name == "alpha" and index[4] < 0) or (src is not None and src.shape != (B, H, C, D)):
            raise ValueError(f"qkv_gates: {name} must come from gen or a static [B, H, C, d] = {[B, H, C, D]}, got "
                             f"{None if src is None else tuple(src.shape)}")
    _check(gen, wb, *[s for s in sources if s is not None])
    if wb.shape != (H, 3, D + 1):
        raise ValueError(f"qkv_gates: expected wb [H, 3, d + 1] = [{H}, 3, {D + 1}], got {tuple(wb.shape)}")
    return B, H, C, D, sources


def _row_strided(x: torch.Tensor, D: int) -> torch.Tensor:
    """x [..., C, D] as the kernels read it: rows of D contiguous one after the other, any strides before."""
    return x if x.stride(-1) == 1 and x.stride(-2) == D else x.contiguous()


@torch.library.custom_op("nl::qkv_gates", mutates_args=())
def qkv_gates(gen: torch.Tensor, q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor | None,
              wb: torch.Tensor, index: list[int], eps: float, normalize_v: bool, retention: bool, momentum: bool,
              eta_max: float, log_mu_offset: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`titans._derive` of one generator chunk in one kernel (kernel=triton, eta and alpha generated).

    gen [B, G, H, C, d]: the generators' outputs A_g(z) stacked on dim 1; index: for q, k, v, eta, alpha the
    position on that dim, -1 where not generated: q, k, v then come in as statics [B, H, C, d] (None where
    generated), alpha is absent (allowed only without retention). wb [H, 3, d + 1]: w | b of the eta, alpha and
    mu gates (`GATE_ROWS`). Returns q = l2norm(q_src), k = l2norm(k_src), v = v_src (l2norm-ed with normalize_v)
    [B, H, C, d]; eta = eta_max sigmoid(w_eta . A_eta(z) + b_eta), log_alpha = logsigmoid(w_alpha . A_alpha(z) +
    b_alpha) (0 without retention), log_mu = logsigmoid(w_mu . A_eta(z) + b_mu) + log_mu_offset (momentum; else an
    empty tensor) [B, H, C]. l2norm(x) = x / sqrt(||x||^2 + eps), as `titans.l2norm`.
    Raises ValueError on other shapes, TypeError unless every input is float32, or every one float64."""
    B, H, C, D, sources = _qkv_gates_check(gen, [q, k, v], wb, index, retention)
    sources = [None if s is None else _row_strided(s, D) for s in sources]
    strides = [st for s in sources for st in ((s.stride(0), s.stride(1)) if s is not None else (0, 0))]
    qo, ko, vo = (gen.new_empty(B, H, C, D) for _ in range(3))
    eta, la = gen.new_empty(B, H, C), gen.new_empty(B, H, C)
    lm = gen.new_empty(B, H, C) if momentum else gen.new_empty(0)
    xe = sources[3]  # stands in for an absent alpha source: never read
    _qkv_gates_kernel[(B * H,)](*sources[:4], sources[4] if sources[4] is not None else xe, wb.contiguous(),
                                qo, ko, vo, eta, la, lm if momentum else eta, H, C, D, *strides, eta_max,
                                log_mu_offset, EPS=eps, NORM_V=normalize_v, RETENTION=retention, MOMENTUM=momentum,
                                BC=_rows(C), BD=_block(D))
    return qo, ko, vo, eta, la, lm


@qkv_gates.register_fake
def _(gen, q, k, v, wb, index, eps, normalize_v, retention, momentum, eta_max, log_mu_offset):
    B, H, C, D, _ = _qkv_gates_check(gen, [q, k, v], wb, index, retention)
    return (*(gen.new_empty(B, H, C, D) for _ in range(3)), gen.new_empty(B, H, C), gen.new_empty(B, H, C),
            gen.new_empty(B, H, C) if momentum else gen.new_empty(0))


@torch.library.custom_op("nl::qkv_gates_backward", mutates_args=())
def qkv_gates_backward(gen: torch.Tensor, q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor | None,
                       wb: torch.Tensor, index: list[int], eps: float, normalize_v: bool, retention: bool,
                       momentum: bool, eta_max: float, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                       deta: torch.Tensor, dla: torch.Tensor, dlm: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `qkv_gates` w.r.t. gen (contiguous [B, G, H, C, d]; every slot written), the statics q, k, v
    (contiguous [B, H, C, d]; empty where generated) and wb ([H, 3, d + 1], summed over the sequences on chip).
    Output gradients shaped like the outputs, rows contiguous, any (sequence, head) strides (dla, dlm unread without
    retention / momentum)."""
    B, H, C, D, sources = _qkv_gates_check(gen, [q, k, v], wb, index, retention)
    sources = [None if s is None else _row_strided(s, D) for s in sources]
    strides = [st for s in sources for st in ((s.stride(0), s.stride(1)) if s is not None else (0, 0))]
    G = gen.shape[1]
    dgen, dwb = gen.new_empty(B, G, H, C, D), wb.new_empty(H, 3, D + 1)
    dstatic = [gen.new_empty(B, H, C, D) if i < 0 else gen.new_empty(0) for i in index[:3]]
    dsrc = [dgen[:, i] if i >= 0 else d for i, d in zip(index, [*dstatic, None, None])]
    dsrc[4] = dsrc[4] if dsrc[4] is not None else dsrc[3]  # absent alpha: never written
    xe = sources[3]
    # an absent gate's gradient (empty) is never read: the kernel gets deta in its place, a valid pointer
    dla, dlm = dla if retention else deta, dlm if momentum else deta
    douts = [*[_row_strided(g, D) for g in (dq, dk, dv)], *[g if g.stride(-1) == 1 else g.contiguous()
                                                            for g in (deta, dla, dlm)]]
    _qkv_gates_bwd_kernel[(H,)](*sources[:4], sources[4] if sources[4] is not None else xe, wb.contiguous(), *douts,
                                *dsrc, dwb, B, H, C, D, *strides, *[d.stride(0) for d in dsrc],
                                *[st for g in douts for st in g.stride()[:2]], eta_max, EPS=eps,
                                NORM_V=normalize_v, RETENTION=retention, HAS_A=index[4] >= 0, MOMENTUM=momentum,
                                BC=_rows(C), BD=_block(D))
    return dgen, *dstatic, dwb


@qkv_gates_backward.register_fake
def _(gen, q, k, v, wb, index, eps, normalize_v, retention, momentum, eta_max, dq, dk, dv, deta, dla, dlm):
    B, H, C, D, _ = _qkv_gates_check(gen, [q, k, v], wb, index, retention)
    return (gen.new_empty(B, gen.shape[1], H, C, D),
            *[gen.new_empty(B, H, C, D) if i < 0 else gen.new_empty(0) for i in index[:3]], wb.new_empty(H, 3, D + 1))


def _qkv_gates_setup(ctx, inputs, output) -> None:
    gen, q, k, v, wb, ctx.index, ctx.eps, ctx.normalize_v, ctx.retention, ctx.momentum, ctx.eta_max, _ = inputs
    ctx.absent = [t is None for t in (q, k, v)]
    ctx.save_for_backward(gen, wb, *[t for t in (q, k, v) if t is not None])
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero-filled launch for it


def _qkv_gates_bwd(ctx, dq, dk, dv, deta, dla, dlm):
    gen, wb, *rest = ctx.saved_tensors
    rest = iter(rest)
    statics = [None if absent else next(rest) for absent in ctx.absent]
    B, _, H, C, D = gen.shape

    def grad(g, *shape):  # None (that output unused): zeros, as the kernel reads every gradient it needs; a slice
        return gen.new_zeros(*shape) if g is None else g  # (from the loop's concatenation) is read in place

    empty = gen.new_empty(0)
    dgen, dq_s, dk_s, dv_s, dwb = qkv_gates_backward(
        gen, *statics, wb, ctx.index, ctx.eps, ctx.normalize_v, ctx.retention, ctx.momentum, ctx.eta_max,
        grad(dq, B, H, C, D), grad(dk, B, H, C, D), grad(dv, B, H, C, D), grad(deta, B, H, C),
        grad(dla, B, H, C) if ctx.retention else empty, grad(dlm, B, H, C) if ctx.momentum else empty)
    dstatic = [None if absent else g for absent, g in zip(ctx.absent, (dq_s, dk_s, dv_s))]
    return dgen, *dstatic, dwb, None, None, None, None, None, None, None


qkv_gates.register_autograd(_qkv_gates_bwd, setup_context=_qkv_gates_setup)
