"""Input records for ``prepare``: text files, JSON Lines and Parquet, read in one fixed order.

A *record* is one document: a whole text file, one line of a ``.jsonl`` file, or one row of a ``.parquet``
file.  Records are addressed by ``(file index, record number)`` with 1-based numbers (the line or row
number a user sees in an editor or ``pyarrow``), which is what shard manifests store to resume and what
error messages print.  A record that cannot be read is a ``RecordError`` naming file and number; with
``skip_bad`` it is yielded with ``text=None`` and the reason instead, so the caller counts it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".md", ".py")
JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet",)
_PARQUET_BATCH = 4096  # rows per batch read from a parquet file: bounded memory for large row groups


class RecordError(ValueError):
    """An input record that cannot become a document; the message starts with ``path:number``."""


@dataclass(frozen=True)
class Record:
    """One input record.  ``text`` is None for a bad record skipped on request, with ``error`` saying why."""

    text: str | None
    file_index: int
    number: int
    nbytes: int  # input bytes it stands for, for the progress bar
    error: str | None = None


def input_kind(path: str) -> str:
    """``jsonl`` / ``parquet`` by suffix; anything else is read as one text document."""
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def collect_files(inputs: Sequence[str]) -> list[str]:
    """Explicit files are taken whatever their suffix; directories contribute text, jsonl and parquet files
    (hidden directories skipped).  Sorted absolute paths, so the same inputs give the same order."""
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    found: set[str] = set()
    for item in inputs:
        if os.path.isfile(item):
            found.add(os.path.abspath(item))
        elif os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found.update(os.path.abspath(os.path.join(root, f)) for f in files if f.endswith(suffixes))
        else:
            raise FileNotFoundError(f"input {item} is neither a file nor a directory")
    return sorted(found)


def iter_records(
    paths: Sequence[str], field: str, skip_bad: bool, after: tuple[int, int] = (-1, 0)
) -> Iterator[Record]:
    """Every record of ``paths`` in order, starting just after record ``after`` = (file index, number).

    Records up to ``after`` are passed over without being parsed: a resumed run must not stop on (or
    count twice) a bad record that an earlier run already dealt with.
    """
    for index, path in enumerate(paths):
        if index < after[0]:
            continue
        skip = after[1] if index == after[0] else 0
        kind = input_kind(path)
        if kind == "jsonl":
            yield from _jsonl(path, index, field, skip_bad, skip)
        elif kind == "parquet":
            yield from _parquet(path, index, field, skip_bad, skip)
        elif skip == 0:
            yield _text(path, index, skip_bad)


def _bad(path: str, index: int, number: int, nbytes: int, reason: str, skip_bad: bool) -> Record:
    message = f"{path}:{number}: {reason}"
    if not skip_bad:
        raise RecordError(f"{message} (pass --skip-bad to skip and count such records)")
    return Record(None, index, number, nbytes, message)


def _text(path: str, index: int, skip_bad: bool) -> Record:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return Record(data.decode("utf-8"), index, 1, len(data))
    except UnicodeDecodeError as e:
        return _bad(path, index, 1, len(data), f"text file is not UTF-8 ({e})", skip_bad)


def _jsonl(path: str, index: int, field: str, skip_bad: bool, skip: int) -> Iterator[Record]:
    """One record per non-blank line; the number is the line number, blank lines included."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number <= skip or not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield _bad(path, index, number, len(raw), f"line is not UTF-8 ({e})", skip_bad)
                continue
            except json.JSONDecodeError as e:
                yield _bad(path, index, number, len(raw), f"line is not valid JSON ({e})", skip_bad)
                continue
            if not isinstance(obj, dict):
                reason = f"line is a JSON {type(obj).__name__}, not an object with field {field!r}"
                yield _bad(path, index, number, len(raw), reason, skip_bad)
            elif field not in obj:
                reason = f"object has no field {field!r} (its fields: {', '.join(sorted(obj)[:8])})"
                yield _bad(path, index, number, len(raw), reason, skip_bad)
            elif not isinstance(obj[field], str):
                reason = f"field {field!r} is a JSON {type(obj[field]).__name__}, not a string"
                yield _bad(path, index, number, len(raw), reason, skip_bad)
            else:
                yield Record(obj[field], index, number, len(raw))


def _parquet(path: str, index: int, field: str, skip_bad: bool, skip: int) -> Iterator[Record]:
    """One record per row of column ``field``; the number is the 1-based row number.

    pyarrow is imported here only: it is needed for parquet inputs alone, and it is a large package.
    A file that pyarrow cannot read is an error whatever ``skip_bad`` says: no record number can be given
    for its rows, so skipping would lose an unknown number of documents.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise RecordError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses that name no file
        raise RecordError(f"{path}: not a readable parquet file ({e})") from None
    if field not in names:
        raise RecordError(f"{path}: parquet file has no column {field!r} (its columns: {', '.join(names)})")
    per_row = max(1, os.path.getsize(path) // max(1, pf.metadata.num_rows))
    number = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[field]):
            for value in batch.column(0).to_pylist():
                number += 1
                if number <= skip:
                    continue
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError as e:
                        yield _bad(path, index, number, per_row, f"row is not UTF-8 ({e})", skip_bad)
                        continue
                if not isinstance(value, str):
                    reason = f"column {field!r} holds {type(value).__name__}, not a string"
                    yield _bad(path, index, number, per_row, reason, skip_bad)
                    continue
                yield Record(value, index, number, per_row)
    except RecordError:
        raise
    except Exception as e:  # a damaged page or row group: name where reading stopped
        raise RecordError(
            f"{path}:{number + 1}: parquet data cannot be read from this row on ({e})"
        ) from None
