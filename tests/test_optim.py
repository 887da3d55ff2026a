"""Single-process unit tests of the outer optimizers of nl/optim.

Every rule is checked against a float64 reference written here from the equation of its class
docstring (HOPE_SPEC.md Sec. 1, 3 and 5), independently of the optimizer's own helpers: the RMS
preconditioner, Newton-Schulz, DMGD's memory and its gradient (by autograd) and DGD's input
covariance are re-implemented below. Parts the implementation computes in float32 by design (DMGD's
memory and features, M3's Newton-Schulz, DGD's input statistics) are compared with a float32
tolerance; everything else to 1e-10.

Also: the CMS schedule (nl/optim/base.py `_due`), a state-dict round trip in the middle of a CMS
window, the parameter grouping of `build_optimizer` and its config errors, and that no registered
optimizer is AdamW under another name.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import REPO
from nl.config import ConfigError, load_config
from nl.optim import (DGD, DMGD, M3, OPTIMIZERS, AdamW, DeltaRuleMomentum, Momentum, PreconditionedMomentum,
                      build_optimizer, check_supported)

F64 = torch.float64
EXACT = dict(rtol=1e-10, atol=1e-10)  # float64 rules
FP32_REL = 1e-5  # relative to the update, where the implementation computes in float32 by design
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Muon's quintic Newton-Schulz (Jordan et al. 2024)


# ---- deterministic problems ---------------------------------------------------------------------

def initial(group: int, shapes) -> list[torch.Tensor]:
    """The starting values of a group's parameters (float64)."""
    gen = torch.Generator().manual_seed(1 + group)
    return [torch.randn(s, generator=gen, dtype=F64) for s in shapes]


def grad_for(step: int, group: int, index: int, shape) -> torch.Tensor:
    """The gradient fed at call `step` (1-based) to parameter `index` of group `group`."""
    gen = torch.Generator().manual_seed(7919 * step + 101 * group + index)
    return torch.randn(shape, generator=gen, dtype=F64)


def group_keys(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "shapes"}


def make_optimizer(cls, spec: list[dict], dtype=F64, **kwargs):
    """`cls` over fresh parameters: spec is a list of groups {'shapes': [...], other group keys}."""
    groups = [{**group_keys(g), "params": [nn.Parameter(t.to(dtype)) for t in initial(i, g["shapes"])]}
              for i, g in enumerate(spec)]
    return cls(groups, **kwargs)


def feed(opt, step: int) -> None:
    """Set the gradients of call `step` and call opt.step()."""
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            p.grad = grad_for(step, gi, pi, p.shape).to(p.dtype)
    opt.step()


def run_optimizer(cls, spec, steps: int, dtype=F64, **kwargs):
    opt = make_optimizer(cls, spec, dtype, **kwargs)
    for step in range(1, steps + 1):
        feed(opt, step)
    return opt


def params_of(opt) -> list[list[torch.Tensor]]:
    return [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]


def run_reference(rule, spec, steps: int, **defaults) -> tuple[list[list[torch.Tensor]], list[dict]]:
    """The outer loop every optimizer shares (HOPE_SPEC.md Sec. 3, NeurIPS Eq. 31; nl/optim/base.py):
    a group with every=C accumulates its gradients and, on every C-th call only, applies the
    decoupled weight decay p <- p (1 - lr wd) and then `rule` to the sum (reduce='sum') or the
    mean (reduce='mean') of the accumulated gradients. Returns (parameters, per-group rule state)."""
    out, states = [], []
    for gi, g in enumerate(spec):
        hp = {"every": 1, "reduce": "sum", "rule": "main", "weight_decay": 0.0, **defaults, **group_keys(g)}
        ps, state = initial(gi, g["shapes"]), {}
        acc, count = [torch.zeros_like(p) for p in ps], 0
        for step in range(1, steps + 1):
            acc = [a + grad_for(step, gi, pi, p.shape) for pi, (a, p) in enumerate(zip(acc, ps))]
            count += 1
            if count < hp["every"]:
                continue
            gs = [a / hp["every"] for a in acc] if hp["reduce"] == "mean" else acc
            acc, count = [torch.zeros_like(p) for p in ps], 0
            ps = [p * (1 - hp["lr"] * hp["weight_decay"]) for p in ps]
            ps = rule(ps, gs, state, hp, gi)
        out.append(ps)
        states.append(state)
    return out, states


def assert_params(actual, expected, **tol) -> None:
    for ga, ge in zip(actual, expected, strict=True):
        for a, e in zip(ga, ge, strict=True):
            torch.testing.assert_close(a.to(F64), e, **tol)


def assert_displacements(actual, expected, spec, rel: float = FP32_REL) -> None:
    """Compare the updates p - p0 where a float32 path is involved (DMGD, M3, DGD): the error allowed
    is `rel` times the largest coordinate of the expected update (Newton-Schulz errors are absolute
    on the matrix's scale, not per coordinate)."""
    for gi, (ga, ge) in enumerate(zip(actual, expected, strict=True)):
        for a, e, p0 in zip(ga, ge, initial(gi, spec[gi]["shapes"]), strict=True):
            want = e - p0
            torch.testing.assert_close(a.to(F64) - p0, want, rtol=0, atol=rel * float(want.abs().max()))


# ---- float64 references of the rules -------------------------------------------------------------

def per_param(update):
    """Lift update(p, g, param_state, hp) -> new p to a group rule."""
    def rule(ps, gs, state, hp, gid):
        return [update(p, g, state.setdefault(i, {}), hp) for i, (p, g) in enumerate(zip(ps, gs))]
    return rule


def ref_adamw_update(p, g, s, hp):
    """AdamW (Loshchilov & Hutter), decay already applied: m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2;
    p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)."""
    b1, b2 = hp["betas"]
    s["t"] = t = s.get("t", 0) + 1
    s["m"] = b1 * s.get("m", torch.zeros_like(p)) + (1 - b1) * g
    s["v"] = b2 * s.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
    return p - hp["lr"] * (s["m"] / (1 - b1 ** t)) / (torch.sqrt(s["v"] / (1 - b2 ** t)) + hp["eps"])


def ref_rms(g, s, hp):
    """P u of HOPE_SPEC.md Sec. 5 as nl/optim/base.py defines it: v <- b2 v + (1-b2) u^2;
    P u = u / (sqrt(v / (1 - b2^t)) + eps)."""
    b2 = hp["betas"][1]
    s["t"] = t = s.get("t", 0) + 1
    s["v"] = b2 * s.get("v", torch.zeros_like(g)) + (1 - b2) * g * g
    return g / (torch.sqrt(s["v"] / (1 - b2 ** t)) + hp["eps"])


def ref_momentum_update(p, g, s, hp):
    """m_{i+1} = a m_i - lr u_i ; W_{i+1} = W_i + m_{i+1}."""
    s["m"] = hp["momentum"] * s.get("m", torch.zeros_like(p)) - hp["lr"] * g
    return p + s["m"]


def ref_precond_update(p, g, s, hp):
    """m_{i+1} = a m_i - lr P_i u_i ; W_{i+1} = W_i + m_{i+1}."""
    s["m"] = hp["momentum"] * s.get("m", torch.zeros_like(p)) - hp["lr"] * ref_rms(g, s, hp)
    return p + s["m"]


def ref_delta_update(p, g, s, hp):
    """m_{i+1} = m_i (a I - beta k^T k) - lr P_i u_i, k = u / ||u||_F, the parameter seen as a matrix
    [-1, last dim] (a vector as one row); W_{i+1} = W_i + m_{i+1}."""
    m = s.get("m", torch.zeros_like(p))
    cols = p.shape[-1]
    k = (g / torch.linalg.vector_norm(g)).reshape(-1, cols)
    mat = m.reshape(-1, cols)
    forget = (hp["momentum"] * mat - hp["delta_beta"] * mat @ (k.T @ k)).reshape(p.shape)
    s["m"] = forget - hp["lr"] * ref_rms(g, s, hp)
    return p + s["m"]


def ref_newton_schulz(m, steps=5, eps=1e-7):
    """Muon's quintic iteration on X = M / (||M||_F + eps), wide orientation (transpose when rows >
    cols): X <- a X + b (X X^T) X + c (X X^T)^2 X, transposed back."""
    a, b, c = NS_COEFFS
    tall = m.shape[0] > m.shape[1]
    x = m.T if tall else m
    x = x / (torch.linalg.matrix_norm(x) + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + b * (gram @ x) + c * (gram @ (gram @ x))
    return x.T if tall else x


def ref_m3_algorithm1(w0, grads, hp):
    """M3 written as arXiv Algorithm 1 is laid out, a plain float64 loop over T = len(grads) steps:

        for k = 0, 1, ...:                                 (chunks of f = slow_every steps)
            M2 <- M2 + b3 * (sum of chunk k-1's gradients)  (nothing for k = 0)      line 3
            O2 <- NS(M2)                                                              line 4
            for t = kf+1 .. (k+1)f:
                M1 <- M1 + b1 g_t ;  V <- V + b2 g_t^2                            lines 7-8
                W <- W - lr (NS(M1) + alpha O2) / (sqrt(V) + eps)                 lines 9-10

    with the decoupled weight decay W <- W (1 - lr wd) first at each step (nl/optim/base.py), and
    the variants of nl/optim/m3.py: ema=true replaces the sums by moving averages (M <- b M + (1-b) x)
    and divides V by 1 - b2^t; precondition=before orthogonalises M1 / D and M2 / D (D = sqrt(V) + eps
    at that point of the loop) instead of dividing by D, and scales the step by 0.2 sqrt(max dim)."""
    b1, b2 = hp["betas"]
    b3, f, ema, before = hp["beta_slow"], hp["slow_every"], hp["ema"], hp["precondition"] == "before"
    w, m1, m2, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0), torch.zeros_like(w0)
    o2, t = torch.zeros_like(w0), 0

    def denominator():
        return torch.sqrt(v / ((1 - b2 ** t) if ema else 1.0)) + hp["eps"]

    for k in range(math.ceil(len(grads) / f)):
        if k > 0:
            chunk_sum = sum(grads[(k - 1) * f:k * f])
            m2 = b3 * m2 + (1 - b3) * chunk_sum if ema else m2 + b3 * chunk_sum
            o2 = ref_newton_schulz(m2 / denominator() if before else m2, hp["ns_steps"])
        for t in range(k * f + 1, min((k + 1) * f, len(grads)) + 1):
            g = grads[t - 1]
            m1 = b1 * m1 + (1 - b1) * g if ema else m1 + b1 * g
            v = b2 * v + (1 - b2) * g * g if ema else v + b2 * g * g
            w = w * (1 - hp["lr"] * hp["weight_decay"])
            if before:
                o1 = ref_newton_schulz(m1 / denominator(), hp["ns_steps"])
                w = w - hp["lr"] * 0.2 * math.sqrt(max(w.shape)) * (o1 + hp["alpha"] * o2)
            else:
                w = w - hp["lr"] * (ref_newton_schulz(m1, hp["ns_steps"]) + hp["alpha"] * o2) / denominator()
    return w


def dmgd_init(hp, gid, seed=0) -> dict:
    """DMGD's documented initial memory: w = [0, 1], W1 ~ N(0, 1/2) from a generator seeded with
    seed + group_id (drawn in float32), b1 = 0, w2 = 0."""
    h = hp["hidden"]
    w1 = torch.randn(h, 2, generator=torch.Generator().manual_seed(seed + gid), dtype=torch.float32)
    return {"w": torch.tensor([0.0, 1.0], dtype=F64), "W1": w1.to(F64) * math.sqrt(0.5),
            "b1": torch.zeros(h, dtype=F64), "w2": torch.zeros(h, dtype=F64)}


def dmgd_memory(theta, phi):
    """m_theta(phi) = w . phi + w2 . silu(W1 phi + b1), per row of phi [n, 2]."""
    return phi @ theta["w"] + F.silu(phi @ theta["W1"].T + theta["b1"]) @ theta["w2"]


def ref_dmgd(ps, gs, state, hp, gid):
    """DMGD (NeurIPS Eq. 23 with an L2 or dot internal objective; nl/optim/memories.py docstring), the
    memory an associative map from the previous step's features to the gradient that followed.
    Per coordinate, over every coordinate of the group:
        key_i = [P u_{i-1}, mbar_{i-1}]  (zero before the first step),  value_i = P u_i
        l2:  L = mean_c (m(key_i)_c - value_i,c)^2 ;   dot: L = -mean_c m(key_i)_c value_i,c
        theta <- (1 - memory_decay) theta - memory_lr grad L      (gradient by autograd)
        mbar_i = a mbar_{i-1} + (1 - a) P u_i ;  o = m_theta([P u_i, mbar_i]) ;  W <- W - lr o."""
    theta = state.setdefault("theta", dmgd_init(hp, gid))
    keys, values, reads = [], [], []
    for i, (p, g) in enumerate(zip(ps, gs)):
        s = state.setdefault(i, {"mbar": torch.zeros_like(p), "prev": torch.zeros_like(p)})
        pu = ref_rms(g, s, hp)
        keys.append(torch.stack([s["prev"].reshape(-1), s["mbar"].reshape(-1)], dim=1))
        values.append(pu.reshape(-1))
        s["mbar"] = hp["momentum"] * s["mbar"] + (1 - hp["momentum"]) * pu
        s["prev"] = pu
        reads.append(torch.stack([pu.reshape(-1), s["mbar"].reshape(-1)], dim=1))
    key, value = torch.cat(keys), torch.cat(values)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    with torch.enable_grad():
        o = dmgd_memory(leaves, key)
        loss = (o - value).pow(2).mean() if hp["internal_loss"] == "l2" else -(o * value).mean()
        grads = torch.autograd.grad(loss, list(leaves.values()))
    state["loss"] = loss.item()
    state["theta"] = {k: (1 - hp["memory_decay"]) * v - hp["memory_lr"] * dv
                      for (k, v), dv in zip(theta.items(), grads)}
    out = dmgd_memory(state["theta"], torch.cat(reads)).split([p.numel() for p in ps])
    return [p - hp["lr"] * o.view(p.shape) for p, o in zip(ps, out)]


def dmgd_theta_of(opt, group_index: int) -> dict:
    group = opt.param_groups[group_index]
    w, w1, b1, w2 = DMGD.unpack(opt.state[group["params"][0]]["memory"], group["hidden"])
    return {"w": w, "W1": w1, "b1": b1, "w2": w2}


# ---- 1. each rule against its reference ----------------------------------------------------------

BETAS, EPS = (0.9, 0.95), 1e-8
SIMPLE_SPEC = [  # two groups: decayed [5,3] matrix + [4] vector; an undecayed one with its own lr
    {"shapes": [(5, 3), (4,)], "lr": 0.05, "weight_decay": 0.1},
    {"shapes": [(6, 2)], "lr": 0.02, "weight_decay": 0.0},
]
SIMPLE = {
    "adamw": (AdamW, {}, per_param(ref_adamw_update), SIMPLE_SPEC),
    "momentum": (Momentum, {"momentum": 0.8}, per_param(ref_momentum_update), SIMPLE_SPEC),
    "precond_momentum": (PreconditionedMomentum, {"momentum": 0.8}, per_param(ref_precond_update), SIMPLE_SPEC),
    "delta_momentum": (DeltaRuleMomentum, {"momentum": 0.8, "delta_beta": 0.7}, per_param(ref_delta_update),
                       [*SIMPLE_SPEC, {"shapes": [(2, 3, 4)], "lr": 0.05, "weight_decay": 0.1}]),
}


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("name", list(SIMPLE))
def test_elementwise_rules_match_float64_reference(name, steps):
    cls, kwargs, rule, spec = SIMPLE[name]
    kwargs = {"lr": 0.05, "betas": BETAS, "eps": EPS, **kwargs}
    opt = run_optimizer(cls, spec, steps, **kwargs)
    expected, _ = run_reference(rule, spec, steps, **kwargs)
    assert_params(params_of(opt), expected, **EXACT)


def test_delta_rule_forgets_a_direction_completely_in_float64():
    """With a = 1, beta = 1 and a gradient parallel to the momentum, m (a I - beta k^T k) erases m:
    k = u / ||u||_F makes k^T k the projector onto u, so m_2 = -lr P u_2 (to float64 rounding)."""
    lr, hp = 0.1, {"betas": BETAS, "eps": EPS}
    g1 = torch.tensor([0.3, -1.7, 2.9, 0.11, -0.77, 1.3, 0.05], dtype=F64)
    p = nn.Parameter(torch.zeros(7, dtype=F64))
    opt = DeltaRuleMomentum([p], lr=lr, momentum=1.0, delta_beta=1.0, **hp)
    p.grad = g1.clone()
    opt.step()
    m1 = opt.state[p]["momentum"].clone()
    p.grad = g2 = -3.0 * m1  # k is the direction of m1
    opt.step()
    rms_state = {}
    ref_rms(g1, rms_state, hp)
    expected = -lr * ref_rms(g2, rms_state, hp)
    residual = float((opt.state[p]["momentum"] - expected).abs().max() / m1.abs().max())
    assert residual < 1e-13, (
        f"m1 not erased along k: residual {residual:.1e} x |m1| (a float64 reference leaves ~3e-16); "
        f"DeltaRuleMomentum normalises k by ||u||_F computed in float32 (u.float() in nl/optim/memories.py)")


def test_adamw_equals_torch_adamw():
    spec = [{"shapes": [(5, 3), (4,)]}]
    kwargs = {"lr": 0.03, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.2}
    ours = run_optimizer(AdamW, spec, 5, **kwargs)
    theirs = run_optimizer(torch.optim.AdamW, spec, 5, **kwargs)
    for a, b in zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


M3_SPEC = [  # a tall (NS transposes it) and a wide matrix on the M3 rule, a vector on the AdamW fallback
    {"shapes": [(5, 3)], "weight_decay": 0.1},
    {"shapes": [(3, 6)], "weight_decay": 0.0, "lr": 0.01},
    {"shapes": [(4,)], "rule": "adamw", "weight_decay": 0.1},
]


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("ema,precondition", [(True, "before"), (False, "before"), (True, "after"),
                                              (False, "after")])
def test_m3_matches_algorithm1_float64_reference(ema, precondition, steps):
    """slow_every=2: the slow momentum is written at the boundaries after steps 2 and 4 and read
    from steps 3 and 5 on (Algorithm 1); step 2 still reads O2 = 0. Newton-Schulz runs in float32
    (documented in nl/optim/m3.py), so the updates are compared to float32 precision."""
    kwargs = {"lr": 0.02, "betas": BETAS, "eps": EPS, "beta_slow": 0.7, "alpha": 0.6, "slow_every": 2,
              "ns_steps": 5, "ema": ema, "precondition": precondition}
    opt = run_optimizer(M3, M3_SPEC, steps, **kwargs)
    expected = []
    for gi, group in enumerate(M3_SPEC[:2]):  # the matrix groups, each a single weight
        hp = {**kwargs, "weight_decay": 0.0, **group_keys(group)}
        (w0,) = initial(gi, group["shapes"])
        expected.append([ref_m3_algorithm1(w0, [grad_for(t, gi, 0, w0.shape) for t in range(1, steps + 1)], hp)])
    assert_displacements(params_of(opt)[:2], expected, M3_SPEC[:2])

    def adamw_fallback(ps, gs, state, hp, gid):  # the vector group; the matrix groups are checked above
        return per_param(ref_adamw_update)(ps, gs, state, hp, gid) if hp["rule"] == "adamw" else ps

    fallback, _ = run_reference(adamw_fallback, M3_SPEC, steps, **kwargs)
    assert_params([params_of(opt)[2]], [fallback[2]], **EXACT)  # the AdamW fallback is float64
    if steps >= 2:  # the slow momentum was written and is held for the next chunk
        assert torch.linalg.matrix_norm(opt.state[opt.param_groups[0]["params"][0]]["slow_ortho"]) > 0.1


def test_reference_newton_schulz_orthogonalises():
    """The reference NS itself: singular values land in Muon's ~[0.7, 1.2] band."""
    m = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    for x in (m, m.T):
        s = torch.linalg.svdvals(ref_newton_schulz(x))
        assert ref_newton_schulz(x).shape == x.shape and s.min() > 0.6 and s.max() < 1.25, s


DMGD_SPEC = [  # group 0 holds two parameters: one memory for both; group 1 has its own memory
    {"shapes": [(5, 3), (4,)], "weight_decay": 0.1},
    {"shapes": [(4,)], "weight_decay": 0.0, "lr": 0.02},
]


@pytest.mark.parametrize("steps", [2, 5])
@pytest.mark.parametrize("internal_loss,memory_decay", [("l2", 0.0), ("dot", 0.05)])
def test_dmgd_matches_float64_autograd_reference(internal_loss, memory_decay, steps):
    """DMGD's hand-written memory gradient against autograd. Its memory and features are float32
    (documented), so updates, memory and internal loss are compared to float32 precision. From
    step 2 on: at step 1 the key is zero and the initial memory's gradient vanishes (w2 = 0)."""
    kwargs = {"lr": 0.05, "betas": BETAS, "eps": EPS, "momentum": 0.9, "hidden": 6,
              "internal_loss": internal_loss, "memory_lr": 0.3, "memory_decay": memory_decay}
    opt = run_optimizer(DMGD, DMGD_SPEC, steps, **kwargs)
    expected, ref_states = run_reference(ref_dmgd, DMGD_SPEC, steps, **kwargs)
    assert_displacements(params_of(opt), expected, DMGD_SPEC)
    for gi, ref in enumerate(ref_states):
        theta = dmgd_theta_of(opt, gi)
        for key, value in ref["theta"].items():
            torch.testing.assert_close(theta[key].to(F64), value, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")
        assert opt.last_internal_loss[gi] == pytest.approx(ref["loss"], rel=1e-5)
        init = dmgd_init(kwargs, gi)
        assert (ref["theta"]["w2"] - init["w2"]).abs().max() > 1e-3  # the memory moved: the check has teeth


def dmgd_copy_memory(hidden: int) -> torch.Tensor:
    """The packed theta of a memory that outputs its P u input channel: w = [1, 0], W1 = 0, b1 = 0, w2 = 0."""
    return torch.cat([torch.tensor([1.0, 0.0]), torch.zeros(4 * hidden)])


def test_dmgd_objective_is_not_minimised_by_copying_an_input():
    """Gradients drawn independently at every step: no memory can predict the next one, so the
    best l2 answer is 0 (loss E[(P u)^2]) and copying the P u channel costs twice that. A memory
    equal to the identity on its P u input must therefore score worse than the zero memory and be
    pushed away by its gradient step. (Regressing P u_i onto features containing P u_i, the copy
    scores 0, the global minimum, and never moves.)"""
    def run(theta0: torch.Tensor, memory_lr: float):
        p = nn.Parameter(torch.zeros(4096, dtype=F64))
        opt = DMGD([p], lr=0.01, momentum=0.9, hidden=4, memory_lr=memory_lr)
        opt.init_memory = lambda group, device: theta0.clone().to(device)
        gen = torch.Generator().manual_seed(4)
        losses = []
        for _ in range(6):
            p.grad = torch.randn(4096, generator=gen, dtype=F64)
            opt.step()
            losses.append(opt.last_internal_loss[0])
        return losses, opt.state[p]["memory"]

    copy = dmgd_copy_memory(4)
    copy_losses, _ = run(copy, 0.0)
    zero_losses, _ = run(torch.zeros_like(copy), 0.0)
    later = slice(2, None)  # past the first steps, where the key is still zero / P u's scale settles
    mean_copy, mean_zero = (sum(x[later]) / len(x[later]) for x in (copy_losses, zero_losses))
    assert mean_copy > 1.5 * mean_zero > 0.5, (copy_losses, zero_losses)
    _, moved = run(copy, 0.1)
    assert (moved - copy).abs().max() > 1e-2, "the objective's gradient vanishes at the copying memory"


def test_dmgd_one_step_from_a_set_state_matches_float64_equations():
    """One step written out from the equations in float64, from a hand-set state (step 3 done,
    previous P u, mbar and v non-zero, a memory with every weight non-zero) on a [3, 4] weight:
        v = b2 v0 + (1 - b2) u^2 ;  P u = u / (sqrt(v / (1 - b2^4)) + eps)
        key = [P u_prev, mbar0] ;  L = mean (m(key) - P u)^2 ;  theta1 = theta0 - memory_lr dL/dtheta0
        mbar = a mbar0 + (1 - a) P u ;  W = W0 (1 - lr wd) - lr m_theta1([P u, mbar])"""
    lr, wd, a, b2, eps, mlr, h = 0.05, 0.1, 0.8, 0.95, 1e-8, 0.3, 3
    gen = torch.Generator().manual_seed(21)
    w0, u, pu_prev, mbar0 = (torch.randn(3, 4, generator=gen, dtype=F64) for _ in range(4))
    v0 = torch.rand(3, 4, generator=gen, dtype=F64) + 0.1
    theta0 = {"w": torch.tensor([0.3, 0.6], dtype=F64), "W1": torch.randn(h, 2, generator=gen, dtype=F64),
              "b1": torch.randn(h, generator=gen, dtype=F64) * 0.1, "w2": torch.randn(h, generator=gen, dtype=F64) * 0.2}
    packed = torch.cat([theta0["w"], theta0["W1"].flatten(), theta0["b1"], theta0["w2"]]).float()

    p = nn.Parameter(w0.clone())
    opt = DMGD([p], lr=lr, momentum=a, weight_decay=wd, betas=(0.9, b2), eps=eps, hidden=h, memory_lr=mlr)
    opt.state[p].update({"step": torch.tensor(3.0), "exp_avg_sq": v0.clone(), "momentum": mbar0.clone(),
                         "prev_precond": pu_prev.clone(), "memory": packed.clone()})
    p.grad = u.clone()
    opt.step()

    v = b2 * v0 + (1 - b2) * u * u
    pu = u / (torch.sqrt(v / (1 - b2 ** 4)) + eps)
    theta = {k: t.float().to(F64).requires_grad_() for k, t in theta0.items()}  # the float32 start it was given

    def memory(th, x, y):  # m(phi) = w . phi + w2 . silu(W1 phi + b1), phi = [x, y] per coordinate
        phi = torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)
        return phi @ th["w"] + F.silu(phi @ th["W1"].T + th["b1"]) @ th["w2"]

    loss = (memory(theta, pu_prev, mbar0) - pu.reshape(-1)).pow(2).mean()
    grads = torch.autograd.grad(loss, list(theta.values()))
    theta1 = {k: t.detach() - mlr * dt for (k, t), dt in zip(theta.items(), grads)}
    mbar = a * mbar0 + (1 - a) * pu
    expected = w0 * (1 - lr * wd) - lr * memory(theta1, pu, mbar).view(3, 4)

    assert opt.last_internal_loss[0] == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(opt.state[p]["momentum"], mbar, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["prev_precond"], pu, rtol=1e-12, atol=1e-12)
    got = dmgd_theta_of(opt, 0)
    for key, value in theta1.items():
        torch.testing.assert_close(got[key].to(F64), value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    step = expected - w0
    torch.testing.assert_close(p.detach() - w0, step, rtol=0, atol=FP32_REL * float(step.abs().max()))


def test_dmgd_memory_is_one_per_group_in_first_params_state():
    opt = run_optimizer(DMGD, DMGD_SPEC, 2, lr=0.05, hidden=6)
    first, second = opt.param_groups[0]["params"]
    assert "memory" in opt.state[first] and "memory" not in opt.state[second]
    assert opt.state[first]["memory"].numel() == 2 + 2 * 6 + 6 + 6
    memories = [s["memory"] for s in opt.state.values() if "memory" in s]
    assert len(memories) == 2 and not torch.equal(memories[0], memories[1])  # seeds differ per group


def test_dmgd_memory_learns_what_momentum_cannot_predict():
    """Gradients that alternate in sign (g_i = (-1)^i mean + noise): the next gradient is minus the
    current one, which an EMA momentum (the frozen initial memory, memory_lr = 0) cannot predict. The
    learning memory's internal loss ends well below the frozen one's, and both MLP layers changed."""
    def run(memory_lr):
        p = nn.Parameter(torch.zeros(128, dtype=F64))
        opt = DMGD([p], lr=0.01, momentum=0.9, hidden=8, memory_lr=memory_lr)
        gen = torch.Generator().manual_seed(3)
        mean = torch.randn(128, generator=gen, dtype=F64)
        losses = []
        for i in range(40):
            p.grad = (-1) ** i * mean + 0.3 * torch.randn(128, generator=gen, dtype=F64)
            opt.step()
            losses.append(opt.last_internal_loss[0])
        assert all(math.isfinite(x) for x in losses)
        return sum(losses[-10:]) / 10, opt.state[p]["memory"], opt

    learned, theta, opt = run(0.2)
    frozen, _, _ = run(0.0)
    assert learned < 0.6 * frozen, (learned, frozen)
    start = opt.init_memory(opt.param_groups[0], "cpu")
    (w, w1, b1, w2), (w_0, w1_0, _, w2_0) = DMGD.unpack(theta, 8), DMGD.unpack(start, 8)
    assert w[0] < -0.2  # it learned to answer with the opposite of the current gradient
    assert (w2 - w2_0).abs().max() > 1e-3 and (w1 - w1_0).abs().max() > 1e-4 and b1.abs().max() > 1e-4


def test_dmgd_masked_coordinates_do_not_touch_the_memory():
    """A [10] parameter whose last 3 coordinates are masked (ZeRO padding) trains the memory exactly
    as a [7] parameter with the same first 7 gradients; unmasked, the extra coordinates matter."""
    def run(n, mask):
        p = nn.Parameter(torch.zeros(n, dtype=F64))
        opt = DMGD([p], lr=0.05, hidden=6, memory_lr=0.3)
        if mask:
            opt.zero_masks[id(p)] = torch.arange(n) < 7
        for step in range(1, 6):
            g = grad_for(step, 0, 0, (10,))
            g[7:] *= 5.0  # padding coordinates with very different statistics
            p.grad = g[:n].clone()
            opt.step()
        return p.detach(), opt.state[p]["memory"], opt.last_internal_loss[0]

    p7, mem7, loss7 = run(7, False)
    p10, mem10, loss10 = run(10, True)
    torch.testing.assert_close(mem10, mem7, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p10[:7], p7, rtol=1e-6, atol=1e-7)  # the float32 memory's sums differ in rounding
    assert loss10 == pytest.approx(loss7, rel=1e-6)
    _, unmasked, _ = run(10, False)
    assert (unmasked - mem7).abs().max() > 1e-4  # the test would see a leak


# ---- DGD ---------------------------------------------------------------------------------------

def linear(n_in, n_out, seed):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, dtype=F64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=gen, dtype=F64) * 0.5)
        lin.bias.copy_(torch.randn(n_out, generator=gen, dtype=F64) * 0.1)
    return lin


def ref_covariance(xs) -> torch.Tensor:
    """C = mean_t x^_t x^_t^T over every token of every micro-batch, x^ = x / ||x||."""
    x = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("steps", [1, 5])
def test_dgd_matches_reference_on_a_real_linear_layer(steps):
    """W <- W(1 - lr wd); W <- W - lr gamma W C - lr u (arXiv Eq. 57), the bias on AdamW; two
    micro-batches of different token counts per step. Forwards under no_grad or in eval mode must not
    count. C is accumulated in float32 by the implementation, hence the tolerance."""
    lr, gamma, wd = 0.1, 0.7, 0.05
    lin = linear(4, 3, seed=0)
    opt = DGD([{"params": [lin.weight], "weight_decay": wd}, {"params": [lin.bias], "rule": "adamw"}],
              {id(lin.weight): lin}, lr=lr, strength=gamma, betas=BETAS, eps=EPS)
    w, b, bias_state = lin.weight.detach().clone(), lin.bias.detach().clone(), {}
    w0 = w.clone()
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        xs = [torch.randn(2, 3, 4, generator=gen, dtype=F64), torch.randn(5, 4, generator=gen, dtype=F64) + 1.0]
        ys = [torch.randn(2, 3, 3, generator=gen, dtype=F64), torch.randn(5, 3, generator=gen, dtype=F64)]
        junk = torch.randn(7, 4, generator=gen, dtype=F64) * 10 + torch.tensor([5.0, 0, 0, 0], dtype=F64)
        opt.zero_grad()
        for x, y in zip(xs, ys):
            (lin(x) - y).pow(2).mean().backward()
        with torch.no_grad():
            lin(junk)
        lin.eval()
        lin(junk)
        lin.train()
        opt.step()
        # reference step
        wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
        loss = sum((x @ wr.T + br - y).pow(2).mean() for x, y in zip(xs, ys))
        gw, gb = torch.autograd.grad(loss, [wr, br])
        w = w * (1 - lr * wd)
        w = w - lr * gamma * (w @ ref_covariance(xs)) - lr * gw
        b = ref_adamw_update(b, gb, bias_state, {"lr": lr, "betas": BETAS, "eps": EPS})
    torch.testing.assert_close(lin.weight.detach() - w0, w - w0, rtol=0, atol=FP32_REL * float((w - w0).abs().max()))
    torch.testing.assert_close(lin.bias.detach(), b, rtol=1e-6, atol=1e-8)


def test_dgd_covariance_ignores_checkpoint_recomputation():
    """Micro-batch 1 runs under activation checkpointing (recomputed inside backward), micro-batch 2
    plainly, with a different token count: a double-counted recomputation would change C."""
    def covariances(use_checkpoint):
        l1, l2 = linear(4, 5, seed=1), linear(5, 3, seed=2)
        opt = DGD([{"params": [l1.weight, l2.weight]}, {"params": [l1.bias, l2.bias], "rule": "adamw"}],
                  {id(l1.weight): l1, id(l2.weight): l2}, lr=0.1)
        calls = []
        l1.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
        gen = torch.Generator().manual_seed(9)
        x1, x2 = torch.randn(2, 4, 4, generator=gen, dtype=F64), torch.randn(3, 4, generator=gen, dtype=F64) - 2

        def f(x):
            return l2(torch.tanh(l1(x)))

        (checkpoint(f, x1, use_reentrant=False) if use_checkpoint else f(x1)).pow(2).sum().backward()
        f(x2).pow(2).sum().backward()
        cov = [opt.input_covariance(l1.weight), opt.input_covariance(l2.weight)]
        with torch.no_grad():
            hidden = [torch.tanh(x @ l1.weight.T + l1.bias) for x in (x1, x2)]
        return cov, ([x1, x2], hidden), calls

    plain, (inputs1, inputs2), plain_calls = covariances(False)
    ckpt, _, ckpt_calls = covariances(True)
    assert plain_calls == [2, 3] and ckpt_calls == [2, 2, 3]  # micro-batch 1 was recomputed in backward
    for a, b in zip(ckpt, plain):
        assert torch.equal(a, b)
    torch.testing.assert_close(plain[0].to(F64), ref_covariance(inputs1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(plain[1].to(F64), ref_covariance(inputs2), rtol=1e-6, atol=1e-7)


def test_dgd_rejects_main_rule_parameters_that_are_not_linear_weights():
    p = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="nn.Linear weight"):
        DGD([p], {})


# ---- 2. the CMS schedule ----------------------------------------------------------------------

CMS_RULES = {
    # eps 0.1 keeps AdamW sensitive to the gradient's scale, so sum and mean give different steps
    "adamw": (AdamW, {"lr": 0.05, "betas": BETAS, "eps": 0.1}, per_param(ref_adamw_update)),
    "momentum": (Momentum, {"lr": 0.05, "momentum": 0.8}, per_param(ref_momentum_update)),
}


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("name", list(CMS_RULES))
def test_cms_group_steps_every_third_call_with_accumulated_gradient(name, reduce):
    cls, kwargs, rule = CMS_RULES[name]
    spec = [{"shapes": [(5, 3), (4,)], "every": 3, "reduce": reduce, "weight_decay": 0.1},
            {"shapes": [(4,)], "every": 1, "weight_decay": 0.1}]
    opt = make_optimizer(cls, spec, **kwargs)
    previous = params_of(opt)
    for call in range(1, 8):
        feed(opt, call)
        now = params_of(opt)
        expected, _ = run_reference(rule, spec, call, **kwargs)
        assert_params(now, expected, rtol=1e-12, atol=1e-12)
        slow_moved = [not torch.equal(a, b) for a, b in zip(now[0], previous[0])]
        assert slow_moved == [call % 3 == 0] * 2, (call, slow_moved)  # weight decay only on due calls
        assert not torch.equal(now[1][0], previous[1][0])  # the every=1 group steps every call
        previous = now
    # the reduction is visible: the other reduction gives other weights
    other = "mean" if reduce == "sum" else "sum"
    spec_other = [{**spec[0], "reduce": other}, spec[1]]
    assert (run_reference(rule, spec_other, 7, **kwargs)[0][0][0] - previous[0][0]).abs().max() > 1e-6


def test_cms_first_due_step_is_the_rule_on_the_summed_gradient():
    """Written out for Momentum: call 3 moves the slow group by -lr (g1 + g2 + g3) after decay."""
    lr, wd = 0.05, 0.1
    opt = make_optimizer(Momentum, [{"shapes": [(5, 3)], "every": 3, "weight_decay": wd}], lr=lr, momentum=0.8)
    (p0,) = initial(0, [(5, 3)])
    for call in (1, 2, 3):
        feed(opt, call)
    total = sum(grad_for(c, 0, 0, (5, 3)) for c in (1, 2, 3))
    torch.testing.assert_close(opt.param_groups[0]["params"][0].detach(), p0 * (1 - lr * wd) - lr * total,
                               rtol=1e-12, atol=1e-12)


# ---- 3. state dict round trip inside a CMS window ----------------------------------------------

def resumed(cls, spec, dtype, cut=4, **kwargs):
    """`cut` calls, state_dict (deep-copied), a fresh optimizer over copies of the parameters, load."""
    first = run_optimizer(cls, spec, cut, dtype, **kwargs)
    saved = copy.deepcopy(first.state_dict())
    groups = [{**group_keys(g), "params": [nn.Parameter(p.detach().clone()) for p in group["params"]]}
              for g, group in zip(spec, first.param_groups)]
    fresh = cls(groups, **kwargs)
    fresh.load_state_dict(saved)
    return saved, fresh


ROUND_TRIP = {
    "dmgd": (DMGD, [{"shapes": [(5, 3), (4,)], "every": 3, "weight_decay": 0.1}, {"shapes": [(4,)]}],
             {"lr": 0.05, "hidden": 6, "memory_lr": 0.3}),
    "m3": (M3, [{"shapes": [(5, 3)], "every": 3, "weight_decay": 0.1}, {"shapes": [(3, 6)]},
                {"shapes": [(4,)], "every": 3, "rule": "adamw"}],
           {"lr": 0.02, "slow_every": 2, "ema": True}),
}


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_state_dict_round_trip_inside_cms_window(name, dtype):
    """4 calls with every=3 (one gradient accumulated), save, load into a fresh optimizer, 5 more
    calls: bit-identical to 9 uninterrupted calls."""
    cls, spec, kwargs = ROUND_TRIP[name]
    straight = run_optimizer(cls, spec, 9, dtype, **kwargs)
    saved, fresh = resumed(cls, spec, dtype, **kwargs)
    assert any("cms_accum" in s for s in saved["state"].values())
    if name == "dmgd":
        assert sum("memory" in s for s in saved["state"].values()) == len(spec)
        for group in fresh.param_groups:  # DMGD keeps its memory in float32 whatever the parameters' dtype
            memory = fresh.state[group["params"][0]]["memory"]
            assert memory.dtype == torch.float32, (
                f"DMGD memory came back from load_state_dict as {memory.dtype} (saved as float32): "
                f"torch.optim.Optimizer casts floating state to the parameter dtype; the next step fails")
    for step in range(5, 10):
        feed(fresh, step)
    for ga, gb in zip(params_of(fresh), params_of(straight), strict=True):
        for a, b in zip(ga, gb, strict=True):
            assert torch.equal(a, b)
    pairs = zip([p for g in fresh.param_groups for p in g["params"]],
                [p for g in straight.param_groups for p in g["params"]])
    for pa, pb in pairs:
        for key, value in straight.state[pb].items():
            assert torch.equal(fresh.state[pa][key].to(value.dtype), value), key


# ---- 4. build_optimizer: grouping and config errors ---------------------------------------------

TINY = ["model.vocab_size=256", "model.n_layers=1", "model.dim=32", "model.n_heads=2", "model.hope.cms_hidden=16"]
CMS_NAME = re.compile(r"(?:^|\.)layers\.\d+\.cms\.levels\.(\d+)\.")


def hope_cfg(*overrides: str):
    return load_config(REPO / "configs/hope_tiny.yaml", [*TINY, *overrides])


@pytest.fixture(scope="module")
def hope_model():
    from nl.models import build_model

    return build_model(hope_cfg().model, device=torch.device("cpu"))


def group_of(opt) -> dict[int, dict]:
    return {id(p): g for g in opt.param_groups for p in g["params"]}


def matrix_weights(model) -> set[int]:
    """Weights the matrix rule of m3 / dgd owns: nn.Linear weights except the LM head and embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {id(m.weight) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n != "output" and id(m.weight) not in embeddings}


def test_build_optimizer_puts_cms_levels_on_their_frequency(hope_model):
    cfg = hope_cfg("optim.cms.lr_scale=[1.0,0.5,0.25]")
    sizes, scales = list(cfg.model.hope.cms_chunk_sizes), [1.0, 0.5, 0.25]
    groups = group_of(build_optimizer(hope_model, cfg))
    levels_seen = set()
    for name, p in hope_model.named_parameters():
        g, match = groups[id(p)], CMS_NAME.search(name)
        level = int(match.group(1)) if match else None
        every, scale = (sizes[level], scales[level]) if match else (1, 1.0)
        levels_seen.add(level)
        assert (g["every"], g["lr_scale"], g["rule"], g["reduce"]) == (every, scale, "main", "sum"), name
        assert g["lr"] == pytest.approx(cfg.train.lr * scale), name
        assert g["weight_decay"] == (cfg.optim.weight_decay if p.ndim >= 2 and "tok_embeddings" not in name
                                     else 0.0), name
    assert levels_seen == {None, 0, 1, 2}


def test_build_optimizer_cms_disabled_steps_everything_every_call(hope_model):
    opt = build_optimizer(hope_model, hope_cfg("optim.cms.enabled=false", "optim.cms.lr_scale=[1.0,0.5,0.25]"))
    assert {(g["every"], g["lr_scale"]) for g in opt.param_groups} == {(1, 1.0)}


def test_build_optimizer_cms_groups_take_precedence(hope_model):
    cfg = hope_cfg("optim.cms.lr_scale=[1.0,0.5,0.25]", "optim.cms.reduce=mean")
    cfg.optim.cms.groups = [r"mixer\.wo\.:2:0.5", r"cms\.levels\.2\.mlp\.w2:8"]
    groups = group_of(build_optimizer(hope_model, cfg))
    for name, p in hope_model.named_parameters():
        g = groups[id(p)]
        if "mixer.wo." in name:
            expected = (2, 0.5)
        elif "cms.levels.2.mlp.w2" in name:
            expected = (8, 1.0)  # the entry wins over level 2's (16, 0.25)
        elif (m := CMS_NAME.search(name)) is not None:
            expected = ([1, 4, 16][int(m.group(1))], [1.0, 0.5, 0.25][int(m.group(1))])
        else:
            expected = (1, 1.0)
        assert (g["every"], g["lr_scale"], g["reduce"]) == (*expected, "mean"), name


@pytest.mark.parametrize("name", ["m3", "dgd"])
def test_build_optimizer_matrix_rule_only_on_linear_weights(hope_model, name):
    cfg = hope_cfg(f"optim.name={name}", "optim.matrix_lr_scale=3.0", "optim.cms.lr_scale=[1.0,0.5,0.25]")
    opt = build_optimizer(hope_model, cfg)
    try:
        assert type(opt) is OPTIMIZERS[name]
        groups, matrices = group_of(opt), matrix_weights(hope_model)
        assert matrices and "output.weight" in dict(hope_model.named_parameters())
        for pname, p in hope_model.named_parameters():
            g, m = groups[id(p)], CMS_NAME.search(pname)
            level_scale = [1.0, 0.5, 0.25][int(m.group(1))] if m else 1.0
            if id(p) in matrices:
                assert (g["rule"], g["lr_scale"]) == ("main", pytest.approx(level_scale * 3.0)), pname
            else:
                assert (g["rule"], g["lr_scale"]) == ("adamw", level_scale), pname
    finally:
        if name == "dgd":
            opt.close()


@pytest.mark.parametrize("name", ["adamw", "momentum", "precond_momentum", "delta_momentum", "dmgd"])
def test_build_optimizer_other_rules_use_main_everywhere(hope_model, name):
    opt = build_optimizer(hope_model, hope_cfg(f"optim.name={name}", "optim.matrix_lr_scale=3.0"))
    assert type(opt) is OPTIMIZERS[name]
    assert {g["rule"] for g in opt.param_groups} == {"main"}
    assert {g["lr_scale"] for g in opt.param_groups} == {1.0}


def test_cms_config_errors_name_the_fix(hope_model):
    with pytest.raises(ConfigError, match=r"lr_scale has 2 entries.*3 levels"):
        build_optimizer(hope_model, hope_cfg("optim.cms.lr_scale=[1.0,0.5]"))
    cfg = hope_cfg()
    for entry in ("no_colon", "a:b", "a:1:2:3", "[unclosed:4"):
        cfg.optim.cms.groups = [entry]
        with pytest.raises(ConfigError, match="must be 'REGEX:EVERY' or 'REGEX:EVERY:LR_SCALE'"):
            build_optimizer(hope_model, cfg)
    cfg.optim.cms.groups = ["wo:0"]
    with pytest.raises(ConfigError, match="EVERY must be >= 1"):
        check_supported(cfg)


def test_unknown_optimizer_name_is_refused(hope_model):
    with pytest.raises(ConfigError, match="optim.name='sgd' is not one of"):
        hope_cfg("optim.name=sgd")
    cfg = hope_cfg()
    cfg.optim.name = "sgd"  # past load_config's choices: build_optimizer still refuses it
    with pytest.raises(ConfigError, match="optim.name='sgd' is not available"):
        build_optimizer(hope_model, cfg)


def test_dmgd_dot_objective_needs_memory_decay():
    with pytest.raises(ConfigError, match="memory_decay > 0"):
        check_supported(hope_cfg("optim.name=dmgd", "optim.dmgd.internal_loss=dot"))
    check_supported(hope_cfg("optim.name=dmgd", "optim.dmgd.internal_loss=dot", "optim.dmgd.memory_decay=0.01"))
    with pytest.raises(ValueError, match="memory_decay > 0"):
        DMGD([nn.Parameter(torch.zeros(2))], internal_loss="dot")


@pytest.mark.parametrize("override, message", [
    ("optim.name=dmgd optim.dmgd.hidden=0", r"optim.dmgd.hidden=0 is out of range for optim.name=dmgd: pass a positive"),
    ("optim.name=dmgd optim.dmgd.memory_lr=-0.1", "optim.dmgd.memory_lr=-0.1 is out of range"),
    ("optim.name=dmgd optim.dmgd.memory_decay=1.0", "in \\[0, 1\\)"),
    ("optim.name=m3 optim.m3.slow_every=0", "optim.m3.slow_every=0 is out of range"),
    ("optim.name=m3 optim.m3.ns_steps=0", "Newton-Schulz"),
    ("optim.name=m3 optim.m3.beta_slow=1.5", "optim.m3.beta_slow=1.5"),
    ("optim.name=m3 optim.m3.alpha=-1", "optim.m3.alpha=-1"),
    ("optim.name=dgd optim.matrix_lr_scale=0", "positive lr multiplier"),
    ("optim.name=dgd optim.dgd_strength=-1", "optim.dgd_strength=-1"),
    ("optim.name=delta_momentum optim.delta_beta=-0.5", "optim.delta_beta=-0.5"),
])
def test_rule_specific_numbers_out_of_range_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        check_supported(hope_cfg(*override.split()))
    name = override.split()[0]
    check_supported(hope_cfg(name))  # the defaults are in range
    check_supported(hope_cfg("optim.name=adamw", *override.split()[1:]))  # another rule does not read the key


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_deepspeed_refuses_shape_rules(name):
    cfg = hope_cfg(f"optim.name={name}", "dist.strategy=deepspeed")
    if name in ("m3", "dgd", "delta_momentum"):
        with pytest.raises(ConfigError, match="needs whole weight matrices.*fsdp"):
            check_supported(cfg)
    else:
        check_supported(cfg)
    if name == "dmgd":
        with pytest.raises(ConfigError, match="zero_stage 1, 2 or 3"):
            check_supported(hope_cfg("optim.name=dmgd", "dist.strategy=deepspeed", "dist.zero_stage=0"))


# ---- 5. no optimizer is AdamW under another name -------------------------------------------------

def toy_run(name: str) -> torch.Tensor:
    """5 steps of least squares on an nn.Linear(6, 4); returns the weight. The bias is on the AdamW
    fallback for m3 / dgd, so only the weight is compared."""
    lin = linear(6, 4, seed=11)
    gen = torch.Generator().manual_seed(12)
    x, y = torch.randn(16, 6, generator=gen, dtype=F64), torch.randn(16, 4, generator=gen, dtype=F64)
    fallback = "adamw" if name in ("m3", "dgd") else "main"
    groups = [{"params": [lin.weight]}, {"params": [lin.bias], "rule": fallback}]
    cls = OPTIMIZERS[name]
    opt = cls(groups, {id(lin.weight): lin}, lr=0.01) if cls is DGD else cls(groups, lr=0.01)
    for _ in range(5):
        opt.zero_grad()
        (lin(x) - y).pow(2).mean().backward()
        opt.step()
    return lin.weight.detach()


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "adamw"])
def test_no_optimizer_is_a_renamed_adamw(name):
    diff = (toy_run(name) - toy_run("adamw")).abs().max()
    assert diff > 1e-6, f"{name} moved the weights like AdamW (max |diff| {diff:.2e})"
