"""Fused Triton chunk kernel (nl/ops/triton_dgd.py, model.hope.kernel=triton) == the float64 token-by-token
references, outputs, end states and every gradient. Without CUDA the kernels run under Triton's
interpreter (TRITON_INTERPRET=1, set here before the kernel module is imported); the interpreter's gap
(`@triton.autotune` benchmarks on a GPU driver) is bridged here, in test code: one config is kept."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    # Read when @triton.jit decorates a function, triton.language's own included: set before triton imports.
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from test_hope_model import small  # noqa: E402
import test_hope_ops  # noqa: E402
from test_hope_ops import HOPE, make_inputs, outputs_and_grads, rel  # noqa: E402

import nl.models.hope  # noqa: E402,F401  (registers arch 'hope')
from nl.models import build_model  # noqa: E402
from nl.models.hope import recurrence_config  # noqa: E402
from nl.ops.delta_rule import dgd_step  # noqa: E402
from nl.ops.titans import RecurrenceConfig, titans_chunked, titans_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def one_autotune_config():
    """The interpreter cannot benchmark autotune configs: keep the first one while interpreting."""
    from nl.ops import triton_dgd, triton_memory
    kernels = [triton_dgd._dgd_chunk_kernel, triton_dgd._dgd_chunk_bwd_kernel, triton_memory._mlp_factors_kernel,
               triton_memory._mlp_factors_bwd_kernel]  # (nl.ops.triton_gates has no autotuned kernel)
    configs = [k.configs for k in kernels]
    if os.environ.get("TRITON_INTERPRET") == "1":
        for k in kernels:
            k.configs = k.configs[:1]
    yield
    for k, c in zip(kernels, configs):
        k.configs = c


def token_by_token(S0, P0, X, G, Q, log_alpha, eta, log_mu, dgd):
    """The chunk from HOPE_SPEC's per-token rule (delta_rule.dgd_step), float64: reads S_{t-1} q_t before
    the write at t; g_t is held fixed (taken at the anchor). Returns (out [N, C, O], S_C, P_C)."""
    S, P, outs = S0, P0, []
    for t in range(X.shape[1]):
        outs.append((S @ Q[:, t, :, None])[..., 0])
        mu = None if log_mu is None else log_mu[:, t].exp()
        S, P = dgd_step(S, P, X[:, t], G[:, t], log_alpha[:, t].exp(), eta[:, t], mu, dgd)
    return torch.stack(outs, 1), S, P


def chunk_inputs(C: int, momentum: bool, seed: int = 0, N: int = 3, I: int = 8, O: int = 6):  # noqa: E741
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: scale * torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    X = torch.nn.functional.normalize(rnd(N, C, I), dim=-1)
    return dict(S0=rnd(N, O, I, scale=0.5), P0=rnd(N, O, I, scale=0.2) if momentum else None, X=X,
                G=rnd(N, C, O), Q=rnd(N, C, I), log_alpha=-0.2 * torch.rand(N, C, generator=g, dtype=torch.float64),
                eta=0.8 * torch.rand(N, C, generator=g, dtype=torch.float64),
                log_mu=torch.log(torch.rand(N, C, generator=g, dtype=torch.float64)) if momentum else None)


def values_and_grads(fn, inputs: dict, dgd: bool, dtype: torch.dtype):
    leaves = {k: None if v is None else v.to(DEVICE, dtype).requires_grad_() for k, v in inputs.items()}
    out, S, P = fn(**leaves, dgd=dgd)
    outs = [out, S] + ([P] if P is not None else [])
    g = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum() for o in outs)
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return [o.double().cpu() for o in outs], {k: gr.double().cpu() for k, gr in zip(names, grads)}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("C,momentum,dgd,given_xs", [(5, True, True, False), (5, False, True, False),
                                                     (1, True, True, False), (16, True, False, False),
                                                     (20, False, True, False), (5, True, True, True)])
def test_chunk_kernel_equals_token_by_token(dtype, tol, C, momentum, dgd, given_xs):
    """One chunk, with padding (C=5, 20 not powers of two; O=6, I=8), chunk size 1, momentum on and off,
    DGD off, the anchor's output XS = X S0^T passed in (its gradient flows back through torch): outputs,
    end states and the gradients of every input (S0, P0, X, G, Q and the gates)."""
    from nl.ops.triton_dgd import dgd_chunk

    def fused(S0, P0, X, G, Q, log_alpha, eta, log_mu, dgd):
        XS = X @ S0.mT if given_xs else None
        out, S, P = dgd_chunk(S0, P0, X, G, XS, Q, log_alpha, eta, log_mu, dgd)
        return out, S, (P if P0 is not None else None)

    inputs = chunk_inputs(C, momentum)
    ref_outs, ref_grads = values_and_grads(token_by_token, inputs, dgd, torch.float64)
    outs, grads = values_and_grads(fused, inputs, dgd, dtype)
    for a, b in zip(outs, ref_outs):
        assert rel(a, b) < tol, rel(a, b)
    assert grads.keys() == ref_grads.keys()
    for k, b in ref_grads.items():
        assert b.abs().sum() > 0, k
        assert rel(grads[k], b) < tol, (k, rel(grads[k], b))


@pytest.mark.parametrize("momentum,given_xs", [(True, False), (False, True)])
def test_chunk_kernel_normalized_input_equals_reference(momentum, given_xs):
    """normalize_x (the normalised step, formed on chip): the kernel equals the float64 per-token reference
    stepped on x / ||x|| with gradient factor g / ||x|| (and XS = X S0^T scaled alike when it is passed in),
    values and the gradients of every input, x's through its norm included."""
    from nl.ops.triton_dgd import dgd_chunk
    inputs = chunk_inputs(6, momentum, seed=2)
    g = torch.Generator().manual_seed(5)
    inputs["X"] = inputs["X"] * (0.5 + 2 * torch.rand(3, 6, 1, generator=g, dtype=torch.float64))  # not unit

    def fused(S0, P0, X, G, Q, log_alpha, eta, log_mu, dgd):
        XS = X @ S0.mT if given_xs else None
        out, S, P = dgd_chunk(S0, P0, X, G, XS, Q, log_alpha, eta, log_mu, dgd, True)
        return out, S, (P if P0 is not None else None)

    def reference(S0, P0, X, G, Q, log_alpha, eta, log_mu, dgd):
        r = 1 / X.norm(dim=-1, keepdim=True)
        return token_by_token(S0, P0, X * r, G * r, Q, log_alpha, eta, log_mu, dgd)

    ref_outs, ref_grads = values_and_grads(reference, inputs, True, torch.float64)
    outs, grads = values_and_grads(fused, inputs, True, torch.float64)
    for a, b in zip(outs, ref_outs):
        assert rel(a, b) < 1e-10, rel(a, b)
    for k, b in ref_grads.items():
        assert b.abs().sum() > 0 and rel(grads[k], b) < 1e-10, (k, rel(grads[k], b))


class OpNames(TorchDispatchMode):
    """The names of the ops dispatched while it is on (aten::bmm, nl::dgd_chunk, ...)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("self_target,normalized,used,dtype,tol", [
    (True, True, "all", torch.float64, 1e-10), (True, False, "g", torch.float64, 1e-10),
    (False, True, "g", torch.float64, 1e-10), (False, False, "all", torch.float64, 1e-10),
    (True, True, "all", torch.float32, 1e-5)])
def test_mlp_grad_factors_kernel_equals_torch_form(self_target, normalized, used, dtype, tol):
    """nl::mlp_grad_factors (one kernel for an MLP memory's gradient factors, model.hope.kernel=triton) equals
    the PyTorch form, `titans._grad_factors` with kernel=torch, differentiated by autograd, in float64: the
    factors (h, g1, hout, g2, pre) and the gradients of W1, W2, k and v through them (the hand-written backward
    kernel, second order in silu), for HOPE's self-generated target and Titans' v, with and without the
    normalised step; inputs broadcast along batch dims (k and v shared by the generators, the initial state by
    the sequences) and sizes that are not powers of two (C 5, d 6, hidden 12); used="g": only g1 and g2
    carry a gradient (the kernel's absent-gradient path: h, hout and pre unused); the kernel in float32 too,
    against the float64 reference."""
    from nl.ops.titans import _grad_factors
    g = torch.Generator().manual_seed(8)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    W1, W2 = 0.5 * rnd(1, 3, 2, 6, 12), 0.5 * rnd(1, 3, 2, 12, 6)
    k, v = torch.nn.functional.normalize(rnd(2, 1, 2, 5, 6), dim=-1), rnd(2, 1, 2, 5, 6)
    weights = [rnd(2, 3, 2, 5, n) for n in (12, 6, 6, 12, 12)]  # h, g1, hout, g2, pre
    results = []
    for kernel in ("torch", "triton"):
        cfg = RecurrenceConfig(target="self" if self_target else "value", normalized_step=normalized, kernel=kernel)
        leaves = [t.to(DEVICE, dtype if kernel == "triton" else torch.float64).requires_grad_() for t in (W1, W2, k, v)]
        with OpNames() as ops:
            (h, g1, hout), (_, g2, pre) = _grad_factors(tuple(leaves[:2]), leaves[2], leaves[3], cfg)
        if kernel == "triton":  # one fused call, no PyTorch matmul around it
            assert ops.names.count("nl::mlp_grad_factors") == 1 and "aten::bmm" not in ops.names, ops.names
        outs = [h, g1, hout, g2, pre]
        picked = [1, 3] if used == "g" else range(5)
        loss = sum((outs[i] * weights[i].to(outs[i])).sum() for i in picked)
        results.append(([o.detach().double().cpu() for o in outs],
                        [gr.double().cpu() for gr in torch.autograd.grad(loss, leaves)]))
    (ref_outs, ref_grads), (outs, grads) = results
    for name, a, b in zip(("h", "g1", "hout", "g2", "pre"), outs, ref_outs):
        assert a.shape == b.shape and rel(a, b) < (1e-12 if dtype == torch.float64 else tol), (name, rel(a, b))
    for name, a, b in zip(("W1", "W2", "k", "v"), grads, ref_grads):
        assert a.shape == b.shape and b.abs().sum() > 0 and rel(a, b) < tol, (name, rel(a, b))


def test_mlp_apply_kernel_equals_memory_apply():
    """nl::mlp_apply (the generators' M(z) = z + W1 silu(W2 z) with kernel=triton) equals delta_rule.memory_apply
    in float64, values and the gradients of W1, W2 and z: z shared by the stacked generators and the weights by
    the sequences (read in place, gradients summed back), C 5, d 6, hidden 12 (padded tiles)."""
    from nl.ops.delta_rule import memory_apply
    from nl.ops.triton_memory import mlp_apply
    g = torch.Generator().manual_seed(6)
    W1, W2, z = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((1, 3, 2, 6, 12), (1, 3, 2, 12, 6),
                                                                                 (2, 1, 2, 5, 6)))
    dy = torch.randn(2, 3, 2, 5, 6, generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda a, b, x: memory_apply((a, b), x), mlp_apply):
        leaves = [t.clone().to(DEVICE).requires_grad_() for t in (W1, W2, z)]
        out = fn(*leaves)
        results.append((out.detach().cpu(), [gr.cpu() for gr in torch.autograd.grad((out * dy.to(out)).sum(), leaves)]))
    (ref, ref_grads), (out, grads) = results
    assert rel(out, ref) < 1e-12
    for name, a, r in zip(("W1", "W2", "z"), grads, ref_grads):
        assert a.shape == r.shape and rel(a, r) < 1e-12, (name, rel(a, r))


@pytest.mark.parametrize("C", [5, 150])
def test_gate_and_l2norm_kernels_equal_torch_forms(C):
    """nl::l2norm and nl::gate (model.hope.kernel=triton's `_derive`) equal titans.l2norm and scale * sigmoid /
    logsigmoid + offset of the logit x . w + b, values and gradients of x, w and b, in float64: x a strided
    slice of the stacked generator outputs, w and b per head shared by the sequences (read in place, their
    gradients summed), d 6 (padded tiles), C 5 and 150 (rows in three blocks of 64, the last partial), logits up
    to |z| ~ 60 (logsigmoid stays finite)."""
    from nl.ops import triton_gates
    from nl.ops.titans import l2norm
    g = torch.Generator().manual_seed(4)
    stacked = torch.randn(2, 3, 2, C, 6, generator=g, dtype=torch.float64)
    stacked[0, 1, 0, 2] *= 30  # large logits
    w, b = torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    dy_n, dy_g = (torch.randn(2, 2, C, 6, generator=g, dtype=torch.float64),
                  torch.randn(2, 2, C, generator=g, dtype=torch.float64))
    for activation, scale, offset in (("sigmoid", 0.3, 0.0), ("logsigmoid", 1.0, -0.69)):
        results = []
        for fused in (False, True):
            leaves = [t.clone().to(DEVICE).requires_grad_() for t in (stacked, w, b)]
            x = leaves[0][:, 1]  # [B, H, C, d], not contiguous
            if fused:
                n = triton_gates.l2norm(x, 1e-6)
                y = triton_gates.gate(x, leaves[1][:, None, :], leaves[2][:, None], activation, scale, offset)
            else:
                n = l2norm(x)
                z = (x * leaves[1][:, None, :]).sum(-1) + leaves[2][:, None]
                y = scale * torch.sigmoid(z) if activation == "sigmoid" else torch.nn.functional.logsigmoid(z) + offset
            loss = (n * dy_n.to(n)).sum() + (y * dy_g.to(y)).sum()
            grads = [gr.cpu() for gr in torch.autograd.grad(loss, leaves)]
            results.append(([n.detach().cpu(), y.detach().cpu()], grads))
        (ref_outs, ref_grads), (outs, grads) = results
        for a, r in zip(outs, ref_outs):
            assert torch.isfinite(a).all() and rel(a, r) < 1e-12, (activation, rel(a, r))
        for name, a, r in zip(("x", "w", "b"), grads, ref_grads):
            assert a.shape == r.shape and r.abs().sum() > 0 and rel(a, r) < 1e-12, (activation, name, rel(a, r))


@pytest.mark.parametrize("static,retention,momentum,normalize_v", [
    ((), True, True, True), (("q",), True, False, False), (("q", "k", "v"), False, True, True)])
def test_qkv_gates_kernel_equals_derive(static, retention, momentum, normalize_v):
    """nl::qkv_gates (a generator chunk's q, k, v and gates in one kernel) == titans._derive on the torch path,
    values and every gradient (generator stack, statics, each readout w and b), float64: 2 sequences (the
    readout's gradient summed over them inside the program), d 6 (padded tiles), C 150 (three row blocks, the
    last partial), generators in a shuffled stack order, large logits; without retention the alpha generator's
    slot gets a zero gradient."""
    from nl.ops import titans
    from nl.ops.triton_gates import qkv_gates
    g = torch.Generator().manual_seed(7)
    names = [n for n in ("eta", "v", "alpha", "k", "q") if n not in static]  # a stack order unlike GENERATORS
    B, H, C, d = 2, 2, 150, 6
    gen0 = torch.randn(B, len(names), H, C, d, generator=g, dtype=torch.float64)
    gen0[0, names.index("eta"), 1, 3] *= 30
    statics0 = {n: torch.randn(B, H, C, d, generator=g, dtype=torch.float64) for n in static}
    readout0 = {f"{p}_{n}": torch.randn(H, d, generator=g, dtype=torch.float64) if p == "w" else
                torch.randn(H, generator=g, dtype=torch.float64)
                for n in ("eta", "alpha", "mu") for p in ("w", "b") if n != "mu" or momentum}
    cfg = RecurrenceConfig(eta_max=0.3, momentum=momentum, retention=retention, momentum_max=0.5,
                           normalize_v=normalize_v)
    dys = [torch.randn(B, H, C, d, generator=g, dtype=torch.float64) for _ in range(3)] + \
          [torch.randn(B, H, C, generator=g, dtype=torch.float64) for _ in range(3)]
    results = []
    for fused in (False, True):
        gen = gen0.clone().to(DEVICE).requires_grad_()
        statics = {n: t.clone().to(DEVICE).requires_grad_() for n, t in statics0.items()}
        readout = {n: t.clone().to(DEVICE).requires_grad_() for n, t in readout0.items()}
        if fused:
            wb = titans._packed_readout(readout, names, gen, RecurrenceConfig(**{**cfg.__dict__, "kernel": "triton"}))
            outs = qkv_gates(gen, *[statics.get(n) for n in ("q", "k", "v")], wb,
                             [names.index(n) if n in names else -1 for n in titans.GENERATORS], 1e-6, normalize_v,
                             retention, momentum, 0.3, math.log(0.5))
            outs = outs[:5] + ((outs[5],) if momentum else ())
        else:
            outs = titans._derive(dict(zip(names, gen.unbind(1))), statics, readout, cfg)
            outs = outs[:5] + ((outs[5],) if momentum else ())
        # through a concatenation along the sequence, as the chunk loop does: the gradients arrive as strided slices
        loss = sum((torch.cat([o, o.detach()], dim=2)[:, :, :C] * dy.to(o)).sum() for o, dy in zip(outs, dys))
        leaves = [gen, *statics.values(), *readout.values()]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, leaves)]
        results.append(([o.detach().cpu() for o in outs], [gr.cpu() for gr in grads]))
    (ref_outs, ref_grads), (outs, grads) = results
    for i, (a, r) in enumerate(zip(outs, ref_outs)):
        assert torch.isfinite(a).all() and rel(a, r) < 1e-12, (i, rel(a, r))
    for i, (a, r) in enumerate(zip(grads, ref_grads)):
        assert a.shape == r.shape and rel(a, r) < 1e-12, (i, rel(a, r))
    if not retention:
        assert grads[0][:, names.index("alpha")].abs().max() == 0
    used = [n for n in readout0 if retention or "alpha" not in n]
    assert ref_grads[0].abs().sum() > 0 and used and all(  # every used readout gets a gradient
        r.abs().sum() > 0 for n, r in zip(readout0, ref_grads[1 + len(static):]) if n in used)


F64, F32 = (torch.float64, 1e-10), (torch.float32, 1e-5)


@pytest.mark.parametrize("momentum,dgd,read,init,normalized,self_target,dtype,tol", [
    (True, True, True, True, True, True, *F64), (False, True, True, False, False, True, *F64),
    (True, True, False, False, True, False, *F64), (False, False, True, True, False, True, *F64),
    (True, True, True, True, True, False, *F64), (True, True, True, True, True, True, *F32)])
def test_mlp_memory_chunk_equals_torch_chunk_memory(momentum, dgd, read, init, normalized, self_target, dtype, tol):
    """nl::mlp_memory_chunk (an MLP memory's whole chunk step in one kernel: gradient factors at the anchor, both
    layers' DGD steps, the read chain) == titans._ChunkMemory on the torch path (memory_grad_factors, two
    ChunkLayers, q + read_W1(silu(read_W2(q)))), in float64: read, both layers' end states and momenta, every
    input's gradient. Retention toward M_0 (init): the loop carries the deviation and the anchor is M_0 + it.
    Batch [2, 2, 1]: k, v and the gates shared along dim 1, the carried state and M_0 along dim 0 (read in place,
    gradients summed); C 5, d 4, hidden 6 (padded tiles). float32: the kernel in fp32 against the float64 torch path
    at 1e-5 (IEEE products, no TF32)."""
    from nl.ops import titans
    from nl.ops.delta_rule import ChunkGates
    from nl.ops.triton_memory import mlp_memory_chunk
    g = torch.Generator().manual_seed(11)
    C, d, hid = 5, 4, 6

    def rnd(*shape, scale=0.5):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    leaves = {"S1": rnd(1, 2, 1, d, hid), "P1": rnd(1, 2, 1, d, hid, scale=0.2) if momentum else None,
              "S2": rnd(1, 2, 1, hid, d), "P2": rnd(1, 2, 1, hid, d, scale=0.2) if momentum else None,
              "M1": rnd(1, 2, 1, d, hid) if init else None, "M2": rnd(1, 2, 1, hid, d) if init else None,
              "K": torch.nn.functional.normalize(rnd(2, 1, 1, C, d), dim=-1), "V": rnd(2, 1, 1, C, d),
              "Q": rnd(2, 2, 1, C, d) if read else None,
              "log_alpha": -0.1 * torch.rand(2, 1, 1, C, generator=g, dtype=torch.float64),
              "eta": 0.3 * torch.rand(2, 1, 1, C, generator=g, dtype=torch.float64),
              "log_mu": -0.3 * torch.rand(2, 1, 1, C, generator=g, dtype=torch.float64) if momentum else None}
    w = {k: rnd(*s) for k, s in (("out", (2, 2, 1, C, d)), ("S1", (2, 2, 1, d, hid)), ("S2", (2, 2, 1, hid, d)))}
    cfg = RecurrenceConfig(dgd=dgd, momentum=momentum, retention_target="init" if init else "zero",
                           normalized_step=normalized, target="self" if self_target else "value")

    def loss_of(out, S1, P1, S2, P2):
        loss = (S1 * w["S1"]).sum() + (S2 * w["S2"]).sum()
        loss = loss + ((P1 * w["S1"]).sum() + (P2 * w["S2"]).sum() if momentum else 0)
        if not read:
            return loss
        # through a concatenation, as the chunk loop does: o's gradient arrives as a strided slice
        return loss + (torch.cat([out, out.detach()], dim=-2)[..., :C, :] * w["out"]).sum()

    results = []
    for fused in (False, True):
        t = {k: None if v is None else v.clone().to(DEVICE, dtype if fused else torch.float64).requires_grad_()
             for k, v in leaves.items()}
        if fused:
            out, S1, P1, S2, P2 = mlp_memory_chunk(*t.values(), dgd, self_target, normalized)
        else:
            carried, M = (t["S1"], t["S2"]), (t["M1"], t["M2"])
            A = tuple(c + m for c, m in zip(carried, M)) if init else carried
            gates = ChunkGates(t["log_alpha"], t["eta"], t["log_mu"])
            k_init = t["K"] @ t["M2"].mT if init and dgd else None
            mem = titans._ChunkMemory(A, carried, (t["P1"], t["P2"]) if momentum else None, M, t["K"], t["V"], gates,
                                      cfg, k_init)
            out = mem.read(t["Q"], t["Q"] @ t["M2"].mT if init else None) if read else None
            (S1, S2), P = mem.ends(momentum)
            P1, P2 = P if momentum else (None, None)
        used = [k for k, v in t.items() if v is not None]
        grads = torch.autograd.grad(loss_of(out, S1, P1, S2, P2), [t[k] for k in used])
        outs = [x.detach().cpu().double() for x in (out, S1, P1, S2, P2) if x is not None and x.numel()]
        results.append((outs, dict(zip(used, [gr.cpu().double() for gr in grads]))))
    (ref_outs, ref_grads), (outs, grads) = results
    assert len(outs) == len(ref_outs)
    for i, (a, r) in enumerate(zip(outs, ref_outs)):
        assert a.shape == r.shape and rel(a, r) < tol, (i, rel(a, r))
    for k, r in ref_grads.items():
        assert grads[k].shape == r.shape and r.abs().sum() > 0 and rel(grads[k], r) < tol, (k, rel(grads[k], r))


def test_chunk_kernel_end_state_without_read():
    """The generators' step: no query, the end state alone (the kernel's HAS_Q=False variant)."""
    from nl.ops.triton_dgd import dgd_chunk
    inputs = chunk_inputs(7, True, seed=3)
    args = {k: None if v is None else v.to(DEVICE) for k, v in inputs.items()}
    args["Q"] = None
    out, S, P = dgd_chunk(**args, XS=None, dgd=True)
    _, S_ref, P_ref = token_by_token(**inputs, dgd=True)
    assert out.numel() == 0
    assert rel(S.cpu(), S_ref) < 1e-12 and rel(P.cpu(), P_ref) < 1e-12


def test_chunk_kernel_reads_broadcast_inputs_in_place():
    """Inputs shared along a batch dim (the initial state by the sequences, k and the gates by the generators,
    an unbatched anchor) go to the kernel as they are, through stride-0 dims: values and gradients equal the
    float64 per-token reference run on the expanded inputs, each gradient summed back to its input's shape; no
    input is copied (no clone/copy_ on the way to the kernel, where expanding made one per shared input)."""
    from nl.ops.delta_rule import ChunkGates
    from nl.ops.triton_dgd import FusedChunkLayer
    C, I, O = 5, 8, 6  # noqa: E741
    batch = (2, 3, 2)  # (sequence, generator, head)
    shapes = dict(S0=(1, 3, 2, O, I), P0=(2, 3, 2, O, I), X=(2, 1, 2, C, I), G=(2, 3, 2, C, O), Q=(3, 1, C, I),
                  log_alpha=(2, 1, 2, C), eta=(2, 1, 2, C), log_mu=(2, 1, 1, C))
    g = torch.Generator().manual_seed(11)
    inputs = {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    inputs["X"] = torch.nn.functional.normalize(inputs["X"], dim=-1)
    inputs["S0"], inputs["P0"] = 0.5 * inputs["S0"], 0.2 * inputs["P0"]
    inputs["log_alpha"], inputs["eta"] = -0.2 * inputs["log_alpha"].sigmoid(), 0.8 * inputs["eta"].sigmoid()
    inputs["log_mu"] = torch.nn.functional.logsigmoid(inputs["log_mu"])
    leaves = {k: v.to(DEVICE).requires_grad_() for k, v in inputs.items()}

    gates = ChunkGates(leaves["log_alpha"], leaves["eta"], leaves["log_mu"], matrices=False)
    layer = FusedChunkLayer(leaves["S0"], leaves["P0"], leaves["X"], leaves["G"], gates, dgd=True)
    with OpNames() as ops:
        out = layer.read(leaves["Q"])
    S, P = layer.end_state()
    assert not {"aten::clone", "aten::copy_"} & set(ops.names), ops.names
    assert out.shape == (*batch, C, O) and S.shape == P.shape == (*batch, O, I)
    w = torch.Generator().manual_seed(3)
    weights = [torch.randn(t.shape, generator=w, dtype=torch.float64).to(t) for t in (out, S, P)]
    loss = sum((t * wt).sum() for t, wt in zip((out, S, P), weights))
    grads = torch.autograd.grad(loss, list(leaves.values()))

    ref = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    flat = lambda t, k: t.expand(*batch, *t.shape[-k:]).reshape(-1, *t.shape[-k:])  # noqa: E731
    r_out, r_S, r_P = token_by_token(flat(ref["S0"], 2), flat(ref["P0"], 2), flat(ref["X"], 2), flat(ref["G"], 2),
                                     flat(ref["Q"], 2), flat(ref["log_alpha"], 1), flat(ref["eta"], 1),
                                     flat(ref["log_mu"], 1), True)
    r_loss = sum((t.reshape(wt.shape) * wt.cpu()).sum() for t, wt in zip((r_out, r_S, r_P), weights))
    r_grads = torch.autograd.grad(r_loss, list(ref.values()))
    for a, b in zip((out, S, P), (r_out, r_S, r_P)):
        assert rel(a.detach().cpu().reshape(b.shape), b.detach()) < 1e-10
    for k, a, b in zip(leaves, grads, r_grads):
        assert a.shape == b.shape == shapes[k], k
        assert b.abs().sum() > 0 and rel(a.cpu(), b) < 1e-10, (k, rel(a.cpu(), b))


@pytest.mark.parametrize("memory_type,momentum,chunk,extra,B", [
    ("linear", True, 4, {}, 1), ("mlp", True, 4, {}, 1), ("mlp", False, 1, {}, 1), ("mlp", True, 1, {}, 1),
    ("linear", False, 1, {}, 1),
    ("mlp", True, 4, {"target": "value", "normalized_step": False}, 1), ("mlp", True, 4, {}, 2),
    ("mlp", True, 4, {"chunk_read": "anchor", "retention_target": "zero"}, 1), ("mlp", False, 4, {"dgd": False}, 1)])
def test_titans_chunked_on_the_kernel_equals_reference(memory_type, momentum, chunk, extra, B, monkeypatch):
    """The whole recurrence (generators k, v, eta, alpha and the memory, layer-wise MLP DGD) with
    kernel=triton == titans_reference token by token in float64, outputs, final states, every gradient;
    T=7 at chunk 4: a partial last chunk; extra: Titans' target v_t without the normalised step, the anchor read
    with Eq. 88's retention toward zero, the plain gradient step (no DGD decay); B=2: the initial
    states shared by two sequences (their gradients summed over them once, after the loop). One head: the
    interpreter runs each program of the grid in Python (~0.1 s each)."""
    monkeypatch.setattr(test_hope_ops, "B", B)
    monkeypatch.setattr(test_hope_ops, "H", 1)
    inputs = make_inputs(memory_type, HOPE, ("q",), T=7 if chunk > 1 else 4, seed=5)
    cfg = RecurrenceConfig(chunk_size=chunk, memory_chunk_size=chunk, eta_max=0.8, momentum=momentum, **extra)
    o_ref, s_ref, g_ref = outputs_and_grads(titans_reference, inputs, cfg)
    fused_cfg = RecurrenceConfig(chunk_size=chunk, memory_chunk_size=chunk, eta_max=0.8, momentum=momentum,
                                 kernel="triton", **extra)
    o, s, g = outputs_and_grads(titans_chunked, inputs, fused_cfg)
    assert rel(o, o_ref) < 1e-6 and rel(s, s_ref) < 1e-6, (rel(o, o_ref), rel(s, s_ref))
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert (a is None) == (b is None), i
        if b is not None:
            assert rel(a, b) < 1e-6, (i, rel(a, b))


def test_static_inputs_on_the_kernels_equal_reference(monkeypatch):
    """No generators (the Titans baseline's static q, k, v and gate logits): the l2norms run once over the whole
    sequence, T=70 > one 64-row block of the l2norm kernel, then the memory's chunks on the kernels; equal to
    titans_reference token by token in float64, outputs, final state and every gradient."""
    monkeypatch.setattr(test_hope_ops, "B", 1)
    monkeypatch.setattr(test_hope_ops, "H", 1)
    inputs = make_inputs("mlp", (), ("q", "k", "v", "eta", "alpha", "mu"), T=70, seed=3)
    kw = dict(chunk_size=32, memory_chunk_size=32, eta_max=0.05, momentum=True, momentum_max=0.5, target="value")
    o_ref, s_ref, g_ref = outputs_and_grads(titans_reference, inputs, RecurrenceConfig(**kw))
    o, s, g = outputs_and_grads(titans_chunked, inputs, RecurrenceConfig(**kw, kernel="triton"))
    assert rel(o, o_ref) < 1e-6 and rel(s, s_ref) < 1e-6, (rel(o, o_ref), rel(s, s_ref))
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert (a is None) == (b is None), i
        if b is not None:
            assert rel(a, b) < 1e-6, (i, rel(a, b))


def test_kernel_runs_the_fused_op(monkeypatch):
    """kernel=triton really goes through the fused ops, torch does not: an MLP memory's chunk step (gradient factors,
    both layers, the read) is one nl::mlp_memory_chunk per memory and chunk, a linear memory's layer one
    nl::dgd_chunk."""
    from nl.ops import triton_dgd, triton_memory
    monkeypatch.setattr(test_hope_ops, "B", 1)
    monkeypatch.setattr(test_hope_ops, "H", 1)
    calls = []
    for module, name in ((triton_dgd, "dgd_chunk"), (triton_memory, "mlp_memory_chunk")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    for memory_type, op in (("mlp", "mlp_memory_chunk"), ("linear", "dgd_chunk")):
        inputs = make_inputs(memory_type, HOPE, ("q",), T=8, seed=1)
        calls.clear()
        titans_chunked(*inputs, RecurrenceConfig(4, 4, 0.8, kernel="torch"))
        assert calls == []
        titans_chunked(*inputs, RecurrenceConfig(4, 4, 0.8, kernel="triton"))
        assert calls == [op] * (2 * 2), (memory_type, calls)  # 2 chunks x (the stacked generators, the memory)


def test_tiny_hope_forward_backward_triton_equals_torch():
    """model.hope.kernel wired end to end: a tiny HOPE (MLP memories, momentum) in float32, loss and every
    parameter gradient equal between kernel=torch and kernel=triton."""
    results = []
    for kernel in ("torch", "triton"):
        cfg = small(chunk=4, kernel=kernel)
        cfg.n_layers, cfg.n_heads = 1, 1  # few interpreted programs: one layer, one head
        model = build_model(cfg, seed=0).to(DEVICE)
        tokens = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert model.layers[0].mixer.rcfg.kernel == "triton"
    assert torch.allclose(l0, l1, rtol=1e-6), (l0, l1)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        assert rel(g1[n], g0[n]) < 1e-4, (n, rel(g1[n], g0[n]))


def test_kernel_choice_is_validated(monkeypatch):
    assert recurrence_config(small(kernel="torch")).kernel == "torch"
    assert recurrence_config(small()).kernel == "auto"
    with pytest.raises(ValueError, match="kernel='cuda'"):
        RecurrenceConfig(kernel="cuda")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs a CUDA device"):
            recurrence_config(small(kernel="triton"))


def test_trainer_says_when_triton_kernels_will_compile():
    """The trainer's start line for a run whose first step compiles the Triton kernels (HOPE, kernel auto or
    triton, CUDA): it names the cache and the way out; nothing for the torch code, CPU or a Transformer++."""
    from conftest import REPO
    from nl.config import load_config
    from nl.trainer import triton_compile_notice

    def cfg(*overrides):
        return load_config(REPO / "configs" / "hope_tiny.yaml", list(overrides))

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for kernel in ("auto", "triton"):
        line = triton_compile_notice(cfg(f"model.hope.kernel={kernel}"), cuda)
        assert "first step" in line and "TRITON_CACHE_DIR" in line and "model.hope.kernel=torch" in line
    assert triton_compile_notice(cfg("model.hope.kernel=torch"), cuda) is None
    assert triton_compile_notice(cfg("model.hope.kernel=triton"), cpu) is None  # the interpreter compiles nothing
    assert triton_compile_notice(cfg("model.arch=transformer"), cuda) is None


def test_auto_is_torch_on_cpu_tensors():
    from nl.ops.delta_rule import ChunkGates, ChunkLayer, chunk_layer
    from nl.ops.triton_dgd import FusedChunkLayer
    x = dict(S0=torch.zeros(2, 3), P0=None, X=torch.zeros(4, 3), G=torch.zeros(4, 2),
             gates=ChunkGates(torch.zeros(4), torch.zeros(4), None), dgd=True)
    assert isinstance(chunk_layer(**x, kernel="auto"), FusedChunkLayer if DEVICE == "cuda" else ChunkLayer)
    assert isinstance(chunk_layer(**x, kernel="triton"), FusedChunkLayer)


def test_custom_op_registration():
    """torch.library.opcheck: the ops' fake (meta) functions, schemas and autograd registrations agree with them,
    so torch.compile and FSDP2 can treat nl::dgd_chunk, nl::mlp_grad_factors, nl::mlp_apply, nl::l2norm and
    nl::gate as one opaque call each."""
    import nl.ops.triton_dgd  # noqa: F401  (registers the ops)
    inputs = {k: None if v is None else v.to(DEVICE).requires_grad_(k != "X") for k, v in chunk_inputs(5, True).items()}
    XS = (inputs["X"] @ inputs["S0"].mT).detach().requires_grad_()
    args = (inputs["S0"], inputs["P0"], inputs["X"], inputs["G"], XS, inputs["Q"], inputs["log_alpha"], inputs["eta"],
            inputs["log_mu"], True)
    for extra in ((), (True,)):  # normalize_x at its default and on
        torch.library.opcheck(torch.ops.nl.dgd_chunk.default, args + extra,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    import nl.ops.triton_memory  # noqa: F401  (registers nl::mlp_grad_factors)
    g = torch.Generator().manual_seed(1)
    W1, W2, k, v = (torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
                    for s in ((1, 2, 4, 6), (1, 2, 6, 4), (3, 1, 5, 4), (3, 1, 5, 4)))
    for flags in ((True, True), (False, False)):
        torch.library.opcheck(torch.ops.nl.mlp_grad_factors.default, (W1, W2, k, v, *flags),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.nl.mlp_apply.default, (W1, W2, k),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    C, d, hid = 5, 4, 6
    t = [torch.randn(*sh, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_() for sh in (
        (1, 2, d, hid), (1, 2, d, hid), (1, 2, hid, d), (1, 2, hid, d), (1, 2, d, hid), (1, 2, hid, d),
        (3, 1, C, d), (3, 1, C, d), (3, 2, C, d))]
    gates = [(-0.1 * torch.rand(3, 1, C, generator=g, dtype=torch.float64)).to(DEVICE).requires_grad_()
             for _ in range(3)]
    for momentum, read in ((True, True), (False, False)):
        args = (t[0], t[1] if momentum else None, t[2], t[3] if momentum else None, t[4] if read else None,
                t[5] if read else None, t[6], t[7], t[8] if read else None, gates[0], gates[1],
                gates[2] if momentum else None, True, momentum, read)
        torch.library.opcheck(torch.ops.nl.mlp_memory_chunk.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    import nl.ops.triton_gates  # noqa: F401  (registers nl::l2norm, nl::gate)
    w, b = W2[..., :1, :].detach().clone().requires_grad_(), W2[..., 0, :1].detach().clone().requires_grad_()
    gen = torch.randn(3, 4, 2, 5, 4, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    wb = torch.randn(2, 3, 5, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    q = torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    for flags in ((True, True, True), (False, False, False)):
        torch.library.opcheck(torch.ops.nl.qkv_gates.default, (gen, q, None, None, wb, [-1, 2, 0, 3, 1], 1e-6, *flags,
                                                                0.4, -0.7),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    for op, args in ((torch.ops.nl.l2norm.default, (k, 1e-6)),
                     (torch.ops.nl.gate.default, (k, w, b, "sigmoid", 0.5, 0.0)),
                     (torch.ops.nl.gate.default, (k, w, b, "logsigmoid", 1.0, -0.1))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_kernel_path_forms_no_gate_matrices(monkeypatch):
    """kernel=triton forms the chunk's decay matrices on chip, so titans_chunked builds none of ChunkGates'
    [C, C] matrices and cumulative sums around it (launches for nothing on a GPU); the torch path does."""
    monkeypatch.setattr(test_hope_ops, "B", 1)
    monkeypatch.setattr(test_hope_ops, "H", 1)
    inputs = make_inputs("mlp", HOPE, ("q",), T=8, seed=1)
    for kernel, cumsums in (("torch", True), ("triton", False)):
        with OpNames() as ops:
            titans_chunked(*inputs, RecurrenceConfig(4, 4, 0.3, momentum=True, kernel=kernel))
        assert ("aten::cumsum" in ops.names) == cumsums, kernel  # ChunkGates' gamma = exp(cumsum log alpha), mu's


def test_launch_counter_counts_the_fused_calls():
    """benchmarks/bench_launches.py on a tiny HOPE: kernel=triton makes, per chunk in the forward, one Triton launch
    per MLP memory's whole step (the stacked generators, the memory), one for the generators' MLP on z and one for
    q, k, v and the gates; and fewer aten launches than torch."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "bench_launches", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_launches.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    counts = {k: bench.count(small(chunk=4, kernel=k, recompute_chunks=False), T=8, B=1, whole_block=False)
              for k in ("torch", "triton")}  # (recompute_chunks would rerun the forward's kernels in the backward)
    assert counts["torch"]["fwd_triton"] == counts["torch"]["bwd_triton"] == 0
    # 2 chunks x (2 MLP memories, the stacked generators and the memory, one whole step each + the generators'
    # MLP on z + q, k, v and the gates eta, alpha, mu in one nl::qkv_gates)
    assert counts["triton"]["fwd_triton"] == 2 * (2 + 1 + 1)
    assert 0 < counts["triton"]["bwd_triton"] <= 2 * (2 + 1 + 1)
    assert counts["triton"]["fwd_aten"] < counts["torch"]["fwd_aten"]
    assert counts["triton"]["total"] < counts["torch"]["total"]


def test_compiled_graph_keeps_the_op_opaque():
    """torch.compile(fullgraph=True) traces a chunk step on the kernel with no graph break, nl::dgd_chunk and
    its backward staying single calls in the graphs; values and gradients equal eager."""
    from nl.ops.triton_dgd import dgd_chunk
    inputs = {k: None if v is None else v.to(DEVICE).requires_grad_() for k, v in chunk_inputs(5, True, seed=4).items()}
    ops = []

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._functorch.aot_autograd import aot_module_simplified

        def record(g, _):
            ops.extend(str(n.target) for n in g.graph.nodes if n.op == "call_function")
            return make_boxed_func(g.forward)
        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    def step(S0, P0, X, G, Q, log_alpha, eta, log_mu):
        out, S, P = dgd_chunk(S0, P0, X, G, None, Q, log_alpha, eta, log_mu, True)
        return out.square().sum() + S.sum() + P.square().sum()

    torch._dynamo.reset()
    results = []
    for fn in (torch.compile(step, fullgraph=True, backend=backend), step):
        loss = fn(**inputs)
        results.append((loss, torch.autograd.grad(loss, [v for v in inputs.values() if v is not None])))
    (l_c, g_c), (l_e, g_e) = results
    assert ops.count("nl.dgd_chunk.default") == 1 and ops.count("nl.dgd_chunk_backward.default") == 1, ops
    assert rel(l_c.detach().cpu(), l_e.detach().cpu()) < 1e-12
    assert all(rel(a.cpu(), b.cpu()) < 1e-12 for a, b in zip(g_c, g_e))


def tf32(a):
    """float32 array rounded to TF32 (10 mantissa bits), to nearest with ties away from zero: PTX cvt.rna.tf32.f32,
    the rounding Triton applies before tensor-core products."""
    import numpy as np
    return ((a.view(np.uint32) + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


@pytest.fixture
def gpu_products(monkeypatch):
    """Interpreter shim: tl.dot on float32 computed as the GPU computes it for the kernel's input_precision (the
    interpreter ignores it and multiplies exactly): TF32, one product of the TF32-rounded operands; TF32x3,
    Triton's 3xTF32, lo*hi + hi*lo + hi*hi of each operand split into hi = tf32(a), lo = tf32(a - hi); float32
    accumulation. Returns the precisions the kernels asked for."""
    import numpy as np
    import triton.runtime.interpreter as interp
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("emulates the GPU's products in Triton's interpreter (on a GPU they are real)")
    create_dot, seen = interp.InterpreterBuilder.create_dot, set()

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype != np.float32:
            return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        seen.add(input_precision.name)
        x, y = a.data, b.data
        xh, yh = tf32(x), tf32(y)
        if input_precision.name == "TF32":
            p = xh @ yh
        elif input_precision.name == "TF32x3":
            p = tf32(x - xh) @ yh + xh @ tf32(y - yh) + xh @ yh
        else:
            p = x @ y
        return interp.TensorHandle((p + d.data).astype(np.float32), d.dtype.scalar)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", dot)
    return seen


def test_tf32_emulation_rounds_as_ptx():
    """The shim's TF32 rounding: 10 mantissa bits kept, to nearest (ties away from zero), both signs."""
    import numpy as np
    one_ulp = 2.0 ** -10  # TF32's spacing at 1
    x = np.array([1 + 0.49 * one_ulp, 1 + 0.5 * one_ulp, 1 + 0.51 * one_ulp, -(1 + 0.5 * one_ulp), 3.0],
                 dtype=np.float32)
    assert tf32(x).tolist() == [1.0, 1 + one_ulp, 1 + one_ulp, -(1 + one_ulp), 3.0]


@pytest.mark.parametrize("precision,tol,expect", [("default", 1e-5, "below"), ("tf32", 1e-5, "above")])
def test_recurrence_in_float32_on_gpu_products(precision, tol, expect, gpu_products, monkeypatch):
    """The whole recurrence (generators and memory, MLP memories with momentum) with kernel=triton in float32,
    each product computed as on the GPU (the `gpu_products` emulation): within 1e-5 of the float64
    reference, outputs, final states and every gradient, with the kernels' 3xTF32 (measured: 5e-8 outputs, 8e-7
    worst gradient). Plain TF32 products are not: the same check fails with them (1e-4 outputs, 5e-4
    gradients), which is why `dot_precision` keeps 3xTF32."""
    from nl.ops import triton_dgd, triton_memory
    if precision == "tf32":
        for mod in (triton_dgd, triton_memory):
            monkeypatch.setattr(mod, "dot_precision", lambda dtype: "tf32")
    monkeypatch.setattr(test_hope_ops, "B", 1)
    monkeypatch.setattr(test_hope_ops, "H", 1)
    inputs = make_inputs("mlp", HOPE, ("q",), T=7, seed=5)
    kw = dict(chunk_size=4, memory_chunk_size=4, eta_max=0.8, momentum=True)
    o_ref, s_ref, g_ref = outputs_and_grads(titans_reference, inputs, RecurrenceConfig(**kw))
    z, static, states, readout = inputs
    f32 = lambda t: t.detach().float().requires_grad_()  # noqa: E731
    inputs32 = (f32(z), {k: f32(v) for k, v in static.items()},
                {k: tuple(f32(w) for w in m) for k, m in states.items()}, {k: f32(v) for k, v in readout.items()})
    o, s, g = outputs_and_grads(titans_chunked, inputs32, RecurrenceConfig(**kw, kernel="triton"))
    assert gpu_products == ({"TF32x3"} if precision == "default" else {"TF32"})
    errors = [rel(o.double(), o_ref), rel(s.double(), s_ref)] + [rel(a.double(), b) for a, b in zip(g, g_ref)
                                                                  if b is not None]
    assert len(errors) > 10 and (max(errors) < tol if expect == "below" else max(errors) > tol), errors
