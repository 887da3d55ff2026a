"""M3, Multi-scale Momentum Muon (arXiv Algorithm 1; HOPE_SPEC.md Sec. 5), and Newton-Schulz."""

from __future__ import annotations

import torch

from nl.optim.base import DTensor, NLOptimizer, local

# Quintic Newton-Schulz coefficients of Muon (Jordan et al. 2024): fast convergence of the
# singular values into ~[0.7, 1.2] in 5 steps.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(m: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonalisation U V^T of a matrix m = U S V^T (float32). m: [rows, cols]."""
    a, b, c = NS_COEFFS
    x = m.float()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class M3(NLOptimizer):
    """Multi-scale Momentum Muon, for groups with rule 'main' (2-D weights of linear layers):

        M1 <- g1 M1 + b1 u                       fast momentum, every step
        V  <- g2 V  + b2 u^2                     second moment, every step
        precondition=after  (arXiv Algorithm 1):  W <- W - lr (NS(M1) + alpha O2) / (sqrt(V / c2) + eps)
        precondition=before (default):            W <- W - lr s (NS(M1 / D) + alpha O2),
                                                  D = sqrt(V / c2) + eps,  s = 0.2 sqrt(max(rows, cols))
        S  <- S + u ;  after the update of every f-th step:                 slow momentum
              M2 <- g3 M2 + b3 S,  S <- 0,  O2 <- NS(M2) (after) or NS(M2 / D) (before, this step's D)
    O2 starts at 0. Timing as in Algorithm 1: the slow memory of chunk k (steps kf+1 .. (k+1)f) is
    written at the chunk's start from the sum of chunk k-1's gradients (lines 3-4) and read by each
    of its f steps (line 10); the f-th step of a chunk still reads the previous O2.

    ema=false: g1 = g2 = g3 = 1 (the plain sums Algorithm 1 writes), b1 = optim.beta1, b2 =
    optim.beta2, b3 = optim.m3.beta_slow, c2 = 1. ema=true (default): moving averages, g = b with
    increments scaled by (1 - b), and Adam's bias correction c2 = 1 - b2^t.
    Decisions (measured on the tiny HOPE, docs/BENCHMARKS.md): dividing an orthogonalised matrix
    by sqrt(V) element-wise (after) is unbounded where a coordinate's gradient vanishes (NaN within
    2 steps at eps 1e-8), so the default divides first and orthogonalises the preconditioned
    momentum, which NS bounds; s matches AdamW's update RMS (Moonlight's rule) so lr and weight
    decay carry over. NS(M2 / D) is computed when M2 is refreshed, with the D of the chunk's last
    step (the V Algorithm 1 holds at that boundary). The literal
    sums never forget, and their AdaGrad-like V shrinks the step as 1/sqrt(t).
    NS is Newton-Schulz on the whole matrix: under FSDP the operand is all-gathered, every rank
    computes NS and keeps its own rows. Groups with rule 'adamw' (embeddings, LM head, norms, biases,
    and the HOPE memories' per-head initial states) use AdamW, as Muon does.
    """

    STATE_KEYS, COUNTS_STEPS = ("fast", "slow", "slow_sum", "slow_ortho", "second_moment"), True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 beta_slow: float = 0.9, alpha: float = 1.0, slow_every: int = 16, ns_steps: int = 5,
                 ema: bool = True, precondition: str = "before"):
        if precondition not in ("before", "after"):
            raise ValueError(f"m3 precondition must be 'before' or 'after', got {precondition!r}")
        if slow_every < 1:
            raise ValueError(f"m3 slow_every must be >= 1, got {slow_every}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "beta_slow": beta_slow, "alpha": alpha, "slow_every": slow_every,
                                  "ns_steps": ns_steps, "ema": ema,
                                  "precondition": precondition})

    def _orthogonalise(self, m: torch.Tensor, p: torch.Tensor, steps: int) -> torch.Tensor:
        """NS of the whole matrix m (a local shard or a whole tensor) -> this rank's rows."""
        full = self.full_matrix(m)
        if full.ndim != 2:
            raise ValueError(f"M3's matrix rule needs 2-D weights, got shape {tuple(full.shape)}")
        return self.local_rows(newton_schulz(full, steps), p)

    def _as_param(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """A local tensor laid out like p (a DTensor shard under FSDP), so it can be gathered."""
        if isinstance(p, DTensor):
            return DTensor.from_local(x, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        return x

    def _step_group(self, group, params, grads) -> None:
        b1, b2 = group["betas"]
        b3, ema, before = group["beta_slow"], group["ema"], group["precondition"] == "before"
        for p, g in zip(params, grads):
            state = self.state[p]
            state["step"] += 1
            t = int(state["step"])
            u = local(g)
            fast, v, slow_sum = local(state["fast"]), local(state["second_moment"]), local(state["slow_sum"])
            if ema:
                fast.lerp_(u, 1 - b1)
                v.mul_(b2).addcmul_(u, u, value=1 - b2)
                correction = 1 - b2 ** t
            else:
                fast.add_(u, alpha=b1)
                v.addcmul_(u, u, value=b2)
                correction = 1.0
            denom = (v / correction).sqrt_().add_(group["eps"])
            operand = self._as_param(fast / denom, p) if before else state["fast"]
            direction = self._orthogonalise(operand, p, group["ns_steps"])
            direction.add_(local(state["slow_ortho"]), alpha=group["alpha"])
            if before:
                local(p).add_(direction.to(u.dtype), alpha=-group["lr"] * 0.2 * max(p.shape) ** 0.5)
            else:
                local(p).addcdiv_(direction.to(u.dtype), denom, value=-group["lr"])
            slow_sum.add_(u)
            if t % group["slow_every"] == 0:  # the chunk ends: the slow memory the next f steps read
                slow = local(state["slow"])
                if ema:
                    slow.lerp_(slow_sum, 1 - b3)
                else:
                    slow.add_(slow_sum, alpha=b3)
                slow_sum.zero_()
                operand = self._as_param(slow / denom, p) if before else state["slow"]
                local(state["slow_ortho"]).copy_(self._orthogonalise(operand, p, group["ns_steps"]))
