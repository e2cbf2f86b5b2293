"""Batches as a pure function of (seed, step): the same global batch whatever the process layout.

A run on 1 GPU, on 8, or resumed half-way on 4 with more micro-batches sees exactly the same sequences at
each step; only who computes which rows changes.  That makes layouts comparable loss-for-loss and makes
resumption need nothing but the step number (no sampler state to checkpoint).
"""

from __future__ import annotations

import numpy as np
import torch


def _check_stream(tokens: np.ndarray, seq_len: int, what: str = "token stream") -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if tokens.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(tokens.shape)}")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"{what} has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1} needed for one window; "
            "lower data.seq_len or use a larger corpus"
        )


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """Gather ``[len(starts), seq_len+1]`` windows; fancy indexing reads only the needed pages of a memmap."""
    idx = starts.astype(np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    return torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))


class GlobalBatchSampler:
    """Random windows of ``seq_len + 1`` tokens; columns ``:-1`` are inputs and ``1:`` their labels."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        _check_stream(tokens, seq_len, "train token stream")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed

    def offsets(self, step: int) -> np.ndarray:
        """Window starts of step ``step``: a fresh generator per (seed, step), so no state carries over."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size, dtype=np.int64)

    def global_batch(self, step: int) -> torch.Tensor:
        """LongTensor ``[batch_size, seq_len + 1]``: the whole optimizer step, as every rank would agree."""
        return _windows(self.tokens, self.offsets(step), self.seq_len)

    def shard(self, step: int, rank: int, world: int, microbatches: int = 1) -> list[torch.Tensor]:
        """Rows ``[rank*B/world, (rank+1)*B/world)`` of the global batch, split into equal micro-batches.

        Only this rank's rows are read from the stream, but they are the same rows ``global_batch`` holds.
        """
        lo, hi, rows = rank_rows(self.batch_size, rank, world, microbatches)
        return list(_windows(self.tokens, self.offsets(step)[lo:hi], self.seq_len).split(rows))


def rank_rows(batch_size: int, rank: int, world: int, microbatches: int) -> tuple[int, int, int]:
    """(first row, end row, rows per micro-batch) of `rank`'s share of a batch of `batch_size` sequences
    cut over `world` data-parallel ranks: the one cut of training steps and evaluation rounds alike."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank}, world={world}: need world >= 1 and 0 <= rank < world")
    if microbatches < 1:
        raise ValueError(f"microbatches={microbatches} must be >= 1")
    if batch_size % (world * microbatches):
        raise ValueError(
            f"batch_size={batch_size} is not divisible by world*microbatches={world}*{microbatches}"
            f"={world * microbatches}"
        )
    per_rank = batch_size // world
    return rank * per_rank, (rank + 1) * per_rank, per_rank // microbatches


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int) -> list[torch.Tensor]:
    """``n_batches`` fixed ``[batch_size, seq_len + 1]`` batches of consecutive windows from the stream start.

    Consecutive windows step by ``seq_len`` so every token is predicted once; a stream too short for
    ``n_batches * batch_size`` windows wraps round to its start.  Fixed windows make val losses of different
    steps, runs and layouts directly comparable.
    """
    _check_stream(tokens, seq_len, "val token stream")
    if batch_size < 1 or n_batches < 0:
        raise ValueError(f"batch_size={batch_size} must be >= 1 and n_batches={n_batches} >= 0")
    n_windows = (len(tokens) - 1) // seq_len
    starts = (np.arange(n_batches * batch_size, dtype=np.int64) % n_windows) * seq_len
    return [
        _windows(tokens, starts[i * batch_size : (i + 1) * batch_size], seq_len) for i in range(n_batches)
    ]
