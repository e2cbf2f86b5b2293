"""Tests for ``python -m moe_train.data.prepare`` on large-corpus inputs: jsonl / parquet records, shards,
resume after a kill, worker-count independence, bad records, and the ``meta.json`` it writes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_train.config import DataConfig
from moe_train.data import build_dataset
from moe_train.data.prepare import FAULT_ENV, prepare
from moe_train.data.prepare import main as prepare_main
from moe_train.data.tokenizer import ByteTokenizer, HFTokenizer

REPO = Path(__file__).resolve().parent.parent
WORDS = ["alpha", "beta", "gamma", "delta", "épsilon", "ζeta", "theta", "lambda", "mu", "naïve", "omega"]


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _corpus(root: Path) -> list[str]:
    """Two jsonl files and a text file; returns the documents in the order prepare reads them."""
    a, b = _texts(23, 1), _texts(17, 2)
    _write_jsonl(root / "a.jsonl", [{"id": i, "text": t} for i, t in enumerate(a)])
    _write_jsonl(root / "b.jsonl", [{"text": t, "title": "x"} for t in b])
    (root / "c.txt").write_text("a whole text file is one document ✓\n", encoding="utf-8")
    return [*a, *b, "a whole text file is one document ✓\n"]


def _bpe(path: Path, texts: list[str]) -> str:
    """A small trained BPE tokenizer.json: merges make tokenization context-dependent, unlike bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]", "<|endoftext|>"])
    )
    tok.save(str(path))
    return str(path)


def _docs(stream: np.ndarray, eod: int) -> list[list[int]]:
    cuts = np.flatnonzero(np.asarray(stream) == eod)
    assert len(cuts) and cuts[-1] == len(stream) - 1  # every document ends with eod
    return [stream[s + 1 : e].tolist() for s, e in zip([-1, *cuts[:-1]], cuts, strict=True)]


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("k", [2, 5])
def test_resume_after_kill_gives_identical_shards(tmp_path, k):
    """Killed (SIGKILL) after shard k at the worst point — shard k+1's .bin files written, its manifest not;
    after the last shard (5), before the concatenation — then restarted: the same shard files, corpus and
    meta.json as a run never interrupted, and the shards committed before the kill are kept as they were
    rather than redone."""
    src = tmp_path / "src"
    texts = _corpus(src)
    lines = (src / "a.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[9:9] = ['{"text": 12}\n', "\n"]  # a bad record and a blank line inside committed shard 1
    (src / "a.jsonl").write_text("".join(lines), encoding="utf-8")
    tok = _bpe(tmp_path / "tok.json", texts)
    args = ["--tokenizer", tok, "--shard-docs", "7", "--val-fraction", "0.2", "--keep-shards", "--skip-bad"]
    args.append(str(src))

    ref = tmp_path / "ref"
    assert prepare_main(["--out", str(ref), *args]) == 0
    n_shards = -(-len(texts) // 7)
    meta = json.loads((ref / "meta.json").read_text())
    assert len(meta["shards"]) == n_shards == 6 and meta["n_docs"] == len(texts)
    assert meta["n_skipped_records"] == 1 and meta["skipped"][0].startswith(f"{src / 'a.jsonl'}:10: field")

    out = tmp_path / "out"
    env = {**os.environ, FAULT_ENV: str(k), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "moe_train.data.prepare", "--out", str(out), *args]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert f"after committing shard {k}" in killed.stderr
    shards = out / "shards"
    assert not (out / "meta.json").exists() and not (out / "train.bin").exists()
    manifests = sorted(p.name for p in shards.glob("0*.json"))
    assert manifests == [f"{i:05d}.json" for i in range(k + 1)]
    if k + 1 < n_shards:
        assert (shards / f"{k + 1:05d}.train.bin").exists()  # written, never committed: redone, not trusted
    committed = {p.name: p.stat().st_mtime_ns for p in shards.glob("0*") if int(p.name[:5]) <= k}

    # what a kill in the middle of a write leaves behind; the restart removes it
    (shards / f".{k + 1:05d}.train.bin.x1.tmp").write_bytes(b"partial")
    (out / ".train.bin.x2.tmp").write_bytes(b"partial")
    assert prepare_main(["--out", str(out), *args]) == 0
    assert _files(out) == _files(ref)
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("0*") if int(p.name[:5]) <= k} == committed

    # the corpus holds every document exactly once (the bad record in none)
    ds = build_dataset(DataConfig(name="memmap", path=str(out)))
    hf = HFTokenizer(tok)
    assert sorted(_docs(ds.train, hf.eod_id) + _docs(ds.val, hf.eod_id)) == sorted(
        hf.encode(t) for t in texts
    )


def test_worker_count_does_not_change_output(tmp_path):
    """One process (encode_batch) and a pool of three processes write the same bytes, shards included."""
    src = tmp_path / "src"
    texts = _corpus(src)
    tok = _bpe(tmp_path / "tok.json", texts)
    outs = []
    for workers in (1, 3):
        outs.append(tmp_path / f"w{workers}")
        prepare([str(src)], str(outs[-1]), tok, 0.2, workers=workers, shard_docs=9, keep_shards=True)
    assert _files(outs[0]) == _files(outs[1])
    assert len(list((outs[0] / "shards").glob("*.train.bin"))) == 5


def test_jsonl_field_and_meta(tmp_path):
    """--field picks the jsonl field; meta.json records the tokenizer hash, vocab, counts and shard list,
    and the memmap reader loads the result."""
    rows = [{"title": f"title {i}", "body": t} for i, t in enumerate(_texts(12, 3))]
    path = _write_jsonl(tmp_path / "in" / "docs.jsonl", rows)
    out = tmp_path / "out"
    assert prepare_main(["--out", str(out), "--field", "title", "--shard-docs", "5", str(path)]) == 0
    assert sorted(os.listdir(out)) == [
        "meta.json",
        "train.bin",
        "val.bin",
    ]  # shards removed once concatenated
    ds = build_dataset(DataConfig(name="memmap", path=str(out)))
    tok = ByteTokenizer()
    got = [tok.decode(d) for d in _docs(ds.train, 256) + _docs(ds.val, 256)]
    assert sorted(got) == sorted(r["title"] for r in rows)

    meta = json.loads((out / "meta.json").read_text())
    assert meta["field"] == "title" and meta["vocab_size"] == 257
    assert meta["tokenizer_hash"] == ByteTokenizer.tokenizer_hash and len(meta["tokenizer_hash"]) == 64
    assert meta["n_docs"] == 12 and meta["n_records"] == 12 and meta["n_skipped_records"] == 0
    assert meta["n_tokens"] == len(ds.train) + len(ds.val) == sum(len(r["title"]) + 1 for r in rows)
    assert [s["first"] for s in meta["shards"]] == [[0, 1], [0, 6], [0, 11]]
    assert [s["last"] for s in meta["shards"]] == [[0, 5], [0, 10], [0, 12]]
    assert meta["inputs"] == [os.path.abspath(path)]


def test_tokenizer_hash_ignores_json_layout(tmp_path):
    """The hash is of the tokenizer's content: a re-indented file with reordered keys keeps it."""
    texts = _texts(20, 4)
    tok = _bpe(tmp_path / "tok.json", texts)
    data = json.loads(Path(tok).read_text(encoding="utf-8"))
    (tmp_path / "again.json").write_text(json.dumps(dict(reversed(data.items())), indent=4), encoding="utf-8")
    a, b = HFTokenizer(tok), HFTokenizer(str(tmp_path / "again.json"))
    assert a.fingerprint != b.fingerprint and a.tokenizer_hash == b.tokenizer_hash
    other = _bpe(tmp_path / "other.json", _texts(20, 5) + ["zzz qqq"])
    assert HFTokenizer(other).tokenizer_hash != a.tokenizer_hash


def test_bad_records_are_named_or_skipped_and_counted(tmp_path, capsys):
    good = _texts(6, 6)
    lines = [json.dumps({"text": t}) for t in good]
    lines[2] = '{"text": "cut off'  # a writer killed mid-line
    lines.insert(4, json.dumps({"body": "no text field"}))
    path = tmp_path / "in" / "docs.jsonl"
    path.parent.mkdir()
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n')

    out = str(tmp_path / "out")
    assert prepare_main(["--out", out, str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:3: line is not valid JSON" in err and "--skip-bad" in err
    assert not os.path.exists(os.path.join(out, "meta.json"))

    # shards committed before the bad line are kept by a --skip-bad restart: nothing else differs
    assert prepare_main(["--out", out, "--shard-docs", "1", "--keep-shards", str(path)]) == 1
    capsys.readouterr()
    committed = {p.name: p.stat().st_mtime_ns for p in Path(out, "shards").glob("00000.*")}
    # line 2's shard is not committed: a shard is cut only once the record after it was read
    assert sorted(committed) == ["00000.json", "00000.train.bin", "00000.val.bin"]
    assert prepare_main(["--out", out, "--shard-docs", "1", "--skip-bad", "--keep-shards", str(path)]) == 0
    capsys.readouterr()
    assert {p.name: p.stat().st_mtime_ns for p in Path(out, "shards").glob("00000.*")} == committed
    resumed = json.loads(Path(out, "meta.json").read_text())
    assert prepare_main(["--out", out, "--skip-bad", "--fresh", str(path)]) == 0
    err = capsys.readouterr().err
    meta = json.loads(Path(out, "meta.json").read_text())
    assert meta["n_records"] == 8 and meta["n_docs"] == 5 and meta["n_skipped_records"] == 3
    assert [s.split(": ")[0] for s in meta["skipped"]] == [f"{path}:3", f"{path}:5", f"{path}:8"]
    assert "has no field 'text' (its fields: body)" in meta["skipped"][1]
    assert "not UTF-8" in meta["skipped"][2]
    assert "skipped 3 unreadable record(s)" in err
    assert {k: resumed[k] for k in ("n_docs", "n_skipped_records", "skipped", "sha256")} == {
        k: meta[k] for k in ("n_docs", "n_skipped_records", "skipped", "sha256")
    }

    # a text file that is not UTF-8 is named too (record 1: the whole file is one document)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    assert prepare_main(["--out", out, "--fresh", str(path), str(tmp_path / "bin.txt")]) == 1
    assert f"{tmp_path / 'bin.txt'}:1: text file is not UTF-8" in capsys.readouterr().err


def test_shards_of_another_preparation_are_refused(tmp_path, capsys):
    src = tmp_path / "src"
    _corpus(src)
    out = str(tmp_path / "out")
    assert prepare_main(["--out", out, "--keep-shards", str(src)]) == 0
    assert prepare_main(["--out", out, "--keep-shards", "--val-fraction", "0.1", str(src)]) == 1
    err = capsys.readouterr().err
    assert "holds shards of another preparation (it differs in: val_fraction)" in err and "--fresh" in err
    assert Path(out, "meta.json").exists()  # a refused run leaves the finished corpus readable
    assert prepare_main(["--out", out, "--fresh", "--val-fraction", "0.1", str(src)]) == 0
    assert json.loads(Path(out, "meta.json").read_text())["val_fraction"] == 0.1


def test_parquet_rows(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = _texts(9, 7)
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(9)), "content": texts}), str(path), row_group_size=4)
    out = str(tmp_path / "out")
    assert prepare_main(["--out", out, "--field", "content", "--shard-docs", "4", str(path)]) == 0
    ds = build_dataset(DataConfig(name="memmap", path=out))
    tok = ByteTokenizer()
    assert sorted(tok.decode(d) for d in _docs(ds.train, 256) + _docs(ds.val, 256)) == sorted(texts)

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"content": [texts[0], None, texts[1]]}), str(bad))
    assert prepare_main(["--out", out, "--field", "content", str(bad)]) == 1
    assert f"{bad}:2: column 'content' holds NoneType" in capsys.readouterr().err
    assert prepare_main(["--out", out, "--field", "text", str(bad)]) == 1
    assert "has no column 'text' (its columns: content)" in capsys.readouterr().err
