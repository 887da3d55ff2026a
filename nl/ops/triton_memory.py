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

`mlp_memory_chunk` (`nl::mlp_memory_chunk`) is what the chunk loop runs for an MLP memory: these gradient
factors, both layers' DGD chunk steps (`triton_dgd`'s `_dgd_fwd_tile` / `_dgd_bwd_tile`, with the shared gates)
and the read, in one kernel forward and one backward per memory and chunk; intermediates pass between the
stages through per-program scratch in global memory. `mlp_grad_factors` alone serves the per-token decoding
step (`titans_step`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nl.ops.delta_rule import INPUT_NORM_EPS
from nl.ops.triton_dgd import _block, _dgd_bwd_tile, _dgd_fwd_tile, batch_offset, batch_strided, dot_precision, grid


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


@triton.jit
def _factors_bwd_tiles(w1, w2, k, v, dg1, dg2, dh_in, dhout_in, dpre_in, BC: tl.constexpr, BH: tl.constexpr,
                       BD: tl.constexpr, SELF_TARGET: tl.constexpr, NORMALIZED: tl.constexpr, HAS_DH: tl.constexpr,
                       HAS_DHOUT: tl.constexpr, HAS_DPRE: tl.constexpr, PRECISION: tl.constexpr):
    """The gradient factors' backward on tiles: the forward recomputed (`_forward_tiles`), then reversed, given the
    gradients of g1, g2 (and of h, hout, pre where HAS_*). Returns (dW1 [BD, BH], dW2 [BH, BD], dk, dv [BC, BD])."""
    pre, sg, sp, h, hout, e, ew1, hv, pv, scale = _forward_tiles(w1, w2, k, v, BC, SELF_TARGET, NORMALIZED, PRECISION)
    # g1 = e scale, g2 = ew1 sp scale
    de = dg1 * scale[:, None]
    dg2 = dg2 * scale[:, None]
    dew1 = dg2 * sp
    # sp = silu'(pre): silu''(pre) = sg (1 - sg) (2 + pre (1 - 2 sg))
    dpre = dg2 * ew1 * sg * (1 - sg) * (2 + pre * (1 - 2 * sg))
    if HAS_DPRE:
        dpre += dpre_in
    # ew1 = e W1
    de += tl.dot(dew1, tl.trans(w1), input_precision=PRECISION)
    dw1 = tl.dot(tl.trans(e), dew1, input_precision=PRECISION)           # [BD, BH]
    # e = k + hout - v (- silu(pv) W1^T)
    dk = de
    dv = -de
    dhout = de
    if HAS_DHOUT:
        dhout += dhout_in
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
        dh += dh_in
    dw1 += tl.dot(tl.trans(dhout), h, input_precision=PRECISION)
    dpre += dh * sp
    dk += tl.dot(dpre, w2, input_precision=PRECISION)
    dw2 += tl.dot(tl.trans(dpre), k, input_precision=PRECISION)
    return dw1, dw2, dk, dv


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
    dg1 = tl.load(dG1 + n * C * D + p_cd, mask=m_cd, other=0.)
    dg2 = tl.load(dG2 + n * C * HID + p_ch, mask=m_ch, other=0.)
    dh, dhout, dpre = dg2, dg1, dg2  # stand-ins where absent (never read)
    if HAS_DH:
        dh = tl.load(dH + n * C * HID + p_ch, mask=m_ch, other=0.)
    if HAS_DHOUT:
        dhout = tl.load(dHOUT + n * C * D + p_cd, mask=m_cd, other=0.)
    if HAS_DPRE:
        dpre = tl.load(dPRE + n * C * HID + p_ch, mask=m_ch, other=0.)
    dw1, dw2, dk, dv = _factors_bwd_tiles(w1, w2, k, v, dg1, dg2, dh, dhout, dpre, BC, BH, BD, SELF_TARGET, NORMALIZED,
                                          HAS_DH, HAS_DHOUT, HAS_DPRE, PRECISION)
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
                              BH=_block(HID), SELF_TARGET=self_target, NORMALIZED=normalized,
                              PRECISION=dot_precision(k.dtype))
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
                                  HAS_DPRE=g_pre is not None, PRECISION=dot_precision(k.dtype))
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
def _mlp_apply_bwd_kernel(W1, W2, Z, DOUT, dW1, dW2, dZ, C, D, HID, N1, N2, NJ, s_W1_0, s_W1_1, s_W1_2,
                          s_W2_0, s_W2_1, s_W2_2, s_Z_0, s_Z_1, s_Z_2, BC: tl.constexpr, BD: tl.constexpr,
                          BH: tl.constexpr, PRECISION: tl.constexpr, RED1: tl.constexpr):
    """out = z + h W1^T, h = silu(pre), pre = z W2^T, recomputed, then reversed. RED1: z is shared along batch
    dim 1 (the stacked generators' input): one program per element of the other batch dims loops over dim 1 (NJ
    elements) and sums z's gradient in registers, stored once (dZ [b0, 1, b2, C, D]); else NJ = 1."""
    r = tl.program_id(0)
    rc, rd, rh = tl.arange(0, BC), tl.arange(0, BD), tl.arange(0, BH)
    mc, md, mh = rc < C, rd < D, rh < HID
    m_cd, m_dh, m_hd = mc[:, None] & md[None, :], md[:, None] & mh[None, :], mh[:, None] & md[None, :]
    p_cd, p_dh, p_hd = rc[:, None] * D + rd[None, :], rd[:, None] * HID + rh[None, :], rh[:, None] * D + rd[None, :]
    dz = tl.zeros([BC, BD], dtype=dZ.dtype.element_ty)
    for j in range(0, NJ):
        n = r
        if RED1:
            n = (r // N2) * N1 * N2 + j * N2 + r % N2
        w1 = tl.load(W1 + batch_offset(n, N1, N2, s_W1_0, s_W1_1, s_W1_2) + p_dh, mask=m_dh, other=0.)
        w2 = tl.load(W2 + batch_offset(n, N1, N2, s_W2_0, s_W2_1, s_W2_2) + p_hd, mask=m_hd, other=0.)
        z = tl.load(Z + batch_offset(n, N1, N2, s_Z_0, s_Z_1, s_Z_2) + p_cd, mask=m_cd, other=0.)
        dout = tl.load(DOUT + n * C * D + p_cd, mask=m_cd, other=0.)
        pre = tl.dot(z, tl.trans(w2), input_precision=PRECISION)
        sg = tl.sigmoid(pre)
        dpre = tl.dot(dout, w1, input_precision=PRECISION) * sg * (1 + pre * (1 - sg))
        tl.store(dW1 + n * D * HID + p_dh, tl.dot(tl.trans(dout), pre * sg, input_precision=PRECISION), mask=m_dh)
        tl.store(dW2 + n * HID * D + p_hd, tl.dot(tl.trans(dpre), z, input_precision=PRECISION), mask=m_hd)
        dz += dout + tl.dot(dpre, w2, input_precision=PRECISION)
    tl.store(dZ + r * C * D + p_cd, dz, mask=m_cd)


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
                            PRECISION=dot_precision(z.dtype))
    return out


@mlp_apply.register_fake
def _(W1, W2, z):
    return z.new_empty(*torch.broadcast_shapes(W1.shape[:-2], W2.shape[:-2], z.shape[:-2]), *z.shape[-2:])


@torch.library.custom_op("nl::mlp_apply_backward", mutates_args=())
def mlp_apply_backward(W1: torch.Tensor, W2: torch.Tensor, z: torch.Tensor,
                       g_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `mlp_apply` w.r.t. W1, W2 and z over the whole batch [*b, ...] (z's summed in the kernel along
    batch dim 1 where z is shared along it: [b0, 1, b2, C, d]); g_out [*b, C, d] contiguous."""
    batch, args, strides, C, D, HID = _apply_prepare(W1, W2, z)
    N, N1, N2 = grid(batch)
    red1, b3 = _z_reduced(z, batch)
    dW1, dW2 = W1.new_empty(*batch, D, HID), W2.new_empty(*batch, HID, D)
    dz = z.new_empty(b3[0], 1, b3[2], C, D) if red1 else z.new_empty(*batch, C, D)
    _mlp_apply_bwd_kernel[(N // N1 if red1 else N,)](*args, g_out, dW1, dW2, dz, C, D, HID, N1, N2, N1 if red1 else 1,
                                                     *strides, BC=_block(C), BD=_block(D), BH=_block(HID),
                                                     PRECISION=dot_precision(z.dtype), RED1=red1)
    return dW1, dW2, dz


def _z_reduced(z: torch.Tensor, batch: torch.Size) -> tuple[bool, tuple[int, ...]]:
    """(whether z is shared along batch dim 1 of 3, which has more than one element; the padded batch)."""
    b3 = (1,) * (3 - len(batch)) + tuple(batch)
    lead = (1,) * (3 - (z.dim() - 2)) + tuple(z.shape[:-2])
    return b3[1] > 1 and lead[1] == 1, b3


@mlp_apply_backward.register_fake
def _(W1, W2, z, g_out):
    batch = torch.broadcast_shapes(W1.shape[:-2], W2.shape[:-2], z.shape[:-2])
    red1, b3 = _z_reduced(z, batch)
    return (W1.new_empty(*batch, *W1.shape[-2:]), W2.new_empty(*batch, *W2.shape[-2:]),
            z.new_empty(b3[0], 1, b3[2], *z.shape[-2:]) if red1 else z.new_empty(*batch, *z.shape[-2:]))


def _apply_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _apply_bwd(ctx, g_out):
    W1, W2, z = ctx.saved_tensors
    grads = mlp_apply_backward(W1, W2, z, g_out.contiguous())
    return tuple(reduce_to(g, t.shape) for g, t in zip(grads, (W1, W2, z)))


mlp_apply.register_autograd(_apply_bwd, setup_context=_apply_setup)


# ------------------------------------------------ an MLP memory's whole chunk step, one kernel ---------------
# Inputs of `mlp_memory_chunk`, in kernel-argument order; matrices [*, rows, cols], gates [*, C].
MLP_INPUTS = ("S1", "P1", "S2", "P2", "M1", "M2", "K", "V", "Q", "log_alpha", "eta", "log_mu")
_GATES = {"log_alpha", "eta", "log_mu"}


@triton.jit
def _anchor_tiles(s1, s2, m1, m2, D, HID, BD: tl.constexpr, BH: tl.constexpr, HAS_M: tl.constexpr):
    """The anchor's layers W1 = S1 (+ M1) [BD, BH] and W2 = S2 (+ M2) [BH, BD] (the carried deviation plus the
    initial state under retention toward M_0)."""
    rd, rh = tl.arange(0, BD), tl.arange(0, BH)
    m_dh, m_hd = (rd < D)[:, None] & (rh < HID)[None, :], (rh < HID)[:, None] & (rd < D)[None, :]
    p_dh, p_hd = rd[:, None] * HID + rh[None, :], rh[:, None] * D + rd[None, :]
    w1 = tl.load(s1 + p_dh, mask=m_dh, other=0.)
    w2 = tl.load(s2 + p_hd, mask=m_hd, other=0.)
    if HAS_M:
        w1 += tl.load(m1 + p_dh, mask=m_dh, other=0.)
        w2 += tl.load(m2 + p_hd, mask=m_hd, other=0.)
    return w1, w2


@triton.jit
def _factors_to_scratch(s1, s2, m1, m2, k, v, h_s, g1_s, g2_s, C, D, HID, BC: tl.constexpr, BD: tl.constexpr,
                        BH: tl.constexpr, HAS_M: tl.constexpr, SELF_TARGET: tl.constexpr, NORMALIZED: tl.constexpr,
                        PRECISION: tl.constexpr):
    """The gradient factors at the anchor (`mlp_grad_factors`' h, g1, g2) stored to the program's scratch for the
    layers' steps, then a barrier (other threads of the program read them back). Nothing is returned: a caller
    that needs the anchor's tiles again reloads them rather than holding them live across the layers' steps."""
    rc, rd, rh = tl.arange(0, BC), tl.arange(0, BD), tl.arange(0, BH)
    m_ch, m_cd = (rc < C)[:, None] & (rh < HID)[None, :], (rc < C)[:, None] & (rd < D)[None, :]
    p_ch, p_cd = rc[:, None] * HID + rh[None, :], rc[:, None] * D + rd[None, :]
    w1, w2 = _anchor_tiles(s1, s2, m1, m2, D, HID, BD, BH, HAS_M)
    kt, vt = tl.load(k + p_cd, mask=m_cd, other=0.), tl.load(v + p_cd, mask=m_cd, other=0.)
    pre, sg, sp, h, hout, e, ew1, hv, pv, scale = _forward_tiles(w1, w2, kt, vt, BC, SELF_TARGET, NORMALIZED,
                                                                 PRECISION)
    tl.store(h_s + p_ch, h, mask=m_ch)
    tl.store(g1_s + p_cd, e * scale[:, None], mask=m_cd)
    tl.store(g2_s + p_ch, ew1 * sp * scale[:, None], mask=m_ch)
    tl.debug_barrier()


@triton.jit
def _mlp_memory_pointers(n, N1, N2, S1, P1, S2, P2, M1, M2, K, V, Q, LA, ETA, LM, ST_S1_0, ST_S1_1, ST_S1_2, ST_P1_0,
                         ST_P1_1, ST_P1_2, ST_S2_0, ST_S2_1, ST_S2_2, ST_P2_0, ST_P2_1, ST_P2_2, ST_M1_0, ST_M1_1,
                         ST_M1_2, ST_M2_0, ST_M2_1, ST_M2_2, ST_K_0, ST_K_1, ST_K_2, ST_V_0, ST_V_1, ST_V_2, ST_Q_0,
                         ST_Q_1, ST_Q_2, ST_LA_0, ST_LA_1, ST_LA_2, ST_ETA_0, ST_ETA_1, ST_ETA_2, ST_LM_0, ST_LM_1,
                         ST_LM_2):
    """Each input's pointer at batch element n (through its batch strides: 0 along a dim it is shared on)."""
    return (S1 + batch_offset(n, N1, N2, ST_S1_0, ST_S1_1, ST_S1_2),
            P1 + batch_offset(n, N1, N2, ST_P1_0, ST_P1_1, ST_P1_2),
            S2 + batch_offset(n, N1, N2, ST_S2_0, ST_S2_1, ST_S2_2),
            P2 + batch_offset(n, N1, N2, ST_P2_0, ST_P2_1, ST_P2_2),
            M1 + batch_offset(n, N1, N2, ST_M1_0, ST_M1_1, ST_M1_2),
            M2 + batch_offset(n, N1, N2, ST_M2_0, ST_M2_1, ST_M2_2),
            K + batch_offset(n, N1, N2, ST_K_0, ST_K_1, ST_K_2),
            V + batch_offset(n, N1, N2, ST_V_0, ST_V_1, ST_V_2),
            Q + batch_offset(n, N1, N2, ST_Q_0, ST_Q_1, ST_Q_2),
            LA + batch_offset(n, N1, N2, ST_LA_0, ST_LA_1, ST_LA_2),
            ETA + batch_offset(n, N1, N2, ST_ETA_0, ST_ETA_1, ST_ETA_2),
            LM + batch_offset(n, N1, N2, ST_LM_0, ST_LM_1, ST_LM_2))


@triton.jit
def _mlp_memory_kernel(S1, P1, S2, P2, M1, M2, K, V, Q, LA, ETA, LM, OUT, S1_END, P1_END, S2_END, P2_END, SCR,
                       C, D, HID, N1, N2, ST_S1_0, ST_S1_1, ST_S1_2, ST_P1_0, ST_P1_1, ST_P1_2, ST_S2_0, ST_S2_1,
                       ST_S2_2, ST_P2_0, ST_P2_1, ST_P2_2, ST_M1_0, ST_M1_1, ST_M1_2, ST_M2_0, ST_M2_1, ST_M2_2,
                       ST_K_0, ST_K_1, ST_K_2, ST_V_0, ST_V_1, ST_V_2, ST_Q_0, ST_Q_1, ST_Q_2, ST_LA_0, ST_LA_1,
                       ST_LA_2, ST_ETA_0, ST_ETA_1, ST_ETA_2, ST_LM_0, ST_LM_1, ST_LM_2,
                       BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, DGD: tl.constexpr, MOMENTUM: tl.constexpr,
                       HAS_Q: tl.constexpr, HAS_M: tl.constexpr, SELF_TARGET: tl.constexpr, NORMALIZED: tl.constexpr,
                       EPS: tl.constexpr, PRECISION: tl.constexpr):
    n = tl.program_id(0)
    s1, p1, s2, p2, m1, m2, k, v, q, la, eta, lm = _mlp_memory_pointers(
        n, N1, N2, S1, P1, S2, P2, M1, M2, K, V, Q, LA, ETA, LM, ST_S1_0, ST_S1_1, ST_S1_2, ST_P1_0, ST_P1_1, ST_P1_2,
        ST_S2_0, ST_S2_1, ST_S2_2, ST_P2_0, ST_P2_1, ST_P2_2, ST_M1_0, ST_M1_1, ST_M1_2, ST_M2_0, ST_M2_1, ST_M2_2,
        ST_K_0, ST_K_1, ST_K_2, ST_V_0, ST_V_1, ST_V_2, ST_Q_0, ST_Q_1, ST_Q_2, ST_LA_0, ST_LA_1, ST_LA_2, ST_ETA_0,
        ST_ETA_1, ST_ETA_2, ST_LM_0, ST_LM_1, ST_LM_2)
    # this program's scratch: h, g2, pre_q, h_q [C, HID] and g1 [C, D]
    h_s = SCR + n * C * (4 * HID + D)
    g2_s, pre_s, hq_s, g1_s = h_s + C * HID, h_s + 2 * C * HID, h_s + 3 * C * HID, h_s + 4 * C * HID
    rc, rd, rh = tl.arange(0, BC), tl.arange(0, BD), tl.arange(0, BH)
    m_ch, m_cd = (rc < C)[:, None] & (rh < HID)[None, :], (rc < C)[:, None] & (rd < D)[None, :]
    p_ch, p_cd = rc[:, None] * HID + rh[None, :], rc[:, None] * D + rd[None, :]
    _factors_to_scratch(s1, s2, m1, m2, k, v, h_s, g1_s, g2_s, C, D, HID, BC, BD, BH, HAS_M, SELF_TARGET,
                        NORMALIZED, PRECISION)
    # W2 (input k): its read of q is the hidden pre-activation of the memory's read
    _dgd_fwd_tile(s2, p2, k, g2_s, k, q, la, eta, lm, pre_s, S2_END + n * HID * D, P2_END + n * HID * D, C, D, HID,
                  BC, BD, BH, DGD, MOMENTUM, HAS_Q, False, False, EPS, PRECISION)
    if HAS_Q:
        tl.debug_barrier()
        a = tl.load(pre_s + p_ch, mask=m_ch, other=0.)
        if HAS_M:  # + q M0_2^T: the layer is M0_2 + the deviation the step carries
            m02 = tl.load(m2 + rh[:, None] * D + rd[None, :], mask=(rh < HID)[:, None] & (rd < D)[None, :], other=0.)
            a += tl.dot(tl.load(q + p_cd, mask=m_cd, other=0.), tl.trans(m02), input_precision=PRECISION)
        tl.store(hq_s + p_ch, a * tl.sigmoid(a), mask=m_ch)  # h_q = silu(.)
        tl.debug_barrier()
    # W1 (input h, the normalised step's layer): its read of h_q
    _dgd_fwd_tile(s1, p1, h_s, g1_s, h_s, hq_s, la, eta, lm, OUT + n * C * D, S1_END + n * D * HID,
                  P1_END + n * D * HID, C, HID, D, BC, BH, BD, DGD, MOMENTUM, HAS_Q, False, NORMALIZED, EPS, PRECISION)
    if HAS_Q:
        tl.debug_barrier()
        o = tl.load(OUT + n * C * D + p_cd, mask=m_cd, other=0.) + tl.load(q + p_cd, mask=m_cd, other=0.)
        if HAS_M:  # + h_q M0_1^T
            m01 = tl.load(m1 + rd[:, None] * HID + rh[None, :], mask=(rd < D)[:, None] & (rh < HID)[None, :], other=0.)
            o += tl.dot(tl.load(hq_s + p_ch, mask=m_ch, other=0.), tl.trans(m01), input_precision=PRECISION)
        tl.store(OUT + n * C * D + p_cd, o, mask=m_cd)


@triton.jit
def _mlp_memory_bwd_kernel(S1, P1, S2, P2, M1, M2, K, V, Q, LA, ETA, LM, DOUT, DS1, DP1, DS2, DP2,
                           dS1, dP1, dS2, dP2, dM1, dM2, dK, dV, dQ, dLA, dETA, dLM, SCR,
                           C, D, HID, N1, N2, NJ, ST_S1_0, ST_S1_1, ST_S1_2, ST_P1_0, ST_P1_1, ST_P1_2, ST_S2_0,
                           ST_S2_1, ST_S2_2, ST_P2_0, ST_P2_1, ST_P2_2, ST_M1_0, ST_M1_1, ST_M1_2, ST_M2_0, ST_M2_1,
                           ST_M2_2, ST_K_0, ST_K_1, ST_K_2, ST_V_0, ST_V_1, ST_V_2, ST_Q_0, ST_Q_1, ST_Q_2, ST_LA_0,
                           ST_LA_1, ST_LA_2, ST_ETA_0, ST_ETA_1, ST_ETA_2, ST_LM_0, ST_LM_1, ST_LM_2, ST_DO_0, ST_DO_1,
                           ST_DO_2, BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, DGD: tl.constexpr,
                           MOMENTUM: tl.constexpr, HAS_Q: tl.constexpr, HAS_M: tl.constexpr,
                           SELF_TARGET: tl.constexpr, NORMALIZED: tl.constexpr, EPS: tl.constexpr,
                           PRECISION: tl.constexpr, RED1: tl.constexpr):
    """The forward recomputed into scratch (gradient factors, W2's read of q, h_q), then in reverse: W1's backward
    (its read of h_q), the read chain back to W2's read output, W2's backward (adding its q and gate gradients to
    W1's), and the gradient factors' backward, whose anchor gradient goes to the carried layers and to M_0.
    RED1: k, v and the gates are shared along batch dim 1 (the stacked generators' k and gates): one program per
    element of the other batch dims loops over dim 1 (NJ = N1 elements) and sums their gradients on chip, stored
    once per program (no second launch to sum them); else NJ = 1 and the program is one batch element."""
    rc, rd, rh = tl.arange(0, BC), tl.arange(0, BD), tl.arange(0, BH)
    m_ch, m_cd = (rc < C)[:, None] & (rh < HID)[None, :], (rc < C)[:, None] & (rd < D)[None, :]
    p_ch, p_cd = rc[:, None] * HID + rh[None, :], rc[:, None] * D + rd[None, :]
    m_dh, p_dh = (rd < D)[:, None] & (rh < HID)[None, :], rd[:, None] * HID + rh[None, :]
    m_hd, p_hd = (rh < HID)[:, None] & (rd < D)[None, :], rh[:, None] * D + rd[None, :]
    r = tl.program_id(0)  # the program: one batch element, or with RED1 one row of them along dim 1
    if RED1:  # the sums start at zero
        z_cd = tl.zeros([BC, BD], dtype=S1.dtype.element_ty)
        tl.store(dK + r * C * D + p_cd, z_cd, mask=m_cd)
        tl.store(dV + r * C * D + p_cd, z_cd, mask=m_cd)
        z_c = tl.zeros([BC], dtype=S1.dtype.element_ty)
        tl.store(dLA + r * C + rc, z_c, mask=rc < C)
        tl.store(dETA + r * C + rc, z_c, mask=rc < C)
        if MOMENTUM:
            tl.store(dLM + r * C + rc, z_c, mask=rc < C)
        tl.debug_barrier()
    for j in tl.range(0, NJ, num_stages=1):  # not pipelined: each element reads back scratch it stored
        n = r
        if RED1:
            n = (r // N2) * N1 * N2 + j * N2 + r % N2
        s1, p1, s2, p2, m1, m2, k, v, q, la, eta, lm = _mlp_memory_pointers(
            n, N1, N2, S1, P1, S2, P2, M1, M2, K, V, Q, LA, ETA, LM, ST_S1_0, ST_S1_1, ST_S1_2, ST_P1_0, ST_P1_1,
            ST_P1_2, ST_S2_0, ST_S2_1, ST_S2_2, ST_P2_0, ST_P2_1, ST_P2_2, ST_M1_0, ST_M1_1, ST_M1_2, ST_M2_0,
            ST_M2_1, ST_M2_2, ST_K_0, ST_K_1, ST_K_2, ST_V_0, ST_V_1, ST_V_2, ST_Q_0, ST_Q_1, ST_Q_2, ST_LA_0,
            ST_LA_1, ST_LA_2, ST_ETA_0, ST_ETA_1, ST_ETA_2, ST_LM_0, ST_LM_1, ST_LM_2)
        dout = DOUT + batch_offset(n, N1, N2, ST_DO_0, ST_DO_1, ST_DO_2)  # read in place (e.g. a slice of o's gradient)
        # scratch: h, g2, pre_q, h_q, dh, dg2, dh_q [C, HID]; g1, dg1 [C, D]; W2's recomputed end state and
        # momentum [HID, D] each (never read)
        h_s = SCR + n * (C * (7 * HID + 2 * D) + 2 * HID * D)
        g2_s, pre_s, hq_s, dh_s, dg2_s, dhq_s = (h_s + C * HID, h_s + 2 * C * HID, h_s + 3 * C * HID, h_s + 4 * C * HID,
                                                h_s + 5 * C * HID, h_s + 6 * C * HID)
        g1_s, dg1_s, end_s = h_s + 7 * C * HID, h_s + 7 * C * HID + C * D, h_s + 7 * C * HID + 2 * C * D
        _factors_to_scratch(s1, s2, m1, m2, k, v, h_s, g1_s, g2_s, C, D, HID, BC, BD, BH, HAS_M, SELF_TARGET,
                            NORMALIZED, PRECISION)
        if HAS_Q:  # W2's read of q and h_q, recomputed (its end state goes to scratch)
            _dgd_fwd_tile(s2, p2, k, g2_s, k, q, la, eta, lm, pre_s, end_s, end_s + HID * D, C, D, HID, BC, BD, BH,
                          DGD, MOMENTUM, True, False, False, EPS, PRECISION)
            tl.debug_barrier()
            a = tl.load(pre_s + p_ch, mask=m_ch, other=0.)
            if HAS_M:
                m02 = tl.load(m2 + p_hd, mask=m_hd, other=0.)
                a += tl.dot(tl.load(q + p_cd, mask=m_cd, other=0.), tl.trans(m02), input_precision=PRECISION)
            tl.store(pre_s + p_ch, a, mask=m_ch)
            tl.store(hq_s + p_ch, a * tl.sigmoid(a), mask=m_ch)
            tl.debug_barrier()
        # W1: o = q + read_1(h_q) (+ h_q M0_1^T)
        _dgd_bwd_tile(s1, p1, h_s, g1_s, h_s, hq_s, la, eta, lm, dout, DS1 + n * D * HID, DP1 + n * D * HID,
                      dS1 + n * D * HID, dP1 + n * D * HID, dh_s, dg1_s, dh_s, dhq_s, dLA + r * C, dETA + r * C,
                      dLM + r * C, C, HID, D, BC, BH, BD, DGD, MOMENTUM, HAS_Q, False, NORMALIZED, EPS, PRECISION,
                      False, RED1, False)
        dm1 = tl.zeros([BD, BH], dtype=S1.dtype.element_ty)
        dm2 = tl.zeros([BH, BD], dtype=S1.dtype.element_ty)
        if HAS_Q:
            tl.debug_barrier()
            do = tl.load(dout + p_cd, mask=m_cd, other=0.)
            g = tl.load(dhq_s + p_ch, mask=m_ch, other=0.)
            dq = do  # the residual q
            if HAS_M:
                m01 = tl.load(m1 + p_dh, mask=m_dh, other=0.)
                g += tl.dot(do, m01, input_precision=PRECISION)
                dm1 += tl.dot(tl.trans(do), tl.load(hq_s + p_ch, mask=m_ch, other=0.), input_precision=PRECISION)
            a = tl.load(pre_s + p_ch, mask=m_ch, other=0.)
            s = tl.sigmoid(a)
            g = g * s * (1 + a * (1 - s))  # silu'(a): now the gradient of W2's read output (+ q M0_2^T)
            tl.store(dhq_s + p_ch, g, mask=m_ch)
            if HAS_M:
                dq += tl.dot(g, tl.load(m2 + p_hd, mask=m_hd, other=0.), input_precision=PRECISION)
                dm2 += tl.dot(tl.trans(g), tl.load(q + p_cd, mask=m_cd, other=0.), input_precision=PRECISION)
            tl.store(dQ + n * C * D + p_cd, dq, mask=m_cd)  # W2's share is added to it
        tl.debug_barrier()
        _dgd_bwd_tile(s2, p2, k, g2_s, k, q, la, eta, lm, dhq_s, DS2 + n * HID * D, DP2 + n * HID * D,
                      dS2 + n * HID * D, dP2 + n * HID * D, dK + r * C * D, dg2_s, dK + r * C * D, dQ + n * C * D,
                      dLA + r * C, dETA + r * C, dLM + r * C, C, D, HID, BC, BD, BH, DGD, MOMENTUM, HAS_Q, False,
                      False, EPS, PRECISION, True, True, RED1)
        tl.debug_barrier()
        # the gradient factors (h, g1 -> W1's step; k, g2 -> W2's): their anchor gradient to S and M_0
        w1, w2 = _anchor_tiles(s1, s2, m1, m2, D, HID, BD, BH, HAS_M)  # reloaded (see _factors_to_scratch)
        kt, vt = tl.load(k + p_cd, mask=m_cd, other=0.), tl.load(v + p_cd, mask=m_cd, other=0.)
        dh = tl.load(dh_s + p_ch, mask=m_ch, other=0.)
        dw1, dw2, dk, dv = _factors_bwd_tiles(w1, w2, kt, vt, tl.load(dg1_s + p_cd, mask=m_cd, other=0.),
                                              tl.load(dg2_s + p_ch, mask=m_ch, other=0.), dh, kt, dh, BC, BH, BD,
                                              SELF_TARGET, NORMALIZED, True, False, False, PRECISION)
        tl.store(dK + r * C * D + p_cd, dk + tl.load(dK + r * C * D + p_cd, mask=m_cd, other=0.), mask=m_cd)
        if RED1:
            dv += tl.load(dV + r * C * D + p_cd, mask=m_cd, other=0.)
        tl.store(dV + r * C * D + p_cd, dv, mask=m_cd)
        tl.debug_barrier()  # the next element of the loop adds to the sums stored above
        tl.store(dS1 + n * D * HID + p_dh, dw1 + tl.load(dS1 + n * D * HID + p_dh, mask=m_dh, other=0.), mask=m_dh)
        tl.store(dS2 + n * HID * D + p_hd, dw2 + tl.load(dS2 + n * HID * D + p_hd, mask=m_hd, other=0.), mask=m_hd)
        if HAS_M:
            tl.store(dM1 + n * D * HID + p_dh, dw1 + dm1, mask=m_dh)
            tl.store(dM2 + n * HID * D + p_hd, dw2 + dm2, mask=m_hd)


def _mlp_memory_batch(tensors: dict[str, torch.Tensor | None]) -> torch.Size:
    batch = torch.broadcast_shapes(*[t.shape[:-1] if k in _GATES else t.shape[:-2]
                                     for k, t in tensors.items() if t is not None])
    if len(batch) > 3:
        raise ValueError(f"mlp_memory_chunk: at most 3 batch dims (batch, generator, head), got {tuple(batch)}")
    return batch


def _mlp_memory_prepare(tensors: dict[str, torch.Tensor | None]):
    """(batch, kernel args, strides, C, D, HID); checks shapes and dtypes."""
    S1 = tensors["S1"]
    D, HID = S1.shape[-2:]
    C = tensors["K"].shape[-2]
    want = {"S1": (D, HID), "P1": (D, HID), "S2": (HID, D), "P2": (HID, D), "M1": (D, HID), "M2": (HID, D),
            "K": (C, D), "V": (C, D), "Q": (C, D)}
    for key, t in tensors.items():
        if t is None:
            continue
        shape, expected = (tuple(t.shape[-1:]), (C,)) if key in _GATES else (tuple(t.shape[-2:]), want[key])
        if shape != expected:
            raise ValueError(f"mlp_memory_chunk: {key} has trailing shape {shape}, expected {expected} "
                             f"(W1 [d, hidden] = {(D, HID)}, chunk {C})")
        if t.dtype != S1.dtype or t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"mlp_memory_chunk: float32 or float64 inputs of one dtype, got {key} {t.dtype}, "
                            f"S1 {S1.dtype}")
    if len({tensors[key] is None for key in ("P1", "P2", "log_mu")}) != 1:
        raise ValueError("mlp_memory_chunk: P1, P2 and log_mu together (momentum) or none of them")
    if (tensors["M1"] is None) != (tensors["M2"] is None):
        raise ValueError("mlp_memory_chunk: M1 and M2 together (retention toward M_0) or neither")
    batch = _mlp_memory_batch(tensors)
    args, strides = [], []
    for key in MLP_INPUTS:
        t = tensors[key]
        t, st = (S1, [0, 0, 0]) if t is None else batch_strided(t, 1 if key in _GATES else 2)
        args.append(t)
        strides += st
    return batch, args, strides, C, D, HID


def _mlp_memory_flags(tensors, dgd: bool, self_target: bool, normalized: bool, C: int, D: int, HID: int) -> dict:
    return dict(BC=_block(C), BD=_block(D), BH=_block(HID), DGD=dgd, MOMENTUM=tensors["P1"] is not None,
                HAS_Q=tensors["Q"] is not None, HAS_M=tensors["M1"] is not None, SELF_TARGET=self_target,
                NORMALIZED=normalized, EPS=INPUT_NORM_EPS,
                PRECISION=dot_precision(tensors["S1"].dtype))


def _mlp_memory_outputs(S1: torch.Tensor, batch: torch.Size, C: int, D: int, HID: int, read: bool, momentum: bool):
    return (S1.new_empty(*batch, C, D) if read else S1.new_empty(0), S1.new_empty(*batch, D, HID),
            S1.new_empty(*batch, D, HID) if momentum else S1.new_empty(0), S1.new_empty(*batch, HID, D),
            S1.new_empty(*batch, HID, D) if momentum else S1.new_empty(0))  # no two outputs may alias


@torch.library.custom_op("nl::mlp_memory_chunk", mutates_args=())
def mlp_memory_chunk(S1: torch.Tensor, P1: torch.Tensor | None, S2: torch.Tensor, P2: torch.Tensor | None,
                     M1: torch.Tensor | None, M2: torch.Tensor | None, K: torch.Tensor, V: torch.Tensor,
                     Q: torch.Tensor | None, log_alpha: torch.Tensor, eta: torch.Tensor, log_mu: torch.Tensor | None,
                     dgd: bool, self_target: bool, normalized: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of an MLP memory M(z) = z + W1 silu(W2 z) in one kernel: gradient factors, both layers' DGD step,
    and the read (`titans._ChunkMemory` with kernel=triton).

    S1 (P1) [*, d, hidden], S2 (P2) [*, hidden, d]: what the chunk loop carries for W1 and W2 (and their momenta),
    the layers themselves or, given the initial state M1 [*, d, hidden], M2 [*, hidden, d] (retention toward M_0),
    their deviation from it: the anchor is W = S (+ M). K, V [*, C, d]: keys and values; log_alpha, eta, log_mu
    [*, C]: the gates. In one program per batch element:
        (h, g1), (k, g2) = the gradient factors at the anchor (`mlp_grad_factors`; self_target: target M(v), else v;
                           normalized: the whole-MLP normalised step, and W1's input h enters as h / ||h||)
        each layer: one `dgd_chunk` step with the shared gates (the same code, `_dgd_fwd_tile`)
        with Q [*, C, d] the read before write:  o = q + read_W1(h_q) (+ h_q M1^T),
                                                 h_q = silu(read_W2(q) (+ q M2^T))
    Batch dims (up to 3) broadcast to [*b]; shared inputs are read in place. Returns (o [*b, C, d] | empty, S1_C,
    P1_C | empty, S2_C, P2_C | empty), contiguous. Raises ValueError on mismatched shapes, TypeError on dtypes other
    than one of float32/float64."""
    tensors = dict(zip(MLP_INPUTS, (S1, P1, S2, P2, M1, M2, K, V, Q, log_alpha, eta, log_mu)))
    batch, args, strides, C, D, HID = _mlp_memory_prepare(tensors)
    N, N1, N2 = grid(batch)
    momentum = P1 is not None
    out, s1, p1, s2, p2 = _mlp_memory_outputs(S1, batch, C, D, HID, Q is not None, momentum)
    scratch = S1.new_empty(N * C * (4 * HID + D))
    _mlp_memory_kernel[(N,)](*args, out if Q is not None else s1, s1, p1 if momentum else s1, s2,
                             p2 if momentum else s2, scratch, C, D, HID, N1, N2, *strides,
                             **_mlp_memory_flags(tensors, dgd, self_target, normalized, C, D, HID))
    return out, s1, p1, s2, p2


@mlp_memory_chunk.register_fake
def _(S1, P1, S2, P2, M1, M2, K, V, Q, log_alpha, eta, log_mu, dgd, self_target, normalized):
    tensors = dict(zip(MLP_INPUTS, (S1, P1, S2, P2, M1, M2, K, V, Q, log_alpha, eta, log_mu)))
    D, HID = S1.shape[-2:]
    return _mlp_memory_outputs(S1, _mlp_memory_batch(tensors), K.shape[-2], D, HID, Q is not None, P1 is not None)


# Inputs whose gradient the backward kernel sums along batch dim 1 where they are all shared along it (RED1).
_REDUCED = ("K", "V", "log_alpha", "eta", "log_mu")


def _reduce_dim1(tensors: dict[str, torch.Tensor | None], batch: torch.Size) -> bool:
    """Whether k, v and the gates are all shared along batch dim 1 of the 3 (left-padded) batch dims, which has
    more than one element: the stacked generators' k, v and gates."""
    b3 = (1,) * (3 - len(batch)) + tuple(batch)
    if b3[1] == 1:
        return False
    for key in _REDUCED:
        t = tensors[key]
        if t is not None:
            dims = t.dim() - (1 if key in _GATES else 2)
            lead = (1,) * (3 - dims) + tuple(t.shape[:dims])
            if lead[1] != 1:
                return False
    return True


def _mlp_memory_grads(tensors: dict[str, torch.Tensor | None], batch: torch.Size, red1: bool) -> list[torch.Tensor]:
    """Gradient buffers over the whole batch [*b, ...] per input (empty for an absent one); with red1, those of
    _REDUCED over the batch with dim 1 (of 3) summed away, [b0, 1, b2, ...]."""
    S1 = tensors["S1"]
    b3 = (1,) * (3 - len(batch)) + tuple(batch)
    grads = []
    for k, t in tensors.items():
        if t is None:
            grads.append(S1.new_empty(0))
            continue
        lead = (b3[0], 1, b3[2]) if red1 and k in _REDUCED else batch
        grads.append(t.new_empty(*lead, *(t.shape[-1:] if k in _GATES else t.shape[-2:])))
    return grads


@torch.library.custom_op("nl::mlp_memory_chunk_backward", mutates_args=())
def mlp_memory_chunk_backward(S1: torch.Tensor, P1: torch.Tensor | None, S2: torch.Tensor, P2: torch.Tensor | None,
                              M1: torch.Tensor | None, M2: torch.Tensor | None, K: torch.Tensor, V: torch.Tensor,
                              Q: torch.Tensor | None, log_alpha: torch.Tensor, eta: torch.Tensor,
                              log_mu: torch.Tensor | None, dgd: bool, self_target: bool, normalized: bool,
                              g_out: torch.Tensor, g_S1: torch.Tensor, g_P1: torch.Tensor, g_S2: torch.Tensor,
                              g_P2: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of `mlp_memory_chunk` w.r.t. every input (MLP_INPUTS order), each over the whole batch [*b, ...]
    (the caller sums a broadcast input's), except that where k, v and the gates are all shared along batch dim 1
    (`_reduce_dim1`) theirs come summed along it, in the kernel; empty for an absent input. Output gradients
    contiguous [*b, ...] (g_out, g_P1, g_P2 empty without a read / momentum; g_out is read through its batch strides,
    rows of d contiguous). One kernel; the forward is recomputed from the inputs."""
    tensors = dict(zip(MLP_INPUTS, (S1, P1, S2, P2, M1, M2, K, V, Q, log_alpha, eta, log_mu)))
    batch, args, strides, C, D, HID = _mlp_memory_prepare(tensors)
    N, N1, N2 = grid(batch)
    momentum, has_m = P1 is not None, M1 is not None
    red1 = _reduce_dim1(tensors, batch)
    grads = _mlp_memory_grads(tensors, batch, red1)
    dS1, dP1, dS2, dP2, dM1, dM2, dK, dV, dQ, dLA, dETA, dLM = grads
    scratch = S1.new_empty(N * (C * (7 * HID + 2 * D) + 2 * HID * D))
    g_out, st_do = batch_strided(g_out, 2) if Q is not None else (g_S1, [0, 0, 0])
    programs = N // N1 if red1 else N  # with red1 one program per row along dim 1, looping over it
    _mlp_memory_bwd_kernel[(programs,)](*args, g_out, g_S1, g_P1 if momentum else g_S1, g_S2,
                                        g_P2 if momentum else g_S2, dS1, dP1 if momentum else dS1, dS2,
                                        dP2 if momentum else dS2, dM1 if has_m else dS1, dM2 if has_m else dS2, dK,
                                        dV, dQ if Q is not None else dK, dLA, dETA, dLM if momentum else dETA, scratch,
                                        C, D, HID, N1, N2, N1 if red1 else 1, *strides, *st_do, RED1=red1,
                                        **_mlp_memory_flags(tensors, dgd, self_target, normalized, C, D, HID))
    return grads


@mlp_memory_chunk_backward.register_fake
def _(S1, P1, S2, P2, M1, M2, K, V, Q, log_alpha, eta, log_mu, dgd, self_target, normalized, g_out, g_S1, g_P1,
      g_S2, g_P2):
    tensors = dict(zip(MLP_INPUTS, (S1, P1, S2, P2, M1, M2, K, V, Q, log_alpha, eta, log_mu)))
    batch = _mlp_memory_batch(tensors)
    return _mlp_memory_grads(tensors, batch, _reduce_dim1(tensors, batch))


def _mlp_memory_setup(ctx, inputs, output) -> None:
    *tensors, ctx.dgd, ctx.self_target, ctx.normalized = inputs
    ctx.absent = [t is None for t in tensors]
    ctx.shapes = [None if t is None else t.shape for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if t is not None])
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zero fill unless needed below)


def reduce_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """g summed to `shape` over the dims it was broadcast along; a view (no launch) where only size-1 dims differ."""
    return g.view(shape) if g.numel() == shape.numel() else g.sum_to_size(shape)


def _mlp_memory_bwd(ctx, g_out, g_S1, g_P1, g_S2, g_P2):
    saved = iter(ctx.saved_tensors)
    tensors = [None if absent else next(saved) for absent in ctx.absent]
    S1, P1, Q = tensors[0], tensors[1], tensors[8]
    batch = _mlp_memory_batch(dict(zip(MLP_INPUTS, tensors)))
    C = tensors[6].shape[-2]
    D, HID = S1.shape[-2:]

    def grad(g, *shape):  # None (unused output): zeros where the kernel reads it
        return S1.new_zeros(*batch, *shape) if g is None else g.contiguous()

    empty = S1.new_empty(0)
    # o's gradient as it comes (a slice of the sequence's, read in place by the kernel: no copy)
    g_out = (S1.new_zeros(*batch, C, D) if g_out is None else g_out) if Q is not None else empty
    grads = mlp_memory_chunk_backward(
        *tensors, ctx.dgd, ctx.self_target, ctx.normalized, g_out,
        grad(g_S1, D, HID), grad(g_P1, D, HID) if P1 is not None else empty, grad(g_S2, HID, D),
        grad(g_P2, HID, D) if P1 is not None else empty)
    # (an input that needs no gradient, e.g. the first chunk's zero deviation, gets none: no reduction launched)
    grads = [None if absent or not needed else reduce_to(g, shape)
             for g, absent, needed, shape in zip(grads, ctx.absent, ctx.needs_input_grad, ctx.shapes)]
    return (*grads, None, None, None)


mlp_memory_chunk.register_autograd(_mlp_memory_bwd, setup_context=_mlp_memory_setup)
