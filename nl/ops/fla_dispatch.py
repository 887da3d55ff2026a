"""The read-out memory's recurrence on flash-linear-attention's `chunk_gated_delta_rule` where it is one.

fla's gated delta rule (fla-core, Triton; state h = S^T, [K, V]) is, per head and token,

    S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T,     o_t = S_t q_t      (a_t = exp(g_t))

Ours (nl/ops/titans.py, linear memory M(k) = S k, Titans' target v_t, no momentum, memory chunk 1, so that
the gradient's anchor is S_{t-1}) is, with c = 2 with DGD's decay (x x^T term plus the gradient's) and 1
without, and on the deviation D = S - M_0 with retention_target="init" (D_0 = 0, v~_t = v_t - M_0 k_t)
or on S itself with "zero" (v~_t = v_t):

    D_t = alpha_t D_{t-1} - c eta_t (D_{t-1} k_t) k_t^T + eta_t v~_t k_t^T,   o_t = S_{t-1} q_t  (read before write)

so fla computes it exactly with a = alpha, b = c eta / alpha, v = v~ alpha / c (then b v = eta v~ and
a b = c eta), and the read before the write is fla's read after the write one token earlier: fla's
query at t is q_{t+1}, o_{t+1} = fla's o_t, o_0 = S_0 q_0; M_0 q_t is added back under "init".

What does not qualify (`fla_unsupported` says which switch): a self-generated target M(v) (HOPE: the
target moves with the memory, S (k - v) k^T is no delta rule); an MLP memory; inner momentum (fla's
rule has none); a memory chunk above 1 (the gradient is taken at the chunk's anchor, Titans' mini-batch
step: its inputs v - A k depend on the previous chunk's end state, not known up front); per-chunk norm
traces. The generators' recurrences never qualify (their targets are their own outputs).
Reads need 0 < alpha: b = c eta / alpha overflows where alpha underflows (alpha < ~1e-38 in fp32).
"""

from __future__ import annotations

import torch

# Devices the dispatch runs on: fla's kernels need a GPU (tests add "cpu" under TRITON_INTERPRET=1).
DEVICES = ("cuda",)


def fla_unsupported(cfg, n_memory_layers: int, trace: bool = False) -> str | None:
    """None where the read-out memory's recurrence of `cfg` (a RecurrenceConfig) is exactly fla's gated
    delta rule with inputs known up front, else the reason it is not."""
    if cfg.target != "value":
        return "the target is the memory's own output M(v) (target=self), not a fixed v"
    if n_memory_layers != 1:
        return "the memory is an MLP (memory_type=mlp), not linear"
    if cfg.momentum:
        return "inner momentum (fla's rule has none)"
    if cfg.memory_chunk_size != 1:
        return (f"memory_chunk_size={cfg.memory_chunk_size}: the gradient is taken at the chunk's anchor "
                f"(mini-batch step), the delta rule's at every token (memory_chunk_size=1)")
    if trace:
        return "per-chunk norm traces need every state"
    return None


def use_fla(cfg, n_memory_layers: int, device: torch.device, trace: bool) -> bool:
    """Dispatch here: the variant qualifies, model.hope.kernel is not torch, the device is in DEVICES and
    fla-core imports."""
    if cfg.kernel == "torch" or device.type not in DEVICES or fla_unsupported(cfg, n_memory_layers, trace):
        return False
    try:
        import fla.ops.gated_delta_rule  # noqa: F401  (optional: pip install fla-core)
    except ImportError:
        return False
    return True


def titans_memory_fla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                      log_alpha: torch.Tensor, S0: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The read-out memory over the whole sequence with fla's `chunk_gated_delta_rule`.

    q, k (L2-normalised), v: [B, H, T, d]; eta, log_alpha: [B, H, T]; S0: the memory's initial state
    (also M_0) [H, d, d] or [B, H, d, d]; cfg: a RecurrenceConfig that `fla_unsupported` accepts.
    Returns (o [B, H, T, d] with o_t = S_{t-1} q_t, the state S_T [B, H, d, d]); same dtype as q."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    B, H, T, d = q.shape
    c = 2.0 if cfg.dgd else 1.0
    S0 = S0.expand(B, H, d, d)
    init = cfg.retention_target == "init"
    if init:
        v = v - k @ S0.mT  # v~ = v - M_0 k; the recurrence runs on D = S - M_0, D_0 = 0
    alpha = log_alpha.exp()
    beta = c * eta / alpha
    v_fla = v * (alpha / c)[..., None]
    q_next = torch.cat([q[:, :, 1:], torch.zeros_like(q[:, :, :1])], dim=2)  # fla reads after its write
    h0 = None if init else S0.mT.contiguous()  # [B, H, K, V] = S^T

    def fla_layout(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, ...] -> [B, T, H, ...]
        return x.transpose(1, 2).contiguous()

    o_next, hT = chunk_gated_delta_rule(fla_layout(q_next), fla_layout(k), fla_layout(v_fla), fla_layout(log_alpha),
                                        fla_layout(beta), scale=1.0, initial_state=h0, output_final_state=True)
    o_next = o_next.transpose(1, 2)  # o_next[t] = D_t q_{t+1}
    first = torch.zeros_like(q[:, :, :1]) if init else q[:, :, :1] @ S0.mT  # D_0 q_0
    o = torch.cat([first, o_next[:, :, :T - 1]], dim=2)
    S_T = hT.mT.contiguous()  # [B, H, V, K] = S, laid out as our states are
    if init:
        o = o + q @ S0.mT
        S_T = S_T + S0
    return o, S_T
