"""Layers shared by the model files: RMSNorm, SwiGLU and rotary position embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2, -1) + eps) * weight, computed in fp32 and cast back to x.dtype.

    x: [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def resolve_ffn_hidden(dim: int, ffn_hidden: int, multiple_of: int) -> int:
    """SwiGLU width: `ffn_hidden` if non-zero, else ceil(8/3 * dim / multiple_of) * multiple_of (Llama)."""
    if ffn_hidden > 0:
        return ffn_hidden
    return -(-8 * dim // (3 * multiple_of)) * multiple_of


class SwiGLU(nn.Module):
    """y = w2(silu(w1 x) * w3 x): w1 the gate, w3 the up projection, w2 the down projection.

    x: [..., dim] -> [..., dim]; hidden width `hidden`; no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def precompute_rope(head_dim: int, seq_len: int, theta: float = 10000.0,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for positions 0..seq_len-1, in fp32.

    Frequencies f_i = theta^(-2i / head_dim), i < head_dim / 2; angle[t, i] = t * f_i.
    Returns (cos, sin), each [seq_len, head_dim // 2]."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
    freqs = theta ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, freqs)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by position (half-split pairing: dim i is paired with dim i + Dh/2).

    q, k: [B, T, H, Dh]; cos, sin: [T, Dh/2] from `precompute_rope`, or [B, T, Dh/2] for positions
    per sequence (nl.models.documents). The rotation is done in fp32 and cast back. Afterwards
    q_s . k_t depends on the positions only through s - t."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [(B,) T, 1, Dh/2], broadcast over heads (and batch)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
