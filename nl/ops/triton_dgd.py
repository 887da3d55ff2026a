"""One DGD chunk step of one memory layer as a single fused Triton kernel (`delta_rule.ChunkLayer`'s math).

Per batch element (one program each; every input read through its own batch strides, so a broadcast
one is read in place) and one chunk of C tokens, from the anchor S0 [O, I] (and the momentum P0 [O, I]),
the layer inputs X [C, I], gradient factors G [C, O], an optional query Q [C, I] and the gates
log_alpha, eta (and log_mu) [C], the kernel forms in registers, with no round trip through memory:

    decays     gamma, D[t-1, j], D_end (and with momentum Mu, E = D Mu, c = D m)   (cumulative sums)
    Gram       X X^T                     right-hand side  -eta (gamma_{t-1} X S0^T + (E o XX) W + c X P0^T)
    solve      delta = (I + eta D o XX)^-1 rhs    (the unit-lower inverse by forward substitution)
    read       S_{t-1} q_t for every t  (read before write)       end state S_C (and P_C)

with W = -eta G; the equations are those of `delta_rule` (module docstring there). With normalize_x (the
normalised step) x_t, g_t (and XS) are first scaled by r_t = 1 / max(||x_t||, 1e-6), on chip. Returns
(out [*b, C, O] or an empty tensor without Q, S_C [*b, O, I], P_C [*b, O, I] or an empty tensor), [*b] the
inputs' broadcast batch shape.

Backward (`dgd_chunk_backward`): a second fused kernel, one program per batch element, that recomputes
the forward's intermediates on chip from the op's inputs (nothing else is saved: recomputation instead
of storage) and runs every product in reverse, down to the gates' cumulative sums: gradients of S0, P0,
X, G, Q, log_alpha, eta and log_mu.

Both are registered with torch.library.custom_op (`nl::dgd_chunk`, `nl::dgd_chunk_backward`), so
torch.compile and FSDP2 see one opaque call each. Inputs are float32 or float64 (the recurrence runs in
fp32, issue 14 item 1); fp32 products are 3xTF32 (`dot_precision`: ~fp32 accuracy on tensor cores).
Triton is imported here, so import this module lazily (`delta_rule.chunk_layer` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nl.ops.delta_rule import INPUT_NORM_EPS, ChunkGates


@triton.jit
def batch_offset(n, N1, N2, s0, s1, s2):
    """Element offset of program n's batch element (n // (N1 N2), n // N2 % N1, n % N2) in a tensor with batch
    strides s0, s1, s2 (0 on a dim it is broadcast along)."""
    return (n // (N1 * N2)) * s0 + ((n // N2) % N1) * s1 + (n % N2) * s2


@triton.jit
def _chunk_decays(la, lmu, mc, BC: tl.constexpr, MOMENTUM: tl.constexpr, PRECISION: tl.constexpr):
    """The gates' decay factors of one chunk, shared by the forward and backward kernels.

    la, lmu: [BC] log_alpha, log_mu (zero on padded tokens); mc: [BC] token mask. With lg = cumsum(la),
    lm = cumsum(lmu): lg_prev = log gamma_{t-1}, lg_end = log gamma_C; Dp[t, j] = gamma_{t-1} / gamma_j
    (j < t), D_end[j] = gamma_C / gamma_j; with momentum Mu[t, j] = mu_t..mu_{j+1} (j <= t), m = exp(lm),
    Ep = Dp Mu, cp = Dp m, E_end = D_end Mu, c_end = D_end . m, Mu_end[j] = exp(lm_C - lm_j); without it
    Ep = Dp, E_end = D_end, and the momentum outputs are unused stand-ins (a Triton function returns one
    fixed tuple). Returns (lg_prev, lg_end, Dp, D_end, Ep, E_end, Mu, m, cp, c_end, Mu_end, lm_end)."""
    rc = tl.arange(0, BC)
    row, col = rc[:, None], rc[None, :]
    lg = tl.sum(tl.where(col <= row, la[None, :], 0.), 1)          # log gamma_t (cumulative sum)
    lg_prev = lg - la                                                # log gamma_{t-1}
    lg_end = tl.sum(la, 0)
    Dp = tl.where(col < row, tl.exp(tl.where(col < row, lg_prev[:, None] - lg[None, :], 0.)), 0.)
    D_end = tl.where(mc, tl.exp(lg_end - lg), 0.)                # padded tokens: no share of the end state
    if MOMENTUM:
        lm = tl.sum(tl.where(col <= row, lmu[None, :], 0.), 1)
        lm_end = tl.sum(lmu, 0)
        Mu = tl.where(col <= row, tl.exp(tl.where(col <= row, lm[:, None] - lm[None, :], 0.)), 0.)
        m = tl.exp(lm)
        Ep = tl.dot(Dp, Mu, input_precision=PRECISION)
        cp = tl.sum(Dp * m[None, :], 1)
        E_end = tl.sum(D_end[:, None] * Mu, 0)
        c_end = tl.sum(D_end * m, 0)
        Mu_end = tl.exp(lm_end - lm)
    else:
        Ep, E_end, Mu, m, cp, c_end, Mu_end, lm_end = Dp, D_end, Dp, D_end, D_end, lg_end, D_end, lg_end
    return lg_prev, lg_end, Dp, D_end, Ep, E_end, Mu, m, cp, c_end, Mu_end, lm_end


# noinline: a function of its own in the PTX, its registers allocated apart from its caller's: the two-layer
# kernels compile in ~0.7x the time with fewer spills (docs/BENCHMARKS.md "Kernels compiled for sm_90").
@triton.jit(noinline=True)
def _dgd_fwd_tile(s0_p, p0_p, x_p, g_p, xs_p, q_p, la_p, eta_p, lm_p, out_p, send_p, pend_p, C, I, O,
                  BC: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr, DGD: tl.constexpr, MOMENTUM: tl.constexpr,
                  HAS_Q: tl.constexpr, HAS_XS: tl.constexpr, NORM_X: tl.constexpr, EPS: tl.constexpr,
                  PRECISION: tl.constexpr):
    """One chunk step of one batch element (the module docstring), every pointer at that element's tile: loads
    the inputs, stores the read (HAS_Q) and the end states. Called by the one-layer and the two-layer kernels."""
    rc, ri, ro = tl.arange(0, BC), tl.arange(0, BI), tl.arange(0, BO)
    mc, mi, mo = rc < C, ri < I, ro < O
    # Tiles, zero-padded: padded tokens have eta = 0 and log_alpha = log_mu = 0, so they change nothing.
    x = tl.load(x_p + rc[:, None] * I + ri[None, :],
                mask=mc[:, None] & mi[None, :], other=0.)
    g = tl.load(g_p + rc[:, None] * O + ro[None, :],
                mask=mc[:, None] & mo[None, :], other=0.)
    s0 = tl.load(s0_p + ro[:, None] * I + ri[None, :],
                 mask=mo[:, None] & mi[None, :], other=0.)
    la = tl.load(la_p + rc, mask=mc, other=0.)
    eta = tl.load(eta_p + rc, mask=mc, other=0.)
    sc = eta  # used only with NORM_X
    if NORM_X:  # the normalised step: the layer reads r_t x_t, gradient factor r_t g_t (and XS r_t), r = 1/||x_t||
        sc = 1 / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), EPS)
        x = x * sc[:, None]
        g = g * sc[:, None]

    lmu = la  # read only with MOMENTUM
    if MOMENTUM:
        lmu = tl.load(lm_p + rc, mask=mc, other=0.)
    lg_prev, lg_end, Dp, D_end, Ep, E_end, Mu, m, cp, c_end, Mu_end, lm_end = _chunk_decays(
        la, lmu, mc, BC, MOMENTUM, PRECISION)
    row, col = rc[:, None], rc[None, :]
    gamma_prev = tl.exp(lg_prev)
    w = -eta[:, None] * g                                            # w_t = -eta_t g_t
    if MOMENTUM:
        p0 = tl.load(p0_p + ro[:, None] * I + ri[None, :],
                     mask=mo[:, None] & mi[None, :], other=0.)
    if DGD:
        XX = tl.dot(x, tl.trans(x), input_precision=PRECISION)
        if HAS_XS:  # the caller's anchor output on X (e.g. of the deviation S0 - M_0)
            xs = tl.load(xs_p + rc[:, None] * O + ro[None, :],
                         mask=mc[:, None] & mo[None, :], other=0.)
            if NORM_X:
                xs = xs * sc[:, None]
        else:
            xs = tl.dot(x, tl.trans(s0), input_precision=PRECISION)
        base = gamma_prev[:, None] * xs
        base += tl.dot(Ep * XX, w, input_precision=PRECISION)
        if MOMENTUM:
            base += cp[:, None] * tl.dot(x, tl.trans(p0), input_precision=PRECISION)
        A = eta[:, None] * Dp * XX                                   # strictly lower triangular
        # (I + A)^-1 by forward substitution on its rows: inv_t = e_t - sum_{j<t} A[t, j] inv_j.
        inv = tl.where(row == col, 1., 0.).to(x.dtype)
        for t in range(1, C):  # rows past C are padding: identity rows suffice
            a_t = tl.sum(tl.where(row == t, A, 0.), 0)               # row t of A, indexed by j
            new = tl.sum(a_t[:, None] * inv, 0)
            inv = tl.where(row == t, inv - new[None, :], inv)
        delta = tl.dot(inv, -eta[:, None] * base, input_precision=PRECISION)
    if HAS_Q:
        q = tl.load(q_p + rc[:, None] * I + ri[None, :],
                    mask=mc[:, None] & mi[None, :], other=0.)
        QX = tl.dot(q, tl.trans(x), input_precision=PRECISION)
        out = gamma_prev[:, None] * tl.dot(q, tl.trans(s0), input_precision=PRECISION)
        out += tl.dot(Ep * QX, w, input_precision=PRECISION)
        if MOMENTUM:
            out += cp[:, None] * tl.dot(q, tl.trans(p0), input_precision=PRECISION)
        if DGD:
            out += tl.dot(Dp * QX, delta, input_precision=PRECISION)
        tl.store(out_p + rc[:, None] * O + ro[None, :], out, mask=mc[:, None] & mo[None, :])
    coef = E_end[:, None] * w
    if DGD:
        coef += D_end[:, None] * delta
    s_end = tl.exp(lg_end) * s0 + tl.dot(tl.trans(coef), x, input_precision=PRECISION)
    if MOMENTUM:
        s_end += c_end * p0
        p_end = tl.exp(lm_end) * p0 + tl.dot(tl.trans(Mu_end[:, None] * w), x, input_precision=PRECISION)
        tl.store(pend_p + ro[:, None] * I + ri[None, :], p_end, mask=mo[:, None] & mi[None, :])
    tl.store(send_p + ro[:, None] * I + ri[None, :], s_end, mask=mo[:, None] & mi[None, :])


@triton.jit
def _dgd_pointers(n, N1, N2, S0, P0, X, G, XS, Q, LA, ETA, LM, s_S0_0, s_S0_1, s_S0_2, s_P0_0, s_P0_1, s_P0_2, s_X_0,
                  s_X_1, s_X_2, s_G_0, s_G_1, s_G_2, s_XS_0, s_XS_1, s_XS_2, s_Q_0, s_Q_1, s_Q_2, s_LA_0, s_LA_1,
                  s_LA_2, s_ETA_0, s_ETA_1, s_ETA_2, s_LM_0, s_LM_1, s_LM_2):
    """Each input's pointer at batch element n, through its own batch strides (`batch_offset`; 0 where it is
    broadcast: k and the gates shared by the generators, the initial state shared by the sequences)."""
    return (S0 + batch_offset(n, N1, N2, s_S0_0, s_S0_1, s_S0_2),
            P0 + batch_offset(n, N1, N2, s_P0_0, s_P0_1, s_P0_2),
            X + batch_offset(n, N1, N2, s_X_0, s_X_1, s_X_2),
            G + batch_offset(n, N1, N2, s_G_0, s_G_1, s_G_2),
            XS + batch_offset(n, N1, N2, s_XS_0, s_XS_1, s_XS_2),
            Q + batch_offset(n, N1, N2, s_Q_0, s_Q_1, s_Q_2),
            LA + batch_offset(n, N1, N2, s_LA_0, s_LA_1, s_LA_2),
            ETA + batch_offset(n, N1, N2, s_ETA_0, s_ETA_1, s_ETA_2),
            LM + batch_offset(n, N1, N2, s_LM_0, s_LM_1, s_LM_2))


@triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (4, 8, 2)], key=["BC", "BI", "BO"])
@triton.jit
def _dgd_chunk_kernel(S0, P0, X, G, XS, Q, LA, ETA, LM, OUT, S_END, P_END, C, I, O, N1, N2,
                      s_S0_0, s_S0_1, s_S0_2, s_P0_0, s_P0_1, s_P0_2, s_X_0, s_X_1, s_X_2, s_G_0, s_G_1, s_G_2,
                      s_XS_0, s_XS_1, s_XS_2, s_Q_0, s_Q_1, s_Q_2, s_LA_0, s_LA_1, s_LA_2, s_ETA_0, s_ETA_1, s_ETA_2,
                      s_LM_0, s_LM_1, s_LM_2,
                      BC: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr, DGD: tl.constexpr,
                      MOMENTUM: tl.constexpr, HAS_Q: tl.constexpr, HAS_XS: tl.constexpr, NORM_X: tl.constexpr,
                      EPS: tl.constexpr, PRECISION: tl.constexpr):
    n = tl.program_id(0)
    s0, p0, x, g, xs, q, la, eta, lm = _dgd_pointers(
        n, N1, N2, S0, P0, X, G, XS, Q, LA, ETA, LM, s_S0_0, s_S0_1, s_S0_2, s_P0_0, s_P0_1, s_P0_2, s_X_0, s_X_1,
        s_X_2, s_G_0, s_G_1, s_G_2, s_XS_0, s_XS_1, s_XS_2, s_Q_0, s_Q_1, s_Q_2, s_LA_0, s_LA_1, s_LA_2, s_ETA_0,
        s_ETA_1, s_ETA_2, s_LM_0, s_LM_1, s_LM_2)
    _dgd_fwd_tile(s0, p0, x, g, xs, q, la, eta, lm, OUT + n * C * O, S_END + n * O * I, P_END + n * O * I,
                  C, I, O, BC, BI, BO, DGD, MOMENTUM, HAS_Q, HAS_XS, NORM_X, EPS, PRECISION)


# noinline: as _dgd_fwd_tile.
@triton.jit(noinline=True)
def _dgd_bwd_tile(s0_p, p0_p, x_p, g_p, xs_p, q_p, la_p, eta_p, lm_p, dout_p, ds_p, dp_p, ds0_p, dp0_p, dx_p, dg_p,
                  dxs_p, dq_p, dla_p, deta_p, dlm_p, C, I, O, BC: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr,
                  DGD: tl.constexpr, MOMENTUM: tl.constexpr, HAS_Q: tl.constexpr, HAS_XS: tl.constexpr,
                  NORM_X: tl.constexpr, EPS: tl.constexpr, PRECISION: tl.constexpr, ACC_Q: tl.constexpr,
                  ACC_GATES: tl.constexpr, ACC_X: tl.constexpr):
    """Gradients of one chunk step: the forward's intermediates are recomputed on chip (nothing was saved
    but the inputs), then every product of the forward is transposed in reverse order. Inputs are read through
    their batch strides (as the forward); the output gradients and gradients are contiguous over the whole batch
    (the caller sums those of broadcast inputs). Every pointer is at this batch element's tile. ACC_Q, ACC_GATES, ACC_X:
    add dq, the gates' and dx to what the pointers hold (a second layer's share, or another batch element's where the
    input is shared) instead of overwriting it."""
    rc, ri, ro = tl.arange(0, BC), tl.arange(0, BI), tl.arange(0, BO)
    mc, mi, mo = rc < C, ri < I, ro < O
    m_ci, m_co, m_oi = mc[:, None] & mi[None, :], mc[:, None] & mo[None, :], mo[:, None] & mi[None, :]
    p_ci, p_co, p_oi = rc[:, None] * I + ri[None, :], rc[:, None] * O + ro[None, :], ro[:, None] * I + ri[None, :]
    x = tl.load(x_p + p_ci, mask=m_ci, other=0.)
    g = tl.load(g_p + p_co, mask=m_co, other=0.)
    s0 = tl.load(s0_p + p_oi, mask=m_oi, other=0.)
    ds = tl.load(ds_p + p_oi, mask=m_oi, other=0.)
    la = tl.load(la_p + rc, mask=mc, other=0.)
    eta = tl.load(eta_p + rc, mask=mc, other=0.)
    row, col = rc[:, None], rc[None, :]
    # ---- forward, recomputed (as _dgd_chunk_kernel)
    x_in, g_in, sc, norm = x, g, eta, eta  # the unscaled inputs (for r's gradient); sc, norm used only with NORM_X
    if NORM_X:
        norm = tl.sqrt(tl.sum(x * x, 1))
        sc = 1 / tl.maximum(norm, EPS)
        x = x * sc[:, None]
        g = g * sc[:, None]
    lmu = la  # read only with MOMENTUM
    if MOMENTUM:
        lmu = tl.load(lm_p + rc, mask=mc, other=0.)
    lg_prev, lg_end, Dp, D_end, Ep, E_end, Mu, m, cp, c_end, Mu_end, lm_end = _chunk_decays(
        la, lmu, mc, BC, MOMENTUM, PRECISION)
    gp = tl.exp(lg_prev)
    ge = tl.exp(lg_end)
    w = -eta[:, None] * g
    if MOMENTUM:
        m_end = tl.exp(lm_end)
        p0 = tl.load(p0_p + p_oi, mask=m_oi, other=0.)
    coef = E_end[:, None] * w
    if DGD:
        XX = tl.dot(x, tl.trans(x), input_precision=PRECISION)
        if HAS_XS:
            xs_in = tl.load(xs_p + p_co, mask=m_co, other=0.)
            xs = xs_in * sc[:, None] if NORM_X else xs_in
        else:
            xs = tl.dot(x, tl.trans(s0), input_precision=PRECISION)
        base = gp[:, None] * xs + tl.dot(Ep * XX, w, input_precision=PRECISION)
        if MOMENTUM:
            XP = tl.dot(x, tl.trans(p0), input_precision=PRECISION)
            base += cp[:, None] * XP
        A = eta[:, None] * Dp * XX
        inv = tl.where(row == col, 1., 0.).to(x.dtype)
        for t in range(1, C):
            a_t = tl.sum(tl.where(row == t, A, 0.), 0)
            new = tl.sum(a_t[:, None] * inv, 0)
            inv = tl.where(row == t, inv - new[None, :], inv)
        delta = tl.dot(inv, -eta[:, None] * base, input_precision=PRECISION)
        coef += D_end[:, None] * delta
    # ---- backward. End state S_C = ge S0 + coef^T X (+ c_end P0); P_C = m_end P0 + (Mu_end w)^T X.
    ds0 = ge * ds
    d_ge = tl.sum(tl.sum(ds * s0, 1), 0)
    dcoef = tl.dot(x, tl.trans(ds), input_precision=PRECISION)          # [C, O]
    dx = tl.dot(coef, ds, input_precision=PRECISION)                    # [C, I]
    dw = E_end[:, None] * dcoef
    dE_end = tl.sum(dcoef * w, 1)
    dDp = tl.zeros([BC, BC], dtype=x.dtype)
    dEp = tl.zeros([BC, BC], dtype=x.dtype)
    dgp = tl.zeros([BC], dtype=x.dtype)
    dcp = tl.zeros([BC], dtype=x.dtype)
    dD_end = tl.zeros([BC], dtype=x.dtype)
    deta = tl.zeros([BC], dtype=x.dtype)
    dsc = tl.zeros([BC], dtype=x.dtype)
    if DGD:
        ddelta = D_end[:, None] * dcoef
        dD_end += tl.sum(dcoef * delta, 1)
    if MOMENTUM:
        dp = tl.load(dp_p + p_oi, mask=m_oi, other=0.)
        dp0 = c_end * ds + m_end * dp
        d_cend = tl.sum(tl.sum(ds * p0, 1), 0)
        d_mend = tl.sum(tl.sum(dp * p0, 1), 0)
        mw = Mu_end[:, None] * w
        dmw = tl.dot(x, tl.trans(dp), input_precision=PRECISION)
        dw += Mu_end[:, None] * dmw
        dMu_end = tl.sum(dmw * w, 1)
        dx += tl.dot(mw, dp, input_precision=PRECISION)
    # Read: out = gp (Q S0^T) + cp (Q P0^T) + (Ep o QX) w + (Dp o QX) delta.
    if HAS_Q:
        q = tl.load(q_p + p_ci, mask=m_ci, other=0.)
        do = tl.load(dout_p + p_co, mask=m_co, other=0.)
        QX = tl.dot(q, tl.trans(x), input_precision=PRECISION)
        doW = tl.dot(do, tl.trans(w), input_precision=PRECISION)           # [C, C]
        dQX = Ep * doW
        dEp += doW * QX
        dw += tl.dot(tl.trans(Ep * QX), do, input_precision=PRECISION)
        dgp += tl.sum(do * tl.dot(q, tl.trans(s0), input_precision=PRECISION), 1)
        dq = gp[:, None] * tl.dot(do, s0, input_precision=PRECISION)
        ds0 += tl.dot(tl.trans(gp[:, None] * do), q, input_precision=PRECISION)
        if MOMENTUM:
            dcp += tl.sum(do * tl.dot(q, tl.trans(p0), input_precision=PRECISION), 1)
            dq += cp[:, None] * tl.dot(do, p0, input_precision=PRECISION)
            dp0 += tl.dot(tl.trans(cp[:, None] * do), q, input_precision=PRECISION)
        if DGD:
            doD = tl.dot(do, tl.trans(delta), input_precision=PRECISION)
            dQX += Dp * doD
            dDp += doD * QX
            ddelta += tl.dot(tl.trans(Dp * QX), do, input_precision=PRECISION)
        dq += tl.dot(dQX, x, input_precision=PRECISION)
        dx += tl.dot(tl.trans(dQX), q, input_precision=PRECISION)
        if ACC_Q:  # a second layer's read of the same query (the two-layer kernel)
            dq += tl.load(dq_p + p_ci, mask=m_ci, other=0.)
        tl.store(dq_p + p_ci, dq, mask=m_ci)
    # Solve: (I + A) delta = -eta base, A = eta Dp o XX; base = gp XS + (Ep o XX) w (+ cp XP).
    if DGD:
        drhs = tl.dot(tl.trans(inv), ddelta, input_precision=PRECISION)
        dA = -tl.where(col < row, tl.dot(drhs, tl.trans(delta), input_precision=PRECISION), 0.)
        deta += tl.sum(dA * Dp * XX, 1) - tl.sum(drhs * base, 1)
        dDp += eta[:, None] * dA * XX
        dXX = eta[:, None] * Dp * dA
        dbase = -eta[:, None] * drhs
        dgp += tl.sum(dbase * xs, 1)
        dxs = gp[:, None] * dbase
        dbW = tl.dot(dbase, tl.trans(w), input_precision=PRECISION)
        dEp += dbW * XX
        dXX += Ep * dbW
        dw += tl.dot(tl.trans(Ep * XX), dbase, input_precision=PRECISION)
        if MOMENTUM:
            dcp += tl.sum(dbase * XP, 1)
            dXP = cp[:, None] * dbase
            dx += tl.dot(dXP, p0, input_precision=PRECISION)
            dp0 += tl.dot(tl.trans(dXP), x, input_precision=PRECISION)
        if HAS_XS:
            if NORM_X:
                dsc += tl.sum(dxs * xs_in, 1)
                dxs = dxs * sc[:, None]
            tl.store(dxs_p + p_co, dxs, mask=m_co)
        else:
            dx += tl.dot(dxs, s0, input_precision=PRECISION)
            ds0 += tl.dot(tl.trans(dxs), x, input_precision=PRECISION)
        dx += tl.dot(dXX + tl.trans(dXX), x, input_precision=PRECISION)
    # w = -eta g
    dg = -eta[:, None] * dw
    deta -= tl.sum(dw * g, 1)
    if ACC_GATES:  # the gates' gradient from another layer stepped with them (the two-layer kernel)
        deta += tl.load(deta_p + rc, mask=mc, other=0.)
    tl.store(deta_p + rc, deta, mask=mc)
    if NORM_X:  # x = r x_in, g = r g_in, r = 1 / max(||x_in||, EPS): dr/dx_in = -r^3 x_in where ||x_in|| > EPS
        dsc += tl.sum(dg * g_in, 1) + tl.sum(dx * x_in, 1)
        dg = dg * sc[:, None]
        dx = dx * sc[:, None] - tl.where(norm > EPS, dsc * sc * sc * sc, 0.)[:, None] * x_in
    tl.store(dg_p + p_co, dg, mask=m_co)
    if ACC_X:  # an input shared along a batch dim, its gradient summed in the program
        dx += tl.load(dx_p + p_ci, mask=m_ci, other=0.)
    tl.store(dx_p + p_ci, dx, mask=m_ci)
    tl.store(ds0_p + p_oi, ds0, mask=m_oi)
    # Gates: Ep = Dp Mu, cp = Dp m, E_end = D_end Mu, c_end = D_end . m; Mu, m, Mu_end, m_end from cumsum(log_mu).
    if MOMENTUM:
        dDp += tl.dot(dEp, tl.trans(Mu), input_precision=PRECISION) + dcp[:, None] * m[None, :]
        dMu = tl.dot(tl.trans(Dp), dEp, input_precision=PRECISION) + D_end[:, None] * dE_end[None, :]
        dm = tl.sum(Dp * dcp[:, None], 0) + d_cend * D_end
        dD_end += tl.sum(Mu * dE_end[None, :], 1) + d_cend * m
        t_mu = dMu * Mu
        dlm = tl.sum(t_mu, 1) - tl.sum(t_mu, 0) + dm * m - dMu_end * Mu_end
        dlm_end = tl.sum(dMu_end * Mu_end, 0) + d_mend * m_end
        dlmu = tl.sum(tl.where(row >= col, dlm[:, None], 0.), 0) + dlm_end     # reverse cumulative sum
        if ACC_GATES:
            dlmu += tl.load(dlm_p + rc, mask=mc, other=0.)
        tl.store(dlm_p + rc, dlmu, mask=mc)
        tl.store(dp0_p + p_oi, dp0, mask=m_oi)
    else:
        dDp += dEp
        dD_end += dE_end
    # Dp = exp(lg_prev[t] - lg[j]), gp = exp(lg_prev), D_end = exp(lg_end - lg), ge = exp(lg_end); lg = cumsum(la).
    t_d = dDp * Dp
    dlg_prev = tl.sum(t_d, 1) + dgp * gp
    dlg = dlg_prev - tl.sum(t_d, 0) - dD_end * D_end
    dlg_end = tl.sum(dD_end * D_end, 0) + d_ge * ge
    dla = tl.sum(tl.where(row >= col, dlg[:, None], 0.), 0) + dlg_end - dlg_prev
    if ACC_GATES:
        dla += tl.load(dla_p + rc, mask=mc, other=0.)
    tl.store(dla_p + rc, dla, mask=mc)


@triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (4, 8, 2)], key=["BC", "BI", "BO"])
@triton.jit
def _dgd_chunk_bwd_kernel(S0, P0, X, G, XS, Q, LA, ETA, LM, DOUT, DS, DP, dS0, dP0, dX, dG, dXS, dQ, dLA, dETA,
                          dLM, C, I, O, N1, N2,
                          s_S0_0, s_S0_1, s_S0_2, s_P0_0, s_P0_1, s_P0_2, s_X_0, s_X_1, s_X_2, s_G_0, s_G_1, s_G_2,
                          s_XS_0, s_XS_1, s_XS_2, s_Q_0, s_Q_1, s_Q_2, s_LA_0, s_LA_1, s_LA_2,
                          s_ETA_0, s_ETA_1, s_ETA_2, s_LM_0, s_LM_1, s_LM_2,
                          BC: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr, DGD: tl.constexpr,
                          MOMENTUM: tl.constexpr, HAS_Q: tl.constexpr, HAS_XS: tl.constexpr,
                          NORM_X: tl.constexpr, EPS: tl.constexpr, PRECISION: tl.constexpr):
    n = tl.program_id(0)
    s0, p0, x, g, xs, q, la, eta, lm = _dgd_pointers(
        n, N1, N2, S0, P0, X, G, XS, Q, LA, ETA, LM, s_S0_0, s_S0_1, s_S0_2, s_P0_0, s_P0_1, s_P0_2, s_X_0, s_X_1,
        s_X_2, s_G_0, s_G_1, s_G_2, s_XS_0, s_XS_1, s_XS_2, s_Q_0, s_Q_1, s_Q_2, s_LA_0, s_LA_1, s_LA_2, s_ETA_0,
        s_ETA_1, s_ETA_2, s_LM_0, s_LM_1, s_LM_2)
    _dgd_bwd_tile(s0, p0, x, g, xs, q, la, eta, lm, DOUT + n * C * O, DS + n * O * I, DP + n * O * I,
                  dS0 + n * O * I, dP0 + n * O * I, dX + n * C * I, dG + n * C * O, dXS + n * C * O, dQ + n * C * I,
                  dLA + n * C, dETA + n * C, dLM + n * C, C, I, O, BC, BI, BO, DGD, MOMENTUM, HAS_Q, HAS_XS, NORM_X,
                  EPS, PRECISION, False, False, False)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dim >= 16


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input_precision for the kernels' products of `dtype` tiles: "tf32x3" for float32 (each product
    as three TF32 tensor-core products, hi*hi + hi*lo + lo*hi of the operands split into TF32 parts: about fp32
    accuracy), "ieee" for float64 (the interpreter's runs in the tests).
    Neither plain TF32 (10-bit mantissa; the chunk's triangular solve amplifies its errors) nor IEEE fp32: Triton
    lowers an IEEE fp32 dot to FMA loops that ptxas compiles with spills of 6 KB per thread for one [64x64]x[64x128]
    product, and had not finished `mlp_memory_chunk`'s backward at the 340m shape after 46 minutes on a 2-core
    machine (docs/BENCHMARKS.md, "Kernels compiled for sm_90")."""
    return "ieee" if dtype == torch.float64 else "tf32x3"


INPUTS = ("S0", "P0", "X", "G", "XS", "Q", "log_alpha", "eta", "log_mu")
_MATRIX = {"S0", "P0", "X", "G", "XS", "Q"}  # [..., rows, cols]; the gates are [..., C]


def _batch(tensors: dict[str, torch.Tensor | None]) -> torch.Size:
    """The broadcast batch shape of the op's inputs (everything but their last 2 dims, or 1 for the gates)."""
    return torch.broadcast_shapes(*[t.shape[:-2] if k in _MATRIX else t.shape[:-1]
                                    for k, t in tensors.items() if t is not None])


def _check(tensors: dict[str, torch.Tensor | None]) -> torch.Size:
    S0, X, G = tensors["S0"], tensors["X"], tensors["G"]
    if S0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"kernel=triton runs the recurrence in float32 or float64, got {S0.dtype}: cast the "
                        "chunk inputs to float32 (the recurrence's own autocast-disabled region does)")
    if S0.device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise RuntimeError("kernel=triton on CPU tensors needs TRITON_INTERPRET=1 set before import "
                           "(or use model.hope.kernel=torch)")
    if min(X.dim(), G.dim(), S0.dim()) < 2 or G.shape[-2] != X.shape[-2] or S0.shape[-2:] != (G.shape[-1], X.shape[-1]):
        raise ValueError(f"dgd_chunk: expected X [..., C, I], G [..., C, O], S0 [..., O, I], got "
                         f"{tuple(X.shape)}, {tuple(G.shape)}, {tuple(S0.shape)}")
    batch = _batch(tensors)
    if len(batch) > 3:
        raise ValueError(f"dgd_chunk: at most 3 batch dims (batch, generator, head), got {tuple(batch)}")
    return batch


def batch_strided(t: torch.Tensor, inner: int) -> tuple[torch.Tensor, list[int]]:
    """t as a kernel reads it, and its strides over 3 batch dims (its leading dims, left-padded to 3): a
    broadcast dim (size 1) has stride 0, so an input shared along a batch dim is read in place rather than
    expanded and copied per batch element. Only the `inner` trailing dims (row-major) must be contiguous; a
    tensor whose are not is made contiguous as it is (not expanded)."""
    dense = t.stride(-1) == 1 or t.shape[-1] == 1
    if inner == 2:
        dense = dense and (t.stride(-2) == t.shape[-1] or t.shape[-2] == 1)
    t = t if dense else t.contiguous()
    dims = t.dim() - inner
    return t, [0] * (3 - dims) + [0 if size == 1 else st for size, st in zip(t.shape[:dims], t.stride()[:dims])]


def _strided(tensors: dict[str, torch.Tensor | None], batch: torch.Size) -> tuple[list, list[int]]:
    """The inputs as the kernels read them and their batch strides (`batch_strided`, 3 per input); an absent
    input is a stand-in with strides 0."""
    args, strides = [], []
    for k in INPUTS:
        t = tensors[k]
        t, st = (tensors["S0"], [0, 0, 0]) if t is None else batch_strided(t, 2 if k in _MATRIX else 1)
        args.append(t)
        strides += st
    return args, strides


def grid(batch: torch.Size) -> tuple[int, int, int]:
    """(N, N1, N2): programs, and the sizes of the last two of the 3 (left-padded) batch dims."""
    b = (1,) * (3 - len(batch)) + tuple(batch)
    return b[0] * b[1] * b[2], b[1], b[2]


@torch.library.custom_op("nl::dgd_chunk", mutates_args=())
def dgd_chunk(S0: torch.Tensor, P0: torch.Tensor | None, X: torch.Tensor, G: torch.Tensor, XS: torch.Tensor | None,
              Q: torch.Tensor | None, log_alpha: torch.Tensor, eta: torch.Tensor, log_mu: torch.Tensor | None,
              dgd: bool, normalize_x: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused chunk step (module docstring). Inputs with up to 3 leading batch dims that broadcast to one
    batch shape [*b] (a shared input, e.g. k for every generator, is read in place, not copied):
    S0, P0 [*, O, I]; X, Q [*, C, I]; G, XS [*, C, O]; log_alpha, eta, log_mu [*, C]. P0 and log_mu
    together (momentum) or neither. XS: the anchor's output on X that DGD's decay reads (None: X S0^T;
    `ChunkLayer`'s XS, e.g. X (S0 - M_0)^T for retention toward M_0). normalize_x: the normalised step
    (`ChunkLayer`'s normalize_x): the layer reads r_t x_t with gradient factor r_t g_t (and r_t XS),
    r_t = 1 / max(||x_t||, 1e-6) (`delta_rule.input_norm`), formed on chip.
    Returns (out [*b, C, O] | empty, S_C [*b, O, I], P_C [*b, O, I] | empty), contiguous."""
    tensors = dict(zip(INPUTS, (S0, P0, X, G, XS, Q, log_alpha, eta, log_mu)))
    batch = _check(tensors)
    args, strides = _strided(tensors, batch)
    C, I, O = X.shape[-2], X.shape[-1], G.shape[-1]
    N, N1, N2 = grid(batch)
    momentum = P0 is not None
    out = X.new_empty(*batch, C, O) if Q is not None else X.new_empty(0)
    S_end = S0.new_empty(*batch, O, I)
    P_end = torch.empty_like(S_end) if momentum else X.new_empty(0)
    _dgd_chunk_kernel[(N,)](*args, out, S_end, P_end if momentum else S_end, C, I, O, N1, N2, *strides,
                            BC=_block(C), BI=_block(I), BO=_block(O), DGD=dgd, MOMENTUM=momentum,
                            HAS_Q=Q is not None, HAS_XS=XS is not None, NORM_X=normalize_x,
                            EPS=INPUT_NORM_EPS, PRECISION=dot_precision(X.dtype))
    return out, S_end, P_end


@dgd_chunk.register_fake
def _(S0, P0, X, G, XS, Q, log_alpha, eta, log_mu, dgd, normalize_x=False):
    batch = _batch(dict(zip(INPUTS, (S0, P0, X, G, XS, Q, log_alpha, eta, log_mu))))
    C, I, O = X.shape[-2], X.shape[-1], G.shape[-1]
    out = X.new_empty(*batch, C, O) if Q is not None else X.new_empty(0)
    return out, S0.new_empty(*batch, O, I), S0.new_empty(*batch, O, I) if P0 is not None else X.new_empty(0)


def _full_grads(tensors: dict[str, torch.Tensor | None], batch: torch.Size) -> list[torch.Tensor]:
    """Gradient buffers over the whole batch [*b, ...] per input (empty for an absent one)."""
    grads = []
    for k in INPUTS:
        t = tensors[k]
        if t is None:
            grads.append(tensors["X"].new_empty(0))
        else:
            grads.append(t.new_empty(*batch, *(t.shape[-2:] if k in _MATRIX else t.shape[-1:])))
    return grads


@torch.library.custom_op("nl::dgd_chunk_backward", mutates_args=())
def dgd_chunk_backward(S0: torch.Tensor, P0: torch.Tensor | None, X: torch.Tensor, G: torch.Tensor,
                       XS: torch.Tensor | None, Q: torch.Tensor | None, log_alpha: torch.Tensor, eta: torch.Tensor,
                       log_mu: torch.Tensor | None, dgd: bool, g_out: torch.Tensor, g_S: torch.Tensor,
                       g_P: torch.Tensor, normalize_x: bool = False) -> list[torch.Tensor]:
    """Gradients of `dgd_chunk` w.r.t. (S0, P0, X, G, XS, Q, log_alpha, eta, log_mu), one fused kernel that
    recomputes the chunk from its inputs; each over the whole batch [*b, ...] (a broadcast input's gradient is
    summed back to its shape by the caller); an absent input (None) gets an empty tensor. g_out, g_P: empty
    when there is no Q / no momentum, else contiguous [*b, ...] like the outputs. Shapes as `dgd_chunk`."""
    tensors = dict(zip(INPUTS, (S0, P0, X, G, XS, Q, log_alpha, eta, log_mu)))
    batch = _check(tensors)
    args, strides = _strided(tensors, batch)
    C, I, O = X.shape[-2], X.shape[-1], G.shape[-1]
    N, N1, N2 = grid(batch)
    momentum = P0 is not None
    grads = _full_grads(tensors, batch)
    dS0, dP0, dX, dG, dXS, dQ, dLA, dETA, dLM = grads
    if XS is not None and not dgd:
        dXS.zero_()  # only DGD's decay reads XS
    _dgd_chunk_bwd_kernel[(N,)](*args, g_out if Q is not None else G, g_S, g_P if momentum else g_S, dS0,
                                dP0 if momentum else dS0, dX, dG, dXS if XS is not None else dG,
                                dQ if Q is not None else dX, dLA, dETA, dLM if momentum else dETA, C, I, O, N1, N2,
                                *strides, BC=_block(C), BI=_block(I), BO=_block(O), DGD=dgd, MOMENTUM=momentum,
                                HAS_Q=Q is not None, HAS_XS=XS is not None, NORM_X=normalize_x, EPS=INPUT_NORM_EPS,
                                PRECISION=dot_precision(X.dtype))
    return grads


@dgd_chunk_backward.register_fake
def _(S0, P0, X, G, XS, Q, log_alpha, eta, log_mu, dgd, g_out, g_S, g_P, normalize_x=False):
    tensors = dict(zip(INPUTS, (S0, P0, X, G, XS, Q, log_alpha, eta, log_mu)))
    return _full_grads(tensors, _batch(tensors))


def _setup_context(ctx, inputs, output) -> None:
    *tensors, ctx.dgd, ctx.normalize_x = inputs
    ctx.absent = [t is None for t in tensors]
    ctx.shapes = [None if t is None else t.shape for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if t is not None])
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zero-filled launch; see _backward)


def _backward(ctx, g_out, g_S, g_P):
    saved = iter(ctx.saved_tensors)
    tensors = [None if absent else next(saved) for absent in ctx.absent]
    S0, P0, X, G, _, Q = tensors[:6]
    batch = _batch(dict(zip(INPUTS, tensors)))
    # Gradients of unused outputs arrive as None; the empty outputs (no Q, no momentum) get empty ones.
    g_out = X.new_empty(0) if Q is None else X.new_zeros(*batch, *X.shape[-2:-1], G.shape[-1]) if g_out is None \
        else g_out
    g_S = S0.new_zeros(*batch, *S0.shape[-2:]) if g_S is None else g_S
    g_P = X.new_empty(0) if P0 is None else S0.new_zeros(*batch, *S0.shape[-2:]) if g_P is None else g_P
    grads = dgd_chunk_backward(*tensors, ctx.dgd, g_out.contiguous(), g_S.contiguous(), g_P.contiguous(),
                               ctx.normalize_x)
    # A broadcast input's gradient is the sum over the batch elements that read it (no launch when not broadcast).
    grads = [None if absent else g.sum_to_size(shape) for g, absent, shape in zip(grads, ctx.absent, ctx.shapes)]
    return (*grads, None, None)


dgd_chunk.register_autograd(_backward, setup_context=_setup_context)


class FusedChunkLayer:
    """`delta_rule.ChunkLayer` on the fused kernel: the same constructor, `read` and `end_state`.

    Nothing runs at construction; `read(Q)` runs the kernel once for the read and the end state
    together, `end_state()` reuses that or runs the kernel without a query. Broadcast batch dims
    (gates shared by memories, k shared by the generators, the initial state shared by the sequences) are
    read in place by the kernel through stride-0 dims, not copied (`dgd_chunk`). XS, the anchor's output on X,
    is passed on when given (DGD only; without it the kernel forms X S0^T on chip); normalize_x on chip."""

    def __init__(self, S0: torch.Tensor, P0: torch.Tensor | None, X: torch.Tensor, G: torch.Tensor,
                 gates: ChunkGates, dgd: bool, XS: torch.Tensor | None = None,
                 normalize_x: bool = False) -> None:
        self.S0, self.P0, self.X, self.G, self.gates, self.dgd = S0, P0, X, G, gates, dgd
        self.XS = XS if dgd else None  # ChunkLayer reads it only for DGD's decay
        self.normalize_x = normalize_x  # r = 1/||x|| and the products r x, r g, r XS on chip (and their backward)
        self._ends: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _run(self, Q: torch.Tensor | None):
        g = self.gates
        out, S, P = dgd_chunk(self.S0, self.P0, self.X, self.G, self.XS, Q, g.log_alpha, g.eta,
                              g.log_mu if g.momentum else None, self.dgd, self.normalize_x)
        self._ends = (S, P if self.P0 is not None else None)
        return out if Q is not None else None

    def read(self, Q: torch.Tensor) -> torch.Tensor:
        """S_{t-1} q_t for every token of the chunk. Q: [..., C, I] -> [..., C, O]."""
        return self._run(Q)

    def end_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(S_C, P_C): the layer and its momentum after the chunk's last token."""
        if self._ends is None:
            self._run(None)
        return self._ends
