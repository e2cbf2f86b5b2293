"""Token streams for training: ``stdlib``, ``memmap`` and ``synthetic`` corpora behind one ``build_dataset``.

Every corpus is two 1-D token streams (train, val) with documents packed back to back and separated by
``eod_id``; the sampler cuts random windows out of them, so nothing downstream knows documents exist.
``info`` records what was trained on (hash, sizes, entropy) so a run can be compared with another one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import DataConfig
from .corpus import (
    DocumentSplitter,
    atomic_write,
    corpus_sha256,
    count_value,
    default_cache_dir,
    max_value,
    pack,
    stream_sha256,
    token_dtype,
    unigram_entropy,
)
from .stdlib import STDLIB_MODULES, stdlib_dir, stdlib_files
from .tokenizer import load_tokenizer

_STDLIB_CACHE_VERSION = 1
_SYNTHETIC_SEED = 0x5EED_70C5


@dataclass
class TokenDataset:
    """Two packed streams plus what the model and the run record need (vocab, separator, provenance).

    ``train``/``val`` are plain arrays or read-only memmaps; samplers index them and never copy them whole.
    """

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    eod_id: int
    info: dict[str, Any] = field(default_factory=dict)
    documents: bool = True  # the streams are documents ended by eod_id (synthetic data is not)


def build_dataset(cfg: DataConfig) -> TokenDataset:
    """Build (or load from cache / disk) the corpus that ``cfg.name`` names."""
    if cfg.name == "stdlib":
        return _build_stdlib(cfg)
    if cfg.name == "memmap":
        return _load_memmap(cfg)
    if cfg.name == "synthetic":
        return _build_synthetic(cfg)
    if cfg.name == "mixture":
        raise ValueError("data.name=mixture is several corpora: build it with moe_train.data.load_mixture")
    raise ValueError(f"data.name={cfg.name!r} is not allowed: one of stdlib, memmap, synthetic")


def _stream_info(train: np.ndarray, val: np.ndarray, vocab_size: int) -> dict[str, Any]:
    return {
        "sha256": corpus_sha256(stream_sha256(train), stream_sha256(val), np.dtype(train.dtype).name),
        "n_train_tokens": int(len(train)),
        "n_val_tokens": int(len(val)),
        "unigram_entropy_nats": unigram_entropy(val, vocab_size),
    }


# ------------------------------------------------------------------------------------------------ stdlib


def _build_stdlib(cfg: DataConfig) -> TokenDataset:
    """Tokenize the fixed stdlib module list, or load it from a cache keyed by everything that shapes it.

    The key covers the module list, the files' bytes, the tokenizer's mapping and the split fraction, so an
    upgraded Python or a different tokenizer can never be served stale tokens.
    """
    tok = load_tokenizer(cfg.tokenizer)
    files = stdlib_files()
    raw = []
    content = hashlib.sha256()
    for mod, path in files:
        with open(path, "rb") as f:
            data = f.read()
        raw.append(data)
        content.update(f"{mod}:{len(data)}:".encode() + hashlib.sha256(data).digest())
    key_src = {
        "version": _STDLIB_CACHE_VERSION,
        "modules": [m for m, _ in files],
        "content": content.hexdigest(),
        "tokenizer": tok.fingerprint,
        "val_fraction": float(cfg.val_fraction),
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
    cache_path = os.path.join(default_cache_dir(cfg.cache_dir), f"stdlib-{key[:24]}.npz")

    cached = _read_cache(cache_path)
    if cached is not None:
        return cached

    texts = []
    for (_, path), data in zip(files, raw, strict=True):
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"stdlib corpus: {path} is not valid UTF-8 ({e})") from e
    docs = tok.encode_arrays(texts)
    splitter = DocumentSplitter(cfg.val_fraction)
    train_docs, val_docs, val_modules = [], [], []
    for i, ((mod, _), d) in enumerate(zip(files, docs, strict=True)):
        if splitter.take(len(d) + 1, last=i == len(docs) - 1):
            val_docs.append(d)
            val_modules.append(mod)
        else:
            train_docs.append(d)
    dtype = token_dtype(tok.vocab_size)
    train = pack(train_docs, tok.eod_id, dtype)
    val = pack(val_docs, tok.eod_id, dtype)
    info: dict[str, Any] = {
        "name": "stdlib",
        **_stream_info(train, val, tok.vocab_size),
        "n_docs": len(docs),
        "n_train_docs": len(train_docs),
        "n_val_docs": len(val_docs),
        "val_modules": val_modules,
        "corpus_bytes": int(sum(len(b) for b in raw)),
        "tokenizer": tok.name,
        "vocab_size": int(tok.vocab_size),
        "eod_id": int(tok.eod_id),
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "stdlib_dir": stdlib_dir(),
        "n_modules": len(STDLIB_MODULES),
    }
    with atomic_write(cache_path) as f:
        np.savez(f, train=train, val=val, info=np.array(json.dumps(info)))
    return _dataset(train, val, info, cache_path, hit=False)


def _dataset(
    train: np.ndarray, val: np.ndarray, info: dict[str, Any], cache_path: str, hit: bool
) -> TokenDataset:
    info = {**info, "cache_path": cache_path, "cache_hit": hit}
    return TokenDataset(
        train=train, val=val, vocab_size=int(info["vocab_size"]), eod_id=int(info["eod_id"]), info=info
    )


def _read_cache(path: str) -> TokenDataset | None:
    """A cache that cannot be read (older format, damaged disk) is rebuilt, not fatal."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            train, val, info = z["train"], z["val"], json.loads(str(z["info"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    return _dataset(train, val, info, path, hit=True)


# ------------------------------------------------------------------------------------------------ memmap


def _prepare_hint(directory: str) -> str:
    return f"build it with: python -m moe_train.data.prepare --out {directory} FILES_OR_DIRS..."


def _load_memmap(cfg: DataConfig) -> TokenDataset:
    """Map a ``prepare``d directory read-only: pages are read on demand, so corpus size is bounded by disk.

    The hash and document count come from ``meta.json`` when ``prepare`` wrote them (hashing a large corpus
    on every start-up would cost each rank seconds per GB); otherwise they are computed once here.
    """
    d = cfg.path
    if not d:
        raise ValueError(
            "data.path is not set: data.name=memmap needs a directory with train.bin, val.bin, meta.json"
        )
    if not os.path.isdir(d):
        raise FileNotFoundError(f"memmap corpus directory {d} does not exist; {_prepare_hint(d)}")
    meta_path = os.path.join(d, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"memmap corpus: {meta_path} not found; {_prepare_hint(d)}")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        dtype = np.dtype(meta["dtype"])
        vocab_size, eod_id = int(meta["vocab_size"]), int(meta["eod_id"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"memmap corpus: {meta_path} is malformed ({e!r}); it needs dtype, vocab_size, eod_id; "
            f"{_prepare_hint(d)}"
        ) from e
    if dtype.name not in ("uint16", "uint32"):
        raise ValueError(f"memmap corpus: {meta_path} has dtype={dtype.name!r}; expected uint16 or uint32")
    if not 0 <= eod_id < vocab_size:
        raise ValueError(f"memmap corpus: {meta_path} has eod_id={eod_id} outside vocab_size={vocab_size}")
    if cfg.tokenizer is not None and "tokenizer_fingerprint" in meta:
        tok = load_tokenizer(cfg.tokenizer)
        if tok.fingerprint != meta["tokenizer_fingerprint"]:
            raise ValueError(
                f"memmap corpus {d} was tokenized with {meta.get('tokenizer')}, but "
                f"data.tokenizer={cfg.tokenizer} is a different tokenizer; set data.tokenizer=null "
                "(the corpus's meta.json decides) or prepare the corpus again"
            )
    train, val = (_map(os.path.join(d, f"{split}.bin"), dtype, d) for split in ("train", "val"))
    _check_tokens(d, meta, {"train": train, "val": val}, vocab_size)

    info: dict[str, Any] = {
        "name": "memmap",
        "path": os.path.abspath(d),
        "n_train_tokens": int(len(train)),
        "n_val_tokens": int(len(val)),
        "unigram_entropy_nats": unigram_entropy(val, vocab_size),
        "tokenizer": meta.get("tokenizer"),
        # None: unknown (written by another tool); mixtures compare sources by these (data/mixture.py)
        "tokenizer_fingerprint": meta.get("tokenizer_fingerprint"),
        "tokenizer_hash": meta.get("tokenizer_hash"),
        "vocab_size": vocab_size,
        "eod_id": eod_id,
    }
    if "sha256" in meta and "n_docs" in meta:
        info["sha256"], info["n_docs"] = meta["sha256"], int(meta["n_docs"])
    else:
        info["sha256"] = corpus_sha256(stream_sha256(train), stream_sha256(val), dtype.name)
        info["n_docs"] = count_value(train, eod_id) + count_value(val, eod_id)
    return TokenDataset(train=train, val=val, vocab_size=vocab_size, eod_id=eod_id, info=info)


def _check_tokens(d: str, meta: dict[str, Any], splits: dict[str, np.ndarray], vocab_size: int) -> None:
    """Each .bin holds as many tokens as meta.json says, every id below vocab_size: a short file would
    train silently on less, and an id out of range fails deep inside the first forward's embedding.
    `prepare` records its largest id, which spares reading the corpus at every start-up; a meta.json
    without it (written by another tool) is checked against the tokens themselves."""
    meta_path = os.path.join(d, "meta.json")
    for split, tokens in splits.items():
        path, want = os.path.join(d, f"{split}.bin"), meta.get(f"n_{split}_tokens")
        if want is not None and want != len(tokens):
            raise ValueError(
                f"memmap corpus: {path} holds {len(tokens)} tokens but {meta_path} says "
                f"n_{split}_tokens={want}: the file is truncated or meta.json belongs to another corpus; "
                + _prepare_hint(d)
            )
        top = meta.get("max_token_id")
        top = max_value(tokens) if top is None else int(top)
        if top >= vocab_size:
            raise ValueError(
                f"memmap corpus: {path} holds token id {top}, not below vocab_size={vocab_size} of "
                f"{meta_path}; tokenize it with the tokenizer meta.json names, or fix its vocab_size"
            )


def _map(path: str, dtype: np.dtype, directory: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"memmap corpus: {path} not found; {_prepare_hint(directory)}")
    size = os.path.getsize(path)
    if size == 0 or size % dtype.itemsize:
        raise ValueError(
            f"memmap corpus: {path} has {size} bytes, not a positive multiple of {dtype.itemsize} "
            f"({dtype.name}): it is empty or truncated; {_prepare_hint(directory)}"
        )
    return np.memmap(path, dtype=dtype, mode="r")


# --------------------------------------------------------------------------------------------- synthetic


def _build_synthetic(cfg: DataConfig) -> TokenDataset:
    """Uniform random tokens from a fixed seed: identical everywhere, no files, no structure to learn.

    The best achievable loss is ln(vocab), which makes it a check that the trainer is not leaking labels.
    The last id is ``eod_id``. By default it is an ordinary token and the stream has no documents; with
    ``synthetic_doc_tokens`` > 0 it ends documents of uniformly random length (mean about that many tokens)
    and appears nowhere else, so document masks have something to mask.
    """
    vocab, n, doc = int(cfg.synthetic_vocab), int(cfg.synthetic_tokens), int(cfg.synthetic_doc_tokens)
    if vocab < 2 or n < 2:
        raise ValueError(
            f"synthetic corpus needs synthetic_vocab >= 2 and synthetic_tokens >= 2, got {vocab}, {n}"
        )
    rng = np.random.default_rng(_SYNTHETIC_SEED)
    tokens = rng.integers(0, vocab - (doc > 0), size=n, dtype=np.int64).astype(token_dtype(vocab))
    if doc > 0:
        ends = np.cumsum(rng.integers(1, 2 * doc + 1, size=n // doc + 1))
        tokens[ends[ends < n]] = vocab - 1
    n_val = min(max(1, round(n * cfg.val_fraction)), n - 1)
    train, val = tokens[: n - n_val], tokens[n - n_val :]
    info: dict[str, Any] = {
        "name": "synthetic",
        **_stream_info(train, val, vocab),
        "n_docs": int(np.count_nonzero(tokens == vocab - 1)) if doc > 0 else 0,
        "seed": _SYNTHETIC_SEED,
        "tokenizer": None,
        "vocab_size": vocab,
        "eod_id": vocab - 1,
    }
    return TokenDataset(
        train=train, val=val, vocab_size=vocab, eod_id=vocab - 1, info=info, documents=doc > 0
    )
