"""An MLP memory's gradient factors at the anchor as one fused Triton kernel (`titans._grad_factors`' math).

For a memory M(z) = z + W1 silu(W2 z) (W1 [d, hidden], W2 [hidden, d]) and one chunk of keys k [C, d] and
values v [C, d], per batch element (one program each; inputs read through their batch strides, so k and v
shared by the stacked generators and an initial state shared by the sequences are read in place):

    pre = k W2^T,  h = silu(pre),  hout = h W1^T                      (M at k, [C, hidden], [C, d])
    target = v + W1 silu(W2 v)   (HOPE's self-generated target)  or  v   (Titans, self_target=False)
    e = k + hout - target                                            (dL/dM(k), L = 1/2 ||M(k) - target||^2)
    g1 = e,  g2 = (e W1) * silu'(pre)                                (grad_W1 L = g1 h^T, grad_W2 L = g2 k^T)

and with normalized=True both g are divided by 1 + ||J||_F^2 = 1 + sum_j silu'(pre_j)^2 ||W1[:, j]||^2 (the
whole-MLP normalised step, docs/HOPE.md), a step-size normaliser through which no gradient flows. Returns
(h, g1, hout, g2, pre): `delta_rule.memory_grad_factors`' [(h, g1, hout), (k, g2, pre)] without k.
The backward is a second kernel that recomputes the forward from the inputs (nothing else is saved) and
returns the gradients of W1, W2, k and v (second order in silu: g2's silu'(pre) contributes silu''(pre)).

Where it runs: model.hope.kernel=triton (auto on CUDA) for MLP memories, one launch forward and one backward
per memory and chunk (the stacked generators are one call): launches per hope_340m block at T=4096 went from
19,678 to 13,304 with it (benchmarks/bench_launches.py, docs/BENCHMARKS.md). Inputs float32 or float64, IEEE
products (no TF32). Registered with torch.library.custom_op (`nl::mlp_grad_factors`,
`nl::mlp_grad_factors_backward`): one opaque call each for torch.compile and FSDP2. Also here:
`nl::mlp_apply`, M(z) itself (the generators' outputs), forward and backward kernels. Triton is imported here,
so import this module lazily (`titans._grad_factors` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nl.ops.delta_rule import INPUT_NORM_EPS
from nl.ops.triton_dgd import _block, _dgd_bwd_tile, _dgd_fwd_tile, batch_offset, batch_strided, grid


@triton.jit
def _forward_tiles(w1, w2, k, v, BC: tl.constexpr, SELF_TARGET: tl.constexpr, NORMALIZED: tl.constexpr,
                   PRECISION: tl.constexpr):
    """The forward on tiles w1 [BD, BH], w2 [BH, BD], k, v [BC, BD] (zero-padded). Returns
    (pre, sg, sp, h, hout, e, ew1, hv, pv, scale): sg = sigmoid(pre), sp = silu'(pre), ew1 = e W1, and for the
    self-generated target pv = v W2^T, hv = silu(pv) (stand-ins without it); scale = 1 / (1 + ||J||_F^2) per
    token (ones without normalized)."""
    pre = tl.dot(k, tl.trans(w2), input_precision=PRECISION)          # [BC, BH]
    sg = tl.sigmoid(pre)
    h = pre * sg
    sp = sg * (1 + pre * (1 - sg))                                    # silu'(pre)
    hout = tl.dot(h, tl.trans(w1), input_precision=PRECISION)         # [BC, BD]
    e = k + hout - v
    pv, hv = pre, h  # stand-ins (a Triton function returns one fixed tuple)
    if SELF_TARGET:
        pv = tl.dot(v, tl.trans(w2), input_precision=PRECISION)
        hv = pv * tl.sigmoid(pv)
        e -= tl.dot(hv, tl.trans(w1), input_precision=PRECISION)
    ew1 = tl.dot(e, w1, input_precision=PRECISION)                    # [BC, BH]
    scale = tl.full((BC,), 1.0, e.dtype)
    if NORMALIZED:
        col_sq = tl.sum(w1 * w1, 0)                                   # ||W1[:, j]||^2, [BH]
        scale = 1 / (1 + tl.sum(sp * sp * col_sq[None, :], 1))
    return pre, sg, sp, h, hout, e, ew1, hv, pv, scale


@triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (4, 8)], key=["BC", "BD", "BH"])
@triton.jit
def _mlp_factors_kernel(W1, W2, K, V, H, G1, HOUT, G2, PRE, C, D, HID, N1, N2,
                        s_W1_0, s_W1_1, s_W1_2, s_W2_0, s_W2_1, s_W2_2, s_K_0, s_K_1, s_K_2, s_V_0, s_V_1, s_V_2,
                        BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, SELF_TARGET: tl.constexpr,
                        NORMALIZED: tl.constexpr, PRECISION: tl.constexpr):
    n = tl.program_id(0)
    rc, rd, rh = tl.arange(0, BC), tl.arange(0, BD), tl.arange(0, BH)
    mc, md, mh = rc < C, rd < D, rh < HID
    m_cd, m_ch = mc[:, None] & md[None, :], mc[:, None] & mh[None, :]
    p_cd, p_ch = rc[:, None] * D + rd[None, :], rc[:, None] * HID + rh[None, :]
    w1 = tl.load(W1 + batch_offset(n, N1, N2, s_W1_0, s_W1_1, s_W1_2) + rd[:, None] * HID + rh[None, :],
                 mask=md[:, None] & mh[None, :], other=0.)
    w2 = tl.load(W2 + batch_offset(n, N1, N2, s_W2_0, s_W2_1, s_W2_2) + rh[:, None] * D + rd[None, :],
                 mask=mh[:, None] & md[None, :], other=0.)
    k = tl.load(K + batch_offset(n, N1, N2, s_K_0, s_K_1, s_K_2) + p_cd, mask=m_cd, other=0.)
    v = tl.load(V + batch_offset(n, N1, N2, s_V_0, s_V_1, s_V_2) + p_cd, mask=m_cd, other=0.)
    pre, sg, sp, h, hout, e, ew1, hv, pv, scale = _forward_tiles(w1, w2, k, v, BC, SELF_TARGET, NORMALIZED, PRECISION)
    tl.store(H + n * C * HID + p_ch, h, mask=m_ch)
    tl.store(G1 + n * C * D + p_cd, e * scale[:, None], mask=m_cd)
    tl.store(HOUT + n * C * D + p_cd, hout, mask=m_cd)
    tl.store(G2 + n * C * HID + p_ch, ew1 * sp * scale[:, None], mask=m_ch)
    tl.store(PRE + n * C * HID + p_ch, pre, mask=m_ch)


@triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (4, 8)], key=["BC", "BD", "BH"])
@triton.jit
def _mlp_factors_bwd_kernel(W1, W2, K, V, dH, dG1, dHOUT, dG2, dPRE, dW1, dW2, dK, dV, C, D, HID, N1, N2,
                            s_W1_0, s_W1_1, s_W1_2, s_W2_0, s_W2_1, s_W2_2, s_K_0, s_K_1, s_K_2,
                            s_V_0, s_V_1, s_V_2, BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                            SELF_TARGET: tl.constexpr, NORMALIZED: tl.constexpr, HAS_DH: tl.constexpr,
                            HAS_DHOUT: tl.constexpr, HAS_DPRE: tl.constexpr, PRECISION: tl.constexpr):
    """The forward recomputed, then reversed: g2 = ew1 sp scale, g1 = e scale (scale constant), ew1 = e W1,
    e = k + hout - v - silu(v W2^T) W1^T, hout = h W1^T, h = silu(pre), pre = k W2^T. Outputs over the whole
    batch (the caller sums those of broadcast inputs). dH, dHOUT, dPRE may be absent (HAS_*: no gradient)."""
    n = tl.program_id(0)
    rc, rd, rh = tl.arange(0, BC), tl.arange(0, BD), tl.arange(0, BH)
    mc, md, mh = rc < C, rd < D, rh < HID
    m_cd, m_ch, m_dh, m_hd = mc[:, None] & md[None, :], mc[:, None] & mh[None, :], md[:, None] & mh[None, :], \
        mh[:, None] & md[None, :]
    p_cd, p_ch = rc[:, None] * D + rd[None, :], rc[:, None] * HID + rh[None, :]
    p_dh, p_hd = rd[:, None] * HID + rh[None, :], rh[:, None] * D + rd[None, :]
    w1 = tl.load(W1 + batch_offset(n, N1, N2, s_W1_0, s_W1_1, s_W1_2) + p_dh, mask=m_dh, other=0.)
    w2 = tl.load(W2 + batch_offset(n, N1, N2, s_W2_0, s_W2_1, s_W2_2) + p_hd, mask=m_hd, other=0.)
    k = tl.load(K + batch_offset(n, N1, N2, s_K_0, s_K_1, s_K_2) + p_cd, mask=m_cd, other=0.)
    v = tl.load(V + batch_offset(n, N1, N2, s_V_0, s_V_1, s_V_2) + p_cd, mask=m_cd, other=0.)
    pre, sg, sp, h, hout, e, ew1, hv, pv, scale = _forward_tiles(w1, w2, k, v, BC, SELF_TARGET, NORMALIZED, PRECISION)
    # g1 = e scale, g2 = ew1 sp scale
    de = tl.load(dG1 + n * C * D + p_cd, mask=m_cd, other=0.) * scale[:, None]
    dg2 = tl.load(dG2 + n * C * HID + p_ch, mask=m_ch, other=0.) * scale[:, None]
    dew1 = dg2 * sp
    # sp = silu'(pre): silu''(pre) = sg (1 - sg) (2 + pre (1 - 2 sg))
    dpre = dg2 * ew1 * sg * (1 - sg) * (2 + pre * (1 - 2 * sg))
    if HAS_DPRE:
        dpre += tl.load(dPRE + n * C * HID + p_ch, mask=m_ch, other=0.)
    # ew1 = e W1
    de += tl.dot(dew1, tl.trans(w1), input_precision=PRECISION)
    dw1 = tl.dot(tl.trans(e), dew1, input_precision=PRECISION)           # [BD, BH]
    # e = k + hout - v (- silu(pv) W1^T)
    dk = de
    dv = -de
    dhout = de
    if HAS_DHOUT:
        dhout += tl.load(dHOUT + n * C * D + p_cd, mask=m_cd, other=0.)
    dw2 = tl.zeros([BH, BD], dtype=w2.dtype)
    if SELF_TARGET:
        dw1 -= tl.dot(tl.trans(de), hv, input_precision=PRECISION)
        sgv = tl.sigmoid(pv)
        dpv = -tl.dot(de, w1, input_precision=PRECISION) * sgv * (1 + pv * (1 - sgv))
        dv += tl.dot(dpv, w2, input_precision=PRECISION)
        dw2 += tl.dot(tl.trans(dpv), v, input_precision=PRECISION)
    # hout = h W1^T, h = silu(pre), pre = k W2^T
    dh = tl.dot(dhout, w1, input_precision=PRECISION)
    if HAS_DH:
        dh += tl.load(dH + n * C * HID + p_ch, mask=m_ch, other=0.)
    dw1 += tl.dot(tl.trans(dhout), h, input_precision=PRECISION)
    dpre += dh * sp
    dk += tl.dot(dpre, w2, input_precision=PRECISION)
    dw2 += tl.dot(tl.trans(dpre), k, input_precision=PRECISION)
    tl.store(dW1 + n * D * HID + p_dh, dw1, mask=m_dh)
    tl.store(dW2 + n * HID * D + p_hd, dw2, mask=m_hd)
    tl.store(dK + n * C * D + p_cd, dk, mask=m_cd)
    tl.store(dV + n * C * D + p_cd, dv, mask=m_cd)


def _prepare(W1: torch.Tensor, W2: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(batch shape, kernel args, strides, C, D, HID); checks dtypes and shapes."""
    if W1.dtype not in (torch.float32, torch.float64) or len({W1.dtype, W2.dtype, k.dtype, v.dtype}) != 1:
        raise TypeError(f"mlp_grad_factors: float32 or float64 inputs of one dtype, got "
                        f"{W1.dtype}, {W2.dtype}, {k.dtype}, {v.dtype}")
    D, HID = W1.shape[-2:]
    if W2.shape[-2:] != (HID, D) or k.shape[-1] != D or v.shape[-2:] != k.shape[-2:]:
        raise ValueError(f"mlp_grad_factors: expected W1 [..., d, hidden], W2 [..., hidden, d], k and v [..., C, d], "
                         f"got {tuple(W1.shape)}, {tuple(W2.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch = torch.broadcast_shapes(W1.shape[:-2], W2.shape[:-2], k.shape[:-2], v.shape[:-2])
    if len(batch) > 3:
        raise ValueError(f"mlp_grad_factors: at most 3 batch dims, got {tuple(batch)}")
    args, strides = [], []
    for t in (W1, W2, k, v):
        t, st = batch_strided(t, 2)
        args.append(t)
        strides += st
    return batch, args, strides, k.shape[-2], D, HID


@torch.library.custom_op("nl::mlp_grad_factors", mutates_args=())
def mlp_grad_factors(W1: torch.Tensor, W2: torch.Tensor, k: torch.Tensor, v: torch.Tensor, self_target: bool,
                     normalized: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradient factors of the MLP memory (W1 [*, d, hidden], W2 [*, hidden, d]) at keys k [*, C, d] against
    the targets of values v [*, C, d] (module docstring; the batch dims, up to 3, broadcast to [*b]).
    Returns (h, g1, hout, g2, pre): [*b, C, hidden], [*b, C, d], [*b, C, d], [*b, C, hidden], [*b, C, hidden]."""
    batch, args, strides, C, D, HID = _prepare(W1, W2, k, v)
    N, N1, N2 = grid(batch)
    h, g2, pre = (k.new_empty(*batch, C, HID) for _ in range(3))
    g1, hout = (k.new_empty(*batch, C, D) for _ in range(2))
    _mlp_factors_kernel[(N,)](*args, h, g1, hout, g2, pre, C, D, HID, N1, N2, *strides, BC=_block(C), BD=_block(D),
                              BH=_block(HID), SELF_TARGET=self_target, NORMALIZED=normalized, PRECISION="ieee")
    return h, g1, hout, g2, pre


@mlp_grad_factors.register_fake
def _(W1, W2, k, v, self_target, normalized):
    batch = torch.broadcast_shapes(W1.shape[:-2], W2.shape[:-2], k.shape[:-2], v.shape[:-2])
    C, D, HID = k.shape[-2], W1.shape[-2], W1.shape[-1]
    return (k.new_empty(*batch, C, HID), k.new_empty(*batch, C, D), k.new_empty(*batch, C, D),
            k.new_empty(*batch, C, HID), k.new_empty(*batch, C, HID))


@torch.library.custom_op("nl::mlp_grad_factors_backward", mutates_args=())
def mlp_grad_factors_backward(W1: torch.Tensor, W2: torch.Tensor, k: torch.Tensor, v: torch.Tensor, self_target: bool,
                              normalized: bool, g_h: torch.Tensor | None, g_g1: torch.Tensor,
                              g_hout: torch.Tensor | None, g_g2: torch.Tensor,
                              g_pre: torch.Tensor | None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `mlp_grad_factors` w.r.t. (W1, W2, k, v), each over the whole batch [*b, ...] (the caller sums a
    broadcast input's); output gradients contiguous [*b, ...] (None: that output is unused)."""
    batch, args, strides, C, D, HID = _prepare(W1, W2, k, v)
    N, N1, N2 = grid(batch)
    dW1, dW2 = W1.new_empty(*batch, D, HID), W2.new_empty(*batch, HID, D)
    dk, dv = k.new_empty(*batch, C, D), v.new_empty(*batch, C, D)
    _mlp_factors_bwd_kernel[(N,)](*args, g_g1 if g_h is None else g_h, g_g1, g_g1 if g_hout is None else g_hout,
                                  g_g2, g_g2 if g_pre is None else g_pre, dW1, dW2, dk, dv, C, D, HID, N1, N2,
                                  *strides, BC=_block(C), BD=_block(D), BH=_block(HID), SELF_TARGET=self_target,
                                  NORMALIZED=normalized, HAS_DH=g_h is not None, HAS_DHOUT=g_hout is not None,
                                  HAS_DPRE=g_pre is not None, PRECISION="ieee")
    return dW1, dW2, dk, dv


@mlp_grad_factors_backward.register_fake
def _(W1, W2, k, v, self_target, normalized, g_h, g_g1, g_hout, g_g2, g_pre):
    batch = torch.broadcast_shapes(W1.shape[:-2], W2.shape[:-2], k.shape[:-2], v.shape[:-2])
    C, D, HID = k.shape[-2], W1.shape[-2], W1.shape[-1]
    return (W1.new_empty(*batch, D, HID), W2.new_empty(*batch, HID, D), k.new_empty(*batch, C, D),
            v.new_empty(*batch, C, D))


def _setup_context(ctx, inputs, output) -> None:
    W1, W2, k, v, ctx.self_target, ctx.normalized = inputs
    ctx.save_for_backward(W1, W2, k, v)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: the kernel skips it (_backward)


def _backward(ctx, g_h, g_g1, g_hout, g_g2, g_pre):
    W1, W2, k, v = ctx.saved_tensors
    batch = torch.broadcast_shapes(W1.shape[:-2], W2.shape[:-2], k.shape[:-2], v.shape[:-2])
    # g1 and g2 always feed a layer's step; h, hout and pre may go unused (no gradient: the kernel skips them)
    g_g1 = k.new_zeros(*batch, *k.shape[-2:]) if g_g1 is None else g_g1.contiguous()
    g_g2 = k.new_zeros(*batch, k.shape[-2], W1.shape[-1]) if g_g2 is None else g_g2.contiguous()
    grads = mlp_grad_factors_backward(W1, W2, k, v, ctx.self_target, ctx.normalized,
                                      None if g_h is None else g_h.contiguous(), g_g1,
                                      None if g_hout is None else g_hout.contiguous(), g_g2,
                                      None if g_pre is None else g_pre.contiguous())
    # a broadcast input's gradient: the sum over the batch elements that read it (no launch when not broadcast)
    return (*[g.sum_to_size(t.shape) for g, t in zip(grads, (W1, W2, k, v))], None, None)


mlp_grad_factors.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ M(z) = z + W1 silu(W2 z) -------

@triton.jit
def _mlp_apply_kernel(W1, W2, Z, OUT, C, D, HID, N1, N2, s_W1_0, s_W1_1, s_W1_2, s_W2_0, s_W2_1, s_W2_2,
                      s_Z_0, s_Z_1, s_Z_2, BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                      PRECISION: tl.constexpr):
    n = tl.program_id(0)
    rc, rd, rh = tl.arange(0, BC), tl.arange(0, BD), tl.arange(0, BH)
    mc, md, mh = rc < C, rd < D, rh < HID
    w1 = tl.load(W1 + batch_offset(n, N1, N2, s_W1_0, s_W1_1, s_W1_2) + rd[:, None] * HID + rh[None, :],
                 mask=md[:, None] & mh[None, :], other=0.)
    w2 = tl.load(W2 + batch_offset(n, N1, N2, s_W2_0, s_W2_1, s_W2_2) + rh[:, None] * D + rd[None, :],
                 mask=mh[:, None] & md[None, :], other=0.)
    z = tl.load(Z + batch_offset(n, N1, N2, s_Z_0, s_Z_1, s_Z_2) + rc[:, None] * D + rd[None, :],
                mask=mc[:, None] & md[None, :], other=0.)
    pre = tl.dot(z, tl.trans(w2), input_precision=PRECISION)
    out = z + tl.dot(pre * tl.sigmoid(pre), tl.trans(w1), input_precision=PRECISION)
    tl.store(OUT + n * C * D + rc[:, None] * D + rd[None, :], out, mask=mc[:, None] & md[None, :])


@triton.jit
def _mlp_apply_bwd_kernel(W1, W2, Z, DOUT, dW1, dW2, dZ, C, D, HID, N1, N2, s_W1_0, s_W1_1, s_W1_2,
                          s_W2_0, s_W2_1, s_W2_2, s_Z_0, s_Z_1, s_Z_2, BC: tl.constexpr, BD: tl.constexpr,
                          BH: tl.constexpr, PRECISION: tl.constexpr):
    """out = z + h W1^T, h = silu(pre), pre = z W2^T, recomputed, then reversed."""
    n = tl.program_id(0)
    rc, rd, rh = tl.arange(0, BC), tl.arange(0, BD), tl.arange(0, BH)
    mc, md, mh = rc < C, rd < D, rh < HID
    m_cd, m_dh, m_hd = mc[:, None] & md[None, :], md[:, None] & mh[None, :], mh[:, None] & md[None, :]
    p_cd, p_dh, p_hd = rc[:, None] * D + rd[None, :], rd[:, None] * HID + rh[None, :], rh[:, None] * D + rd[None, :]
    w1 = tl.load(W1 + batch_offset(n, N1, N2, s_W1_0, s_W1_1, s_W1_2) + p_dh, mask=m_dh, other=0.)
    w2 = tl.load(W2 + batch_offset(n, N1, N2, s_W2_0, s_W2_1, s_W2_2) + p_hd, mask=m_hd, other=0.)
    z = tl.load(Z + batch_offset(n, N1, N2, s_Z_0, s_Z_1, s_Z_2) + p_cd, mask=m_cd, other=0.)
    dout = tl.load(DOUT + n * C * D + p_cd, mask=m_cd, other=0.)
    pre = tl.dot(z, tl.trans(w2), input_precision=PRECISION)
    sg = tl.sigmoid(pre)
    dpre = tl.dot(dout, w1, input_precision=PRECISION) * sg * (1 + pre * (1 - sg))
    tl.store(dW1 + n * D * HID + p_dh, tl.dot(tl.trans(dout), pre * sg, input_precision=PRECISION), mask=m_dh)
    tl.store(dW2 + n * HID * D + p_hd, tl.dot(tl.trans(dpre), z, input_precision=PRECISION), mask=m_hd)
    tl.store(dZ + n * C * D + p_cd, dout + tl.dot(dpre, w2, input_precision=PRECISION), mask=m_cd)


def _apply_prepare(W1: torch.Tensor, W2: torch.Tensor, z: torch.Tensor):
    batch, args, strides, C, D, HID = _prepare(W1, W2, z, z)
    return batch, args[:3], strides[:9], C, D, HID


@torch.library.custom_op("nl::mlp_apply", mutates_args=())
def mlp_apply(W1: torch.Tensor, W2: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """M(z) = z + W1 silu(W2 z) for W1 [*, d, hidden], W2 [*, hidden, d], z [*, C, d] (up to 3 batch dims,
    broadcast to [*b]; shared inputs read in place): [*b, C, d] (`delta_rule.memory_apply` of an MLP memory)."""
    batch, args, strides, C, D, HID = _apply_prepare(W1, W2, z)
    N, N1, N2 = grid(batch)
    out = z.new_empty(*batch, C, D)
    _mlp_apply_kernel[(N,)](*args, out, C, D, HID, N1, N2, *strides, BC=_block(C), BD=_block(D), BH=_block(HID),
                            PRECISION="ieee")
    return out


@mlp_apply.register_fake
def _(W1, W2, z):
    return z.new_empty(*torch.broadcast_shapes(W1.shape[:-2], W2.shape[:-2], z.shape[:-2]), *z.shape[-2:])


@torch.library.custom_op("nl::mlp_apply_backward", mutates_args=())
def mlp_apply_backward(W1: torch.Tensor, W2: torch.Tensor, z: torch.Tensor,
                       g_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `mlp_apply` w.r.t. W1, W2 and z over the whole batch [*b, ...]; g_out [*b, C, d] contiguous."""
    batch, args, strides, C, D, HID = _apply_prepare(W1, W2, z)
    N, N1, N2 = grid(batch)
    dW1, dW2, dz = W1.new_empty(*batch, D, HID), W2.new_empty(*batch, HID, D), z.new_empty(*batch, C, D)
    _mlp_apply_bwd_kernel[(N,)](*args, g_out, dW1, dW2, dz, C, D, HID, N1, N2, *strides, BC=_block(C),
                                BD=_block(D), BH=_block(HID), PRECISION="ieee")
    return dW1, dW2, dz


@mlp_apply_backward.register_fake
def _(W1, W2, z, g_out):
    batch = torch.broadcast_shapes(W1.shape[:-2], W2.shape[:-2], z.shape[:-2])
    return (W1.new_empty(*batch, *W1.shape[-2:]), W2.new_empty(*batch, *W2.shape[-2:]),
            z.new_empty(*batch, *z.shape[-2:]))


def _apply_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _apply_bwd(ctx, g_out):
    W1, W2, z = ctx.saved_tensors
    grads = mlp_apply_backward(W1, W2, z, g_out.contiguous())
    return tuple(g.sum_to_size(t.shape) for g, t in zip(grads, (W1, W2, z)))


mlp_apply.register_autograd(_apply_bwd, setup_context=_apply_setup)


# ------------------------------------------------ both layers of an MLP memory's chunk step, one kernel -------
# Inputs of `mlp_dgd_chunk`, in kernel-argument order; matrices [*, rows, cols], gates [*, C].
MLP_INPUTS = ("S1", "P1", "S2", "P2", "X1", "G1", "X2", "G2", "Q", "QI2", "M01", "log_alpha", "eta", "log_mu")
_GATES = {"log_alpha", "eta", "log_mu"}


@triton.jit
def _mlp_dgd_kernel(S1, P1, S2, P2, X1, G1, X2, G2, Q, QI2, M01, LA, ETA, LM, OUT, S1_END, P1_END, S2_END, P2_END,
                    PRE, HQ, C, D, HID, N1, N2, STRIDES_S1_0, STRIDES_S1_1, STRIDES_S1_2, STRIDES_P1_0, STRIDES_P1_1,
                    STRIDES_P1_2, STRIDES_S2_0, STRIDES_S2_1, STRIDES_S2_2, STRIDES_P2_0, STRIDES_P2_1, STRIDES_P2_2,
                    STRIDES_X1_0, STRIDES_X1_1, STRIDES_X1_2, STRIDES_G1_0, STRIDES_G1_1, STRIDES_G1_2,
                    STRIDES_X2_0, STRIDES_X2_1, STRIDES_X2_2, STRIDES_G2_0, STRIDES_G2_1, STRIDES_G2_2,
                    STRIDES_Q_0, STRIDES_Q_1, STRIDES_Q_2, STRIDES_QI2_0, STRIDES_QI2_1, STRIDES_QI2_2,
                    STRIDES_M01_0, STRIDES_M01_1, STRIDES_M01_2, STRIDES_LA_0, STRIDES_LA_1, STRIDES_LA_2,
                    STRIDES_ETA_0, STRIDES_ETA_1, STRIDES_ETA_2, STRIDES_LM_0, STRIDES_LM_1, STRIDES_LM_2,
                    BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, DGD: tl.constexpr, MOMENTUM: tl.constexpr,
                    HAS_Q: tl.constexpr, HAS_QI: tl.constexpr, HAS_M01: tl.constexpr, NORM_X1: tl.constexpr,
                    EPS: tl.constexpr, PRECISION: tl.constexpr):
    n = tl.program_id(0)
    s1 = S1 + batch_offset(n, N1, N2, STRIDES_S1_0, STRIDES_S1_1, STRIDES_S1_2)
    p1 = P1 + batch_offset(n, N1, N2, STRIDES_P1_0, STRIDES_P1_1, STRIDES_P1_2)
    s2 = S2 + batch_offset(n, N1, N2, STRIDES_S2_0, STRIDES_S2_1, STRIDES_S2_2)
    p2 = P2 + batch_offset(n, N1, N2, STRIDES_P2_0, STRIDES_P2_1, STRIDES_P2_2)
    x1 = X1 + batch_offset(n, N1, N2, STRIDES_X1_0, STRIDES_X1_1, STRIDES_X1_2)
    g1 = G1 + batch_offset(n, N1, N2, STRIDES_G1_0, STRIDES_G1_1, STRIDES_G1_2)
    x2 = X2 + batch_offset(n, N1, N2, STRIDES_X2_0, STRIDES_X2_1, STRIDES_X2_2)
    g2 = G2 + batch_offset(n, N1, N2, STRIDES_G2_0, STRIDES_G2_1, STRIDES_G2_2)
    q = Q + batch_offset(n, N1, N2, STRIDES_Q_0, STRIDES_Q_1, STRIDES_Q_2)
    la = LA + batch_offset(n, N1, N2, STRIDES_LA_0, STRIDES_LA_1, STRIDES_LA_2)
    eta = ETA + batch_offset(n, N1, N2, STRIDES_ETA_0, STRIDES_ETA_1, STRIDES_ETA_2)
    lm = LM + batch_offset(n, N1, N2, STRIDES_LM_0, STRIDES_LM_1, STRIDES_LM_2)
    pre, hq = PRE + n * C * HID, HQ + n * C * HID
    # W2 (input k): its read of q is the hidden pre-activation of the memory's read
    _dgd_fwd_tile(s2, p2, x2, g2, x2, q, la, eta, lm, pre, S2_END + n * HID * D, P2_END + n * HID * D, C, D, HID,
                  BC, BD, BH, DGD, MOMENTUM, HAS_Q, False, False, EPS, PRECISION)
    rc, rd, rh = tl.arange(0, BC), tl.arange(0, BD), tl.arange(0, BH)
    m_ch, m_cd = (rc < C)[:, None] & (rh < HID)[None, :], (rc < C)[:, None] & (rd < D)[None, :]
    p_ch, p_cd = rc[:, None] * HID + rh[None, :], rc[:, None] * D + rd[None, :]
    if HAS_Q:
        tl.debug_barrier()  # the tile stored above is read back by other threads of the program
        a = tl.load(pre + p_ch, mask=m_ch, other=0.)
        if HAS_QI:  # + q M0_2^T (retention toward M_0: the layer is M0_2 + the deviation the step carries)
            a += tl.load(QI2 + batch_offset(n, N1, N2, STRIDES_QI2_0, STRIDES_QI2_1, STRIDES_QI2_2) + p_ch,
                         mask=m_ch, other=0.)
        tl.store(hq + p_ch, a * tl.sigmoid(a), mask=m_ch)  # h_q = silu(.)
        tl.debug_barrier()
    # W1 (input h): its read of h_q
    _dgd_fwd_tile(s1, p1, x1, g1, x1, hq, la, eta, lm, OUT + n * C * D, S1_END + n * D * HID, P1_END + n * D * HID,
                  C, HID, D, BC, BH, BD, DGD, MOMENTUM, HAS_Q, False, NORM_X1, EPS, PRECISION)
    if HAS_Q:
        tl.debug_barrier()
        o = tl.load(OUT + n * C * D + p_cd, mask=m_cd, other=0.) + tl.load(q + p_cd, mask=m_cd, other=0.)
        if HAS_M01:  # + h_q M0_1^T
            m01 = tl.load(M01 + batch_offset(n, N1, N2, STRIDES_M01_0, STRIDES_M01_1, STRIDES_M01_2)
                          + rd[:, None] * HID + rh[None, :], mask=(rd < D)[:, None] & (rh < HID)[None, :], other=0.)
            o += tl.dot(tl.load(hq + p_ch, mask=m_ch, other=0.), tl.trans(m01), input_precision=PRECISION)
        tl.store(OUT + n * C * D + p_cd, o, mask=m_cd)


@triton.jit
def _mlp_dgd_bwd_kernel(S1, P1, S2, P2, X1, G1, X2, G2, Q, QI2, M01, LA, ETA, LM, DOUT, DS1, DP1, DS2, DP2,
                        dS1, dP1, dS2, dP2, dX1, dG1, dX2, dG2, dQ, dQI2, dM01, dLA, dETA, dLM, PRE, HQ, DHQ, SCR,
                        C, D, HID, N1, N2, STRIDES_S1_0, STRIDES_S1_1, STRIDES_S1_2, STRIDES_P1_0, STRIDES_P1_1,
                        STRIDES_P1_2, STRIDES_S2_0, STRIDES_S2_1, STRIDES_S2_2, STRIDES_P2_0, STRIDES_P2_1,
                        STRIDES_P2_2, STRIDES_X1_0, STRIDES_X1_1, STRIDES_X1_2, STRIDES_G1_0, STRIDES_G1_1,
                        STRIDES_G1_2, STRIDES_X2_0, STRIDES_X2_1, STRIDES_X2_2, STRIDES_G2_0, STRIDES_G2_1,
                        STRIDES_G2_2, STRIDES_Q_0, STRIDES_Q_1, STRIDES_Q_2, STRIDES_QI2_0, STRIDES_QI2_1,
                        STRIDES_QI2_2, STRIDES_M01_0, STRIDES_M01_1, STRIDES_M01_2, STRIDES_LA_0, STRIDES_LA_1,
                        STRIDES_LA_2, STRIDES_ETA_0, STRIDES_ETA_1, STRIDES_ETA_2, STRIDES_LM_0, STRIDES_LM_1,
                        STRIDES_LM_2, BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, DGD: tl.constexpr,
                        MOMENTUM: tl.constexpr, HAS_Q: tl.constexpr, HAS_QI: tl.constexpr, HAS_M01: tl.constexpr,
                        NORM_X1: tl.constexpr, EPS: tl.constexpr, PRECISION: tl.constexpr):
    """The read chain recomputed (W2's read of q, h_q), then W1's backward (its read of h_q), the chain's
    gradient back to W2's read output, and W2's backward adding its q and gate gradients to W1's."""
    n = tl.program_id(0)
    s1 = S1 + batch_offset(n, N1, N2, STRIDES_S1_0, STRIDES_S1_1, STRIDES_S1_2)
    p1 = P1 + batch_offset(n, N1, N2, STRIDES_P1_0, STRIDES_P1_1, STRIDES_P1_2)
    s2 = S2 + batch_offset(n, N1, N2, STRIDES_S2_0, STRIDES_S2_1, STRIDES_S2_2)
    p2 = P2 + batch_offset(n, N1, N2, STRIDES_P2_0, STRIDES_P2_1, STRIDES_P2_2)
    x1 = X1 + batch_offset(n, N1, N2, STRIDES_X1_0, STRIDES_X1_1, STRIDES_X1_2)
    g1 = G1 + batch_offset(n, N1, N2, STRIDES_G1_0, STRIDES_G1_1, STRIDES_G1_2)
    x2 = X2 + batch_offset(n, N1, N2, STRIDES_X2_0, STRIDES_X2_1, STRIDES_X2_2)
    g2 = G2 + batch_offset(n, N1, N2, STRIDES_G2_0, STRIDES_G2_1, STRIDES_G2_2)
    q = Q + batch_offset(n, N1, N2, STRIDES_Q_0, STRIDES_Q_1, STRIDES_Q_2)
    la = LA + batch_offset(n, N1, N2, STRIDES_LA_0, STRIDES_LA_1, STRIDES_LA_2)
    eta = ETA + batch_offset(n, N1, N2, STRIDES_ETA_0, STRIDES_ETA_1, STRIDES_ETA_2)
    lm = LM + batch_offset(n, N1, N2, STRIDES_LM_0, STRIDES_LM_1, STRIDES_LM_2)
    pre, hq, dhq = PRE + n * C * HID, HQ + n * C * HID, DHQ + n * C * HID
    rc, rd, rh = tl.arange(0, BC), tl.arange(0, BD), tl.arange(0, BH)
    m_ch, m_cd = (rc < C)[:, None] & (rh < HID)[None, :], (rc < C)[:, None] & (rd < D)[None, :]
    p_ch, p_cd = rc[:, None] * HID + rh[None, :], rc[:, None] * D + rd[None, :]
    m_dh, p_dh = (rd < D)[:, None] & (rh < HID)[None, :], rd[:, None] * HID + rh[None, :]
    if HAS_Q:  # recompute W2's read and h_q (its end state goes to scratch)
        scr = SCR + n * HID * D
        _dgd_fwd_tile(s2, p2, x2, g2, x2, q, la, eta, lm, pre, scr, scr, C, D, HID, BC, BD, BH, DGD, MOMENTUM, True,
                      False, False, EPS, PRECISION)
        tl.debug_barrier()
        a = tl.load(pre + p_ch, mask=m_ch, other=0.)
        if HAS_QI:
            a += tl.load(QI2 + batch_offset(n, N1, N2, STRIDES_QI2_0, STRIDES_QI2_1, STRIDES_QI2_2) + p_ch,
                         mask=m_ch, other=0.)
        tl.store(pre + p_ch, a, mask=m_ch)
        tl.store(hq + p_ch, a * tl.sigmoid(a), mask=m_ch)
        tl.debug_barrier()
    # W1: o = q + read_1(h_q) (+ h_q M0_1^T)
    _dgd_bwd_tile(s1, p1, x1, g1, x1, hq, la, eta, lm, DOUT + n * C * D, DS1 + n * D * HID, DP1 + n * D * HID,
                  dS1 + n * D * HID, dP1 + n * D * HID, dX1 + n * C * HID, dG1 + n * C * D, dX1 + n * C * HID, dhq,
                  dLA + n * C, dETA + n * C, dLM + n * C, C, HID, D, BC, BH, BD, DGD, MOMENTUM, HAS_Q, False,
                  NORM_X1, EPS, PRECISION, False, False)
    if HAS_Q:
        tl.debug_barrier()
        do = tl.load(DOUT + n * C * D + p_cd, mask=m_cd, other=0.)
        g = tl.load(dhq + p_ch, mask=m_ch, other=0.)
        if HAS_M01:
            h = tl.load(hq + p_ch, mask=m_ch, other=0.)
            m01 = tl.load(M01 + batch_offset(n, N1, N2, STRIDES_M01_0, STRIDES_M01_1, STRIDES_M01_2) + p_dh,
                          mask=m_dh, other=0.)
            g += tl.dot(do, m01, input_precision=PRECISION)
            tl.store(dM01 + n * D * HID + p_dh, tl.dot(tl.trans(do), h, input_precision=PRECISION), mask=m_dh)
        a = tl.load(pre + p_ch, mask=m_ch, other=0.)
        s = tl.sigmoid(a)
        g = g * s * (1 + a * (1 - s))  # silu'(a)
        tl.store(dhq + p_ch, g, mask=m_ch)  # now W2's read-output gradient
        if HAS_QI:
            tl.store(dQI2 + n * C * HID + p_ch, g, mask=m_ch)
        tl.store(dQ + n * C * D + p_cd, do, mask=m_cd)  # the residual q; W2's share is added to it
    tl.debug_barrier()
    _dgd_bwd_tile(s2, p2, x2, g2, x2, q, la, eta, lm, dhq, DS2 + n * HID * D, DP2 + n * HID * D, dS2 + n * HID * D,
                  dP2 + n * HID * D, dX2 + n * C * D, dG2 + n * C * HID, dX2 + n * C * D, dQ + n * C * D, dLA + n * C,
                  dETA + n * C, dLM + n * C, C, D, HID, BC, BD, BH, DGD, MOMENTUM, HAS_Q, False, False, EPS,
                  PRECISION, True, True)


def _mlp_dgd_batch(tensors: dict[str, torch.Tensor | None]) -> torch.Size:
    batch = torch.broadcast_shapes(*[t.shape[:-1] if k in _GATES else t.shape[:-2]
                                     for k, t in tensors.items() if t is not None])
    if len(batch) > 3:
        raise ValueError(f"mlp_dgd_chunk: at most 3 batch dims (batch, generator, head), got {tuple(batch)}")
    return batch


def _mlp_dgd_prepare(tensors: dict[str, torch.Tensor | None]):
    """(batch, kernel args, strides, C, D, HID); checks shapes and dtypes."""
    S1, S2, X1, X2 = tensors["S1"], tensors["S2"], tensors["X1"], tensors["X2"]
    D, HID = S1.shape[-2:]
    C = X2.shape[-2]
    want = {"S1": (D, HID), "P1": (D, HID), "S2": (HID, D), "P2": (HID, D), "X1": (C, HID), "G1": (C, D),
            "X2": (C, D), "G2": (C, HID), "Q": (C, D), "QI2": (C, HID), "M01": (D, HID)}
    for k, t in tensors.items():
        if t is None:
            continue
        shape = tuple(t.shape[-1:]) if k in _GATES else tuple(t.shape[-2:])
        if shape != ((C,) if k in _GATES else want[k]):
            raise ValueError(f"mlp_dgd_chunk: {k} has trailing shape {shape}, expected {(C,) if k in _GATES else want[k]} "
                             f"(W1 [d, hidden] = {(D, HID)}, chunk {C})")
        if t.dtype != S1.dtype or t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"mlp_dgd_chunk: float32 or float64 inputs of one dtype, got {k} {t.dtype}, S1 {S1.dtype}")
    if (tensors["P1"] is None) != (tensors["P2"] is None) or (tensors["P1"] is None) != (tensors["log_mu"] is None):
        raise ValueError("mlp_dgd_chunk: P1, P2 and log_mu together (momentum) or none of them")
    batch = _mlp_dgd_batch(tensors)
    args, strides = [], []
    for k in MLP_INPUTS:
        t = tensors[k]
        t, st = (S1, [0, 0, 0]) if t is None else batch_strided(t, 1 if k in _GATES else 2)
        args.append(t)
        strides += st
    return batch, args, strides, C, D, HID


def _mlp_dgd_flags(tensors, dgd: bool, normalize_x1: bool, D: int, HID: int, C: int) -> dict:
    return dict(BC=_block(C), BD=_block(D), BH=_block(HID), DGD=dgd, MOMENTUM=tensors["P1"] is not None,
                HAS_Q=tensors["Q"] is not None, HAS_QI=tensors["QI2"] is not None, HAS_M01=tensors["M01"] is not None,
                NORM_X1=normalize_x1, EPS=INPUT_NORM_EPS, PRECISION="ieee")


def _mlp_dgd_outputs(S1: torch.Tensor, batch: torch.Size, C: int, D: int, HID: int, read: bool, momentum: bool):
    return (S1.new_empty(*batch, C, D) if read else S1.new_empty(0), S1.new_empty(*batch, D, HID),
            S1.new_empty(*batch, D, HID) if momentum else S1.new_empty(0), S1.new_empty(*batch, HID, D),
            S1.new_empty(*batch, HID, D) if momentum else S1.new_empty(0))  # no two outputs may alias


@torch.library.custom_op("nl::mlp_dgd_chunk", mutates_args=())
def mlp_dgd_chunk(S1: torch.Tensor, P1: torch.Tensor | None, S2: torch.Tensor, P2: torch.Tensor | None,
                  X1: torch.Tensor, G1: torch.Tensor, X2: torch.Tensor, G2: torch.Tensor, Q: torch.Tensor | None,
                  QI2: torch.Tensor | None, M01: torch.Tensor | None, log_alpha: torch.Tensor, eta: torch.Tensor,
                  log_mu: torch.Tensor | None, dgd: bool, normalize_x1: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both layers of an MLP memory M(z) = z + W1 silu(W2 z) over one chunk, and its read, in one kernel.

    Each layer is `dgd_chunk`'s step (the same code, `_dgd_fwd_tile`) with the shared gates: W1 from S1 (P1)
    [*, d, hidden] on X1 [*, C, hidden] with gradient factors G1 [*, C, d] (normalize_x1: the normalised step),
    W2 from S2 (P2) [*, hidden, d] on X2 [*, C, d] with G2 [*, C, hidden]; log_alpha, eta, log_mu [*, C]; the
    anchor's outputs on X are formed on chip. With a query Q [*, C, d], the read before write (`_ChunkMemory.read`):
        pre = read_W2(q) (+ QI2),  h_q = silu(pre),  o = q + read_W1(h_q) (+ h_q M01^T)
    where QI2 = q M0_2^T [*, C, hidden] and M01 = M0_1 [*, d, hidden] are the initial state's terms when the layers
    carried are deviations from it (retention toward M_0). Batch dims (up to 3) broadcast to [*b], read in place.
    Returns (o [*b, C, d] | empty, S1_C, P1_C | empty, S2_C, P2_C | empty), contiguous.
    Raises ValueError on mismatched shapes, TypeError on dtypes other than one of float32/float64."""
    tensors = dict(zip(MLP_INPUTS, (S1, P1, S2, P2, X1, G1, X2, G2, Q, QI2, M01, log_alpha, eta, log_mu)))
    batch, args, strides, C, D, HID = _mlp_dgd_prepare(tensors)
    N, N1, N2 = grid(batch)
    momentum = P1 is not None
    out, s1, p1, s2, p2 = _mlp_dgd_outputs(S1, batch, C, D, HID, Q is not None, momentum)
    scratch = S1.new_empty(2, *batch, C, HID) if Q is not None else S1.new_empty(2, 1)  # pre, h_q
    _mlp_dgd_kernel[(N,)](*args, out if Q is not None else s1, s1, p1 if momentum else s1, s2, p2 if momentum else s2,
                          scratch[0], scratch[1], C, D, HID, N1, N2, *strides,
                          **_mlp_dgd_flags(tensors, dgd, normalize_x1, D, HID, C))
    return out, s1, p1, s2, p2


@mlp_dgd_chunk.register_fake
def _(S1, P1, S2, P2, X1, G1, X2, G2, Q, QI2, M01, log_alpha, eta, log_mu, dgd, normalize_x1):
    tensors = dict(zip(MLP_INPUTS, (S1, P1, S2, P2, X1, G1, X2, G2, Q, QI2, M01, log_alpha, eta, log_mu)))
    D, HID = S1.shape[-2:]
    return _mlp_dgd_outputs(S1, _mlp_dgd_batch(tensors), X2.shape[-2], D, HID, Q is not None, P1 is not None)


def _mlp_dgd_grads(tensors: dict[str, torch.Tensor | None], batch: torch.Size) -> list[torch.Tensor]:
    """Gradient buffers over the whole batch [*b, ...] per input (empty for an absent one)."""
    S1 = tensors["S1"]
    return [S1.new_empty(0) if t is None else t.new_empty(*batch, *(t.shape[-1:] if k in _GATES else t.shape[-2:]))
            for k, t in tensors.items()]


@torch.library.custom_op("nl::mlp_dgd_chunk_backward", mutates_args=())
def mlp_dgd_chunk_backward(S1: torch.Tensor, P1: torch.Tensor | None, S2: torch.Tensor, P2: torch.Tensor | None,
                           X1: torch.Tensor, G1: torch.Tensor, X2: torch.Tensor, G2: torch.Tensor,
                           Q: torch.Tensor | None, QI2: torch.Tensor | None, M01: torch.Tensor | None,
                           log_alpha: torch.Tensor, eta: torch.Tensor, log_mu: torch.Tensor | None, dgd: bool,
                           normalize_x1: bool, g_out: torch.Tensor, g_S1: torch.Tensor, g_P1: torch.Tensor,
                           g_S2: torch.Tensor, g_P2: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of `mlp_dgd_chunk` w.r.t. every input (in MLP_INPUTS order), each over the whole batch [*b, ...]
    (the caller sums a broadcast input's); empty for an absent input. Output gradients contiguous [*b, ...] (g_out,
    g_P1, g_P2 empty without a read / momentum). One kernel; the forward is recomputed from the inputs."""
    tensors = dict(zip(MLP_INPUTS, (S1, P1, S2, P2, X1, G1, X2, G2, Q, QI2, M01, log_alpha, eta, log_mu)))
    batch, args, strides, C, D, HID = _mlp_dgd_prepare(tensors)
    N, N1, N2 = grid(batch)
    momentum = P1 is not None
    grads = _mlp_dgd_grads(tensors, batch)
    dS1, dP1, dS2, dP2, dX1, dG1, dX2, dG2, dQ, dQI2, dM01, dLA, dETA, dLM = grads
    scratch = S1.new_empty(3, *batch, C, HID) if Q is not None else S1.new_empty(3, 1)  # pre, h_q, dh_q
    end = S1.new_empty(*batch, HID, D) if Q is not None else S1.new_empty(1)  # W2's recomputed end state: unused
    _mlp_dgd_bwd_kernel[(N,)](*args, g_out if Q is not None else g_S1, g_S1, g_P1 if momentum else g_S1, g_S2,
                              g_P2 if momentum else g_S2, dS1, dP1 if momentum else dS1, dS2, dP2 if momentum else dS2,
                              dX1, dG1, dX2, dG2, dQ if Q is not None else dX2, dQI2 if QI2 is not None else dX2,
                              dM01 if M01 is not None else dS1, dLA, dETA, dLM if momentum else dETA,
                              scratch[0], scratch[1], scratch[2], end, C, D, HID, N1, N2, *strides,
                              **_mlp_dgd_flags(tensors, dgd, normalize_x1, D, HID, C))
    return grads


@mlp_dgd_chunk_backward.register_fake
def _(S1, P1, S2, P2, X1, G1, X2, G2, Q, QI2, M01, log_alpha, eta, log_mu, dgd, normalize_x1, g_out, g_S1, g_P1,
      g_S2, g_P2):
    tensors = dict(zip(MLP_INPUTS, (S1, P1, S2, P2, X1, G1, X2, G2, Q, QI2, M01, log_alpha, eta, log_mu)))
    return _mlp_dgd_grads(tensors, _mlp_dgd_batch(tensors))


def _mlp_dgd_setup(ctx, inputs, output) -> None:
    *tensors, ctx.dgd, ctx.normalize_x1 = inputs
    ctx.absent = [t is None for t in tensors]
    ctx.shapes = [None if t is None else t.shape for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if t is not None])
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zero fill unless needed below)


def reduce_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """g summed to `shape` over the dims it was broadcast along; a view (no launch) where only size-1 dims differ."""
    return g.view(shape) if g.numel() == shape.numel() else g.sum_to_size(shape)


def _mlp_dgd_bwd(ctx, g_out, g_S1, g_P1, g_S2, g_P2):
    saved = iter(ctx.saved_tensors)
    tensors = [None if absent else next(saved) for absent in ctx.absent]
    S1, P1, S2, Q = tensors[0], tensors[1], tensors[2], tensors[8]
    batch = _mlp_dgd_batch(dict(zip(MLP_INPUTS, tensors)))
    C = tensors[6].shape[-2]
    D, HID = S1.shape[-2:]

    def grad(g, *shape):  # None (unused output): zeros where the kernel reads it
        return S1.new_zeros(*batch, *shape) if g is None else g.contiguous()

    empty = S1.new_empty(0)
    grads = mlp_dgd_chunk_backward(*tensors, ctx.dgd, ctx.normalize_x1, grad(g_out, C, D) if Q is not None else empty,
                                   grad(g_S1, D, HID), grad(g_P1, D, HID) if P1 is not None else empty,
                                   grad(g_S2, HID, D), grad(g_P2, HID, D) if P1 is not None else empty)
    grads = [None if absent else reduce_to(g, shape) for g, absent, shape in zip(grads, ctx.absent, ctx.shapes)]
    return (*grads, None, None)


mlp_dgd_chunk.register_autograd(_mlp_dgd_bwd, setup_context=_mlp_dgd_setup)
