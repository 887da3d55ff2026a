"""HOPE kernels: chunked == token-by-token reference (float64, outputs and gradients), chunk size 1
== the online recurrence written from HOPE_SPEC.md with autograd gradients, and the linear
memory's inner update == flash-linear-attention's gated delta rule (an outside oracle)."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nl.ops import delta_rule
from nl.ops import titans as titans_ops
from nl.ops.delta_rule import ChunkGates, ChunkLayer, _solve_unit_lower, memory_apply
from nl.ops.titans import RecurrenceConfig, titans_chunked, titans_reference

DT = torch.float64
B, H, D, HID = 2, 2, 4, 6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(memory_type: str, generators: tuple[str, ...], static: tuple[str, ...], T: int, seed: int = 0):
    """Random leaf tensors (requires_grad) for the recurrence: z, static, states, readout."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, dtype=DT)).requires_grad_()  # noqa: E731
    states = {}
    for name in (*generators, "memory"):
        if memory_type == "linear":
            states[name] = ((torch.eye(D, dtype=DT) + 0.3 * torch.randn(H, D, D, generator=g, dtype=DT))
                            .requires_grad_(),)
        else:
            states[name] = (rnd(H, D, HID, scale=0.3), rnd(H, HID, D, scale=0.5))
    readout = {f"{p}_{n}": rnd(H, D, scale=0.5) if p == "w" else rnd(H)
               for p in "wb" for n in ("eta", "alpha", "mu")}
    st = {n: rnd(B, H, T, D) for n in static if n in ("q", "k", "v")}
    st.update({n: rnd(B, H, T) for n in static if n in ("eta", "alpha", "mu")})
    z = rnd(B, H, T, D) if generators else None
    return z, st, states, readout


def leaves(z, static, states, readout) -> list[torch.Tensor]:
    out = [] if z is None else [z]
    out += list(static.values()) + [w for m in states.values() for w in m] + list(readout.values())
    return [t for t in out if t.requires_grad]


def outputs_and_grads(fn, inputs, cfg: RecurrenceConfig):
    o, state = fn(*inputs, cfg)
    final = torch.cat([w.flatten() for m in state.cur.values() for w in m])
    g = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=g, dtype=DT)).sum() + (final * torch.randn(
        final.shape, generator=g, dtype=DT)).sum()
    params = leaves(*inputs)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return o, final, list(grads)  # None: an input this configuration does not use


def check_equal(inputs, cfg: RecurrenceConfig, tol: float = 1e-6) -> None:
    o_ref, s_ref, g_ref = outputs_and_grads(titans_reference, inputs, cfg)
    o_chk, s_chk, g_chk = outputs_and_grads(titans_chunked, inputs, cfg)
    assert rel(o_chk, o_ref) < tol, rel(o_chk, o_ref)
    assert rel(s_chk, s_ref) < tol, rel(s_chk, s_ref)
    assert [a is None for a in g_chk] == [b is None for b in g_ref]
    assert sum(b is not None for b in g_ref) >= len(g_ref) - 6  # only readouts of unused gates
    for i, (a, b) in enumerate(zip(g_chk, g_ref)):
        if b is None:
            continue
        assert b.abs().sum() > 0, f"gradient {i} is zero: the test would not see an error"
        assert rel(a, b) < tol, (i, rel(a, b))


HOPE = ("k", "v", "eta", "alpha")


@pytest.mark.parametrize("memory_type", ["linear", "mlp"])
@pytest.mark.parametrize("chunk", [1, 2, 4, 8, 16])
def test_chunked_equals_reference_hope(memory_type, chunk):
    """Default HOPE mixer (DGD + momentum + retention), T = 19 not divisible by any chunk > 1,
    generator and memory chunk sizes different."""
    inputs = make_inputs(memory_type, HOPE, ("q",), T=19)
    cfg = RecurrenceConfig(chunk_size=chunk, memory_chunk_size=max(1, chunk // 2) if chunk != 4 else 8,
                           eta_max=0.8, dgd=True, momentum=True, retention=True)
    check_equal(inputs, cfg)


@pytest.mark.parametrize("dgd,momentum,retention", [(True, False, True), (False, True, True),
                                                    (False, False, True), (True, True, False)])
@pytest.mark.parametrize("memory_type", ["linear", "mlp"])
def test_chunked_equals_reference_switches(dgd, momentum, retention, memory_type):
    gens = HOPE if retention else ("k", "v", "eta")
    inputs = make_inputs(memory_type, gens, ("q",), T=13, seed=2)
    check_equal(inputs, RecurrenceConfig(4, 3, 0.8, dgd, momentum, retention))


@pytest.mark.parametrize("generators,static", [
    (("q", "k", "v", "eta", "alpha"), ()),                 # adaptive q
    (("v", "eta", "alpha"), ("q", "k")),                   # static k
    (("k", "eta", "alpha"), ("q", "v")),                   # static v
    ((), ("q", "k", "v", "eta", "alpha", "mu")),           # Titans baseline: all static
])
def test_chunked_equals_reference_generator_sets(generators, static):
    inputs = make_inputs("mlp", generators, static, T=11, seed=3)
    check_equal(inputs, RecurrenceConfig(4, 2, 0.8, dgd=not static[3:], momentum=True, retention=True))


LITERAL = dict(retention_target="zero", normalized_step=False, normalize_v=False)  # Eq. 88 as printed


def online_recurrence(z, static, states, readout, cfg: RecurrenceConfig, literal: bool = True) -> torch.Tensor:
    """HOPE_SPEC.md section 2 as a fully online loop, gradients of 1/2 ||M(k) - vhat||^2 by autograd.

    literal: Eq. 88 as printed. Otherwise docs/HOPE.md's memory-health form: v L2-normalised before it
    makes the targets; the MLP hidden layer's step normalised by its input (h -> h / ||h|| in the
    decay, the gradient divided by ||h||^2: normalised LMS) and both layers' gradients divided by
    1 + ||J||_F^2, J the Jacobian of W1 silu(a) in a = W2 k; retention and decay act on W - W_0.
    Independent of nl.ops except memory_apply (M(z) = W z or z + W1 silu(W2 z))."""
    T = z.shape[2]
    unit = lambda x: x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)  # noqa: E731  (l2norm, eps 1e-6)
    cur = {n: [w.detach().expand(B, *w.shape).clone() for w in m] for n, m in states.items()}
    mom = {n: [torch.zeros_like(w) for w in m] for n, m in cur.items()}
    ro = {k: v.detach() for k, v in readout.items()}
    outs = []
    for t in range(T):
        zt = z[:, :, t:t + 1].detach()
        gen = {n: memory_apply(tuple(cur[n]), zt) for n in cur if n != "memory"}
        k = unit(gen["k"])
        v = gen["v"] if literal else unit(gen["v"])
        q = unit(static["q"][:, :, t:t + 1].detach())
        eta = cfg.eta_max * torch.sigmoid((gen["eta"] * ro["w_eta"][:, None]).sum(-1) + ro["b_eta"][:, None])
        alpha = torch.sigmoid((gen["alpha"] * ro["w_alpha"][:, None]).sum(-1) + ro["b_alpha"][:, None])
        mu = torch.sigmoid((gen["eta"] * ro["w_mu"][:, None]).sum(-1) + ro["b_mu"][:, None])
        eta, alpha, mu = (s[..., None, None] for s in (eta[..., 0], alpha[..., 0], mu[..., 0]))
        outs.append(memory_apply(tuple(cur["memory"]), q))
        for n, layers in cur.items():
            target = memory_apply(tuple(layers), v)
            loss = lambda ws: 0.5 * (memory_apply(tuple(ws), k) - target).pow(2).sum()  # noqa: E731
            grads = torch.func.grad(loss)(layers)
            if not literal and len(layers) == 2:  # normalised LMS over the whole MLP: / (1 + ||J||_F^2)
                pre = (k @ layers[1].mT).detach().requires_grad_()
                (dsilu,) = torch.autograd.grad(F.silu(pre).sum(), pre)  # silu'(W2 k) by autograd
                J = layers[0].detach()[..., None, :, :] * dsilu[..., None, :]  # d(W1 silu(a))/da = W1 diag(silu'(a))
                scale = 1 / (1 + J.pow(2).sum((-2, -1)))  # a step-size normaliser: no outer gradient
                grads = tuple(gr * scale[..., None] for gr in grads)
            # Layer inputs: k for W (linear) or W2; h = silu(W2 k) for W1.
            xs = [k] if len(layers) == 1 else [F.silu(k @ layers[1].mT), k]
            new = []
            for i, (W, x, gr) in enumerate(zip(layers, xs, grads)):
                x = x[..., 0, :]
                W0 = 0.0
                if not literal:
                    W0 = states[n][i].detach()
                    if len(layers) == 2 and i == 0:  # the MLP's hidden input h (k is unit already)
                        norm = torch.clamp(torch.sqrt(x.pow(2).sum(-1)), min=1e-6)[..., None]
                        x, gr = x / norm, gr / norm[..., None] ** 2
                mom[n][i] = mu * mom[n][i] - eta * gr
                decay = alpha * torch.eye(W.shape[-1], dtype=DT) - eta * x[..., :, None] * x[..., None, :]
                new.append(W0 + (W - W0) @ decay + mom[n][i])
            cur[n] = new
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("literal", [True, False])
@pytest.mark.parametrize("memory_type", ["linear", "mlp"])
def test_chunk_size_one_is_the_online_recurrence(memory_type, literal):
    inputs = make_inputs(memory_type, HOPE, ("q",), T=9, seed=4)
    form = LITERAL if literal else {}
    cfg = RecurrenceConfig(1, 1, 0.8, dgd=True, momentum=True, retention=True, **form)
    expected = online_recurrence(*inputs, cfg, literal)
    with torch.no_grad():
        o, _ = titans_chunked(*inputs, cfg)
    assert rel(o, expected) < 1e-10
    # ... and chunk size 2, or the other form, is a different recurrence (the test can tell them apart).
    with torch.no_grad():
        o2, _ = titans_chunked(*inputs, RecurrenceConfig(2, 2, 0.8, True, True, True, **form))
        o3, _ = titans_chunked(*inputs, RecurrenceConfig(1, 1, 0.8, True, True, True, **({} if literal else LITERAL)))
    assert rel(o2, expected) > 1e-6 and rel(o3, expected) > 1e-6


@pytest.mark.parametrize("memory_type", ["linear", "mlp"])
@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("literal", [True, False])
def test_chunked_equals_reference_both_forms_and_reads(memory_type, chunk, literal):
    """Each chunk read (in_chunk, anchor) and each form (literal Eq. 88, memory-health) equals its own
    token-by-token reference, outputs, final state and every gradient."""
    inputs = make_inputs(memory_type, HOPE, ("q",), T=13, seed=9)
    for read in ("in_chunk", "anchor"):
        form = LITERAL if literal else {}
        check_equal(inputs, RecurrenceConfig(chunk, chunk, 0.3, True, True, True, chunk_read=read, **form))


def test_anchor_read_is_the_anchor_state_applied_to_q():
    """Eq. 90 read literally: o_t = M_anchor(q_t), the memory as it was at the end of the previous chunk;
    written here with the state trajectory of the in-chunk run (which the anchor read must not see)."""
    inputs = make_inputs("mlp", HOPE, ("q",), T=12, seed=10)
    z, static, states, readout = inputs
    C = 4
    with torch.no_grad():
        o, _ = titans_chunked(*inputs, RecurrenceConfig(C, C, 0.3, True, False, True, chunk_read="anchor"))
        q = F.normalize(static["q"], dim=-1, eps=0) * (static["q"].pow(2).sum(-1, keepdim=True) /
                                                      (static["q"].pow(2).sum(-1, keepdim=True) + 1e-6)).sqrt()
        expected = [memory_apply(states["memory"], q[:, :, :C])]
        for c0 in range(C, 12, C):  # the anchor of chunk c0 is the state after token c0 of a run of c0 tokens
            _, st = titans_chunked(z[:, :, :c0], {"q": static["q"][:, :, :c0]}, states, readout,
                                   RecurrenceConfig(C, C, 0.3, True, False, True))
            expected.append(memory_apply(st.cur["memory"], q[:, :, c0:c0 + C]))
    assert rel(o, torch.cat(expected, dim=2)) < 1e-12
    with torch.no_grad():
        o_in, _ = titans_chunked(*inputs, RecurrenceConfig(C, C, 0.3, True, False, True))
    assert rel(o_in, o) > 1e-3  # the two readings differ


@pytest.mark.parametrize("memory_type", ["linear", "mlp"])
def test_titans_baseline_is_titans_eqs_11_12(memory_type):
    """mixer=titans regresses M(k_t) onto v_t (Titans, arXiv 2501.00663, Eqs. 11-12), with momentum and
    forgetting, written here from those equations (float64, chunk size 1, gradients by autograd):
        S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; x_t),  M_t = (1 - a_t) M_{t-1} + S_t,
        l = 1/2 ||M(k_t) - v_t||^2,  o_t = M_{t-1}(q_t) (read before write)
    with our names eta_t -> mu_t (momentum), theta_t -> eta_t (step), 1 - a_t -> alpha_t (retention)."""
    inputs = make_inputs(memory_type, (), ("q", "k", "v", "eta", "alpha", "mu"), T=10, seed=11)
    z, static, states, readout = inputs
    cfg = RecurrenceConfig(1, 1, 0.8, dgd=False, momentum=True, retention=True, retention_target="zero",
                           target="value", normalized_step=False)
    with torch.no_grad():
        o, _ = titans_chunked(*inputs, cfg)
    unit = lambda x: x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    M = [w.detach().expand(B, *w.shape).clone() for w in states["memory"]]
    S = [torch.zeros_like(w) for w in M]
    outs = []
    for t in range(10):
        q, k = unit(static["q"][:, :, t:t + 1].detach()), unit(static["k"][:, :, t:t + 1].detach())
        v = static["v"][:, :, t:t + 1].detach()
        theta = 0.8 * torch.sigmoid(static["eta"][:, :, t].detach())[..., None, None]
        keep = torch.sigmoid(static["alpha"][:, :, t].detach())[..., None, None]     # 1 - a_t
        surprise_decay = torch.sigmoid(static["mu"][:, :, t].detach())[..., None, None]
        outs.append(memory_apply(tuple(M), q))
        grads = torch.func.grad(lambda ws: 0.5 * (memory_apply(tuple(ws), k) - v).pow(2).sum())(M)
        S = [surprise_decay * s - theta * g for s, g in zip(S, grads)]
        M = [keep * m + s for m, s in zip(M, S)]
    assert rel(o, torch.cat(outs, dim=2)) < 1e-10
    # The self-referential target M(v) (the old baseline) is a different model.
    with torch.no_grad():
        o_self, _ = titans_chunked(*inputs, RecurrenceConfig(1, 1, 0.8, False, True, True, retention_target="zero"))
    assert rel(o_self, o) > 1e-3


# ------------------------------------------------------------ outside oracle: fla ----------

def load_fla_naive() -> types.ModuleType:
    """fla-core's pure-PyTorch gated delta rule, loaded by file path (fla's package __init__ imports
    Triton). Its functions cast to float32; they run in float64 here by giving the module a `torch`
    whose float32 is float64."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla-core is not installed (pip install fla-core==0.6.0)")
    path = Path(spec.submodule_search_locations[0]) / "ops" / "gated_delta_rule" / "naive.py"
    if not path.is_file():
        pytest.skip(f"{path} not found: this fla-core version has no naive gated delta rule")
    module_spec = importlib.util.spec_from_file_location("fla_gated_delta_rule_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    shim = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch) if not n.startswith("__")})
    shim.float32 = torch.float64
    module.torch = shim
    return module


@pytest.mark.parametrize("chunk", [1, 4, 7, 32])
def test_linear_memory_update_is_fla_gated_delta_rule(chunk):
    """S_t = S_{t-1}(alpha I - eta k k^T) - eta (S_A k - vhat) k^T is fla's
    S_t = a S_{t-1}(I - beta k k^T) + beta v' k^T with a = alpha, beta = eta / alpha,
    v' = alpha (vhat - S_A k); fla reads after the write, we before: our o_{t+1} = fla's o_t
    with fla's query at t set to q_{t+1}."""
    naive = load_fla_naive()
    g = torch.Generator().manual_seed(5)
    T = 21
    q = F.normalize(torch.randn(B, H, T, D, generator=g, dtype=DT), dim=-1)
    k = F.normalize(torch.randn(B, H, T, D, generator=g, dtype=DT), dim=-1)
    vhat = torch.randn(B, H, T, D, generator=g, dtype=DT)
    eta = 0.9 * torch.rand(B, H, T, generator=g, dtype=DT)
    alpha = 0.5 + 0.5 * torch.rand(B, H, T, generator=g, dtype=DT)
    S = torch.randn(B, H, D, D, generator=g, dtype=DT)

    ours, fla_out, S_fla = [], [], S
    for c0 in range(0, T, chunk):
        sl = slice(c0, c0 + chunk)
        kc, qc = k[:, :, sl], q[:, :, sl]
        gates = ChunkGates(alpha[..., sl].log(), eta[..., sl], None)
        layer = ChunkLayer(S, None, kc, memory_apply((S,), kc) - vhat[:, :, sl], gates, dgd=True)
        ours.append(layer.read(qc))
        S, _ = layer.end_state()
        # fla on the same chunk from its own state (state layout [K, V] = our S^T, [B, T, H, ...]).
        vprime = alpha[..., sl, None] * (vhat[:, :, sl] - kc @ S_fla.mT)
        q_next = q[:, :, c0 + 1:c0 + chunk + 1]
        q_next = torch.cat([q_next, torch.zeros_like(qc[:, :, : qc.shape[2] - q_next.shape[2]])], dim=2)
        o, h = naive.naive_recurrent_gated_delta_rule(
            q_next.transpose(1, 2), kc.transpose(1, 2), vprime.transpose(1, 2),
            (eta[..., sl] / alpha[..., sl]).transpose(1, 2), alpha[..., sl].log().transpose(1, 2),
            scale=1.0, initial_state=S_fla.mT, output_final_state=True)
        assert o.dtype == DT
        fla_out.append(o.transpose(1, 2))
        S_fla = h.mT
    ours, fla_out = torch.cat(ours, dim=2), torch.cat(fla_out, dim=2)
    assert rel(ours[:, :, 1:], fla_out[:, :, :-1]) < 1e-10
    assert rel(S, S_fla) < 1e-10


@pytest.mark.parametrize("n", [1, 7, 16, 17, 33, 64, 100])
def test_unit_lower_solve_equals_lapack_in_value_and_gradient(n, monkeypatch):
    """The blocked explicit inverse (halves down to 16) and its closed-form backward against LAPACK's
    triangular solve with autograd, float64, for sizes that split evenly, oddly and not at all;
    A broadcast along a batch dim of B (folded into columns) and not. The inverse is forced (these
    small solves would otherwise go to LAPACK)."""
    monkeypatch.setattr(delta_rule, "INVERSE_MIN_WORK", 0)
    g = torch.Generator().manual_seed(n)
    for a_shape, b_shape in [((2, 3, n, n), (2, 3, n, 5)), ((2, 1, n, n), (2, 4, n, 3))]:
        A = (torch.randn(*a_shape, generator=g, dtype=DT) / n ** 0.5).tril(-1).requires_grad_()
        Bm = torch.randn(*b_shape, generator=g, dtype=DT).requires_grad_()
        w = torch.randn(torch.broadcast_shapes(a_shape[:-1] + (1,), b_shape), generator=g, dtype=DT)
        eye = torch.eye(n, dtype=DT)
        ref = torch.linalg.solve_triangular(A + eye, Bm, upper=False, unitriangular=True)
        ours = _solve_unit_lower(A, Bm)
        assert rel(ours, ref) < 1e-12
        g_ref = torch.autograd.grad((ref * w).sum(), (A, Bm))
        g_ours = torch.autograd.grad((ours * w).sum(), (A, Bm))
        for a, b in zip(g_ours, g_ref):
            assert rel(a, b.tril(-1) if b.shape == A.shape else b) < 1e-12


@pytest.mark.parametrize("memory_type", ["linear", "mlp"])
@pytest.mark.parametrize("solve", ["inverse", "lapack"])
def test_chunks_longer_than_the_inverse_block_equal_reference(memory_type, solve, monkeypatch):
    """Chunks of 40 and 24 tokens (T=45: one full and one partial chunk) take the blocked inverse's
    recursive path, which the small chunks above never reach; and the same through LAPACK."""
    monkeypatch.setattr(delta_rule, "INVERSE_MIN_WORK", 0 if solve == "inverse" else 10 ** 9)
    inputs = make_inputs(memory_type, HOPE, ("q",), T=45, seed=8)
    check_equal(inputs, RecurrenceConfig(24, 40, 0.8, True, True, True))


@pytest.mark.parametrize("memory_type", ["linear", "mlp"])
def test_recomputed_chunks_give_the_same_outputs_and_gradients(memory_type):
    """recompute=True (activation checkpointing per chunk) against the reference."""
    inputs = make_inputs(memory_type, HOPE, ("q",), T=19, seed=6)
    check_equal(inputs, RecurrenceConfig(4, 8, 0.8, True, True, True, recompute=True))


@pytest.mark.parametrize("solve", ["inverse", "lapack"])
def test_chunked_path_compiles_into_one_graph_forward_and_backward(solve, monkeypatch):
    """Compile-friendly (issues 8 and 14): under torch.compile the chunk loop stays in Python and each
    chunk body (chunk recompute included) is compiled with fullgraph=True, so a graph break or a
    data-dependent host read (.item(), tensor-valued if) inside a chunk, forward or backward, is an
    error; AOTAutograd's backward graph gives the eager gradients. backend aot_eager: no C++
    compiler needed on CPU. Both solves: the explicit inverse's autograd.Function and LAPACK's."""
    monkeypatch.setattr(delta_rule, "INVERSE_MIN_WORK", 0 if solve == "inverse" else 10 ** 9)
    monkeypatch.setattr(titans_ops, "CHUNK_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(titans_ops, "_compiled_chunks", {})
    inputs = make_inputs("mlp", HOPE, ("q",), T=9, seed=7)
    cfg = RecurrenceConfig(3, 6, 0.8, True, True, True, recompute=True)

    def run(z, static, states, readout):
        o, state = titans_chunked(z, static, states, readout, cfg)
        return o, torch.cat([w.flatten() for w in state.cur["memory"]])

    torch._dynamo.reset()
    compiled = torch.compile(run, backend="aot_eager", dynamic=False)
    params = leaves(*inputs)
    results = []
    for fn in (compiled, run):
        o, final = fn(*inputs)
        grads = torch.autograd.grad(o.pow(2).sum() + final.sum(), params, allow_unused=True)
        results.append((o, final, grads))
    (o_c, s_c, g_c), (o_e, s_e, g_e) = results
    assert "aot_eager" in titans_ops._compiled_chunks  # the compiled run took the compiled chunk bodies
    assert rel(o_c, o_e) < 1e-12 and rel(s_c, s_e) < 1e-12
    assert all((a is None) == (b is None) for a, b in zip(g_c, g_e))
    assert all(rel(a, b) < 1e-12 for a, b in zip(g_c, g_e) if b is not None)


def _chunk_op_counts(cfg: RecurrenceConfig, T: int) -> tuple[int, int]:
    """Forward of titans_chunked (MLP memories, generators k v eta alpha): (matrix products, elementwise
    ops whose output has a memory layer's shape [..., D, HID] or [..., HID, D])."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.mm = self.weight_sized = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            self.mm += name in ("mm", "bmm")
            if name in ("add", "sub", "mul", "addcmul", "lerp") and isinstance(out, torch.Tensor) \
                    and tuple(out.shape[-2:]) in ((D, HID), (HID, D)):
                self.weight_sized += 1
            return out

    inputs = make_inputs("mlp", ("k", "v", "eta", "alpha"), ("q",), T=T)
    with torch.no_grad(), Count() as c:
        titans_chunked(*inputs, cfg)
    return c.mm, c.weight_sized


def test_memory_health_form_costs_one_deviation_product_per_layer_and_chunk():
    """Performance budget of the default (memory-health) form against the literal Eq. 88 (issue 11): per
    chunk of both loops it adds DGD's product of each layer's deviation with its inputs and the read-out
    memory's M_0 read of the hidden layer (k M_0^T and q M_0^T are formed once per sequence), i.e. 4
    matrix products, plus the whole-MLP normalised step's ||J||_F^2 (one [C, hidden] x [hidden] product
    per loop: 2), and one memory-sized pass per layer (the anchor M_0 + (S - M_0)): S - M_0 is never
    formed per chunk and M_0 is never added back to an end state."""
    literal = RecurrenceConfig(3, 3, 0.3, True, False, True, retention_target="zero", normalized_step=False,
                               normalize_v=False)
    health = RecurrenceConfig(3, 3, 0.3, True, False, True)
    per_chunk = {}
    for name, cfg in (("literal", literal), ("health", health)):
        (mm2, w2), (mm4, w4) = _chunk_op_counts(cfg, 6), _chunk_op_counts(cfg, 12)  # 2 and 4 chunks
        per_chunk[name] = ((mm4 - mm2) / 2, (w4 - w2) / 2)
    extra_mm = per_chunk["health"][0] - per_chunk["literal"][0]
    extra_weight_sized = per_chunk["health"][1] - per_chunk["literal"][1]
    assert extra_mm <= 4 + 2, per_chunk
    assert extra_weight_sized <= 2 * 2, per_chunk  # 2 layers in each of the 2 loops (generators, memory)


def test_times_silu_grad_is_a_times_the_silu_derivative_with_its_gradients():
    """The fused a * silu'(p) of the MLP memory's gradient factor (one kernel forward, closed-form backward)
    against silu' and silu'' taken by autograd from F.silu, float64, values and both input gradients; a and p
    of different broadcastable shapes."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 1, 5, 7, generator=g, dtype=DT).requires_grad_()
    p = (3 * torch.randn(2, 4, 5, 7, generator=g, dtype=DT)).requires_grad_()
    w = torch.randn(2, 4, 5, 7, generator=g, dtype=DT)
    d_silu = torch.autograd.grad(F.silu(p).sum(), p, create_graph=True)[0]  # silu'(p), differentiable again
    ref = a * d_silu
    ours = delta_rule.times_silu_grad(a, p)
    assert rel(ours, ref) < 1e-14
    g_ref = torch.autograd.grad((ref * w).sum(), (a, p))
    g_ours = torch.autograd.grad((ours * w).sum(), (a, p))
    assert all(rel(x, y) < 1e-13 for x, y in zip(g_ours, g_ref))


def _chunk_elementwise_ops(cfg: RecurrenceConfig, T: int) -> int:
    """Forward and backward of titans_chunked (MLP memories, generators k v eta alpha): the elementwise
    ops (aten add, sub, mul, div, neg, addcmul, sigmoid, silu and their backward kernels) it runs on
    hidden-layer-sized tensors (HID in the output's last two dims: where the cost is)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    elementwise = {"add", "sub", "mul", "div", "neg", "rsub", "addcmul", "sigmoid", "silu", "silu_backward",
                   "sigmoid_backward"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Count.n += func.overloadpacket.__name__ in elementwise and HID in tuple(out.shape[-2:])
            return out

    z, static, states, readout = make_inputs("mlp", ("k", "v", "eta", "alpha"), ("q",), T=T)
    with Count():
        o, _ = titans_chunked(z, static, states, readout, cfg)
        torch.autograd.grad(o.pow(2).sum(), leaves(z, static, states, readout), allow_unused=True)
    return Count.n


def test_chunk_form_elementwise_op_budget():
    """Speed of the default form (issue 11's 5% budget, docs/BENCHMARKS.md "Memory-health form"): per chunk of
    both loops, forward and backward, the chunk form runs at most 144 elementwise ops on hidden-layer-sized
    tensors (154 before: the silu derivative of the gradient factor is one fused kernel with a closed-form
    backward, the scaled adds of the chunk step are addcmul: 138; the whole-MLP normalised step adds 6, its
    silu' and the scaling of W2's gradient factor per loop, with no backward through its divisor)."""
    cfg = RecurrenceConfig(3, 3, 0.3, True, False, True)
    per_chunk = (_chunk_elementwise_ops(cfg, 12) - _chunk_elementwise_ops(cfg, 6)) / 2
    assert per_chunk <= 144, per_chunk
