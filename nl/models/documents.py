"""Document boundaries inside packed windows (`data.document_boundaries=reset`).

A training window of T tokens is a slice of the token stream, where every document ends with
EOS. With `reset`, each document of a window is modelled as if it were run on its own:

- document i is its tokens up to and including its EOS; document i+1 starts right after that
  EOS (a window's first token starts a document, possibly the tail of one cut by the window);
- recurrent state (HOPE's inner memories, their short-convolution caches, in-context CMS fast
  weights) restarts from its initial state at every document start;
- attention is block-diagonal causal (a token sees the earlier tokens of its own document) and
  RoPE positions restart at 0 in each document.

The recurrent parts run on `Documents.pack`: the documents of the batch as the rows of an
[N, L] batch (N documents, L the longest), right-padded with zeros. Padding after the real
tokens cannot reach them through a causal recurrence, so `unpack` of the result equals running
every document alone, exactly. Cost: N * L tokens of recurrence instead of B * T.

    docs = Documents.from_eos(input_ids, eos_id)      # once per forward
    y = docs.unpack(mixer(docs.pack(x)))              # per recurrent layer
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("none", "reset")


class Documents:
    """Where the documents of a [B, T] batch of windows start, and the index maps to pack them.

    starts: bool [B, T], True at each document's first token (column 0 always).
    Attributes: positions (int64 [B, T], offset of each token in its document), doc_ids (int64
    [B, T], document index in the batch, row-major), n_docs N, max_len L, and the flat index
    `_dest` (int64 [B*T]) of each token in the packed [N*L] layout."""

    def __init__(self, starts: torch.Tensor) -> None:
        if starts.dim() != 2 or starts.dtype != torch.bool:
            raise ValueError(f"starts must be a bool [B, T] tensor, got {starts.dtype} {tuple(starts.shape)}")
        B, T = starts.shape
        starts = starts.clone()
        starts[:, 0] = True  # every window starts a document
        flat = starts.flatten()
        self.starts = starts
        self.doc_ids = (flat.cumsum(0) - 1).view(B, T)
        first = flat.nonzero().squeeze(1)  # [N] flat index of each document's first token (one host sync)
        lengths = torch.diff(first, append=first.new_tensor([B * T]))
        self.n_docs = int(first.numel())
        self.max_len = int(lengths.max())
        self.positions = torch.arange(B * T, device=flat.device).sub(first[self.doc_ids.flatten()]).view(B, T)
        self._dest = self.doc_ids.flatten() * self.max_len + self.positions.flatten()
        self._mask: torch.Tensor | None = None  # attention_mask, built once for all blocks

    @classmethod
    def from_eos(cls, input_ids: torch.Tensor, eos_id: int) -> "Documents":
        """input_ids [B, T] int -> the documents of each window: a new one starts after every EOS
        (an EOS in the last column starts nothing inside the window)."""
        starts = torch.zeros_like(input_ids, dtype=torch.bool)
        starts[:, 1:] = input_ids[:, :-1] == eos_id
        return cls(starts)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, ...] -> [N, L, ...]: document n in row n, zeros after its last token."""
        B, T = self.starts.shape
        flat = x.reshape(B * T, *x.shape[2:])
        out = flat.new_zeros(self.n_docs * self.max_len, *x.shape[2:]).index_copy(0, self._dest, flat)
        return out.view(self.n_docs, self.max_len, *x.shape[2:])

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """y [N, L, ...] -> [B, T, ...]: each token's row back in its window (padding dropped)."""
        B, T = self.starts.shape
        return y.reshape(self.n_docs * self.max_len, *y.shape[2:]).index_select(0, self._dest).view(B, T, *y.shape[2:])

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """layer run on every document alone: unpack(layer(pack(x))). x [B, T, dim] -> [B, T, dim]."""
        return self.unpack(layer(self.pack(x)))

    def attention_mask(self) -> torch.Tensor:
        """bool [B, 1, T, T], True where query s may attend key t: same document and t <= s."""
        if self._mask is None:
            same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]
            T = self.doc_ids.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=same.device).tril()
            self._mask = (same & causal)[:, None]
        return self._mask

    def rope(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables [T, Dh/2] (positions 0..T-1) -> [B, T, Dh/2] at each token's position in its
        document, so positions restart at 0 in every document."""
        return cos[self.positions], sin[self.positions]


def document_reset(model: nn.Module, eos_id: int | None) -> None:
    """Make `model`'s forward treat each EOS-terminated document of a window on its own (eos_id) or
    see the window as one sequence (None, the default). Raises ValueError for a model without the
    switch (its class has no `document_eos_id` attribute)."""
    if not hasattr(model, "document_eos_id"):
        raise ValueError(f"{type(model).__name__} does not support data.document_boundaries=reset: "
                         f"use data.document_boundaries=none")
    model.document_eos_id = None if eos_id is None else int(eos_id)
