"""Tokenize text, JSON Lines and Parquet inputs into a memmap corpus: train.bin, val.bin and meta.json.

    python -m moe_train.data.prepare --out DIR [--tokenizer tokenizer.json] [--field text] [--workers N] \\
        [--val-fraction 0.05] [--shard-mb 256] [--skip-bad] [--keep-shards] [--fresh] FILES_OR_DIRS...

Inputs (``records.py``): a text file is one document, each line of a ``.jsonl`` file is one (its ``--field``),
each row of a ``.parquet`` file is one (column ``--field``).  Files are read in sorted path order.

Shards make the command resumable.  Records are grouped into shards by a rule that looks at the records only
(``--shard-docs`` documents or ``--shard-mb`` of text, whichever comes first), so shard boundaries, and
therefore every output byte, are the same whatever ``--workers`` is and however often the run was killed.
Each shard is committed by writing its ``.bin`` files and then its manifest ``NNNNN.json``, each atomically;
the manifest says which records the shard covers and carries the train/val splitter's state after it.  A
restart keeps the committed shards and goes on after the last record they cover: nothing twice, nothing lost.
At the end the shards are concatenated into ``train.bin`` / ``val.bin`` (the reader then maps one file per
split, as before), each shard checked against its manifest's hash on the way, and ``meta.json`` goes last.

Fault hook for the resume tests: ``MOE_TRAIN_FAULT_PREPARE=<k>`` SIGKILLs the process once shard k is
committed and the next shard's ``.bin`` files are written but not its manifest (for the last shard: before
the concatenation), i.e. at the most awkward point a real kill can hit.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from .corpus import DocumentSplitter, atomic_write, corpus_sha256, token_dtype
from .records import Record, collect_files, iter_records
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

FAULT_ENV = "MOE_TRAIN_FAULT_PREPARE"
SHARDS = "shards"
PLAN_VERSION = 1
_COPY = 16 << 20  # bytes per read when concatenating shards
_SHOWN_SKIPS = 20  # skipped records printed (and kept in meta.json) by name; all are counted


def prepare(
    inputs: Sequence[str],
    out: str,
    tokenizer: str | None = None,
    val_fraction: float = 0.05,
    *,
    field: str = "text",
    workers: int = 1,
    shard_docs: int = 1_000_000,
    shard_mb: float = 256.0,
    skip_bad: bool = False,
    keep_shards: bool = False,
    fresh: bool = False,
) -> dict[str, Any]:
    """Write the corpus into ``out`` (resuming from committed shards there) and return its ``meta.json``."""
    if shard_docs < 1 or shard_mb <= 0 or workers < 1:
        raise ValueError(
            f"need shard_docs >= 1, shard_mb > 0, workers >= 1; got {shard_docs}, {shard_mb}, {workers}"
        )
    tok = load_tokenizer(tokenizer)
    dtype = np.dtype(token_dtype(tok.vocab_size))
    paths = collect_files(inputs)
    splitter = DocumentSplitter(val_fraction)  # validates val_fraction before anything is written
    os.makedirs(out, exist_ok=True)

    plan = {
        "version": PLAN_VERSION,
        "inputs": [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths],
        "field": field,
        "val_fraction": val_fraction,
        "shard_docs": shard_docs,
        "shard_bytes": int(shard_mb * (1 << 20)),
        "skip_bad": skip_bad,
        "tokenizer_hash": tok.tokenizer_hash,
        "dtype": dtype.name,
    }
    shard_dir = os.path.join(out, SHARDS)
    manifests = _resume(shard_dir, plan, dtype, fresh)
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        os.unlink(meta_path)  # readers now see "not built" rather than an old meta next to new .bin files
    for name in ("train.bin", "val.bin", "meta.json"):  # temporary files of a concatenation a kill cut short
        for tmp in glob.glob(os.path.join(glob.escape(out), f".{name}.*.tmp")):
            os.unlink(tmp)
    if manifests:
        last = manifests[-1]
        for k in ("seen", "val_tokens", "n_train", "n_val"):
            setattr(splitter, k, last["splitter"][k])
    done = bool(manifests) and manifests[-1]["final"]
    after = tuple(manifests[-1]["last"]) if manifests else (-1, 0)

    bar = tqdm(
        total=sum(p[1] for p in plan["inputs"]),
        initial=sum(m["n_input_bytes"] for m in manifests),
        unit="B",
        unit_scale=True,
        desc="prepare",
        disable=None,  # off when stderr is not a terminal (logs, tests)
    )
    shown = sum(len(m["skipped"]) for m in manifests)
    with bar, _encoder(tokenizer, tok, dtype, workers) as encode:
        records = iter_records(paths, field, skip_bad, after) if not done else iter(())
        for group, final in _groups(records, shard_docs, plan["shard_bytes"]):
            index = len(manifests)
            for r in group:
                if r.error is not None and shown < _SHOWN_SKIPS:
                    bar.write(f"prepare: skipped {r.error}", file=sys.stderr)
                    shown += 1
            docs = encode([r.text for r in group if r.text])
            manifests.append(_commit_shard(shard_dir, index, group, docs, final, splitter, tok.eod_id))
            bar.update(sum(r.nbytes for r in group))

    n_docs = sum(m["n_docs"] for m in manifests)
    if n_docs < 2:
        raise ValueError(
            f"found {n_docs} non-empty document(s) in {list(inputs)}; need at least 2 documents "
            "(a text file, a jsonl line or a parquet row is one document; train and val each need one)"
        )
    shas = {s: _concat(shard_dir, manifests, s, os.path.join(out, f"{s}.bin")) for s in ("train", "val")}
    meta = _meta(tok, dtype, val_fraction, field, paths, manifests, shas)
    with atomic_write(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    if not keep_shards:
        shutil.rmtree(shard_dir)
    return meta


def _resume(shard_dir: str, plan: dict[str, Any], dtype: np.dtype, fresh: bool) -> list[dict[str, Any]]:
    """The committed shards' manifests, in order, after checking they belong to this very preparation.

    A shard counts once its manifest exists; ``.bin`` files without one (a kill between the two writes) are
    simply written again.  Shards of other inputs or settings are an error, not silently mixed in.
    """
    plan_path = os.path.join(shard_dir, "plan.json")
    if fresh and os.path.isdir(shard_dir):
        shutil.rmtree(shard_dir)
    if os.path.isfile(os.path.join(shard_dir, "00000.json")):
        old: dict[str, Any] = {}
        if os.path.isfile(plan_path):
            with open(plan_path, encoding="utf-8") as f:
                old = json.load(f)
        differ = sorted(k for k in set(plan) | set(old) if plan.get(k) != old.get(k))
        if differ == ["skip_bad"] and plan["skip_bad"]:
            # shards committed without --skip-bad hold no bad record, exactly as a --skip-bad run would
            # have written them: a run stopped by a bad record resumes with --skip-bad, losing nothing
            with atomic_write(plan_path, "w") as f:
                json.dump(plan, f, indent=2)
        elif differ:
            raise ValueError(
                f"{shard_dir} holds shards of another preparation (it differs in: {', '.join(differ)}); "
                "pass --fresh to discard them, or choose another --out"
            )
    else:  # nothing committed yet (e.g. the last attempt stopped at a bad record): start under this plan
        with atomic_write(plan_path, "w") as f:
            json.dump(plan, f, indent=2)
    for name in os.listdir(shard_dir):  # temporary files of writes a kill cut short
        if name.startswith(".") and name.endswith(".tmp"):
            os.unlink(os.path.join(shard_dir, name))
    manifests: list[dict[str, Any]] = []
    while os.path.isfile(path := os.path.join(shard_dir, f"{len(manifests):05d}.json")):
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
        for split in ("train", "val"):
            bin_path = _shard_bin(shard_dir, m["index"], split)
            want = m[f"n_{split}_tokens"] * dtype.itemsize
            if not os.path.isfile(bin_path) or os.path.getsize(bin_path) != want:
                raise ValueError(
                    f"shard file {bin_path} is missing or not {want} bytes as {path} says; "
                    "pass --fresh to prepare again from scratch"
                )
        manifests.append(m)
    return manifests


def _groups(
    records: Iterator[Record], shard_docs: int, shard_bytes: int
) -> Iterator[tuple[list[Record], bool]]:
    """Cut the record stream into shards; yields ``(records, final)``.

    A shard takes records until it holds ``shard_docs`` documents or ``shard_bytes`` of input, then also the
    skipped and empty records that follow, so that the last shard is known to be last (``final``) when it
    is written: the splitter must know the corpus's last document (it may have to go to val).
    """
    pending = next(records, None)
    while pending is not None:
        group: list[Record] = []
        docs = size = 0
        while pending is not None and docs < shard_docs and size < shard_bytes:
            group.append(pending)
            docs += bool(pending.text)
            size += pending.nbytes
            pending = next(records, None)
        while pending is not None and not pending.text:
            group.append(pending)
            pending = next(records, None)
        yield group, pending is None


def _commit_shard(
    shard_dir: str,
    index: int,
    group: list[Record],
    docs: list[np.ndarray],
    final: bool,
    splitter: DocumentSplitter,
    eod_id: int,
) -> dict[str, Any]:
    """Split the shard's documents into train and val, write both ``.bin`` files, then its manifest."""
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for i, doc in enumerate(docs):
        split = "val" if splitter.take(len(doc), last=final and i == len(docs) - 1) else "train"
        parts[split].append(doc)
    m: dict[str, Any] = {
        "index": index,
        "first": [group[0].file_index, group[0].number],
        "last": [group[-1].file_index, group[-1].number],
        "final": final,
        "n_records": len(group),
        "n_input_bytes": sum(r.nbytes for r in group),
        "n_docs": len(docs),
        "n_empty": sum(r.text == "" for r in group),
        "n_skipped": sum(r.error is not None for r in group),
        "skipped": [r.error for r in group if r.error is not None][:_SHOWN_SKIPS],
        "max_token_id": max((int(d.max()) for d in docs), default=-1),
    }
    for split, arrays in parts.items():
        buf = np.concatenate(arrays).tobytes() if arrays else b""
        with atomic_write(_shard_bin(shard_dir, index, split)) as f:
            f.write(buf)
        m[f"n_{split}_docs"] = len(arrays)
        m[f"n_{split}_tokens"] = sum(len(a) for a in arrays)
        m[f"{split}_sha256"] = hashlib.sha256(buf).hexdigest()
    m["splitter"] = {k: getattr(splitter, k) for k in ("seen", "val_tokens", "n_train", "n_val")}
    _fault_point(index - 1)  # after shard index-1: this shard's data is on disk, its manifest is not
    with atomic_write(os.path.join(shard_dir, f"{index:05d}.json"), "w") as f:
        json.dump(m, f, indent=2)
    if final:
        _fault_point(index)
    return m


def _fault_point(k: int) -> None:
    if os.environ.get(FAULT_ENV) == str(k):
        print(f"fault injection: prepare killed after committing shard {k}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _shard_bin(shard_dir: str, index: int, split: str) -> str:
    return os.path.join(shard_dir, f"{index:05d}.{split}.bin")


def _concat(shard_dir: str, manifests: list[dict[str, Any]], split: str, path: str) -> str:
    """Concatenate one split's shards into ``path`` atomically; returns the sha256 of the whole stream.

    Every shard is re-hashed against its manifest on the way: a shard damaged on disk since it was
    committed would otherwise end up in the corpus unnoticed.
    """
    whole = hashlib.sha256()
    with atomic_write(path) as f:
        for m in manifests:
            shard_path, part = _shard_bin(shard_dir, m["index"], split), hashlib.sha256()
            with open(shard_path, "rb") as src:
                while chunk := src.read(_COPY):
                    f.write(chunk)
                    whole.update(chunk)
                    part.update(chunk)
            if part.hexdigest() != m[f"{split}_sha256"]:
                raise ValueError(
                    f"shard file {shard_path} does not match the sha256 in its manifest (damaged on disk); "
                    "pass --fresh to prepare again from scratch"
                )
    return whole.hexdigest()


def _meta(
    tok: ByteTokenizer | HFTokenizer,
    dtype: np.dtype,
    val_fraction: float,
    field: str,
    paths: list[str],
    manifests: list[dict[str, Any]],
    shas: dict[str, str],
) -> dict[str, Any]:
    def total(key: str) -> int:
        return sum(m[key] for m in manifests)

    skipped = [e for m in manifests for e in m["skipped"]][:_SHOWN_SKIPS]
    return {
        "dtype": dtype.name,
        "vocab_size": int(tok.vocab_size),
        "eod_id": int(tok.eod_id),
        "tokenizer": tok.name,
        "tokenizer_fingerprint": tok.fingerprint,
        "tokenizer_hash": tok.tokenizer_hash,
        "val_fraction": val_fraction,
        "field": field,
        "n_docs": total("n_docs"),
        "n_train_docs": total("n_train_docs"),
        "n_val_docs": total("n_val_docs"),
        "n_tokens": total("n_train_tokens") + total("n_val_tokens"),
        "n_train_tokens": total("n_train_tokens"),
        "n_val_tokens": total("n_val_tokens"),
        "n_records": total("n_records"),
        "n_empty_records": total("n_empty"),
        "n_skipped_records": total("n_skipped"),
        "skipped": skipped,
        "max_token_id": max(m["max_token_id"] for m in manifests),
        "sha256": corpus_sha256(shas["train"], shas["val"], dtype.name),
        "inputs": paths,
        "shards": [
            {k: m[k] for k in ("index", "first", "last", "n_docs", "n_train_tokens", "n_val_tokens")}
            for m in manifests
        ],
    }


# Tokenizer of a pool worker process, set once by its initializer (a worker serves one prepare run only).
_WORKER: dict[str, Any] = {}


def _worker_init(tokenizer: str | None, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = (
        "false"  # one thread per worker process: the pool is the parallelism
    )
    _WORKER["tok"], _WORKER["dtype"] = load_tokenizer(tokenizer), np.dtype(dtype)


def _worker_encode(texts: list[str]) -> list[np.ndarray]:
    return _encode(_WORKER["tok"], texts, _WORKER["dtype"])


def _encode(tok: ByteTokenizer | HFTokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """Token ids of each text with ``eod_id`` appended, already in the corpus dtype (half the bytes to
    move between processes with uint16)."""
    out = []
    for ids in tok.encode_arrays(texts):
        arr = np.empty(len(ids) + 1, dtype=dtype)
        arr[:-1] = ids
        arr[-1] = tok.eod_id
        out.append(arr)
    return out


@contextlib.contextmanager
def _encoder(
    tokenizer: str | None, tok: ByteTokenizer | HFTokenizer, dtype: np.dtype, workers: int
) -> Iterator[Any]:
    """A function texts -> documents.  ``workers == 1`` tokenizes in this process (``encode_batch`` of a
    ``tokenizers`` tokenizer is itself multi-threaded); more spreads contiguous chunks over a process pool,
    which also parallelizes the Python side.  Results come back in input order either way, so the bytes do
    not depend on the worker count."""
    if workers == 1:
        yield lambda texts: _encode(tok, texts, dtype)
        return
    # fork starts workers without re-importing the package; nothing here has started tokenizer threads yet
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _worker_init, (tokenizer, dtype.name)) as pool:

        def encode(texts: list[str]) -> list[np.ndarray]:
            step = max(1, -(-len(texts) // (4 * workers)))  # a few chunks per worker evens out long texts
            chunks = [texts[i : i + step] for i in range(0, len(texts), step)]
            return [doc for part in pool.map(_worker_encode, chunks) for doc in part]

        yield encode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_train.data.prepare",
        description="Tokenize text / jsonl / parquet inputs into train.bin / val.bin / meta.json "
        "for data.name=memmap; resumable after a kill.",
    )
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizers tokenizer.json (default: bytes)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of tokens for validation")
    parser.add_argument("--field", default="text", help="jsonl field / parquet column holding the text")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is the same)")
    parser.add_argument("--shard-docs", type=int, default=1_000_000, help="a shard closes at this many docs")
    parser.add_argument("--shard-mb", type=float, default=256.0, help="... or at this many MiB of input")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count unreadable records")
    parser.add_argument("--keep-shards", action="store_true", help="keep DIR/shards after concatenating")
    parser.add_argument("--fresh", action="store_true", help="discard committed shards instead of resuming")
    parser.add_argument("inputs", nargs="+", help="files, or directories walked for text/jsonl/parquet files")
    args = parser.parse_args(argv)
    try:
        meta = prepare(
            args.inputs,
            args.out,
            args.tokenizer,
            args.val_fraction,
            field=args.field,
            workers=args.workers,
            shard_docs=args.shard_docs,
            shard_mb=args.shard_mb,
            skip_bad=args.skip_bad,
            keep_shards=args.keep_shards,
            fresh=args.fresh,
        )
    except (OSError, ValueError) as e:  # RecordError is a ValueError: one line naming file and record
        print(f"prepare: error: {e}", file=sys.stderr)
        return 1
    if meta["n_skipped_records"]:
        print(
            f"prepare: skipped {meta['n_skipped_records']} unreadable record(s), listed in meta.json "
            f"(first {len(meta['skipped'])}); the first: {meta['skipped'][0]}",
            file=sys.stderr,
        )
    print(
        f"wrote {args.out}: {meta['n_docs']} docs in {len(meta['shards'])} shard(s), "
        f"{meta['n_train_tokens']} train + {meta['n_val_tokens']} val "
        f"tokens ({meta['dtype']}, vocab {meta['vocab_size']}), sha256 {meta['sha256'][:16]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
