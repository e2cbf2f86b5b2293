"""Tokenizers: a dependency-free byte tokenizer and a thin wrapper around a Hugging Face ``tokenizer.json``.

Both expose the same small surface (``encode``, ``decode``, ``encode_arrays``, ``eod_id``, ``vocab_size``,
``name``, ``fingerprint``, ``tokenizer_hash``) so corpus builders never branch on the tokenizer kind.
``fingerprint`` identifies the token mapping itself (not the file's location), which is what a token cache
must be keyed by.  ``tokenizer_hash`` is the sha256 of the tokenizer's JSON in canonical form (sorted keys,
no whitespace): re-saving or pretty-printing ``tokenizer.json`` keeps it, so two corpora can be checked for
the same tokenizer whoever wrote their files.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

# End-of-document tokens used by common tokenizer families, in the order they are tried.
EOD_CANDIDATES: tuple[str, ...] = (
    "<|endoftext|>",
    "</s>",
    "<eos>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
)


def json_sha256(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON: the same value whatever key order or indentation a file had."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255 and 256 separates documents.

    Needs no file and no training, so every machine can tokenize any text identically; the price is
    long sequences (one token per byte), which is fine for the small models this default is for.
    """

    eod_id: int = 256
    vocab_size: int = 257
    name: str = "bytes"
    fingerprint: str = "bytes-v1"
    tokenizer_hash: str = json_sha256({"moe_train_tokenizer": "bytes", "version": 1})

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Invalid byte sequences become U+FFFD rather than raising: samples often end mid-character."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Bulk path for corpus building: a zero-copy byte view instead of a Python list per byte."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]


class HFTokenizer:
    """A ``tokenizers`` ``tokenizer.json``; the document separator is the first known end token in its vocab.

    Documents are packed into one stream, so a separator is required: without it the model could not tell
    where one document ends, hence the error rather than a silent fallback.
    """

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"tokenizer file not found: {path} (expected a tokenizers tokenizer.json)"
            )
        self.path = path
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception that names no file
            raise ValueError(f"tokenizer {path} is not a valid tokenizers tokenizer.json: {e}") from None
        self.vocab_size: int = self._tok.get_vocab_size()
        eod = None
        for tok in EOD_CANDIDATES:
            tid = self._tok.token_to_id(tok)
            if tid is not None:
                eod = tid
                break
        if eod is None:
            raise ValueError(
                f"tokenizer {path} has none of the end-of-document tokens {list(EOD_CANDIDATES)} in its "
                "vocab; "
                "add one as a special token (documents are packed and need a separator)"
            )
        self.eod_id: int = int(eod)
        with open(path, "rb") as f:
            raw = f.read()
        self.fingerprint: str = "hf-" + hashlib.sha256(raw).hexdigest()
        self.tokenizer_hash: str = json_sha256(json.loads(raw))
        self.name: str = f"hf:{os.path.abspath(path)}"

    def encode(self, text: str) -> list[int]:
        """No special tokens are added: packing inserts ``eod_id`` itself, once per document."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != self.eod_id], skip_special_tokens=False)

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Bulk path for corpus building; ``encode_batch`` tokenizes the texts in parallel in Rust."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]


def load_tokenizer(path: str | None) -> ByteTokenizer | HFTokenizer:
    """``None`` means bytes; anything else must be a ``tokenizer.json`` file."""
    if path is None:
        return ByteTokenizer()
    return HFTokenizer(path)
