"""Weighted mixtures of ``memmap`` corpora (``data.name=mixture``, ``data.mixture``).

Which source each sequence comes from is fixed by its global index alone: sequence ``g`` (row ``r`` of step
``s`` is ``g = s * batch_size + r``) takes the source whose cumulative-weight interval holds ``frac(g / φ)``,
a golden-ratio Weyl sequence.  Its points spread so evenly that every run of consecutive sequences, even one
batch, holds each source in almost exactly its weight's share (as Megatron-Core's blended datasets do with
a greedy schedule), yet nothing is stateful.  The window inside the source and the order of rows within
the batch come from a generator seeded by ``(seed, step)``.  The global batch is therefore a pure function of
``(seed, step)``: the same in every layout (ranks cut it with ``rank_rows``) and identical after a resume.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, DataConfig
from .dataset import TokenDataset, _load_memmap
from .sampler import _check_stream, _windows, rank_rows

_WEYL = 0x9E3779B9  # round(2^32 / φ): the multiplier whose points leave the smallest gaps (Knuth)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # names become metric keys (val_loss/NAME, source_tokens/NAME)


@dataclass(frozen=True)
class MixtureSource:
    name: str
    path: str
    weight: float


def mixture_sources(d: DataConfig) -> list[MixtureSource]:
    """``data.mixture`` checked and typed; a bad entry raises ConfigError naming ``data.mixture[i].key``."""
    if d.name != "mixture":
        if d.mixture:
            raise ConfigError(
                f"data.mixture is set but data.name={d.name!r}: set data.name=mixture to train on it"
            )
        return []
    raw = d.mixture
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ConfigError(
            f"data.mixture={raw!r} is not allowed: a non-empty list of {{name, path, weight}} "
            "when data.name=mixture"
        )
    out: list[MixtureSource] = []
    for i, entry in enumerate(raw):
        key = f"data.mixture[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{key}={entry!r} is not allowed: a mapping with keys name, path, weight")
        extra = sorted(set(entry) - {"name", "path", "weight"})
        if extra:
            raise ConfigError(f"{key}.{extra[0]} is not a key of a mixture source: use name, path, weight")
        for k in ("name", "path", "weight"):
            if entry.get(k) is None:
                raise ConfigError(f"{key}.{k} is missing: every source needs name, path and weight")
        name, path, weight = entry["name"], entry["path"], entry["weight"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{key}.name={name!r} is not allowed: letters, digits, '_', '.', '-'")
        if name in (s.name for s in out):
            raise ConfigError(f"{key}.name={name!r} is not allowed: source names must be unique")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{key}.path={path!r} is not allowed: a prepared memmap corpus directory")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"{key}.weight={weight!r} is not allowed: a positive finite number")
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"{key}.weight={weight!r} is not allowed: a positive finite number")
        out.append(MixtureSource(name, path, float(weight)))
    return out


def source_of(cum: np.ndarray, first: int, n: int) -> np.ndarray:
    """Source ids of global sequences ``first .. first+n-1`` (``cum``: cumulative normalized weights)."""
    g = np.arange(first, first + n, dtype=np.uint64)
    # uint64 products wrap mod 2^64, which keeps the low 32 bits exact for any index
    u = ((g * np.uint64(_WEYL)) & np.uint64(0xFFFFFFFF)).astype(np.float64) / float(1 << 32)
    return np.minimum(np.searchsorted(cum, u, side="right"), len(cum) - 1)


def cumulative(weights: list[float]) -> np.ndarray:
    """Cumulative normalized weights, the last exactly 1 so every point of [0, 1) falls in a source."""
    cum = np.cumsum(np.asarray(weights, dtype=np.float64))
    cum /= cum[-1]
    cum[-1] = 1.0
    return cum


def step_source_tokens(
    sources: list[MixtureSource], batch_size: int, seq_len: int, step: int
) -> dict[str, int]:
    """``{"source_tokens/NAME": tokens}`` of step ``step``'s batch (0-based): a function of the config
    alone, so the logging rank computes it without reading data or talking to other ranks."""
    ids = source_of(cumulative([s.weight for s in sources]), step * batch_size, batch_size)
    counts = np.bincount(ids, minlength=len(sources))
    return {f"source_tokens/{s.name}": int(c) * seq_len for s, c in zip(sources, counts, strict=True)}


@dataclass
class MixtureDataset:
    """The sources' corpora in config order, with what the model and the run record need."""

    sources: list[MixtureSource]
    corpora: list[TokenDataset]
    vocab_size: int
    eod_id: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def val(self) -> dict[str, np.ndarray]:
        """Each source's held-out stream by name: evaluation reports a val loss per source."""
        return {s.name: c.val for s, c in zip(self.sources, self.corpora, strict=True)}


def tokenizer_key(info: dict[str, Any], other: dict[str, Any]) -> str | None:
    """Which recorded hash two corpora are compared by: ``tokenizer_hash`` (the tokenizer's JSON in
    canonical form, so a re-saved file still matches) when both record it, else ``tokenizer_fingerprint``
    (the file's raw sha256; ``bytes-v1`` for bytes) when both do; None when they share neither."""
    for key in ("tokenizer_hash", "tokenizer_fingerprint"):
        if info.get(key) is not None and other.get(key) is not None:
            return key
    return None


def load_mixture(d: DataConfig) -> MixtureDataset:
    """Map every source; all must share one tokenizer, told by a recorded hash of it (``tokenizer_key``), so
    two tokenizers of equal vocab size are told apart.  A source whose meta.json records no hash that the
    first source also records is "unknown" and refused: its compatibility cannot be shown."""
    sources = mixture_sources(d)
    corpora: list[TokenDataset] = []
    for i, s in enumerate(sources):
        try:
            corpora.append(_load_memmap(dataclasses.replace(d, name="memmap", path=s.path, mixture=[])))
        except (OSError, ValueError) as e:
            raise type(e)(f"data.mixture[{i}] ({s.name}): {e}") from None
        for split in ("train", "val"):
            n = len(getattr(corpora[-1], split))
            if n < d.seq_len + 1:  # here, where the source can be named, not at the first step or eval
                raise ValueError(
                    f"data.mixture[{i}] ({s.name}): {s.path}/{split}.bin holds {n} tokens, fewer than "
                    f"data.seq_len+1={d.seq_len + 1}; lower data.seq_len or use a larger corpus"
                )
    first, ref = sources[0], corpora[0]
    for i, (s, c) in enumerate(zip(sources, corpora, strict=True)):
        for what in ("vocab_size", "eod_id"):
            if c.info[what] != ref.info[what]:
                raise ValueError(
                    f"data.mixture[{i}] ({s.name}) has {what}={c.info[what]!r} but data.mixture[0] "
                    f"({first.name}) has {ref.info[what]!r}: every source needs the same tokenizer"
                )
    for i, (s, c) in enumerate(zip(sources, corpora, strict=True)):
        key = tokenizer_key(c.info, ref.info)
        if key is None:
            bad = 0 if tokenizer_key(c.info, c.info) and not tokenizer_key(ref.info, ref.info) else i
            where = sources[bad]
            raise ValueError(
                f"data.mixture[{bad}] ({where.name}): {where.path}/meta.json records no tokenizer_hash or "
                "tokenizer_fingerprint that the other sources record, so its tokenizer cannot be matched "
                "with theirs; prepare it again with python -m moe_train.data.prepare"
            )
        if c.info[key] != ref.info[key]:
            raise ValueError(
                f"data.mixture[{i}] ({s.name}) has {key}={c.info[key]!r} but data.mixture[0] "
                f"({first.name}) has {ref.info[key]!r}: every source needs the same tokenizer"
            )
    total = sum(s.weight for s in sources)
    info: dict[str, Any] = {
        "name": "mixture",
        "sources": [
            {**c.info, "name": s.name, "weight": s.weight / total}
            for s, c in zip(sources, corpora, strict=True)
        ],
        "tokenizer": ref.info.get("tokenizer"),
        "tokenizer_fingerprint": ref.info.get("tokenizer_fingerprint"),
        "tokenizer_hash": ref.info.get("tokenizer_hash"),
        "vocab_size": ref.vocab_size,
        "eod_id": ref.eod_id,
    }
    return MixtureDataset(sources, corpora, ref.vocab_size, ref.eod_id, info)


class MixtureSampler:
    """GlobalBatchSampler's interface over several train streams (see the module docstring)."""

    def __init__(
        self, streams: list[np.ndarray], weights: list[float], seq_len: int, batch_size: int, seed: int
    ) -> None:
        if not streams or len(streams) != len(weights):
            raise ValueError(f"need one weight per stream: {len(streams)} streams, {len(weights)} weights")
        for i, s in enumerate(streams):
            _check_stream(s, seq_len, f"train token stream of source {i}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.streams, self.seq_len, self.batch_size, self.seed = streams, seq_len, batch_size, seed
        self.cum = cumulative(weights)
        self._highs = np.array([len(s) - seq_len for s in streams], dtype=np.int64)

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source id, window start) of every row of step ``step``'s global batch."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        rng = np.random.default_rng([self.seed, step])
        # shuffled so that a rank's rows are not always the same slots of the Weyl pattern
        src = source_of(self.cum, step * self.batch_size, self.batch_size)[rng.permutation(self.batch_size)]
        starts = rng.integers(0, self._highs[src], dtype=np.int64)
        return src, starts

    def sources(self, step: int) -> np.ndarray:
        """Source id of each row of the global batch."""
        return self.plan(step)[0]

    def _gather(self, src: np.ndarray, starts: np.ndarray) -> torch.Tensor:
        out = torch.empty(len(src), self.seq_len + 1, dtype=torch.long)
        for i in np.unique(src):
            rows = np.flatnonzero(src == i)
            out[torch.from_numpy(rows)] = _windows(self.streams[i], starts[rows], self.seq_len)
        return out

    def global_batch(self, step: int) -> torch.Tensor:
        return self._gather(*self.plan(step))

    def shard(self, step: int, rank: int, world: int, microbatches: int = 1) -> list[torch.Tensor]:
        """This rank's rows of the global batch in micro-batches; only those rows are read."""
        lo, hi, rows = rank_rows(self.batch_size, rank, world, microbatches)
        src, starts = self.plan(step)
        return list(self._gather(src[lo:hi], starts[lo:hi]).split(rows))
