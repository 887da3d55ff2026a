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

from nl.ops.triton_dgd import _block, batch_offset, batch_strided, grid


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
