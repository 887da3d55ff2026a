"""Deterministic, resumable token loader (OLMo-core style) and the in-order eval iterator.

Training samples form one global stream independent of the world size: with N windows of
seq_len+1 tokens (see TokenShards.num_windows), global sample s is window

    perm(seed, s // N)[s % N],   perm(seed, epoch) = np.random.default_rng([seed, epoch]).permutation(N)

Each `next_batch` consumes the next `global_batch_size` samples; rank r takes samples
[r*B_local, (r+1)*B_local) of them. The whole loader state is (seed, samples_seen, seq_len, data
fingerprint), so a resume is exact and may change the world size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from nl.data.shards import DataError, TokenShards


def _to_batch(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T+1] token windows -> (inputs [B, T], targets [B, T]) as contiguous int64 tensors."""
    w = torch.from_numpy(windows.astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def take_from_periods(first: int, count: int, period: int, table: Callable[[int], np.ndarray]) -> np.ndarray:
    """Items [first, first + count) of the stream table(0) ++ table(1) ++ ..., where table(i) is an
    integer array of length `period` (>= 1): [count] int64. table(i) is called once per period touched,
    in increasing i, so a table that caches its latest period regenerates each one once."""
    out = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        i, offset = divmod(first + filled, period)
        take = min(count - filled, period - offset)
        out[filled:filled + take] = table(i)[offset:offset + take]
        filled += take
    return out


class EpochPermutations:
    """The window order of one split over epochs: sample j is window perm(j // n)[j % n], where
    perm(e) = np.random.default_rng([*key, e]).permutation(n) and n = num_windows.

    Only the current epoch's permutation is kept (int32 below 2**31 windows): a run moving
    forward regenerates each permutation once, a batch straddling two epochs at most one more.
    """

    def __init__(self, num_windows: int, key: tuple[int, ...]):
        self.num_windows, self.key = num_windows, tuple(key)
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            n = self.num_windows
            perm = np.random.default_rng([*self.key, epoch]).permutation(n)
            self._perm = perm.astype(np.int32) if n < 2**31 else perm
            self._epoch = epoch
        return self._perm

    def indices(self, first_sample: int, count: int) -> np.ndarray:
        """Window index of each sample in [first_sample, first_sample + count): [count] int64."""
        return take_from_periods(first_sample, count, self.num_windows, self._permutation)


def check_loader_args(global_batch_size: int, rank: int, world_size: int, seed: int) -> None:
    """Raise DataError (one line with the fix) for a rank layout or seed a loader cannot honour."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size}): check the launcher's RANK/WORLD_SIZE")
    if global_batch_size < 1 or global_batch_size % world_size:
        raise DataError(f"global batch size {global_batch_size} is not a positive multiple of the world size "
                        f"{world_size}: set train.batch_size to a multiple of {world_size}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}: set train.seed to a non-negative integer")


def check_loader_state(state: dict, fingerprint: str, seq_len: int, seed: int, data: str, setting: str) -> None:
    """Raise DataError (one line with the fix) unless a loader's `state` fits this run's fingerprint,
    seq_len and seed; `data` names this run's data in the message, `setting` the config key holding it."""
    missing = {"seed", "samples_seen", "seq_len", "fingerprint"} - set(state)
    if missing:
        raise DataError(f"loader state lacks {', '.join(sorted(missing))}: it was not written by "
                        f"this codebase's loaders; resume from a checkpoint of this codebase")
    if state["fingerprint"] != fingerprint:
        raise DataError(f"loader state fingerprint {str(state['fingerprint'])[:12]} does not match {data}: the "
                        f"checkpoint was trained on other data; resume with the same {setting} or start a new run")
    if int(state["seq_len"]) != seq_len:
        raise DataError(f"loader state has seq_len {state['seq_len']}, this run has {seq_len}: "
                        f"resume with data.seq_len={state['seq_len']} or start a new run")
    if int(state["seed"]) != seed:
        raise DataError(f"loader state has seed {state['seed']}, this run has {seed}: "
                        f"resume with train.seed={state['seed']} or start a new run")


class ResumableLoader:
    """The checkpoint state of a training loader (TokenLoader, MixtureLoader): a subclass sets `seed`,
    `samples_seen`, `seq_len` (ints) and `fingerprint` (str, its data) and resumes with check_loader_state."""

    seed: int
    samples_seen: int
    seq_len: int
    fingerprint: str

    def state_dict(self) -> dict:
        """{"seed", "samples_seen", "seq_len", "fingerprint"}: plain ints and a str."""
        return {"seed": self.seed, "samples_seen": self.samples_seen, "seq_len": self.seq_len,
                "fingerprint": self.fingerprint}


class TokenLoader(ResumableLoader):
    """Shuffled training batches of one rank; `next_batch()` -> (inputs, targets), each [B_local, seq_len]."""

    def __init__(self, shards: TokenShards, seq_len: int, global_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        check_loader_args(global_batch_size, rank, world_size, seed)
        shards.check_seq_len(seq_len, min_windows=1)
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.local_batch_size = global_batch_size // world_size
        self.num_windows = shards.num_windows(seq_len)
        self.fingerprint = shards.data_fingerprint
        self.samples_seen = 0
        self._order = EpochPermutations(self.num_windows, (seed,))

    @property
    def epoch(self) -> int:
        """Epoch of the next sample (0-based)."""
        return self.samples_seen // self.num_windows

    def window_indices(self, first_sample: int, count: int) -> np.ndarray:
        """Window index of each global sample in [first_sample, first_sample + count): [count] int64."""
        return self._order.indices(first_sample, count)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the next global batch: (inputs, targets), int64 [B_local, seq_len]."""
        first = self.samples_seen + self.rank * self.local_batch_size
        idx = self.window_indices(first, self.local_batch_size)
        windows = self.shards.windows(idx * self.seq_len, self.seq_len + 1)
        self.samples_seen += self.global_batch_size
        return _to_batch(windows)

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (any world size / rank); errors if it belongs to other data or settings."""
        check_loader_state(state, self.fingerprint, self.seq_len, self.seed,
                           data=f"the data ({self.fingerprint[:12]}, {self.shards.dir})", setting="data.dir")
        self.samples_seen = int(state["samples_seen"])


def iter_eval_batches(shards: TokenShards, seq_len: int, batch_size: int, max_batches: int = 0,
                      rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows 0..N-1 of `shards` in order, as this rank's (inputs, targets) int64 [<=batch_size, seq_len].

    Global eval batch g is windows [g*batch_size*W, (g+1)*batch_size*W) and rank r takes the r-th
    equal part, so the ranks' windows are disjoint and every rank yields the same number of
    batches (needed by collective forwards such as FSDP). Only the first N - N % W windows are
    used (at most W-1 dropped); the last batch may be smaller. max_batches=0 means all batches.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size}): check the launcher's RANK/WORLD_SIZE")
    if batch_size < 1:
        raise DataError(f"eval batch size must be >= 1, got {batch_size}")
    shards.check_seq_len(seq_len, min_windows=world_size)
    usable = shards.num_windows(seq_len) // world_size * world_size
    step = batch_size * world_size
    for batch, first in enumerate(range(0, usable, step)):
        if max_batches and batch >= max_batches:
            return
        local = min(step, usable - first) // world_size
        idx = np.arange(first + rank * local, first + (rank + 1) * local, dtype=np.int64)
        yield _to_batch(shards.windows(idx * seq_len, seq_len + 1))
