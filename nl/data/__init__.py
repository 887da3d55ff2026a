"""Data pipeline: text sources -> token shards -> deterministic resumable loader.

- `nl.data.sources`: `iter_documents` (txt/jsonl/parquet/datasets) and the built-in demo corpus.
- `nl.data.shards`: the token-shard format, `TokenShards` (validated, memory-mapped), `ShardWriter`.
- `nl.data.loader`: `TokenLoader` (global permutation, per-rank slice, integer state) and
  `iter_eval_batches`. It imports torch, so it is not imported here.
- `nl.data.mixture`: `data.sources`, several token directories sampled by weight (`MixtureLoader`).
"""

from nl.data.shards import DataError

__all__ = ["DataError"]
