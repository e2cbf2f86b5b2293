"""Tests for moe_train.data: tokenizers, the three corpora, prepare, and the layout-invariant sampler."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch

from moe_train.config import DataConfig
from moe_train.data import ByteTokenizer, GlobalBatchSampler, HFTokenizer, build_dataset, load_tokenizer
from moe_train.data import corpus as corpus_mod
from moe_train.data import stdlib as stdlib_mod
from moe_train.data.corpus import DocumentSplitter, corpus_sha256, stream_sha256, unigram_entropy
from moe_train.data.prepare import main as prepare_main
from moe_train.data.sampler import val_batches

# ------------------------------------------------------------------------------------------------ tokenizers


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓ 世界'\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 257 and tok.eod_id == 256
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids + [tok.eod_id]) == text
    assert tok.decode(tok.encode("✓")[:2]) == "\ufffd"  # cut mid-character: replaced, not raised
    assert [a.tolist() for a in tok.encode_arrays([text, ""])] == [ids, []]
    assert isinstance(load_tokenizer(None), ByteTokenizer)


def _write_hf_tokenizer(path, with_eod: bool = True, words: list[str] | None = None) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = words or ["hello", "world", "alpha", "beta", "gamma", "def", "return"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    if with_eod:
        vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_eod:
        tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer(tmp_path):
    path = _write_hf_tokenizer(tmp_path / "tokenizer.json")
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 9 and tok.eod_id == 8
    ids = tok.encode("hello world zzz")
    assert ids == [1, 2, 0]
    assert tok.decode([1, 2, tok.eod_id]) == "hello world"
    assert [a.tolist() for a in tok.encode_arrays(["hello world zzz"])] == [ids]

    no_eod = _write_hf_tokenizer(tmp_path / "plain.json", with_eod=False)
    with pytest.raises(ValueError, match="end-of-document"):
        HFTokenizer(no_eod)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(str(tmp_path / "missing.json"))


# ------------------------------------------------------------------------------------------------ stdlib


@pytest.fixture(scope="module")
def stdlib_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_stdlib_corpus(stdlib_cache):
    ds = build_dataset(DataConfig(name="stdlib", cache_dir=stdlib_cache))
    info = ds.info
    assert ds.vocab_size == 257 and ds.eod_id == 256
    assert ds.train.dtype == np.uint16 and ds.train.ndim == 1
    assert 2_000_000 < info["corpus_bytes"] < 6_000_000
    # every document ends with eod, and there is exactly one eod per document
    assert ds.train[-1] == ds.eod_id and ds.val[-1] == ds.eod_id
    n_eod = int((ds.train == ds.eod_id).sum() + (ds.val == ds.eod_id).sum())
    assert n_eod == info["n_docs"] == len(stdlib_mod.STDLIB_MODULES)
    assert info["n_val_docs"] >= 1 and info["n_train_docs"] >= 1
    assert info["n_train_tokens"] == len(ds.train) and info["n_val_tokens"] == len(ds.val)
    frac = len(ds.val) / (len(ds.train) + len(ds.val))
    assert 0.5 * 0.05 < frac < 2 * 0.05
    assert info["sha256"] == corpus_sha256(stream_sha256(ds.train), stream_sha256(ds.val), "uint16")
    assert 2.0 < info["unigram_entropy_nats"] < math.log(257)
    assert info["tokenizer"] == "bytes" and info["name"] == "stdlib"
    # the first document decodes back to its source file
    first_mod, first_path = stdlib_mod.stdlib_files()[0]
    end = int(np.argmax(ds.train == ds.eod_id))
    with open(first_path, encoding="utf-8") as f:
        assert ByteTokenizer().decode(ds.train[:end].tolist()) == f.read()


def test_stdlib_cache_hit(stdlib_cache):
    cfg = DataConfig(name="stdlib", cache_dir=stdlib_cache)
    a = build_dataset(cfg)
    b = build_dataset(cfg)
    assert b.info["cache_hit"] and b.info["cache_path"] == a.info["cache_path"]
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.info["sha256"] == b.info["sha256"]
    assert not [f for f in os.listdir(stdlib_cache) if f.endswith(".tmp")]  # atomic write left no temp file
    # the split fraction is part of the key and of the hash
    c = build_dataset(DataConfig(name="stdlib", cache_dir=stdlib_cache, val_fraction=0.1))
    assert c.info["cache_path"] != a.info["cache_path"] and c.info["sha256"] != a.info["sha256"]
    assert len(c.val) > len(a.val)


def test_stdlib_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_TRAIN_CACHE", str(tmp_path / "env_cache"))
    ds = build_dataset(DataConfig(name="stdlib"))
    assert ds.info["cache_path"].startswith(str(tmp_path / "env_cache"))


def test_stdlib_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(stdlib_mod, "stdlib_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "_collections_abc.py"))):
        build_dataset(DataConfig(name="stdlib", cache_dir=str(tmp_path)))


def test_splitter_is_token_weighted_and_never_empty():
    sp = DocumentSplitter(0.05)
    sizes = [1000] * 200
    to_val = [sp.take(n, last=i == len(sizes) - 1) for i, n in enumerate(sizes)]
    assert sum(to_val) == 10 and not to_val[0]
    two = DocumentSplitter(0.05)
    assert [two.take(10), two.take(10, last=True)] == [False, True]


# ------------------------------------------------------------------------------------------------ entropy


def test_unigram_entropy(monkeypatch):
    assert unigram_entropy(np.array([0, 0, 1, 1], dtype=np.uint16), 257) == pytest.approx(math.log(2))
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert unigram_entropy(np.array([3, 3, 3, 7]), 8) == pytest.approx(expected)
    assert unigram_entropy(np.array([5, 5, 5]), 6) == pytest.approx(0.0)
    assert unigram_entropy(np.array([0, 9]), 2) == pytest.approx(
        math.log(2)
    )  # ids beyond the hint still count
    x = np.random.default_rng(0).integers(0, 50, size=1000)
    whole = unigram_entropy(x, 50)
    monkeypatch.setattr(corpus_mod, "_CHUNK", 7)
    assert unigram_entropy(x, 50) == pytest.approx(whole)


# ------------------------------------------------------------------------------------------------ sampler


def test_sampler_deterministic_and_shifted():
    tokens = np.arange(10_000, dtype=np.uint32)
    s = GlobalBatchSampler(tokens, seq_len=16, batch_size=8, seed=3)
    b0 = s.global_batch(0)
    assert b0.dtype == torch.long and b0.shape == (8, 17)
    assert torch.equal(b0, GlobalBatchSampler(tokens, 16, 8, seed=3).global_batch(0))
    assert not torch.equal(b0, s.global_batch(1))
    assert not torch.equal(b0, GlobalBatchSampler(tokens, 16, 8, seed=4).global_batch(0))
    inputs, labels = b0[:, :-1], b0[:, 1:]
    assert torch.equal(labels, inputs + 1)  # consecutive tokens: labels are inputs shifted by one


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("microbatches", [1, 2])
def test_sampler_layout_invariance(world, microbatches):
    tokens = np.random.default_rng(1).integers(0, 257, size=5000).astype(np.uint16)
    s = GlobalBatchSampler(tokens, seq_len=32, batch_size=16, seed=7)
    for step in (0, 5, 123):
        parts = []
        for rank in range(world):
            mbs = s.shard(step, rank, world, microbatches)
            assert len(mbs) == microbatches and all(m.shape == (16 // world // microbatches, 33) for m in mbs)
            parts.extend(mbs)
        assert torch.equal(torch.cat(parts), s.global_batch(step))


def test_sampler_errors():
    tokens = np.arange(100, dtype=np.uint16)
    s = GlobalBatchSampler(tokens, seq_len=8, batch_size=6, seed=0)
    with pytest.raises(ValueError, match="divisible"):
        s.shard(0, 0, 4)
    with pytest.raises(ValueError, match="divisible"):
        s.shard(0, 0, 2, microbatches=2)
    with pytest.raises(ValueError, match="rank"):
        s.shard(0, 2, 2)
    with pytest.raises(ValueError, match="seq_len"):
        GlobalBatchSampler(tokens[:8], seq_len=8, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        val_batches(tokens[:5], seq_len=8, batch_size=1, n_batches=1)
    # the shortest legal stream: every window is the whole stream
    tiny = GlobalBatchSampler(tokens[:9], seq_len=8, batch_size=3, seed=0)
    assert torch.equal(tiny.global_batch(0), torch.arange(9).repeat(3, 1))


def test_val_batches():
    tokens = np.arange(100, dtype=np.uint16)
    batches = val_batches(tokens, seq_len=10, batch_size=3, n_batches=2)
    assert len(batches) == 2 and all(b.shape == (3, 11) for b in batches)
    starts = [int(r[0]) for b in batches for r in b]
    assert starts == [0, 10, 20, 30, 40, 50]
    assert torch.equal(batches[0][1], torch.arange(10, 21))
    # short stream: (100-1)//10 = 9 windows, then wrap round to the start
    wrapped = val_batches(tokens, seq_len=10, batch_size=4, n_batches=3)
    assert [int(r[0]) for b in wrapped for r in b] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 0, 10, 20]
    again = val_batches(tokens, seq_len=10, batch_size=4, n_batches=3)
    assert all(torch.equal(a, b) for a, b in zip(wrapped, again, strict=True))


# ------------------------------------------------------------------------------------------------ memmap


def _text_tree(root) -> dict[str, str]:
    """A few text files, plus files prepare must ignore; returns the texts it must pick up, by path."""
    docs = {
        "a.txt": "hello world\n" * 50,
        "sub/b.md": "# beta\n\nalpha gamma ✓\n" * 30,
        "sub/deeper/c.py": "def f():\n    return 1\n" * 40,
        "d.txt": "gamma beta alpha\n" * 20,
        "e.txt": "world hello\n" * 60,
    }
    for rel, text in docs.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    return docs


def _split_docs(stream: np.ndarray, eod: int) -> list[list[int]]:
    out, cur = [], []
    for t in stream.tolist():
        if t == eod:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    assert cur == []  # the stream ends with eod
    return out


def test_prepare_and_memmap_round_trip(tmp_path):
    src = tmp_path / "src"
    docs = _text_tree(src)
    out = tmp_path / "corpus"
    assert prepare_main(["--out", str(out), "--val-fraction", "0.2", str(src)]) == 0
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]

    ds = build_dataset(DataConfig(name="memmap", path=str(out), cache_dir=str(tmp_path)))
    assert isinstance(ds.train, np.memmap) and isinstance(ds.val, np.memmap)
    assert ds.vocab_size == 257 and ds.eod_id == 256 and ds.train.dtype == np.uint16
    assert ds.info["n_docs"] == len(docs) and len(ds.val) > 0
    tok = ByteTokenizer()
    got = [tok.decode(d) for d in _split_docs(ds.train, 256) + _split_docs(ds.val, 256)]
    assert sorted(got) == sorted(docs.values())
    assert ds.info["sha256"] == corpus_sha256(stream_sha256(ds.train), stream_sha256(ds.val), "uint16")

    # the same inputs give the same bytes
    out2 = tmp_path / "corpus2"
    assert prepare_main(["--out", str(out2), "--val-fraction", "0.2", str(src)]) == 0
    for f in ("train.bin", "val.bin"):
        assert (out / f).read_bytes() == (out2 / f).read_bytes()

    # without the hash in meta.json it is recomputed, to the same value
    m = json.loads((out2 / "meta.json").read_text())
    del m["sha256"], m["n_docs"]
    (out2 / "meta.json").write_text(json.dumps(m))
    ds2 = build_dataset(DataConfig(name="memmap", path=str(out2)))
    assert ds2.info["sha256"] == ds.info["sha256"] and ds2.info["n_docs"] == len(docs)


def test_memmap_missing(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))) as e:
        build_dataset(DataConfig(name="memmap", path=str(missing)))
    assert "moe_train.data.prepare" in str(e.value)
    with pytest.raises(ValueError, match="data.path"):
        build_dataset(DataConfig(name="memmap", path=None))

    src = tmp_path / "src"
    _text_tree(src)
    out = tmp_path / "corpus"
    assert prepare_main(["--out", str(out), str(src)]) == 0
    (out / "val.bin").unlink()
    with pytest.raises(FileNotFoundError, match="val.bin"):
        build_dataset(DataConfig(name="memmap", path=str(out)))
    (out / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        build_dataset(DataConfig(name="memmap", path=str(out)))


def test_prepare_errors(tmp_path, capsys):
    assert prepare_main(["--out", str(tmp_path / "o"), str(tmp_path / "absent")]) == 1
    assert "absent" in capsys.readouterr().err
    (tmp_path / "one.txt").write_text("only one document", encoding="utf-8")
    assert prepare_main(["--out", str(tmp_path / "o"), str(tmp_path / "one.txt")]) == 1
    assert "at least 2" in capsys.readouterr().err


def test_prepare_with_hf_tokenizer(tmp_path):
    tok_path = _write_hf_tokenizer(tmp_path / "tokenizer.json")
    src = tmp_path / "src"
    docs = _text_tree(src)
    out = tmp_path / "corpus"
    assert prepare_main(["--out", str(out), "--tokenizer", tok_path, str(src)]) == 0
    ds = build_dataset(DataConfig(name="memmap", path=str(out)))
    tok = HFTokenizer(tok_path)
    assert ds.vocab_size == tok.vocab_size == 9 and ds.eod_id == tok.eod_id == 8
    assert ds.info["tokenizer"] == tok.name and ds.info["n_docs"] == len(docs)
    stream = np.concatenate([ds.train, ds.val])
    assert int(stream.max()) < ds.vocab_size and int((stream == ds.eod_id).sum()) == len(docs)
    # naming the same tokenizer is fine, naming another one is an error
    build_dataset(DataConfig(name="memmap", path=str(out), tokenizer=tok_path))
    other = _write_hf_tokenizer(tmp_path / "other.json", words=["x", "y"])
    with pytest.raises(ValueError, match="different tokenizer"):
        build_dataset(DataConfig(name="memmap", path=str(out), tokenizer=other))
    expected = sorted(tok.encode(t) for t in docs.values())
    assert sorted(_split_docs(ds.train, 8) + _split_docs(ds.val, 8)) == expected


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_deterministic():
    cfg = DataConfig(name="synthetic", synthetic_vocab=300, synthetic_tokens=20_000)
    a, b = build_dataset(cfg), build_dataset(cfg)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.info["sha256"] == b.info["sha256"]
    assert len(a.train) + len(a.val) == 20_000 and len(a.val) == 1000
    assert a.vocab_size == 300 and int(a.train.max()) < 300
    assert a.info["unigram_entropy_nats"] == pytest.approx(math.log(300), abs=0.3)
    big = build_dataset(DataConfig(name="synthetic", synthetic_vocab=70_000, synthetic_tokens=1000))
    assert big.train.dtype == np.uint32


def test_unknown_corpus():
    with pytest.raises(ValueError, match="data.name"):
        build_dataset(DataConfig(name="wiki"))
