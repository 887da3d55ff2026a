"""Transformer++ (Llama-style) baseline: pre-norm blocks of RoPE causal attention and SwiGLU.

    h = embed(input_ids)
    for each block:  h = h + Attention(RMSNorm(h)) ; h = h + SwiGLU(RMSNorm(h))
    logits = output(RMSNorm(h))      (output.weight is embed.weight when tie_embeddings)

Built on the meta device and materialised with `to_empty` + `init_weights` (see
`nl.models.build_model`); parallelism (FSDP, activation checkpointing) is applied to
`model.layers` from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nl.config import ModelConfig
from nl.models import register_model
from nl.models.documents import Documents
from nl.models.layers import RMSNorm, SwiGLU, apply_rope, precompute_rope, resolve_ffn_hidden


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE, no biases. x: [B, T, dim] -> [B, T, dim]."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """cos, sin: [T, Dh/2] or [B, T, Dh/2] (`apply_rope`); mask: None (causal) or bool [B, 1, T, T],
        True where a query may attend a key (block-diagonal causal: `Documents.attention_mask`)."""
        B, T, _ = x.shape
        shape = (B, T, self.n_heads, self.head_dim)
        q, k = apply_rope(self.wq(x).view(shape), self.wk(x).view(shape), cos, sin)
        v = self.wv(x).view(shape)
        # SDPA wants [B, H, T, Dh].
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class TransformerBlock(nn.Module):
    """h = x + Attention(RMSNorm(x)); y = h + SwiGLU(RMSNorm(h)). x: [B, T, dim] -> [B, T, dim]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.dim, resolve_ffn_hidden(cfg.dim, cfg.ffn_hidden, cfg.ffn_multiple_of))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, std: float, out_std: float) -> None:
        """Input projections ~ N(0, std); the two residual-branch outputs (wo, w2) ~ N(0, out_std)."""
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        for linear in (self.attention.wq, self.attention.wk, self.attention.wv,
                       self.feed_forward.w1, self.feed_forward.w3):
            nn.init.normal_(linear.weight, mean=0.0, std=std)
        for linear in (self.attention.wo, self.feed_forward.w2):
            nn.init.normal_(linear.weight, mean=0.0, std=out_std)


@register_model("transformer")
class Transformer(nn.Module):
    """Decoder-only Transformer++. forward: input_ids LongTensor[B, T] -> logits FloatTensor[B, T, V]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Plain Python values, not the (OmegaConf) config object: cheap to read and compile-friendly.
        self.head_dim = cfg.dim // cfg.n_heads
        self.rope_theta = float(cfg.rope_theta)
        self.init_std = float(cfg.init_std)
        self.tie_embeddings = bool(cfg.tie_embeddings)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # data.document_boundaries=reset: the EOS id, and attention stays inside each document
        # (nl.models.documents.document_reset); None: a window is one sequence.
        self.document_eos_id: int | None = None

    def init_weights(self) -> None:
        """Initialise every parameter in place (after `to_empty`, or to re-initialise).

        Embedding, attention and SwiGLU input projections and the LM head ~ N(0, init_std);
        the residual-branch output projections (attention wo, SwiGLU w2) ~ N(0, init_std /
        sqrt(2 * n_layers)) as in GPT-2/OLMo; norm weights = 1. Re-ties the LM head to the
        embedding first (`to_empty` gives tied parameters separate storage)."""
        std = self.init_std
        if self.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        out_std = std / math.sqrt(2 * len(self.layers))
        for block in self.layers:
            block.init_weights(std, out_std)
        self.norm.reset_parameters()
        if not self.tie_embeddings:
            nn.init.normal_(self.output.weight, mean=0.0, std=std)

    def mixing_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of attention itself (QK^T and AV, full square): 4 * L * dim * T."""
        return 4.0 * len(self.layers) * self.tok_embeddings.embedding_dim * seq_len

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(input_ids)
        cos, sin = precompute_rope(self.head_dim, input_ids.shape[1], self.rope_theta, device=h.device)
        mask = None
        if self.document_eos_id is not None:  # each document alone: positions restart, no attention across
            docs = Documents.from_eos(input_ids, self.document_eos_id)
            (cos, sin), mask = docs.rope(cos, sin), docs.attention_mask()
        for block in self.layers:
            h = block(h, cos, sin, mask)
        return self.output(self.norm(h)).float()
