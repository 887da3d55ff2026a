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
