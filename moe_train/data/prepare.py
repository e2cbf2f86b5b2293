"""Tokenize text files into a ``memmap`` corpus: ``train.bin``, ``val.bin`` (raw token ids) and ``meta.json``.

    python -m moe_train.data.prepare --out DIR [--tokenizer tokenizer.json] [--val-fraction 0.05] \\
        FILES_OR_DIRS...

Each file is one document.  Directories are walked recursively for ``*.txt``, ``*.md`` and ``*.py``
(hidden directories skipped); all files are processed in sorted path order, so the same inputs give the
same bytes.  Files are streamed to disk in batches, so the corpus may be larger than memory.  Every output
is written to a temporary file and renamed into place, and ``meta.json`` goes last: a reader never maps a
half-written corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from .corpus import DocumentSplitter, atomic_write, corpus_sha256, token_dtype
from .tokenizer import load_tokenizer

TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".md", ".py")
_BATCH_BYTES = 32 << 20  # text read and tokenized at once (encode_batch parallelizes within a batch)


def collect_files(inputs: Sequence[str]) -> list[str]:
    """Explicit files are taken whatever their suffix; directories contribute their text files."""
    found: set[str] = set()
    for item in inputs:
        if os.path.isfile(item):
            found.add(os.path.abspath(item))
        elif os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found.update(
                    os.path.abspath(os.path.join(root, f)) for f in files if f.endswith(TEXT_SUFFIXES)
                )
        else:
            raise FileNotFoundError(f"input {item} is neither a file nor a directory")
    return sorted(found)


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); convert it or leave it out") from e


def _batches(paths: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    size = 0
    for p in paths:
        n = os.path.getsize(p)
        if out[-1] and size + n > _BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(p)
        size += n
    return out


def prepare(
    inputs: Sequence[str], out: str, tokenizer: str | None = None, val_fraction: float = 0.05
) -> dict[str, Any]:
    """Write the corpus into ``out`` and return its ``meta.json`` content."""
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    paths = [p for p in collect_files(inputs) if os.path.getsize(p) > 0]
    if len(paths) < 2:
        raise ValueError(
            f"found {len(paths)} non-empty text file(s) in {list(inputs)}; need at least 2 documents "
            "(each file is one document, and train and val each need one)"
        )
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        os.unlink(meta_path)  # readers now see "not built" rather than an old meta next to new .bin files

    splitter = DocumentSplitter(val_fraction)
    hashes = {"train": hashlib.sha256(), "val": hashlib.sha256()}
    counts = {"train": 0, "val": 0}
    done, top = 0, -1
    with (
        atomic_write(os.path.join(out, "train.bin")) as ftrain,
        atomic_write(os.path.join(out, "val.bin")) as fval,
    ):
        files = {"train": ftrain, "val": fval}
        for batch in _batches(paths):
            docs = tok.encode_arrays([_read_text(p) for p in batch])
            for doc in docs:
                done += 1
                arr = np.empty(len(doc) + 1, dtype=dtype)
                arr[:-1] = doc
                arr[-1] = tok.eod_id
                split = "val" if splitter.take(len(arr), last=done == len(paths)) else "train"
                buf = arr.tobytes()
                files[split].write(buf)
                hashes[split].update(buf)
                counts[split] += len(arr)
                top = max(top, int(arr.max()))
    meta = {
        "dtype": np.dtype(dtype).name,
        "vocab_size": int(tok.vocab_size),
        "eod_id": int(tok.eod_id),
        "tokenizer": tok.name,
        "tokenizer_fingerprint": tok.fingerprint,
        "val_fraction": val_fraction,
        "n_docs": len(paths),
        "n_train_docs": splitter.n_train,
        "n_val_docs": splitter.n_val,
        "n_train_tokens": counts["train"],
        "n_val_tokens": counts["val"],
        "max_token_id": top,
        "sha256": corpus_sha256(hashes["train"].hexdigest(), hashes["val"].hexdigest(), np.dtype(dtype).name),
    }
    with atomic_write(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_train.data.prepare",
        description="Tokenize text files into train.bin / val.bin / meta.json for data.name=memmap.",
    )
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizers tokenizer.json (default: bytes)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of tokens for validation")
    parser.add_argument(
        "inputs", nargs="+", help=f"text files, or directories walked for {', '.join(TEXT_SUFFIXES)}"
    )
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.inputs, args.out, args.tokenizer, args.val_fraction)
    except (OSError, ValueError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.out}: {meta['n_docs']} docs, "
        f"{meta['n_train_tokens']} train + {meta['n_val_tokens']} val "
        f"tokens ({meta['dtype']}, vocab {meta['vocab_size']}), sha256 {meta['sha256'][:16]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
