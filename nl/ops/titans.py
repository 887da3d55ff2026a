"""Self-modifying Titans recurrence (HOPE_SPEC.md section 2): token-by-token reference and chunked form.

Per head, on d-dimensional vectors. Inner memories (each a `delta_rule` memory state):
generators g in {q, k, v, eta, alpha} (any subset; the rest come in `static`) and `memory`.
At token t, with A_c the ANCHOR of memory c (its state at the end of the previous chunk;
chunk size `chunk_size` for the generators, `memory_chunk_size` for `memory`):

    q_t = l2norm(A_q(z_t) or static q_t)          k_t = l2norm(A_k(z_t) or static k_t)
    v_t = A_v(z_t) or static v_t
    eta_t   = eta_max * sigmoid(w_eta . A_eta(z_t) + b_eta)          (or a static logit)
    alpha_t = sigmoid(w_alpha . A_alpha(z_t) + b_alpha)              (1 without retention)
    mu_t    = momentum_max * sigmoid(w_mu . A_eta(z_t) + b_mu)       (momentum only)
    o_t     = M_{memory, t-1}(q_t)                                   (read before write)
    for every memory c:  vhat_c = A_c(v_t);  L_c = 1/2 ||M_c(k_t) - vhat_c||^2 with its gradient
        at A_c; every layer of M_c takes one `delta_rule` step (DGD, decays token by token).

RecurrenceConfig's memory-health switches (docs/HOPE.md) change this as follows: normalize_v uses
l2norm(v_t) for the targets; normalized_step feeds the MLP's hidden layer h / ||h|| to the decay and
g h^T / ||h||^2 as the gradient term (k is unit already); retention_target="init" applies retention and decay to
M - M_0; target="value" (Titans) regresses onto v_t itself; chunk_read="anchor" reads A_memory(q_t).

Chunk size 1 makes every anchor the previous state: the fully online recurrence.
`titans_reference` runs this loop token by token; `titans_chunked` runs the same math with a
loop over chunks only (the generators' chunks first, then the memory's chunks with reads).
Both return (o [B, H, T, d], RecurrentState), and `titans_step` (one token) continues from
a RecurrentState: that is the decoding path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from nl.ops.delta_rule import (KERNELS, ChunkGates, chunk_layer, dgd_step, input_norm, memory_apply,
                              memory_grad_factors, resolve_kernel)
from nl.ops.fla_dispatch import titans_memory_fla, use_fla

GENERATORS = ("q", "k", "v", "eta", "alpha")

Memory = tuple[torch.Tensor, ...]


RETENTION_TARGETS = ("init", "zero")
CHUNK_READS = ("in_chunk", "anchor")
TARGETS = ("self", "value")


@dataclass(frozen=True)
class RecurrenceConfig:
    chunk_size: int = 64         # generators (q, k, v, eta, alpha)
    memory_chunk_size: int = 64  # the read-out memory
    eta_max: float = 1.0
    dgd: bool = True             # DGD's x x^T decay term (False: plain gradient step)
    momentum: bool = False       # inner momentum P_t = mu_t P_{t-1} - eta_t grad
    retention: bool = True       # alpha gate (False: alpha = 1)
    # Recompute each chunk's intermediates in the backward pass (torch.utils.checkpoint, non-
    # reentrant) instead of storing them: activation memory per chunk drops from ~30 [C, hidden]
    # tensors per memory to the chunk's input state, for ~1/3 more compute.
    recompute: bool = False
    # Memory health (docs/HOPE.md "Memories that live"). "init": retention and DGD's x x^T decay act
    # on the deviation M - M_0 from the meta-learned initial state (a memory forgets back to M_0);
    # "zero": Eq. 88 literally (with self-generated targets zero is absorbing: the memories fade).
    retention_target: str = "init"
    # Normalised step (normalised LMS) per layer: the layer input enters as x / ||x|| in DGD's decay and
    # in the gradient term, g x^T / ||x||^2, so the step changes the layer's output on x by -eta g whatever
    # ||x|| is (Eq. 57 assumes ||x|| = 1; k is unit, the MLP's hidden h = silu(W2 k) is not). False: as is.
    normalized_step: bool = True
    # L2-normalise v before it makes the self-generated targets M_c(v), as q and k are: with a unit k and
    # v, the self-referential step is contractive for eta_max <= `contractive_eta_max` (docs/HOPE.md).
    normalize_v: bool = True
    # "self": vhat_c = M_c(v) (HOPE, each memory makes its own target); "value": vhat = v (Titans Eqs. 11-12).
    target: str = "self"
    # Read inside a chunk: "in_chunk" = the anchor plus the in-chunk updates up to t-1; "anchor" = the
    # anchor alone, like every other chunk quantity (Eq. 90 literally).
    chunk_read: str = "in_chunk"
    # The chunk step of each memory layer: torch (`delta_rule.ChunkLayer`) | triton (one fused kernel per layer
    # and chunk, nl/ops/triton_dgd.py) | auto (triton on CUDA tensors when Triton imports).
    kernel: str = "torch"
    # mu_t = momentum_max * sigmoid(.): a cap < 1 keeps the gradient-step form (dgd=False) contractive at chunk
    # sizes > 1, where every gradient of a chunk is taken at its anchor (`contractive_eta_max`, docs/HOPE.md).
    momentum_max: float = 1.0

    def __post_init__(self) -> None:
        for key, allowed in (("retention_target", RETENTION_TARGETS), ("chunk_read", CHUNK_READS),
                             ("target", TARGETS), ("kernel", KERNELS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r}: expected one of {allowed}")
        if not 0 < self.momentum_max <= 1:
            raise ValueError(f"momentum_max={self.momentum_max}: expected a value in (0, 1]")


@dataclass
class RecurrentState:
    """Everything the recurrence carries from token to token (constant size in the sequence length).

    pos: tokens consumed; cur / anchor / mom: per memory name, the current layers, the anchor
    (state at the last chunk boundary) and the momentum (None without momentum); init: the initial
    states M_0 (outer parameters; retention_target="init" decays toward them); stats: detached
    diagnostics of the last forward (mean eta and alpha; with trace, per-chunk-end memory norms)."""

    pos: int
    cur: dict[str, Memory]
    anchor: dict[str, Memory]
    mom: dict[str, Memory | None]
    init: dict[str, Memory] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def memory_norm(layers: Memory) -> torch.Tensor:
    """Frobenius norm of a memory over all its layers: [..., O, I] layers -> [...]."""
    return torch.sqrt(sum(w.pow(2).sum((-2, -1)) for w in layers))


def initial_state(states: dict[str, Memory], cfg: RecurrenceConfig) -> RecurrentState:
    mom = {n: tuple(torch.zeros_like(w) for w in m) if cfg.momentum else None for n, m in states.items()}
    return RecurrentState(0, dict(states), dict(states), mom, dict(states))


def _derive(gen: dict[str, torch.Tensor], static: dict[str, torch.Tensor], readout: dict[str, torch.Tensor],
            cfg: RecurrenceConfig):
    """q, k, v [B, H, N, d] and eta, log_alpha, log_mu [B, H, N] from generator outputs or static inputs.
    kernel=triton (auto on CUDA): the l2norms and the generated gates are one fused kernel each
    (`nl.ops.triton_gates`), the same functions."""
    q_in = gen["q"] if "q" in gen else static["q"]
    fused = resolve_kernel(cfg.kernel, q_in) == "triton"
    if fused:
        from nl.ops import triton_gates
    norm = (lambda x: triton_gates.l2norm(x, 1e-6)) if fused else l2norm

    def gate(name: str, source: str, log: bool, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        """scale * sigmoid(logit), or logsigmoid(logit) + offset (log); the logit w . A(z) + b from the generator
        `source` (w [H, d], b [H] against [B, H, N, d]), or given in static."""
        if source in gen and fused:
            return triton_gates.gate(gen[source], readout[f"w_{name}"][:, None, :], readout[f"b_{name}"][:, None],
                                     "logsigmoid" if log else "sigmoid", scale, offset)
        if source in gen:
            z = (gen[source] * readout[f"w_{name}"][:, None, :]).sum(-1) + readout[f"b_{name}"][:, None]
        else:
            z = static[name]
        if not log:
            return scale * torch.sigmoid(z)
        return F.logsigmoid(z) + offset if offset else F.logsigmoid(z)

    q = norm(q_in)
    k = norm(gen["k"] if "k" in gen else static["k"])
    v = gen["v"] if "v" in gen else static["v"]
    if cfg.normalize_v and cfg.target == "self":
        v = norm(v)
    eta = gate("eta", "eta", False, scale=cfg.eta_max)
    log_alpha = gate("alpha", "alpha", True) if cfg.retention else torch.zeros_like(eta)
    log_mu = gate("mu", "eta", True, offset=math.log(cfg.momentum_max)) if cfg.momentum else None
    return q, k, v, eta, log_alpha, log_mu


def _packed_readout(readout: dict[str, torch.Tensor], gen_names: list[str], z: torch.Tensor,
                    cfg: RecurrenceConfig) -> torch.Tensor | None:
    """The gates' readout packed for `triton_gates.qkv_gates`, [H, 3, d + 1] (w | b of eta, alpha, mu; zeros for
    a gate the config does not use), formed once per sequence; None where that kernel does not apply (kernel
    torch, or eta, or with retention alpha, not generated: `_derive` then runs per quantity)."""
    if resolve_kernel(cfg.kernel, z) != "triton" or "eta" not in gen_names or (
            cfg.retention and "alpha" not in gen_names):
        return None
    w_eta = readout["w_eta"]
    rows = []
    for name in ("eta", "alpha", "mu"):
        if f"w_{name}" in readout and (name != "mu" or cfg.momentum):
            rows.append(torch.cat([readout[f"w_{name}"], readout[f"b_{name}"][:, None]], dim=-1))
        else:
            rows.append(w_eta.new_zeros(w_eta.shape[0], w_eta.shape[1] + 1))
    return torch.stack(rows, dim=1)


def _chunk_of(name: str, cfg: RecurrenceConfig) -> int:
    return cfg.memory_chunk_size if name == "memory" else cfg.chunk_size


def _reads_hidden(i: int, layers: Memory) -> bool:
    """Layer i of an MLP memory (W1, W2) reads the hidden h = silu(W2 k), the only layer input that is not
    an L2-normalised k: the normalised step applies to it alone (to k it would be a no-op)."""
    return len(layers) == 2 and i == 0


def _apply(A: Memory, z: torch.Tensor, cfg: RecurrenceConfig) -> torch.Tensor:
    """M(z) (`memory_apply`); kernel=triton (auto on CUDA), MLP memory: one fused kernel (`triton_memory.mlp_apply`)."""
    if len(A) == 2 and resolve_kernel(cfg.kernel, z) == "triton":
        from nl.ops.triton_memory import mlp_apply
        return mlp_apply(A[0], A[1], z)
    return memory_apply(A, z)


def _target(A: Memory, v: torch.Tensor, cfg: RecurrenceConfig) -> torch.Tensor:
    return memory_apply(A, v) if cfg.target == "self" else v


def _grad_factors(A: Memory, k: torch.Tensor, v: torch.Tensor, cfg: RecurrenceConfig):
    """`memory_grad_factors` of memory A at k against its target; with normalized_step, an MLP's gradient factors
    are divided by 1 + ||J||_F^2, J = W1 diag(silu'(W2 k)) [..., N, d, hidden] the output's Jacobian in the
    hidden pre-activation (normalised LMS over the whole memory, docs/HOPE.md): the hidden layer's normalised
    step moves M(k) by -eta e and W2's step by -eta J J^T e, so together they move it by at most eta ||e||,
    the unit gain the contractive bound assumes however large W1 has grown. The divisor is a step-size
    normaliser: no outer gradient flows through it (one fused kernel and one product forward, none backward).
    kernel=triton (auto on CUDA), MLP memory: all of it in one fused kernel (`nl.ops.triton_memory`)."""
    if len(A) == 2 and resolve_kernel(cfg.kernel, k) == "triton":
        from nl.ops.triton_memory import mlp_grad_factors
        h, g1, hout, g2, pre = mlp_grad_factors(A[0], A[1], k, v, cfg.target == "self", cfg.normalized_step)
        return [(h, g1, hout), (k, g2, pre)]
    factors = memory_grad_factors(A, k, _target(A, v, cfg))
    if not (cfg.normalized_step and len(A) == 2):
        return factors
    with torch.no_grad():
        pre = factors[1][2]  # W2 k, [..., N, hidden]
        # silu'(W2 k)^2 . (W1's squared column norms): a product and a row sum, not a [hidden] x 1 matmul (1.6
        # against 2.4 ms at the generator shape [4, 4, 4, 64, 128])
        jac_sq = (torch.ops.aten.silu_backward(pre.new_ones(()).expand_as(pre), pre).square_()
                  .mul_(A[0].square().sum(-2)[..., None, :]).sum(-1, keepdim=True))
        scale = jac_sq.add_(1).reciprocal_()  # [..., N, 1]
    return [(x, g * scale, xs) for x, g, xs in factors]


def titans_step(state: RecurrentState, z: torch.Tensor | None, static: dict[str, torch.Tensor],
                readout: dict[str, torch.Tensor], cfg: RecurrenceConfig) -> tuple[torch.Tensor, RecurrentState]:
    """One token, straight from the equations. z: [B, H, 1, d]; static values [B, H, 1, ...].

    Returns (o_t [B, H, 1, d], the state after the token)."""
    anchor = {n: (state.cur[n] if state.pos % _chunk_of(n, cfg) == 0 else state.anchor[n]) for n in state.cur}
    gen = {n: memory_apply(anchor[n], z) for n in GENERATORS if n in state.cur}
    q, k, v, eta, log_alpha, log_mu = _derive(gen, static, readout, cfg)
    eta, alpha = eta[..., 0], log_alpha[..., 0].exp()
    mu = None if log_mu is None else log_mu[..., 0].exp()
    read_from = state.cur if cfg.chunk_read == "in_chunk" else anchor
    o = memory_apply(read_from["memory"], q)  # read before write
    cur, mom = {}, {}
    for name, layers in state.cur.items():
        A = anchor[name]
        init = state.init[name] if cfg.retention_target == "init" else (None,) * len(layers)
        stepped = []
        for i, (S, (x, g, _)) in enumerate(zip(layers, _grad_factors(A, k, v, cfg))):
            x, g = x[..., 0, :], g[..., 0, :]
            if cfg.normalized_step and _reads_hidden(i, layers):
                n = input_norm(x)
                x, g = x / n, g / n
            P = None if state.mom[name] is None else state.mom[name][i]
            stepped.append(dgd_step(S, P, x, g, alpha, eta, mu, cfg.dgd, init[i]))
        cur[name] = tuple(s for s, _ in stepped)
        mom[name] = tuple(p for _, p in stepped) if cfg.momentum else None
    return o, RecurrentState(state.pos + 1, cur, anchor, mom, state.init)


def titans_reference(z: torch.Tensor | None, static: dict[str, torch.Tensor], states: dict[str, Memory],
                     readout: dict[str, torch.Tensor], cfg: RecurrenceConfig) -> tuple[torch.Tensor, RecurrentState]:
    """Token-by-token reference (slow: a Python loop over tokens). Shapes as in `titans_chunked`."""
    T = (z if z is not None else static["q"] if "q" in static else static["k"]).shape[2]
    state = initial_state(states, cfg)
    outs = []
    for t in range(T):
        st = {n: s[:, :, t:t + 1] for n, s in static.items()}
        o, state = titans_step(state, None if z is None else z[:, :, t:t + 1], st, readout, cfg)
        outs.append(o)
    return torch.cat(outs, dim=2), state


def _times_init(x: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """x w0^T: x [..., N, I], w0 [..., O, I] (an initial state, which the sequences share) -> [..., N, O].
    As an einsum the dims that only one side has (the sequences of x; the stacked generators of w0 against a
    shared k) become rows or columns of one larger matmul, where x @ w0.mT would copy w0 per sequence."""
    return torch.einsum("...ni,...oi->...no", x, w0)


def _layers_from_deviation(dev: Memory, init: Memory) -> Memory:
    """A memory's layers M_0 + (S - M_0) from its deviation (what the chunk loops carry under retention_target="init")."""
    return tuple(d + w0 for d, w0 in zip(dev, init))


class _ChunkMemory:
    """Every layer of one memory over one chunk (`ChunkLayer`s), in the form the config asks for.

    S: the anchor's layers; carried: what the chunk loop carries, the layers themselves, or with
    retention_target="init" their deviation S - M_0 from the initial state `init` (retention and DGD's decay
    act on the deviation and the chunk form of `dgd_step` is unchanged on it, so the `ChunkLayer`s run on
    it and their end states are the next deviation: S - M_0 is formed once, at the loop's start, and M_0
    is added back only where the layers themselves are needed, S = M_0 + (S - M_0) for the outputs and
    gradients at the anchor, and M_0 q in reads). DGD's decay reads (S_0 - M_0) x: for the read-out
    memory's layer fed by k it is k S_0^T - k M_0^T, with k M_0^T formed for the whole sequence at once
    (`k_init`, [..., C, O]), the product k S_0^T coming with the gradient.
    normalized_step: the MLP's hidden input h enters as the unit vector h / ||h|| and its gradient factors
    are divided by ||h|| (`input_norm`; layers fed by k, already unit, are left as they are)."""

    def __init__(self, S: Memory, carried: Memory, P: Memory | None, init: Memory, k: torch.Tensor,
                 v: torch.Tensor, gates: ChunkGates, cfg: RecurrenceConfig, k_init: torch.Tensor | None = None) -> None:
        self.init = init if cfg.retention_target == "init" else None
        self.layers = []
        self.fused = None
        if _fused_mlp(carried, k, cfg):
            # the whole step in one kernel (`triton_memory.mlp_memory_chunk`): gradient factors at the anchor
            # carried (+ M_0), both layers, the read chain; S (the anchor's layers) is not needed (may be None)
            P1, P2 = (None, None) if P is None else P
            M1, M2 = (None, None) if self.init is None else self.init
            self.fused = (carried[0], P1, carried[1], P2, M1, M2, k, v)
            self.gates, self.cfg = gates, cfg
            self._ends = None
            return
        for i, (x, g, xs) in enumerate(_grad_factors(S, k, v, cfg)):
            if self.init is not None:  # the layer's output on x is the deviation's: k's from k_init, else ChunkLayer's
                xs = xs - k_init if k_init is not None and i == len(S) - 1 and cfg.dgd else None
            # the normalised step's 1 / ||h||, applied to x, g and xs by the layer (on chip with kernel=triton)
            self.layers.append(chunk_layer(carried[i], None if P is None else P[i], x, g, gates, cfg.dgd, xs,
                                           cfg.kernel, normalize_x=cfg.normalized_step and _reads_hidden(i, S)))

    def read_layer(self, i: int, Q: torch.Tensor, Q_init: torch.Tensor | None = None) -> torch.Tensor:
        """Layer i's S_{t-1} Q_t [..., C, O]; Q_init: Q M_0^T when the caller has it."""
        out = self.layers[i].read(Q)
        if self.init is None:
            return out
        return out + (_times_init(Q, self.init[i]) if Q_init is None else Q_init)

    def _run_fused(self, q: torch.Tensor | None) -> torch.Tensor | None:
        from nl.ops.triton_memory import mlp_memory_chunk
        g, cfg = self.gates, self.cfg
        out, S1, P1, S2, P2 = mlp_memory_chunk(*self.fused, q, g.log_alpha, g.eta, g.log_mu if g.momentum else None,
                                               cfg.dgd, cfg.target == "self", cfg.normalized_step)
        self._ends = ((S1, S2), None if self.fused[1] is None else (P1, P2))
        return out if q is not None else None

    def read(self, q: torch.Tensor, q_init: torch.Tensor | None = None) -> torch.Tensor:
        """M_{t-1}(q_t) for every token of the chunk: [..., C, d] -> [..., C, d]. q_init: q M_0^T of the
        layer fed by q, when the caller formed it for the whole sequence."""
        if self.fused is not None:  # (q M_0^T formed on chip)
            return self._run_fused(q)
        if len(self.layers) == 1:
            return self.read_layer(0, q, q_init)
        return q + self.read_layer(0, F.silu(self.read_layer(1, q, q_init)))  # M(q) = q + W1 silu(W2 q)

    def ends(self, momentum: bool) -> tuple[Memory, Memory | None]:
        """The carried state (layers or deviation) and the momentum after the chunk."""
        if self.fused is not None:
            if self._ends is None:
                self._run_fused(None)
            return self._ends
        ends = [layer.end_state() for layer in self.layers]
        return tuple(s for s, _ in ends), (tuple(p for _, p in ends) if momentum else None)


def _fused_mlp(layers: Memory, x: torch.Tensor, cfg: RecurrenceConfig) -> bool:
    """Whether an MLP memory's chunk step runs as one kernel (`triton_memory.mlp_memory_chunk`): kernel=triton
    (auto on CUDA tensors) and two layers."""
    return len(layers) == 2 and resolve_kernel(cfg.kernel, x) == "triton"


def _per_sequence(init: Memory, B: int, cfg: RecurrenceConfig, x: torch.Tensor, batched: bool) -> Memory:
    """For the fused MLP step (`_fused_mlp`): initial states as views with a leading batch dim of B sequences
    (stride 0, no copy), so each chunk's kernels return M_0's gradient per sequence and the sum over the sequences
    runs once, in the view's backward, not once per chunk. batched: the layers' leading dim is a batch dim (of 1 or
    B) already; else [H, O, I] gets one. Otherwise the states as they are (the torch path's products with M_0 take
    the shared form)."""
    if not _fused_mlp(init, x, cfg):
        return init
    return tuple(w.expand(B, *w.shape[1:]) if batched else w.expand(B, *w.shape) for w in init)


def _split_chunks(tensors: dict[str, torch.Tensor], C: int, T: int) -> list[dict[str, torch.Tensor]]:
    """Per chunk of C tokens, the slices of every [B, H, T, ...] tensor along T (dim 2)."""
    parts = {n: t.split(C, dim=2) for n, t in tensors.items()}
    return [{n: p[i] for n, p in parts.items()} for i in range(-(-T // C))]


def _maybe_recompute(cfg: RecurrenceConfig, fn, *args):
    if cfg.recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


CHUNK_COMPILE_BACKEND = "inductor"  # set by nl.distributed.apply_compile to the blocks' backend
# Graphs of one chunk-body function: (generator, memory) x (first chunk, the rest) x (grad, no_grad),
# and as many again once a new sequence length makes dynamo mark the chunk's strides dynamic.
CHUNK_RECOMPILE_LIMIT = 32
_compiled_chunks: dict[str, object] = {}  # backend -> torch.compile(_maybe_recompute)


def _run_chunk(compiled: bool, cfg: RecurrenceConfig, fn, *args):
    """One chunk body: eager, or (compiled) through one torch.compile of `_maybe_recompute` shared by
    all chunks, steps and layers: dynamo guards on the body's code and the inputs' shapes and strides,
    so equal chunks reuse one graph (the first chunk, whose anchor is the unbatched initial state, and
    a shorter last chunk add one graph each). Recomputation (cfg.recompute) is traced as part of it."""
    if not compiled:
        return _maybe_recompute(cfg, fn, *args)
    backend = CHUNK_COMPILE_BACKEND
    if backend not in _compiled_chunks:
        # fullgraph: a graph break or host read inside a chunk body is an error, not a silent slowdown
        _compiled_chunks[backend] = torch.compile(_maybe_recompute, backend=backend, fullgraph=True)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    with torch._dynamo.config.patch(**{limit: CHUNK_RECOMPILE_LIMIT}):
        return _compiled_chunks[backend](cfg, fn, *args)


@torch._disable_dynamo  # torch.compiler.disable, imported lazily: importing torch._dynamo imports triton
def _chunk_loop_in_python(*args, **kwargs):
    return titans_chunked(*args, **kwargs, compile_chunks=True)


def titans_chunked(z: torch.Tensor | None, static: dict[str, torch.Tensor], states: dict[str, Memory],
                   readout: dict[str, torch.Tensor], cfg: RecurrenceConfig,
                   trace: bool = False, compile_chunks: bool = False) -> tuple[torch.Tensor, RecurrentState]:
    """Chunk-wise parallel form: a loop over chunks, none over tokens; no host-device sync.

    z: [B, H, T, d] input of the generators (None if there are none); static: the values not
    generated, q/k/v [B, H, T, d] and eta/alpha/mu logits [B, H, T]; states: initial layers per
    memory name ('memory' required), each [H, O, I] (or with a batch dim); readout: w_eta,
    b_eta, w_alpha, b_alpha, w_mu, b_mu ([H, d], [H]) for the generated gates.
    Returns o [B, H, T, d] and the RecurrentState after token T. Its stats hold the mean eta and
    alpha of the memory's chunks (detached 0-dim tensors) and, with trace, "norm/<name>": the
    memory's Frobenius norm at the end of each of its chunks, [B, H, n_chunks] (detached).

    Under torch.compile (train.compile) the graph breaks here: the chunk loop runs in Python and each
    chunk body is compiled once (compile_chunks, `_run_chunk`), instead of the loop being unrolled
    into one graph of T/C chunk bodies."""
    if torch.compiler.is_compiling():
        return _chunk_loop_in_python(z, static, states, readout, cfg, trace)
    gen_names = [n for n in GENERATORS if n in states]
    T = (z if z is not None else static["q"] if "q" in static else static["k"]).shape[2]
    C1, C2 = cfg.chunk_size, cfg.memory_chunk_size
    final = initial_state(states, cfg)
    norms: dict[str, list[torch.Tensor]] = {}
    if gen_names:
        # Stack the generators along a new dim 1: they share inputs (z, k, v) and gates. A leading
        # batch dim (1 for the unbatched initial states) keeps dim 1 the generator index even when
        # the anchor below is still the initial state (a sequence no longer than one chunk).
        n_layers = len(states[gen_names[0]])
        S = tuple(torch.stack([w if w.dim() == 4 else w[None] for w in
                               torch.broadcast_tensors(*[states[n][i] for n in gen_names])], dim=1)
                  for i in range(n_layers))
        S_init = _per_sequence(S, z.shape[0], cfg, z, batched=True)
        P = tuple(torch.zeros_like(w) for w in S) if cfg.momentum else None
        gen_dev_init = S_init if cfg.retention_target == "init" else None  # the loop carries S - M_0 (_ChunkMemory)
        if gen_dev_init is not None:
            S = tuple(torch.zeros_like(w) for w in S)
        wb = _packed_readout(readout, gen_names, z, cfg)
        def generator_chunk(zc: torch.Tensor, sc: dict[str, torch.Tensor], S: Memory, P: Memory | None):
            A = S if gen_dev_init is None else _layers_from_deviation(S, gen_dev_init)
            out = _apply(A, zc[:, None], cfg)
            if wb is not None:  # every generator: q, k, v and the gates in one kernel, from the stack itself
                from nl.ops.triton_gates import qkv_gates
                q, k, v, eta, log_alpha, log_mu = qkv_gates(
                    out, *[sc.get(n) for n in ("q", "k", "v")], wb,
                    [gen_names.index(n) if n in gen_names else -1 for n in GENERATORS], 1e-6,
                    cfg.normalize_v and cfg.target == "self", cfg.retention, cfg.momentum, cfg.eta_max,
                    math.log(cfg.momentum_max))
                log_mu = log_mu if cfg.momentum else None
            else:
                # unbind: one stack in the backward, not a zero-padded copy per generator
                gen = dict(zip(gen_names, out.unbind(1)))
                q, k, v, eta, log_alpha, log_mu = _derive(gen, sc, readout, cfg)
            gates = ChunkGates(log_alpha[:, None], eta[:, None], None if log_mu is None else log_mu[:, None],
                               matrices=resolve_kernel(cfg.kernel, eta) == "torch")
            S, P = _ChunkMemory(A, S, P, S_init, k[:, None], v[:, None], gates, cfg).ends(cfg.momentum)
            return (q, k, v, eta, log_alpha, log_mu), S, P

        pieces = []
        for zc, sc in zip(z.split(C1, dim=2), _split_chunks(static, C1, T)):
            anchor = S
            piece, S, P = _run_chunk(compile_chunks, cfg, generator_chunk, zc, sc, S, P)
            pieces.append(piece)
            if trace:
                layers = S if gen_dev_init is None else _layers_from_deviation(S, gen_dev_init)
                for i, n in enumerate(gen_names):
                    norms.setdefault(n, []).append(memory_norm(tuple(w[:, i] for w in layers)).detach())
        if gen_dev_init is not None:
            S, anchor = _layers_from_deviation(S, gen_dev_init), _layers_from_deviation(anchor, gen_dev_init)
        for i, n in enumerate(gen_names):
            final.cur[n] = tuple(w[:, i] for w in S)
            final.anchor[n] = tuple(w[:, i] for w in anchor)
            final.mom[n] = None if P is None else tuple(w[:, i] for w in P)
        q, k, v, eta, log_alpha, log_mu = (None if p[0] is None else torch.cat(p, dim=2) for p in zip(*pieces))
    else:
        q, k, v, eta, log_alpha, log_mu = _derive({}, static, readout, cfg)

    S, P = states["memory"], final.mom["memory"]
    def memory_chunk(c: dict[str, torch.Tensor], S: Memory, P: Memory | None):
        gates = ChunkGates(c["log_alpha"], c["eta"], c.get("log_mu"),
                           matrices=resolve_kernel(cfg.kernel, c["eta"]) == "torch")
        fused = _fused_mlp(S, c["k"], cfg)  # the kernel forms the anchor S (+ M_0) on chip
        A = None if fused and cfg.chunk_read == "in_chunk" else \
            S if dev_init is None else _layers_from_deviation(S, dev_init)
        mem = _ChunkMemory(A, S, P, mem_init, c["k"], c["v"], gates, cfg, c.get("k_init"))
        o = mem.read(c["q"], c.get("q_init")) if cfg.chunk_read == "in_chunk" else _apply(A, c["q"], cfg)
        return (o, *mem.ends(cfg.momentum))

    # Split every input into chunks once: the backward of split is one concatenation, where the
    # backward of T/C separate slices would write T/C zero-padded full-length gradients (O(T^2)).
    inputs = {"q": q, "k": k, "v": v, "eta": eta, "log_alpha": log_alpha}
    if log_mu is not None:
        inputs["log_mu"] = log_mu
    if cfg.retention_target == "init":  # k and q are known: their products with the constant M_0 in one matmul each
        by_k = states["memory"][-1]  # the layer fed by k and q (W of a linear memory, W2 of an MLP)
        fused = _fused_mlp(states["memory"], k, cfg)  # (forms both products on chip)
        if cfg.dgd and not fused:
            inputs["k_init"] = _times_init(k, by_k)
        if cfg.chunk_read == "in_chunk" and not fused:
            inputs["q_init"] = _times_init(q, by_k)
    outs, chunks = [], _split_chunks(inputs, C2, T)
    if use_fla(cfg, len(S), q.device, trace):  # the online Titans rule is fla's gated delta rule: one call
        o, S_T = titans_memory_fla(q, k, v, eta, log_alpha, S[0], cfg)
        outs, chunks, S, anchor = [o], [], (S_T,), (S_T,)  # chunk 1: S_T is the next token's anchor
    mem_init = _per_sequence(states["memory"], q.shape[0], cfg, q, batched=states["memory"][0].dim() == 4)
    dev_init = mem_init if cfg.retention_target == "init" and chunks else None  # the loop carries S - M_0
    if dev_init is not None:
        S = tuple(torch.zeros_like(w) for w in S)
    for c in chunks:
        anchor = S
        o, S, P = _run_chunk(compile_chunks, cfg, memory_chunk, c, S, P)
        outs.append(o)
        if trace:
            norms.setdefault("memory", []).append(memory_norm(S if dev_init is None else
                                                              _layers_from_deviation(S, dev_init)).detach())
    if dev_init is not None:
        S, anchor = _layers_from_deviation(S, dev_init), _layers_from_deviation(anchor, dev_init)
    final.cur["memory"], final.anchor["memory"], final.mom["memory"] = S, anchor, P
    final.pos = T
    o = torch.cat(outs, dim=2)
    with torch.no_grad():  # diagnostics: the share of the read the memory adds to the (static or not) query
        added = (o - q).norm(dim=-1)
        share = (added / (added + q.norm(dim=-1) + 1e-12)).mean()
    final.stats = {"eta": eta.detach().mean(), "alpha": log_alpha.detach().exp().mean(), "share": share}
    final.stats.update({f"norm/{n}": torch.stack(v, dim=-1) for n, v in norms.items()})
    return o, final


def chunked_matmul_flops(T: int, d: int, hidden: int, memory_type: str, n_generators: int, chunk_size: int,
                         memory_chunk_size: int, dgd: bool, momentum: bool, init_retention: bool = False,
                         anchor_read: bool = False, self_target: bool = True) -> tuple[int, int]:
    """Forward FLOPs of `titans_chunked` for ONE sequence of T tokens and ONE head, as written.

    Returns (matmul, triangular_solve) FLOPs; every matrix product of the chunk form is counted
    (2 * m * n * k), elementwise work is not. The solve term is c (c - 1) O per layer and chunk of
    c tokens: forward substitution with O right-hand sides, the algorithm's count (model FLOPs);
    the fast path forms an explicit inverse instead, which executes more FLOPs in less time.
    Per chunk of c tokens, with a layer of input width I and output width O (linear: one layer,
    I = O = d; MLP: W1 (I = hidden, O = d) and W2 (I = d, O = hidden)) and A = the cost of one memory application (2 c d^2 or 4 c d hidden):
      generators (each of n_generators): A on z, A on v (targets), the gradient factors
          (linear 2 c d^2; MLP 6 c d hidden), and per layer the update terms below;
      memory: A on v, the gradient factors, the update terms, and the read of q per layer;
      update terms per layer: with DGD X X^T (2 c^2 I; for the layer whose input is k, once per
          chunk: the generators share k), (E o XX) W (2 c^2 O), with momentum
          X P0^T (2 c I O); the end state (2 c I O, twice with momentum);
      read per layer: Q X^T (2 c^2 I), Q S0^T (2 c I O), with momentum Q P0^T (2 c I O), and the
          in-chunk terms (2 c^2 O; twice when momentum and DGD are both on);
      gates with momentum (once per chunk, shared by the memories): 2 c^3 + 4 c^2;
      init_retention (retention_target=init): with DGD per layer X (S_0 - M_0)^T (2 c I O; without it the
          anchor's own output on X comes free), and in the read Q M_0^T;
      anchor_read: the read is one memory application A on q instead of the in-chunk read;
      self_target False (Titans' target v_t): the memory's A on v is not computed.
    The whole-MLP normalised step's ||J||_F^2 (normalized_step) is elementwise work (a product and a row sum
    per token), not counted."""
    mlp = memory_type == "mlp"
    layers = [(hidden, d), (d, hidden)] if mlp else [(d, d)]
    apply = (lambda c: 4 * c * d * hidden) if mlp else (lambda c: 2 * c * d * d)
    factors = (lambda c: 6 * c * d * hidden) if mlp else (lambda c: 2 * c * d * d)

    def update(c: int) -> tuple[int, int]:  # without the X X^T of the layer that reads k (k_gram)
        mm = solve = 0
        for i, (I, O) in enumerate(layers):
            if dgd:
                mm += (2 * c * c * I if i < len(layers) - 1 else 0) + 2 * c * c * O + (2 * c * I * O if momentum else 0)
                solve += c * (c - 1) * O
            mm += 2 * c * I * O * (2 if momentum else 1) + (2 * c * I * O if init_retention and dgd else 0)
        return mm, solve

    def k_gram(c: int) -> int:  # k k^T of the layer whose input is k: once per chunk, the memories share k
        return 2 * c * c * d if dgd else 0

    def read(c: int) -> int:
        if anchor_read:
            return apply(c)
        in_chunk = 2 * c * c * sum(O for _, O in layers) * (2 if momentum and dgd else 1)
        per_layer = [2 * c * c * I + 2 * c * I * O * (2 if momentum else 1) + (2 * c * I * O if init_retention else 0)
                     for I, O in layers]
        return sum(per_layer) + in_chunk

    def gates(c: int) -> int:
        return 2 * c ** 3 + 4 * c * c if momentum else 0

    def chunks(C: int) -> list[int]:
        return [min(C, T - c0) for c0 in range(0, T, C)]

    mm = solve = 0
    for c in chunks(chunk_size) if n_generators else []:
        up_mm, up_solve = update(c)
        mm += gates(c) + k_gram(c) + n_generators * (2 * apply(c) + factors(c) + up_mm)
        solve += n_generators * up_solve
    for c in chunks(memory_chunk_size):
        up_mm, up_solve = update(c)
        mm += gates(c) + k_gram(c) + (apply(c) if self_target else 0) + factors(c) + up_mm + read(c)
        solve += up_solve
    return mm, solve
