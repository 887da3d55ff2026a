"""HOPE: self-modifying Titans + Continuum Memory System (HOPE_SPEC.md sections 2-4).

    h = embed(input_ids)
    for each block:  h = h + Mixer(RMSNorm(h)) ; h = CMS(h)
    logits = output(RMSNorm(h))      (output.weight is embed.weight when tie_embeddings)

    CMS(h) = level_{K-1}( ... level_0(h)),  level_l(h) = h + SwiGLU_l(RMSNorm_l(h))

Mixer (`model.hope.mixer`): `self_modifying` (HOPE), `attention` (Hope-Attention: causal
softmax attention with RoPE) or `titans` (baseline: static projections, one neural memory).
CMS level l's parameters are named `layers.<i>.cms.levels.<l>.*` (`cms_level_of`): the
optimizers of nl/optim step level l every `cms_chunk_sizes[l]` outer steps with the gradient
accumulated since its last step (optim.cms; the outer multi-frequency schedule of Sec. 3).

Inference: `prefill(input_ids)` runs the chunked forward and returns the recurrent state
(inner memories, their anchors and momenta, the convolution tails: constant size in the
context length, no KV cache); `step(token, state)` continues one token; `generate` samples.
`restore_after_adaptation(model)` undoes any weight change made inside it.

Decisions where HOPE_SPEC.md is silent (defaults; each is a switch or a value in HopeConfig):
- Per head: a static projection W_z (d -> H x d_h) + causal depthwise conv (window 4) + SiLU
  gives z_t, the input of every generator memory; q_t = silu(conv(W_q x_t)); static k / v
  (ablations) likewise with their own W_k / W_v. k_t, v_t are the memories' outputs (no
  further SiLU); q_t and k_t are L2-normalised (eps 1e-6) inside the recurrence.
- Gates per head and token: eta = eta_max * sigmoid(w_eta . M_eta(z) + b_eta),
  alpha = sigmoid(w_alpha . M_alpha(z) + b_alpha), momentum mu = sigmoid(w_mu . M_eta(z) + b_mu)
  (M_eta generates both optimizer hyper-parameters). Biases start at eta = min(0.1, eta_max / 2),
  mu = 0.5 and alpha = 1 - 1/tau per head, tau log-spaced over retention_tau_init. Without retention
  M_alpha does not exist. eta_max above the contractive bound is refused (`contractive_eta_max`); at
  chunk size > 1 the bound is the chunk's (`chunk_step_limit`) and with momentum
  mu = momentum_max * sigmoid(.) is capped (auto 0.5); eta_max and momentum_max 0 = auto.
- Memory health (docs/HOPE.md "Memories that live"): retention and DGD's decay pull a memory
  toward its initial state M_0, each layer's step is normalised by its input, v is L2-normalised
  before it makes the self-generated targets; each a switch (retention_target, normalized_step,
  normalize_v), all off = Eq. 88 literally. `diagnostics()` returns each block's memory health.
- The inner loss is 1/2 ||M(k) - vhat||^2 (the 2 of the squared norm is absorbed in eta); vhat
  is a target (no gradient through it inside the inner step).
- Momentum with DGD: P_t = mu_t P_{t-1} - eta_t grad, M_t = M_{t-1}(alpha_t I - eta_t x x^T) + P_t
  (the DGD decay acts on the memory, the momentum carries the gradient term); see nl/ops/delta_rule.py.
- Memory MLP: M(z) = z + W1 silu(W2 z), hidden 2 d_h; initial states W1 ~ N(0, init_std),
  W2 ~ N(0, 1/hidden) (near identity; a zero memory would stay zero, its targets being its own
  outputs). Linear memories start at I + N(0, init_std).
- Output: wo(RMSNorm_head(o) * silu(W_g x)) (GatedDeltaNet-style gate). The recurrence runs in
  fp32 (or wider) whatever the model dtype. The Titans baseline is mixer=titans with dgd=false
  momentum=true and cms_chunk_sizes=[1]: static q/k/v, eta/alpha/mu = linear(x) with bias, one MLP memory
  regressing M(k_t) onto v_t (Titans Eqs. 11-12), forgetting toward zero.
- Inner momentum is off by default (HopeConfig.momentum; decided by data, docs/HOPE.md).
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nl.config import ConfigError, ModelConfig
from nl.models import register_model
from nl.models.documents import Documents
from nl.models.layers import RMSNorm, SwiGLU, precompute_rope, resolve_ffn_hidden
from nl.models.transformer import Attention
from nl.ops.cms import CMSState, ContextConfig, cms_chunked, cms_reference
from nl.ops.cms import initial_state as cms_initial_state
from nl.ops.delta_rule import check_kernel
from nl.ops.titans import (GENERATORS, RecurrenceConfig, RecurrentState, chunked_matmul_flops, memory_norm,
                            titans_chunked, titans_reference, titans_step)

_CMS_LEVEL = re.compile(r"(?:^|\.)cms\.levels\.(\d+)\.")

# Initial gates (decided here; HOPE_SPEC.md is silent): eta_t = 0.1 (ETA_INIT), mu_t = 0.5, and
# alpha_t from model.hope.retention_tau_init (`alpha_bias_init`).
ETA_INIT = 0.1
# momentum_max=auto with inner momentum at chunk size > 1: a cap the chunk bound needs (mu -> 1 leaves no
# contractive eta); 0.5 is Titans-like momentum (mu starts at 0.25): eta_max 0.0699 for mixer=titans at chunk 16,
# 0.0350 for HOPE at chunk 16 and 0.0082 at chunk 64 (`chunk_step_limit`).
AUTO_MOMENTUM_MAX = 0.5


def _anchor_chunk_size(rcfg: RecurrenceConfig) -> int:
    """The chunk size whose gradients share one anchor: the memory's for the Titans baseline (no generators),
    else the larger of the generators' and the memory's."""
    return rcfg.memory_chunk_size if rcfg.target == "value" else max(rcfg.chunk_size, rcfg.memory_chunk_size)


@functools.lru_cache(maxsize=None)
def chunk_step_limit(C: int, retention: bool, momentum_max: float, c_decay: float = 0.0, c_grad: float = 1.0) -> float:
    """The largest eta for which the chunk map of one inner step is stable (spectral radius <= 1) for every alpha
    in [0, 1] (retention; else alpha = 1) and mu in [0, momentum_max] (0: no momentum).

    One direction u of unit curvature (C keys equal to u, the worst case), the memory's deviation e along u and
    the momentum S along u. Every gradient of the chunk is taken at the anchor e_A (the gradient term's
    coefficient on e_A is c_grad: 1 for a value target, up to 2 for a self-generated one, 1 - k . v), while
    DGD's decay (c_decay = 1 with DGD, 0 for the plain gradient step) acts token by token on the current e:
        S_t = mu S_{t-1} - eta c_grad e_A,    e_t = (alpha - eta c_decay) e_{t-1} + S_t.
    The chunk maps (e_A, S_0) -> (e_C, S_C) linearly. Without DGD or momentum at alpha = 1 this is
    e_C = (1 - C eta c_grad) e_A: eta <= 2 / (C c_grad). With DGD and a self target (c_grad 2) at alpha = 1,
    e_C = (3 (1 - eta)^C - 2) e_A: the chunk's stale gradients pull e toward -2 e_A, so eta <= 1 - 3^(-1/C)
    (0.066 at C = 16). As mu -> 1 the limit goes to 0 at C > 2 (the accumulated momentum re-applies the stale
    gradient). Bisection in float64 over a grid of 132 alphas x 41 mus, in numpy: config checks also run under
    meta-device and fake-tensor modes."""
    # alpha: an even grid plus 1 - 10^-4 .. 1 - 10^-1, where the limit without momentum has its minimum (just below 1)
    alpha = np.concatenate([np.linspace(0, 1, 101), 1 - np.logspace(-4, -1, 31)]) if retention else np.ones(1)
    mu = np.linspace(0, momentum_max, 41) if momentum_max > 0 else np.zeros(1)
    alpha, mu = (g.reshape(-1, 1) for g in np.meshgrid(alpha, mu, indexing="ij"))

    def stable(eta: float) -> bool:
        e_A = np.array([1.0, 0.0])  # columns: the images of e_A = 1 and of S_0 = 1
        e, S = np.broadcast_to(e_A, (len(alpha), 2)), np.broadcast_to(np.array([0.0, 1.0]), (len(alpha), 2))
        for _ in range(C):
            S = mu * S - eta * c_grad * e_A
            e = (alpha - eta * c_decay) * e + S
        return bool(np.abs(np.linalg.eigvals(np.stack([e, S], axis=1))).max() <= 1 + 1e-9)

    lo, hi = 0.0, 2.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if stable(mid) else (lo, mid)
    return lo if lo > 1e-9 else 0.0


def contractive_eta_max(rcfg: RecurrenceConfig) -> float | None:
    """The largest eta_max for which the inner step is contractive, or None where no bound holds.

    With unit inputs (normalised k, normalised v or a value target, normalised step), one token's
    step multiplies the memory's deviation along k by alpha - eta c, with c = 1 for DGD's decay
    (dgd) plus, for the gradient term, 1 - k . v in [0, 2] for a self-generated target M(v), or 1 for
    a value target (Titans). |alpha - eta c| <= 1 for every alpha in (0, 1] (retention) or alpha = 1
    needs eta <= (1 + alpha_min) / c_max. With an unnormalised v (normalize_v=false, the paper's
    literal form) k . v is unbounded and so is the step: no bound (None).
    At a chunk size C > 1 every gradient of a chunk is taken at its anchor (Titans' mini-batch step, arXiv
    2501.00663 Sec. 3.3; HOPE's Eq. 90): C aligned keys add C stale gradient steps, which DGD's exact per-token
    decay corrects only in part, and momentum re-applies them, so the bound is `chunk_step_limit` for C (0 when
    momentum_max = 1: no eta is contractive)."""
    if rcfg.target == "self" and not rcfg.normalize_v:
        return None
    c_decay, c_grad = (1 if rcfg.dgd else 0), (2 if rcfg.target == "self" else 1)
    C = _anchor_chunk_size(rcfg)
    if C == 1:
        return (1.0 + (0.0 if rcfg.retention else 1.0)) / (c_decay + c_grad)
    return chunk_step_limit(C, rcfg.retention, rcfg.momentum_max if rcfg.momentum else 0.0, c_decay, c_grad)


def alpha_bias_init(n_heads: int, tau_min: float, tau_max: float) -> torch.Tensor:
    """Per-head retention bias b with sigmoid(b) = alpha = 1 - 1/tau, the time constants tau
    log-uniformly spaced over [tau_min, tau_max] tokens (as Mamba spreads its decays): [n_heads]."""
    if n_heads == 1:
        tau = torch.tensor([math.sqrt(tau_min * tau_max)], dtype=torch.float64)
    else:
        tau = torch.logspace(math.log10(tau_min), math.log10(tau_max), n_heads, dtype=torch.float64)
    return (tau - 1).log().float()  # logit(1 - 1/tau) = log(tau - 1)


def recurrence_config(cfg: ModelConfig) -> RecurrenceConfig:
    """The inner recurrence's settings from model.hope.*. The Titans baseline follows Titans' equations:
    target v_t, a plain gradient step (normalized_step and normalize_v apply to self-generated targets
    only), and retention_target auto = zero (its targets are a source that decay cannot starve);
    for HOPE auto = init."""
    hc = cfg.hope
    titans = hc.mixer == "titans"
    target = hc.retention_target if hc.retention_target != "auto" else ("zero" if titans else "init")
    check_kernel(str(hc.kernel))
    rcfg = RecurrenceConfig(int(hc.chunk_size), int(hc.memory_chunk_size), float(hc.eta_max) or 1 / 3, bool(hc.dgd),
                            bool(hc.momentum), bool(hc.retention), bool(hc.recompute_chunks),
                            retention_target=target, normalized_step=bool(hc.normalized_step) and not titans,
                            normalize_v=bool(hc.normalize_v), target="value" if titans else "self",
                            chunk_read=str(hc.chunk_read), kernel=str(hc.kernel))
    # auto (0): cap mu where the gradient-step chunk form needs it, then eta_max = min(1/3, the bound)
    capped = rcfg.momentum and _anchor_chunk_size(rcfg) > 1
    rcfg = replace(rcfg, momentum_max=float(hc.momentum_max) or (AUTO_MOMENTUM_MAX if capped else 1.0))
    if not hc.eta_max:
        bound = contractive_eta_max(rcfg)
        rcfg = replace(rcfg, eta_max=1 / 3 if bound is None else min(1 / 3, bound))
    return rcfg


def cms_level_of(param_name: str) -> int | None:
    """CMS level of a parameter from its name ('layers.3.cms.levels.1.mlp.w1.weight' -> 1), else None.

    Works on names with wrapper prefixes (e.g. '_orig_mod.' or FSDP's)."""
    match = _CMS_LEVEL.search(param_name)
    return int(match.group(1)) if match else None


class ShortConv(nn.Module):
    """Causal depthwise convolution over time, window `size`. x: [B, T, C] -> [B, T, C]."""

    matmul_weight = True  # 2 FLOPs per weight per token, like a Linear (nl.models.matmul_parameters)

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.weight = nn.Parameter(torch.empty(channels, size))

    def init_weights(self) -> None:
        bound = 1.0 / math.sqrt(self.size)  # nn.Conv1d's default for a depthwise kernel
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv1d(F.pad(x.transpose(1, 2), (self.size - 1, 0)), self.weight[:, None, :], groups=x.shape[-1])
        return y.transpose(1, 2)

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """The last size-1 inputs of x [B, T, C] (zero-padded on the left): the decoding cache."""
        return F.pad(x.transpose(1, 2), (self.size - 1, 0))[..., x.shape[1]:].transpose(1, 2)

    def step(self, x: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token. x: [B, 1, C]; cache: [B, size-1, C] -> (y [B, 1, C], new cache)."""
        window = torch.cat([cache, x], dim=1)
        return (window * self.weight.T).sum(1, keepdim=True), window[:, 1:]


class Projection(nn.Module):
    """silu(conv(W x)) split into heads: x [B, T, dim] -> [B, H, T, head_dim] (no conv when conv_size = 1)."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, conv_size: int) -> None:
        super().__init__()
        self.shape = (n_heads, head_dim)
        self.linear = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.conv = ShortConv(n_heads * head_dim, conv_size) if conv_size > 1 else None

    def _heads(self, y: torch.Tensor) -> torch.Tensor:
        return F.silu(y).unflatten(-1, self.shape).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ([B, H, T, head_dim], the conv cache after the last token)."""
        y = self.linear(x)
        if self.conv is None:
            return self._heads(y), None
        return self._heads(self.conv(y)), self.conv.tail(y)

    def step(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        y = self.linear(x)
        if self.conv is not None:
            y, cache = self.conv.step(y, cache)
        return self._heads(y), cache


def _full_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for the inner recurrence: under bf16 autocast its matmuls would run in bf16 (and the
    explicit inverse's backward would mix bf16 and fp32). The inputs are cast to >= fp32 at the boundary
    (`_recurrence_inputs`), so every op inside runs in fp32 or wider, forward and backward."""
    return torch.autocast(device_type=x.device.type, enabled=False)


@dataclass
class MixerState:
    """Decoding state of one block: its mixer's conv caches and inner-memory recurrence, and (cms_mode
    in_context | both) each CMS level's fast weights and partial sums (None for a level without)."""

    conv: dict[str, torch.Tensor | None]
    rec: RecurrentState
    cms: list[CMSState | None] | None = None


class SelfModifyingTitans(nn.Module):
    """Self-modifying Titans sequence mixer (and, with mixer='titans', the Titans baseline).

    x: [B, T, dim] -> [B, T, dim]. Per head (H heads of d_h = dim / H):
      z_t = silu(conv(W_z x_t))  feeds the inner generator memories M_k, M_v, M_eta, M_alpha
      (and M_q with adaptive_q); q_t = silu(conv(W_q x_t)) (static), or static k/v likewise;
      the recurrence of `nl.ops.titans` gives o_t = M_{memory,t-1}(q_t);
      y_t = W_o (RMSNorm(o_t) * silu(W_g x_t))   (output norm per head, linear gate).
    Titans baseline: q, k, v static; eta, alpha, mu logits = linear(x_t) (with bias); only M_memory.
    Initial states of all memories are outer parameters `memory_init.<name>_<layer>` ([H, O, I])."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hc = cfg.hope
        H, dh = cfg.n_heads, cfg.dim // cfg.n_heads
        self.n_heads, self.head_dim = H, dh
        self.init_std = float(cfg.init_std)
        self.memory_type = str(hc.memory_type)
        self.memory_hidden = int(hc.memory_hidden) or 2 * dh
        self.rcfg = recurrence_config(cfg)
        self.retention_tau_init = tuple(float(t) for t in hc.retention_tau_init)
        if hc.mixer == "titans":
            self.generators: tuple[str, ...] = ()
            static = ("q", "k", "v")
            self.gate_proj = nn.Linear(cfg.dim, 3 * H, bias=True)  # eta, alpha, mu logits
        else:
            enabled = {"q": hc.adaptive_q, "k": not hc.static_k, "v": not hc.static_v, "eta": True,
                       "alpha": hc.retention}
            self.generators = tuple(n for n in GENERATORS if enabled[n])
            static = tuple(n for n in ("q", "k", "v") if n not in self.generators)
            self.gate_proj = None
        self.proj = nn.ModuleDict({n: Projection(cfg.dim, H, dh, int(hc.conv_size)) for n in static})
        if self.generators:
            self.proj["z"] = Projection(cfg.dim, H, dh, int(hc.conv_size))
        self.memory_init = nn.ParameterDict()
        for name in (*self.generators, "memory"):
            for i, shape in enumerate(self._layer_shapes()):
                self.memory_init[f"{name}_{i}"] = nn.Parameter(torch.empty(H, *shape))
        self.readout = nn.ParameterDict()
        gates = [g for g, used in (("eta", "eta" in self.generators), ("alpha", "alpha" in self.generators),
                                   ("mu", "eta" in self.generators and self.rcfg.momentum)) if used]
        for g in gates:
            self.readout[f"w_{g}"] = nn.Parameter(torch.empty(H, dh))
            self.readout[f"b_{g}"] = nn.Parameter(torch.empty(H))
        self.out_norm = RMSNorm(dh, cfg.norm_eps)
        self.gate = nn.Linear(cfg.dim, H * dh, bias=False)
        self.wo = nn.Linear(H * dh, cfg.dim, bias=False)
        self.reference = False  # True: run the token-by-token reference (tests)
        self.trace = False  # True: record each memory's norm at every chunk end (nl.memory_health)
        self.last_stats: dict[str, torch.Tensor] = {}  # detached diagnostics of the last forward

    def mixing_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the inner memories (matrix products and triangular solves of
        the chunk form, all heads; `nl.ops.titans.chunked_matmul_flops`). The static projections,
        gate and output are Linear weights, counted in 6 N."""
        c = self.rcfg
        mm, solve = chunked_matmul_flops(seq_len, self.head_dim, self.memory_hidden, self.memory_type,
                                         len(self.generators), c.chunk_size, c.memory_chunk_size, c.dgd, c.momentum,
                                         c.retention_target == "init", c.chunk_read == "anchor", c.target == "self")
        return self.n_heads * (mm + solve) / seq_len

    def _layer_shapes(self) -> list[tuple[int, int]]:
        d, h = self.head_dim, self.memory_hidden
        return [(d, d)] if self.memory_type == "linear" else [(d, h), (h, d)]  # (W,) | (W1, W2)

    def init_weights(self, std: float, out_std: float) -> None:
        """Projections, gate ~ N(0, std); wo ~ N(0, out_std); memory initial states: linear W = I + N(0, std),
        MLP W1 ~ N(0, std), W2 ~ N(0, 1/hidden) (M starts near the identity); readout w ~ N(0, std),
        biases: eta = min(0.1, eta_max / 2), mu = 0.5, alpha per head from `alpha_bias_init`."""
        for p in self.proj.values():
            nn.init.normal_(p.linear.weight, std=std)
            if p.conv is not None:
                p.conv.init_weights()
        for name, w in self.memory_init.items():
            if self.memory_type == "linear":
                with torch.no_grad():
                    nn.init.normal_(w, std=std).add_(torch.eye(self.head_dim, device=w.device, dtype=w.dtype))
            else:
                nn.init.normal_(w, std=std if name.endswith("_0") else 1.0 / math.sqrt(self.memory_hidden))
        eta0 = min(ETA_INIT / self.rcfg.eta_max, 0.5)  # eta starts at 0.1 (or eta_max / 2 if that is smaller)
        biases = {"eta": torch.full((self.n_heads,), math.log(eta0 / (1 - eta0))), "mu": torch.full((self.n_heads,), 0.0),
                  "alpha": alpha_bias_init(self.n_heads, *self.retention_tau_init)}
        for name, w in self.readout.items():
            if name.startswith("w_"):
                nn.init.normal_(w, std=std)
            else:
                with torch.no_grad():
                    w.copy_(biases[name[2:]])
        if self.gate_proj is not None:
            nn.init.normal_(self.gate_proj.weight, std=std)
            with torch.no_grad():
                for i, g in enumerate(("eta", "alpha", "mu")):
                    self.gate_proj.bias[i * self.n_heads:(i + 1) * self.n_heads] = biases[g]
        self.out_norm.reset_parameters()
        nn.init.normal_(self.gate.weight, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)

    def _states(self) -> dict[str, tuple[torch.Tensor, ...]]:
        n_layers = len(self._layer_shapes())
        return {name: tuple(self.memory_init[f"{name}_{i}"] for i in range(n_layers))
                for name in (*self.generators, "memory")}

    def _gate_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.gate_proj is None:
            return {}
        logits = self.gate_proj(x).unflatten(-1, (3, self.n_heads)).permute(2, 0, 3, 1)  # [3, B, H, T]
        return dict(zip(("eta", "alpha", "mu"), logits))

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        o = self.out_norm(o).transpose(1, 2).flatten(2)  # [B, T, H * dh]
        return self.wo(o * F.silu(self.gate(x)))

    def _recurrence_inputs(self, inputs: dict[str, torch.Tensor], x: torch.Tensor):
        """(z, static, states, readout) for nl.ops.titans, in at least fp32: the inner recurrence
        (decays, triangular solves) always runs in fp32 or wider, whatever the model's dtype."""
        ct = torch.promote_types(x.dtype, torch.float32)
        z = inputs.pop("z", None)
        static = {n: t.to(ct) for n, t in {**inputs, **self._gate_logits(x)}.items()}
        states = {n: tuple(w.to(ct) for w in m) for n, m in self._states().items()}
        return (None if z is None else z.to(ct)), static, states, {n: w.to(ct) for n, w in self.readout.items()}

    def forward_with_state(self, x: torch.Tensor) -> tuple[torch.Tensor, MixerState]:
        inputs, caches = {}, {}
        for name, p in self.proj.items():
            inputs[name], caches[name] = p(x)
        z, static, states, readout = self._recurrence_inputs(inputs, x)
        with _full_precision(x):
            if self.reference:
                o, rec = titans_reference(z, static, states, readout, self.rcfg)
            else:
                o, rec = titans_chunked(z, static, states, readout, self.rcfg, trace=self.trace)
        self.last_stats = self._diagnostics(rec)
        return self._output(o.to(x.dtype), x), MixerState(caches, rec)

    @torch.no_grad()
    def _diagnostics(self, rec: RecurrentState) -> dict[str, torch.Tensor]:
        """Memory health of one forward, detached 0-dim tensors (no host sync): per memory, its
        end-of-sequence norm over its initial state's (mean over sequences and heads); mean eta and
        alpha; the share of the read the memory adds to the query (0: the mixer is a static layer)."""
        stats = {k: v for k, v in rec.stats.items() if not k.startswith("norm/")}
        for name, layers in rec.cur.items():
            stats[f"norm_{name}"] = (memory_norm(layers) / memory_norm(rec.init[name])).mean()
        stats.update({k: v for k, v in rec.stats.items() if k.startswith("norm/")})  # traces (trace=True)
        return stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_state(x)[0]

    def step(self, x: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        """One token x [B, 1, dim] from `state` -> (y [B, 1, dim], the next state)."""
        inputs, caches = {}, {}
        for name, p in self.proj.items():
            inputs[name], caches[name] = p.step(x, state.conv[name])
        z, static, _, readout = self._recurrence_inputs(inputs, x)
        with _full_precision(x):
            o, rec = titans_step(state.rec, z, static, readout, self.rcfg)
        return self._output(o.to(x.dtype), x), MixerState(caches, rec)


class CMSLevel(nn.Module):
    """x + SwiGLU(RMSNorm(x)). x: [B, T, dim] -> [B, T, dim].

    With `context` (cms_mode in_context | both) the SwiGLU's down projection w2 (its values) is the initial
    state of per-sequence fast weights that learn inside the forward every context.chunk_size tokens
    (nl/ops/cms.py), and the level owns `target_scale` [dim], the learned gain s of its reconstruction
    target s * RMSNorm(x)."""

    def __init__(self, dim: int, hidden: int, eps: float, context: ContextConfig | None = None) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)
        self.context = context
        self.reference = False  # True: the token-by-token reference (tests)
        if context is not None:
            self.target_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_state(x)[0]

    def forward_with_state(self, x: torch.Tensor, state: CMSState | None = None) -> tuple[torch.Tensor, CMSState | None]:
        """x [B, T, dim], continuing from `state` (None: the sequence starts) -> (y, state after T; None
        without context). The in-context recurrence runs in fp32 or wider, whatever the model's dtype."""
        u = self.norm(x)
        if self.context is None:
            return x + self.mlp(u), None
        ct = torch.promote_types(x.dtype, torch.float32)
        if state is None:
            state = cms_initial_state(self.mlp.w2.weight.to(ct))
        keys = F.silu(self.mlp.w1(u)) * self.mlp.w3(u)  # the SwiGLU's hidden features, outer weights
        with _full_precision(x):
            run = cms_reference if self.reference else cms_chunked
            y, state = run(keys.to(ct), self.target_scale.to(ct) * u.to(ct), state, self.context)
        return x + y.to(x.dtype), state


class CMS(nn.Module):
    """Continuum Memory System: a chain of levels, level l updated every chunk_sizes[l] outer steps
    (cms_mode outer | both) and/or every context_chunk_sizes[l] tokens in context (in_context | both)."""

    def __init__(self, dim: int, hidden: int, chunk_sizes: list[int], eps: float,
                 contexts: list[ContextConfig] | None = None) -> None:
        super().__init__()
        self.chunk_sizes = list(chunk_sizes)
        contexts = contexts or [None] * len(chunk_sizes)
        self.levels = nn.ModuleList(CMSLevel(dim, hidden, eps, c) for c in contexts)
        self.last_stats: dict[str, torch.Tensor] = {}  # detached diagnostics of the last forward

    def forward(self, x: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; with `docs` (data.document_boundaries=reset) the in-context levels'
        fast weights restart at every document (the chain runs on the packed documents)."""
        if docs is not None and any(level.context is not None for level in self.levels):
            return docs.apply(self, x)
        return self.forward_with_state(x)[0]

    def forward_with_state(self, x: torch.Tensor, states: list[CMSState | None] | None = None
                           ) -> tuple[torch.Tensor, list[CMSState | None]]:
        """x [B, T, dim] from per-level states (None: the sequence starts) -> (y, the states after T)."""
        states = states or [None] * len(self.levels)
        out = []
        for level, state in zip(self.levels, states):
            x, state = level.forward_with_state(x, state)
            out.append(state)
        self.last_stats = self._diagnostics(out)
        return x, out

    @torch.no_grad()
    def _diagnostics(self, states: list[CMSState | None]) -> dict[str, torch.Tensor]:
        """Per in-context level l: cms<l>_norm, the fast weights' norm over the outer weights' at the end of
        the sequence, and cms<l>_dev, their distance to the outer weights over the outer norm (mean over
        sequences); detached 0-dim tensors."""
        stats = {}
        for l, st in enumerate(states):
            if st is not None:
                n0 = st.init.norm()
                stats[f"cms{l}_norm"] = (st.cur.flatten(-2).norm(dim=-1) / n0).mean()
                stats[f"cms{l}_dev"] = ((st.cur - st.init).flatten(-2).norm(dim=-1) / n0).mean()
        return stats


class HopeBlock(nn.Module):
    """h = x + Mixer(RMSNorm(x)); y = CMS(h). x: [B, T, dim] -> [B, T, dim]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hc = cfg.hope
        self.mixer_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mixer = Attention(cfg.dim, cfg.n_heads) if hc.mixer == "attention" else SelfModifyingTitans(cfg)
        hidden = int(hc.cms_hidden) or resolve_ffn_hidden(cfg.dim, cfg.ffn_hidden, cfg.ffn_multiple_of)
        self.cms = CMS(cfg.dim, hidden, list(hc.cms_chunk_sizes), cfg.norm_eps, cms_contexts(cfg))

    def init_weights(self, std: float, out_std: float) -> None:
        self.mixer_norm.reset_parameters()
        if isinstance(self.mixer, Attention):
            for linear in (self.mixer.wq, self.mixer.wk, self.mixer.wv):
                nn.init.normal_(linear.weight, std=std)
            nn.init.normal_(self.mixer.wo.weight, std=out_std)
        else:
            self.mixer.init_weights(std, out_std)
        for level in self.cms.levels:
            level.norm.reset_parameters()
            nn.init.normal_(level.mlp.w1.weight, std=std)
            nn.init.normal_(level.mlp.w3.weight, std=std)
            nn.init.normal_(level.mlp.w2.weight, std=out_std)
            if level.context is not None:  # s = 0: at init the inner step only pulls the level toward zero
                nn.init.zeros_(level.target_scale)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                docs: Documents | None = None) -> torch.Tensor:
        """rope: the attention mixer's (cos, sin); docs: the windows' documents (data.document_boundaries=reset):
        attention is masked block-diagonally, a recurrent mixer (memories, conv caches) runs on every
        document from its initial state."""
        h = self.mixer_norm(x)
        if rope is not None:
            h = self.mixer(h, *rope, None if docs is None else docs.attention_mask())
        elif docs is not None:
            h = docs.apply(self.mixer, h)
        else:
            h = self.mixer(h)
        return self.cms(x + h, docs)


def cms_contexts(cfg: ModelConfig) -> list[ContextConfig] | None:
    """Each CMS level's in-context settings (cms_mode in_context | both), else None."""
    hc = cfg.hope
    if hc.cms_mode == "outer":
        return None
    sizes = list(hc.cms_context_chunk_sizes) or list(hc.cms_chunk_sizes)
    return [ContextConfig(int(c), float(hc.cms_inner_lr), float(hc.cms_retention)) for c in sizes]


def _validate_hope(cfg: ModelConfig) -> None:
    hc = cfg.hope
    if hc.cms_mode not in ("outer", "in_context", "both"):
        raise ConfigError(f"model.hope.cms_mode={hc.cms_mode!r}: valid values are outer, in_context, both")
    sizes = list(hc.cms_context_chunk_sizes)
    if sizes and (len(sizes) != len(hc.cms_chunk_sizes) or any(c < 1 for c in sizes)):
        raise ConfigError(f"model.hope.cms_context_chunk_sizes={sizes} must hold one positive token count per CMS "
                          f"level ({len(hc.cms_chunk_sizes)}, as cms_chunk_sizes), or be [] to reuse cms_chunk_sizes")
    if not 0 < hc.cms_inner_lr <= 1:
        raise ConfigError(f"model.hope.cms_inner_lr={hc.cms_inner_lr} must be in (0, 1] (the normalised in-context "
                          f"step is contractive up to 1, docs/HOPE.md)")
    if not 0 < hc.cms_retention <= 1:
        raise ConfigError(f"model.hope.cms_retention={hc.cms_retention} must be in (0, 1] (1 = no pull back toward "
                          f"the outer weights)")
    if len(hc.cms_chunk_sizes) == 0 or any(c < 1 for c in hc.cms_chunk_sizes):
        raise ConfigError(f"model.hope.cms_chunk_sizes={list(hc.cms_chunk_sizes)} must be a non-empty list of "
                          f"positive integers (one per CMS level; [1] = a single MLP)")
    for key in ("chunk_size", "memory_chunk_size", "conv_size"):
        if getattr(hc, key) < 1:
            raise ConfigError(f"model.hope.{key} must be >= 1, got {getattr(hc, key)}")
    if hc.eta_max < 0:
        raise ConfigError(f"model.hope.eta_max must be positive (or 0 = auto), got {hc.eta_max}")
    if not 0 <= hc.momentum_max <= 1:
        raise ConfigError(f"model.hope.momentum_max must be in (0, 1] (or 0 = auto), got {hc.momentum_max}")
    if len(hc.retention_tau_init) != 2 or not 1 < hc.retention_tau_init[0] <= hc.retention_tau_init[1]:
        raise ConfigError(f"model.hope.retention_tau_init={list(hc.retention_tau_init)} must be [min, max] "
                          f"time constants in tokens with 1 < min <= max, e.g. [32, 4096]")
    if hc.mixer != "attention":
        rcfg = recurrence_config(cfg)
        bound = contractive_eta_max(rcfg)
        if bound == 0:
            raise ConfigError(f"model.hope.momentum_max={rcfg.momentum_max} leaves no contractive eta_max at chunk "
                              f"size {_anchor_chunk_size(rcfg)}: the chunk's gradients share its anchor and mu -> 1 "
                              f"re-applies them; set model.hope.momentum_max < 1 (0 = auto: {AUTO_MOMENTUM_MAX}), or "
                              f"chunk sizes 1 (docs/HOPE.md)")
        if bound is not None and rcfg.eta_max > bound + 1e-12:
            C = _anchor_chunk_size(rcfg)
            chunk, rule = (f", chunk size {C}", "the chunk map's spectral radius <= 1") if C > 1 else ("", "|alpha - eta c| <= 1")
            raise ConfigError(f"model.hope.eta_max={hc.eta_max} makes the inner step non-contractive for these "
                              f"switches{chunk}: it must be <= {bound:.4g} ({rule}, docs/HOPE.md); lower "
                              f"it (0 = auto){', use smaller chunk sizes' if C > 1 else ''}"
                              + (", or set model.hope.normalize_v=false for the paper's unbounded literal form"
                                 if rcfg.target == "self" else ""))


@register_model("hope")
class Hope(nn.Module):
    """HOPE language model. forward: input_ids LongTensor[B, T] -> logits FloatTensor[B, T, V]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        _validate_hope(cfg)
        self.head_dim = cfg.dim // cfg.n_heads
        self.rope_theta = float(cfg.rope_theta)
        self.init_std = float(cfg.init_std)
        self.tie_embeddings = bool(cfg.tie_embeddings)
        self.mixer = str(cfg.hope.mixer)
        self.cms_chunk_sizes = [int(c) for c in cfg.hope.cms_chunk_sizes]
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(HopeBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # data.document_boundaries=reset: the EOS id; every document of a window then starts from the
        # initial state (nl.models.documents.document_reset). None: a window is one sequence.
        self.document_eos_id: int | None = None

    def init_weights(self) -> None:
        """Initialise every parameter in place (after `to_empty`, or to re-initialise).

        Embedding, input projections, LM head ~ N(0, init_std); residual-branch outputs (mixer
        wo, CMS w2) ~ N(0, init_std / sqrt(2 * n_blocks)); see SelfModifyingTitans.init_weights."""
        std = self.init_std
        if self.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        out_std = std / math.sqrt(2 * len(self.layers))
        for block in self.layers:
            block.init_weights(std, out_std)
        self.norm.reset_parameters()
        if not self.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)

    def cms_level_params(self) -> dict[int | None, list[nn.Parameter]]:
        """{level: its parameters over all blocks}; key None: every parameter outside the CMS."""
        groups: dict[int | None, list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            groups.setdefault(cms_level_of(name), []).append(p)
        return groups

    def mixing_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of sequence mixing over all blocks: attention 4 * dim * T per block
        (Hope-Attention), else the inner memories of each block (SelfModifyingTitans); plus the in-context
        CMS levels' gradient sums."""
        # In-context CMS levels add the chunk sums of e h^T, 2 * dim * hidden per token and level (their
        # reads W h are the static w2's matmul, counted in 6 N).
        cms = sum(2 * level.mlp.w2.weight.numel() for block in self.layers for level in block.cms.levels
                  if level.context is not None)
        if self.mixer == "attention":
            return 4.0 * len(self.layers) * self.tok_embeddings.embedding_dim * seq_len + cms
        return sum(block.mixer.mixing_flops_per_token(seq_len) for block in self.layers) + cms

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Memory health of the last forward per block, detached 0-dim tensors (no host sync), keyed
        'memory/block<i>/<stat>': norm_<memory> (end-of-sequence norm / initial norm), eta, alpha,
        share (of the read added by the memory to the query); with in-context CMS levels, cms<l>_norm and
        cms<l>_dev (CMS.last_stats). Empty for Hope-Attention with cms_mode=outer."""
        return {f"memory/block{i}/{k}": v for i, block in enumerate(self.layers)
                for k, v in {**getattr(block.mixer, "last_stats", {}), **block.cms.last_stats}.items()
                if not k.startswith("norm/")}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(input_ids)
        docs = None if self.document_eos_id is None else Documents.from_eos(input_ids, self.document_eos_id)
        rope = None
        if self.mixer == "attention":
            rope = precompute_rope(self.head_dim, input_ids.shape[1], self.rope_theta, device=h.device)
            if docs is not None:  # RoPE positions restart in every document
                rope = docs.rope(*rope)
        for block in self.layers:
            h = block(h, rope, docs)
        return self.output(self.norm(h)).float()

    # ------------------------------------------------------------ inference ----------

    def _check_recurrent(self) -> None:
        if self.mixer == "attention":
            raise RuntimeError("recurrent decoding needs a recurrent mixer; Hope-Attention would need a "
                                      "KV cache: decode it with repeated forward() calls")

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[MixerState]]:
        """Chunked forward over a prompt [B, T] -> (logits [B, T, V], per-block recurrent state).

        The prompt is one document: with data.document_boundaries=reset a prompt holding EOS is refused
        (ValueError), as `step` carries the state on across tokens."""
        self._check_recurrent()
        if self.document_eos_id is not None and bool((input_ids == self.document_eos_id).any()):
            raise ValueError("prefill: the prompt holds EOS (several documents) and this model resets at each "
                             "document: decode one document per prompt, or switch the reset off with "
                             "nl.models.documents.document_reset(model, None)")
        h = self.tok_embeddings(input_ids)
        states = []
        for block in self.layers:
            o, state = block.mixer.forward_with_state(block.mixer_norm(h))
            h, state.cms = block.cms.forward_with_state(h + o)
            states.append(state)
        return self.output(self.norm(h)).float(), states

    @torch.no_grad()
    def step(self, token: torch.Tensor, states: list[MixerState]) -> tuple[torch.Tensor, list[MixerState]]:
        """One token per sequence, token [B] -> (logits [B, V], the next states). Constant memory per token."""
        h = self.tok_embeddings(token[:, None])
        new = []
        for block, state in zip(self.layers, states):
            o, new_state = block.mixer.step(block.mixer_norm(h), state)
            h, new_state.cms = block.cms.forward_with_state(h + o, state.cms)
            new.append(new_state)
        return self.output(self.norm(h))[:, 0].float(), new

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, generator: torch.Generator | None = None, eos_id: int | None = None,
                 stop_at_eos: bool = True) -> torch.Tensor:
        """Continue prompts [B, T] recurrently (prefill, then step) -> [B, T + n], n <= max_new_tokens.

        temperature 0 = greedy; top_k > 0 samples among the k most likely tokens; rows stop at
        eos_id unless stop_at_eos=False. The one sampling loop is `nl.generate.sample`."""
        from nl.generate import sample

        self._check_recurrent()
        return sample(self, input_ids, max_new_tokens, temperature, top_k, generator, eos_id, stop_at_eos)


@contextlib.contextmanager
def restore_after_adaptation(model: nn.Module) -> Iterator[nn.Module]:
    """Undo every change test-time adaptation makes to `model` inside the block.

    Restores, in place, all parameters and buffers (values; tied weights stay tied),
    requires_grad flags and train/eval modes. (The inner memories of a forward pass and the in-context
    CMS levels' fast weights are per-call state and never touch the module; this covers adaptation that
    writes weights.)"""
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                v.copy_(saved[k])
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        for n, m in model.named_modules():
            m.training = modes[n]
