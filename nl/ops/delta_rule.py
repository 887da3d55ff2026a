"""Delta Gradient Descent (DGD) on one linear layer: the token-by-token step and its chunk form.

A layer S (shape [..., O, I]) is trained in context on inputs x_t ([I]) with the gradient
term g_t x_t^T of an objective, g_t ([O]) taken at the chunk's ANCHOR (the state at the end
of the previous chunk; see HOPE_SPEC.md section 2). Per token (arXiv Eq. 88, DGD):

    S_t = S_{t-1} (alpha_t I - eta_t x_t x_t^T) - eta_t g_t x_t^T                   (no momentum)

With inner momentum P (our design; Titans' S_t = mu S_{t-1} - eta grad, M_t = alpha M_{t-1} + S_t,
with DGD's input-dependent decay kept on the memory itself):

    P_t = mu_t P_{t-1} - eta_t g_t x_t^T
    S_t = S_{t-1} (alpha_t I - eta_t x_t x_t^T) + P_t                                  (momentum)

Without DGD the x_t x_t^T term is dropped (plain gradient step): S_t = alpha_t S_{t-1} + ....
With chunk size 1 the anchor is S_{t-1}, so these are the fully online rules.

Chunk form (UT transform, as in flash-linear-attention). Inside a chunk of C tokens with
S_0 the anchor, write w_t = -eta_t g_t and delta_t = -eta_t S_{t-1} x_t (zero without DGD),
so that S_t = alpha_t S_{t-1} + delta_t x_t^T + P_t. With cumulative products
gamma_t = prod_{i<=t} alpha_i and m_t = prod_{i<=t} mu_i, D[t, j] = gamma_t / gamma_j and
Mu[i, j] = m_i / m_j (j <= i), unrolling gives

    S_t = gamma_t S_0 + c_t P_0 + sum_{j<=t} (D[t, j] delta_j + E[t, j] w_j) x_j^T,
    E = D @ Mu,  c = D @ m                   (no momentum: E = D, no P term)

and delta_t = -eta_t S_{t-1} x_t is the lower-triangular system

    delta_t + eta_t sum_{j<t} D[t-1, j] (x_t . x_j) delta_j
        = -eta_t (gamma_{t-1} S_0 x_t + c_{t-1} P_0 x_t + sum_{j<t} E[t-1, j] (x_t . x_j) w_j),

solved for all t at once with one triangular solve (no loop over tokens). A read with a query
q_t before the write at t is S_{t-1} q_t, from the same formula with (x_j . q_t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_exp(rows: torch.Tensor, cols: torch.Tensor, diagonal: int) -> torch.Tensor:
    """exp(rows[..., t] - cols[..., j]) where j <= t + diagonal, else 0. rows, cols [..., C] -> [..., C, C]."""
    C = rows.shape[-1]
    keep = torch.ones(C, C, dtype=torch.bool, device=rows.device).tril(diagonal)
    diff = rows[..., :, None] - cols[..., None, :]
    return diff.masked_fill(~keep, float("-inf")).exp()


def _unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + A)^-1 for strictly lower-triangular A [..., n, n], by halves:
    [[L11, 0], [L21, L22]]^-1 = [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]], down to blocks of
    at most 16 that are solved directly. Why not one triangular solve: batched LAPACK trsm on
    these small matrices runs at ~7 GFLOP/s on our CPU where bmm runs at 40-50 (docs/BENCHMARKS.md);
    flash-linear-attention's chunk kernels form the same explicit inverse (the UT transform)."""
    n = A.shape[-1]
    if n <= 16:
        eye = torch.eye(n, dtype=A.dtype, device=A.device)
        return torch.linalg.solve_triangular(A + eye, eye.expand_as(A), upper=False, unitriangular=True)
    h = n // 2
    if n % 2 == 0:  # both halves in one call
        inv = _unit_lower_inverse(torch.stack([A[..., :h, :h], A[..., h:, h:]]))
        i11, i22 = inv[0], inv[1]
    else:
        i11, i22 = _unit_lower_inverse(A[..., :h, :h]), _unit_lower_inverse(A[..., h:, h:])
    i21 = -i22 @ (A[..., h:, :h] @ i11)
    top = torch.cat([i11, i11.new_zeros(*i11.shape[:-1], n - h)], dim=-1)
    return torch.cat([top, torch.cat([i21, i22], dim=-1)], dim=-2)


class _UnitLowerSolve(torch.autograd.Function):
    """X = (I + A)^-1 B with its backward in closed form: gB = (I + A)^-T gX, gA = -tril(gB X^T, -1)
    (A's diagonal and upper part are never read). A [..., C, C] must have B's batch dims."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        inv = _unit_lower_inverse(A)
        X = inv @ B
        ctx.save_for_backward(inv, X)
        return X

    @staticmethod
    def backward(ctx, gX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv, X = ctx.saved_tensors
        gB = inv.mT @ gX
        return -(gB @ X.mT).tril(-1), gB


# Below this many (matrices x right-hand-side columns) per solve, LAPACK's triangular solve is
# faster than forming the inverse (its dozen small ops cost more than they save); measured on our
# 2-core CPU at the bench_hope shapes, benchmarks/bench_solve.py (docs/BENCHMARKS.md).
INVERSE_MIN_WORK = 2048


def _solve_unit_lower(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """X with (I + A) X = B for strictly lower-triangular A [..., C, C] and B [..., C, O].

    Where A is broadcast along a batch dim of B (the generator memories share k, so the layer
    reading k has one A for all of them), that dim is folded into B's columns: one solve with
    G * O columns. Wide or many right-hand sides: X = (I + A)^-1 B with the inverse formed once
    (`_UnitLowerSolve`); few: LAPACK's solve (see INVERSE_MIN_WORK)."""
    folded = [i for i, (a, b) in enumerate(zip(A.shape[:-2], B.shape[:-2])) if a == 1 and b > 1]
    if len(folded) == 1 and A.dim() == B.dim():
        g = folded[0]
        Bf = B.movedim(g, -2)                               # [..., C, G, O] with dim g gone
        X = _solve_unit_lower(A.squeeze(g), Bf.flatten(-2))
        return X.unflatten(-1, Bf.shape[-2:]).movedim(-2, g)
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    if batch.numel() * B.shape[-1] < INVERSE_MIN_WORK:
        return torch.linalg.solve_triangular(A, B, upper=False, unitriangular=True)
    return _UnitLowerSolve.apply(A.expand(*batch, *A.shape[-2:]), B.expand(*batch, *B.shape[-2:]))


class ChunkGates:
    """Decay coefficients of one chunk, shared by every layer and memory stepped with the same gates.

    log_alpha, eta, log_mu: [..., C] (log_mu None = no momentum). Attributes (all [..., C] or
    [..., C, C]): gamma_prev[t] = gamma_{t-1}; Dp[t, j] = D[t-1, j] (j < t); Ep, cp the same
    shift of E and c; and the end-of-chunk rows D_end, E_end, gamma_end, c_end, Mu_end, m_end.
    matrices=False keeps the raw gates only: the fused kernel (kernel=triton) forms the rest on chip, so the
    ~15 ops that build them (and their backward) would be launches for nothing."""

    def __init__(self, log_alpha: torch.Tensor, eta: torch.Tensor, log_mu: torch.Tensor | None,
                 matrices: bool = True) -> None:
        self.eta = eta
        self.log_alpha, self.log_mu = log_alpha, log_mu  # the raw gates, for the fused kernel (kernel=triton)
        self.momentum = log_mu is not None
        if not matrices:
            return
        lg = log_alpha.cumsum(-1)
        lg_prev = lg - log_alpha
        self.gamma_prev = lg_prev.exp()
        self.gamma_end = lg[..., -1].exp()
        self.Dp = _masked_exp(lg_prev, lg, diagonal=-1)
        self.eta_Dp = eta[..., None] * self.Dp
        self.D_end = (lg[..., -1:] - lg).exp()
        if self.momentum:
            lm = log_mu.cumsum(-1)
            mu_mat = _masked_exp(lm, lm, diagonal=0)
            m = lm.exp()
            self.Ep = self.Dp @ mu_mat
            self.cp = (self.Dp @ m[..., None])[..., 0]
            self.E_end = (self.D_end[..., None, :] @ mu_mat)[..., 0, :]
            self.c_end = (self.D_end * m).sum(-1)
            self.Mu_end = mu_mat[..., -1, :]
            self.m_end = m[..., -1]
        else:
            self.Ep = self.Dp
            self.E_end = self.D_end


class ChunkLayer:
    """One linear layer S over one chunk: solves for the DGD terms once, then reads and the end state.

    S0, P0: [..., O, I] anchor and momentum at the chunk start (P0 None without momentum);
    X: [..., C, I] layer inputs x_t; G: [..., C, O] gradient factors g_t (grad_S L_t = g_t x_t^T,
    computed at the anchor); gates: ChunkGates broadcastable to [..., C]; XS: X @ S0^T [..., C, O]
    when the caller already has it (the anchor's own output on X; computed here otherwise). normalize_x: the
    normalised step, the layer is stepped on r_t x_t with gradient factor r_t g_t (XS scaled with it),
    r_t = 1 / ||x_t|| (`input_norm`)."""

    def __init__(self, S0: torch.Tensor, P0: torch.Tensor | None, X: torch.Tensor, G: torch.Tensor,
                 gates: ChunkGates, dgd: bool, XS: torch.Tensor | None = None,
                 normalize_x: bool = False) -> None:
        if normalize_x:
            r = input_norm(X).reciprocal()
            X, G, XS = X * r, G * r, None if XS is None else XS * r
        self.S0, self.P0, self.X, self.g = S0, P0, X, gates
        eta = gates.eta[..., None]
        self.W = -eta * G                                    # w_t = -eta_t g_t
        self.delta = None
        if dgd:
            XX = X @ X.mT                                    # [..., C, C]
            XS = X @ S0.mT if XS is None else XS
            # addcmul: the scaled add in one pass (also below)
            base = torch.addcmul((gates.Ep * XX) @ self.W, gates.gamma_prev[..., None], XS)
            if P0 is not None:
                base = base + gates.cp[..., None] * (X @ P0.mT)
            A = gates.eta_Dp * XX                            # eta_t D[t-1, j]: strictly lower triangular
            self.delta = _solve_unit_lower(A, -eta * base)

    def read(self, Q: torch.Tensor) -> torch.Tensor:
        """S_{t-1} q_t for every token of the chunk (read before write). Q: [..., C, I] -> [..., C, O]."""
        g = self.g
        QX, QS = Q @ self.X.mT, Q @ self.S0.mT
        if self.delta is not None and self.P0 is None and not g.momentum:
            return torch.addcmul((g.Dp * QX) @ (self.W + self.delta), g.gamma_prev[..., None], QS)
        out = g.gamma_prev[..., None] * QS
        if self.P0 is not None:
            out = out + g.cp[..., None] * (Q @ self.P0.mT)
        if self.delta is not None and not g.momentum:
            return out + (g.Dp * QX) @ (self.W + self.delta)
        out = out + (g.Ep * QX) @ self.W
        if self.delta is not None:
            out = out + (g.Dp * QX) @ self.delta
        return out

    def end_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(S_C, P_C): the layer and its momentum after the chunk's last token."""
        g = self.g
        coef = g.E_end[..., None] * self.W
        if self.delta is not None:
            coef = torch.addcmul(coef, g.D_end[..., None], self.delta)
        S = torch.addcmul(coef.mT @ self.X, g.gamma_end[..., None, None], self.S0)
        if self.P0 is None:
            return S, None
        S = S + g.c_end[..., None, None] * self.P0
        P = g.m_end[..., None, None] * self.P0 + (g.Mu_end[..., None] * self.W).mT @ self.X
        return S, P


KERNELS = ("auto", "torch", "triton")


def chunk_layer(S0: torch.Tensor, P0: torch.Tensor | None, X: torch.Tensor, G: torch.Tensor, gates: ChunkGates,
                dgd: bool, XS: torch.Tensor | None = None, kernel: str = "torch", normalize_x: bool = False):
    """The one dispatch point of the chunk step: `ChunkLayer` (kernel="torch"), or the fused Triton kernel
    (kernel="triton": `nl.ops.triton_dgd.FusedChunkLayer`, same interface); "auto" picks triton for CUDA
    tensors when Triton imports, torch otherwise. Arguments as `ChunkLayer`."""
    kernel = resolve_kernel(kernel, X)
    if kernel == "triton":
        from nl.ops.triton_dgd import FusedChunkLayer
        return FusedChunkLayer(S0, P0, X, G, gates, dgd, XS, normalize_x)
    if kernel != "torch":
        raise ValueError(f"kernel={kernel!r}: expected one of {KERNELS}")
    return ChunkLayer(S0, P0, X, G, gates, dgd, XS, normalize_x)


def resolve_kernel(kernel: str, x: torch.Tensor) -> str:
    """The chunk step that runs for `kernel` on x's device: "auto" is triton for CUDA tensors when Triton
    imports, torch otherwise; "torch" and "triton" stand."""
    if kernel == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    return kernel


def triton_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None


def check_kernel(kernel: str) -> None:
    """Refuse kernel=triton where it cannot run (no Triton; no CUDA and no TRITON_INTERPRET=1)."""
    import os
    if kernel not in KERNELS:
        raise ValueError(f"model.hope.kernel={kernel!r}: expected one of {KERNELS}")
    if kernel != "triton":
        return
    if not triton_available():
        raise ValueError("model.hope.kernel=triton needs the triton package (pip install triton), or use kernel=torch")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("model.hope.kernel=triton needs a CUDA device (or TRITON_INTERPRET=1 to run the kernels "
                         "on CPU, slowly): use model.hope.kernel=auto or torch here")


INPUT_NORM_EPS = 1e-6


def input_norm(x: torch.Tensor, eps: float = INPUT_NORM_EPS) -> torch.Tensor:
    """max(||x||, eps) over the last dim, kept: [..., I] -> [..., 1]. The normalised step uses x / n in
    DGD's decay and g x^T / n^2 as the gradient term (normalised LMS): the step then changes the
    layer's output on x by -eta g whatever the scale of x, as arXiv Eq. 57 assumes (||x|| = 1)."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def dgd_step(S: torch.Tensor, P: torch.Tensor | None, x: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor,
             eta: torch.Tensor, mu: torch.Tensor | None, dgd: bool,
             S_init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token of the rule, straight from the equations (reference and decoding path).

    S, P: [..., O, I]; x: [..., I]; g: [..., O] (gradient factor at the anchor); alpha, eta, mu: [...].
    S_init (the memory's initial state M_0, broadcastable to S) makes retention and DGD's decay act
    on the deviation S - M_0 (decay toward the initial state, docs/HOPE.md):
        S_t = M_0 + (S_{t-1} - M_0)(alpha_t I - eta_t x x^T) - eta_t g x^T   (+ momentum as above);
    None is Eq. 88 literally (decay toward zero)."""
    a, e = alpha[..., None, None], eta[..., None, None]
    grad = g[..., :, None] * x[..., None, :]                 # g x^T
    dev = S if S_init is None else S - S_init
    new = a * dev
    if dgd:
        new = new - e * (dev @ x[..., :, None]) * x[..., None, :]   # (S - M_0) (eta x x^T)
    if S_init is not None:
        new = new + S_init
    if P is None:
        return new - e * grad, None
    P = mu[..., None, None] * P - e * grad
    return new + P, P


# ---------------------------------------------------------------- memories -------------
# A memory state is a tuple of layer weights with leading batch dims: linear (W,) with
# M(z) = W z; mlp (W1, W2) with M(z) = z + W1 silu(W2 z), W1 [..., d, hidden], W2 [..., hidden, d].

def memory_apply(state: tuple[torch.Tensor, ...], z: torch.Tensor) -> torch.Tensor:
    """M(z) for a batch of vectors. state layers [..., O, I]; z: [..., N, d] -> [..., N, d]."""
    if len(state) == 1:
        return z @ state[0].mT
    W1, W2 = state
    return z + F.silu(z @ W2.mT) @ W1.mT


class _TimesSiluGrad(torch.autograd.Function):
    """a * silu'(p) for a, p of one shape: the backpropagation of a through silu at p, in one fused kernel
    (aten's silu_backward) where the composed form takes six elementwise passes and twice as many in its
    backward. silu'(p) = s (1 + p (1 - s)) and silu''(p) = s (1 - s) (2 + p (1 - 2 s)), s = sigmoid(p).
    Differentiable once (the training backward); a second derivative is refused by autograd."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, p)
        return torch.ops.aten.silu_backward(a, p)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, p = ctx.saved_tensors
        s = torch.sigmoid(p)
        # silu'' (p) = sigmoid'(p) (2 + p - 2 p s), sigmoid'(p) = s (1 - s) applied by sigmoid_backward
        return (torch.ops.aten.silu_backward(grad, p),
                torch.ops.aten.sigmoid_backward(grad * a * torch.addcmul(2 + p, p, s, value=-2), s))


def times_silu_grad(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """a * silu'(p), broadcasting a and p to one shape and dtype (`_TimesSiluGrad`)."""
    dtype = torch.promote_types(a.dtype, p.dtype)
    a, p = torch.broadcast_tensors(a.to(dtype), p.to(dtype))
    return _TimesSiluGrad.apply(a, p)


def memory_grad_factors(state: tuple[torch.Tensor, ...], k: torch.Tensor,
                        target: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer (x, g, x W^T) with grad_{W_l} of L = 1/2 ||M(k) - target||^2 equal to g x^T, aligned with
    state; the third item, the layer's own output on x, comes free and spares the chunk form a matmul.

    k, target: [..., N, d]. Linear: [(k, e, W k)], e = W k - target. MLP (layer by layer,
    HOPE_SPEC.md section 1): [(h, e, W1 h), (k, (W1^T e) * silu'(W2 k), W2 k)], h = silu(W2 k)."""
    if len(state) == 1:
        out = k @ state[0].mT
        return [(k, out - target, out)]
    W1, W2 = state
    pre = k @ W2.mT
    h = F.silu(pre)
    h_out = h @ W1.mT
    e = k + h_out - target
    return [(h, e, h_out), (k, times_silu_grad(e @ W1, pre), pre)]
