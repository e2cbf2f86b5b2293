"""Pieces shared by every corpus builder: token dtype, train/val split rule, hashes, entropy, atomic files.

They live together so that ``build_dataset`` (in memory) and ``prepare`` (streamed to disk) produce the same
split and the same hash for the same documents.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections.abc import Iterator
from typing import IO

import numpy as np

_CHUNK = 1 << 24  # tokens per chunk when scanning a stream that may be a large memmap


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """Half the disk and page cache of uint32 whenever the ids fit."""
    return np.uint16 if vocab_size < 65536 else np.uint32


class DocumentSplitter:
    """Decides, one document at a time and in corpus order, whether it goes to validation.

    A document goes to val when that brings the val share of tokens seen so far closer to ``val_fraction``
    (``val + n/2 < fraction * seen``).  Counting tokens rather than documents matters because file sizes
    differ by 100x: "every 20th file" can give 1% or 10% of tokens.  The rule looks only at what came
    before, so ``prepare`` can stream documents to disk, and it spreads val documents through the corpus.
    The last document goes to val if none did yet, so val is never empty when there are two documents.
    """

    def __init__(self, val_fraction: float) -> None:
        if not 0.0 < val_fraction < 0.5:
            raise ValueError(f"val_fraction={val_fraction} must be between 0 and 0.5 (exclusive)")
        self.val_fraction = val_fraction
        self.seen = 0
        self.val_tokens = 0
        self.n_train = 0
        self.n_val = 0

    def take(self, n_tokens: int, last: bool = False) -> bool:
        """Record a document of ``n_tokens`` (eod included); True means it belongs to val."""
        self.seen += n_tokens
        to_val = self.val_tokens + n_tokens / 2 < self.val_fraction * self.seen
        if last and self.n_val == 0 and self.n_train > 0:
            to_val = True
        if to_val:
            self.val_tokens += n_tokens
            self.n_val += 1
        else:
            self.n_train += 1
        return to_val


def pack(docs: list[np.ndarray], eod_id: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """Concatenate documents, each followed by ``eod_id``, into one 1-D stream."""
    total = sum(len(d) + 1 for d in docs)
    out = np.empty(total, dtype=dtype)
    pos = 0
    for d in docs:
        out[pos : pos + len(d)] = d
        out[pos + len(d)] = eod_id
        pos += len(d) + 1
    return out


def stream_sha256(tokens: np.ndarray) -> str:
    """sha256 of a stream's raw bytes, read in chunks so a memmap is never loaded whole."""
    h = hashlib.sha256()
    for i in range(0, len(tokens), _CHUNK):
        h.update(np.ascontiguousarray(tokens[i : i + _CHUNK]).tobytes())
    return h.hexdigest()


def corpus_sha256(train_sha: str, val_sha: str, dtype: str) -> str:
    """One hash for the tokenized corpus *and* its split: moving a document between splits changes it."""
    return hashlib.sha256(f"moe_train-corpus-v1|{dtype}|train={train_sha}|val={val_sha}".encode()).hexdigest()


def unigram_entropy(tokens: np.ndarray, vocab_size: int | None = None) -> float:
    """Entropy (nats per token) of the stream's token frequencies.

    A model that ignores context cannot beat this loss, so it is the first yardstick for a training curve.
    """
    n = len(tokens)
    if n == 0:
        return float("nan")
    counts = np.zeros(max(int(vocab_size or 0), 1), dtype=np.int64)
    for i in range(0, n, _CHUNK):
        c = np.bincount(np.asarray(tokens[i : i + _CHUNK], dtype=np.int64), minlength=len(counts))
        if len(c) > len(counts):
            c[: len(counts)] += counts
            counts = c
        else:
            counts += c
    p = counts[counts > 0].astype(np.float64) / n
    ent = float(-(p * np.log(p)).sum())
    return ent if math.isfinite(ent) else float("nan")


def count_value(tokens: np.ndarray, value: int) -> int:
    """How often ``value`` occurs, chunked for memmaps (used to count documents by their eod)."""
    return int(
        sum(int(np.count_nonzero(tokens[i : i + _CHUNK] == value)) for i in range(0, len(tokens), _CHUNK))
    )


def max_value(tokens: np.ndarray) -> int:
    """The largest token id, chunked for memmaps (-1 for an empty stream)."""
    return max((int(tokens[i : i + _CHUNK].max()) for i in range(0, len(tokens), _CHUNK)), default=-1)


def default_cache_dir(cache_dir: str | None) -> str:
    """``data.cache_dir``, else ``$MOE_TRAIN_CACHE``, else ``~/.cache/moe_train``."""
    return (
        cache_dir
        or os.environ.get("MOE_TRAIN_CACHE")
        or os.path.join(os.path.expanduser("~"), ".cache", "moe_train")
    )


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file in the same directory, then ``os.replace`` it onto ``path``.

    Readers (e.g. other ranks) see either the old file or the complete new one, never a partial write;
    several writers racing produce one of their complete files.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
