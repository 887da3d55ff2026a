"""Document boundaries inside packed windows (`data.document_boundaries=reset`).

A training window of T tokens is a slice of the token stream, where every document ends with
EOS. With `reset`, each document of a window is modelled as if it were run on its own:

- document i is its tokens up to and including its EOS; document i+1 starts right after that
  EOS (a window's first token starts a document, possibly the tail of one cut by the window);
- recurrent state (HOPE's inner memories, their short-convolution caches, in-context CMS fast
  weights) restarts from its initial state at every document start;
- attention is block-diagonal causal (a token sees the earlier tokens of its own document) and
  RoPE positions restart at 0 in each document.

The recurrent parts run through `Documents.apply`: the documents of the batch, grouped by length,
as the rows of padded batches [n, L] (L the group's longest), right-padded with zeros. Padding
after the real tokens cannot reach them through a causal recurrence, so the result equals running
every document alone, exactly. Cost: `padded_tokens()` tokens of recurrence instead of B * T, in
one call of the layer per group.

    docs = Documents.from_eos(input_ids, eos_id)      # once per forward
    y = docs.apply(mixer, x)                          # per recurrent layer
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("none", "reset")


# Documents of at most this many tokens share one padded batch: below it, one more call of a
# recurrent layer (its chunk loop) costs more than the padding it saves.
MIN_GROUP_LEN = 64


class Documents:
    """Where the documents of a [B, T] batch of windows start, and the index maps to run them alone.

    starts: bool [B, T], True at each document's first token (column 0 always).
    Attributes: positions (int64 [B, T], offset of each token in its document), doc_ids (int64
    [B, T], document index in the batch, row-major), n_docs N, and `groups`: the documents grouped
    by length (up to MIN_GROUP_LEN tokens, then one group per power of two: padding at most doubles a
    group's tokens), each group a padded batch [n, L] of its documents (`apply`)."""

    def __init__(self, starts: torch.Tensor) -> None:
        if starts.dim() != 2 or starts.dtype != torch.bool:
            raise ValueError(f"starts must be a bool [B, T] tensor, got {starts.dtype} {tuple(starts.shape)}")
        B, T = starts.shape
        starts = starts.clone()
        starts[:, 0] = True  # every window starts a document
        flat = starts.flatten()
        self.starts = starts
        self.doc_ids = (flat.cumsum(0) - 1).view(B, T)
        first = flat.nonzero().squeeze(1)  # [N] flat index of each document's first token
        lengths = torch.diff(first, append=first.new_tensor([B * T])).tolist()  # host copy: shapes need it
        self.n_docs = len(lengths)
        self.positions = torch.arange(B * T, device=flat.device).sub(first[self.doc_ids.flatten()]).view(B, T)
        members: dict[int, list[int]] = {}
        for doc, length in enumerate(lengths):
            bucket = (max(length, MIN_GROUP_LEN) - 1).bit_length()  # lengths in (2^(b-1), 2^b]
            members.setdefault(bucket, []).append(doc)
        doc_row = [0] * self.n_docs
        doc_group = [0] * self.n_docs
        for g, docs in enumerate(members.values()):
            for row, doc in enumerate(docs):
                doc_row[doc], doc_group[doc] = row, g
        doc_row_t = torch.tensor(doc_row, device=flat.device)
        token_group = torch.tensor(doc_group, device=flat.device)[self.doc_ids.flatten()]
        # groups: (tokens: flat indices in [B*T] of the group's tokens, dest: their flat indices in the
        # group's packed [n * L], n documents, L the group's longest)
        self.groups: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
        for g, docs in enumerate(members.values()):
            L = max(lengths[d] for d in docs)
            tokens = (token_group == g).nonzero().squeeze(1)
            dest = doc_row_t[self.doc_ids.flatten()[tokens]] * L + self.positions.flatten()[tokens]
            self.groups.append((tokens, dest, len(docs), L))
        # The groups' outputs, concatenated, back in window order.
        self._order = torch.cat([tokens for tokens, *_ in self.groups]).argsort()
        self._mask: torch.Tensor | None = None  # attention_mask, built once for all blocks

    @classmethod
    def from_eos(cls, input_ids: torch.Tensor, eos_id: int) -> "Documents":
        """input_ids [B, T] int -> the documents of each window: a new one starts after every EOS
        (an EOS in the last column starts nothing inside the window)."""
        starts = torch.zeros_like(input_ids, dtype=torch.bool)
        starts[:, 1:] = input_ids[:, :-1] == eos_id
        return cls(starts)

    def padded_tokens(self) -> int:
        """Tokens `apply` runs a layer on, padding included: sum over groups of n * L (>= B * T)."""
        return sum(n * L for *_, n, L in self.groups)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`layer` run on every document alone. x [B, T, ...] -> layer's output per token [B, T, ...].

        Per group, the documents are the rows of a [n, L, ...] batch, right-padded with zeros: padding
        after a document cannot reach it through a causal layer, so the result equals running each
        document as its own sequence. A layer's `last_stats` (0-dim diagnostics) become their mean
        over all N documents (per-chunk traces are kept only when there is one group)."""
        B, T = self.starts.shape
        flat = x.reshape(B * T, *x.shape[2:])
        outs, stats = [], []
        for tokens, dest, n, L in self.groups:
            packed = flat.new_zeros(n * L, *x.shape[2:]).index_copy(0, dest, flat.index_select(0, tokens))
            y = layer(packed.view(n, L, *x.shape[2:]))
            outs.append(y.reshape(n * L, *y.shape[2:]).index_select(0, dest))
            stats.append((n, dict(getattr(layer, "last_stats", {}))))
        if len(self.groups) > 1 and hasattr(layer, "last_stats"):
            layer.last_stats = {k: sum(n * s[k] for n, s in stats) / self.n_docs for k, v in stats[0][1].items()
                                if v.dim() == 0}
        y = torch.cat(outs).index_select(0, self._order)
        return y.view(B, T, *y.shape[1:])

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
