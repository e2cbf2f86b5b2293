"""Weighted mixtures (data.name=mixture): proportions, layout independence, exact resume, tokenizer checks,
config errors, and the per-source records a run writes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from moe_train.config import ConfigError, DataConfig, load_config, to_object
from moe_train.data.mixture import MixtureSampler, load_mixture, mixture_sources, step_source_tokens
from moe_train.data.prepare import main as prepare_main
from moe_train.parallel.mesh import Layout
from moe_train.train.trainer import Trainer
from tests.test_data import _write_hf_tokenizer
from tests.test_trainer import read_metrics

SPAN = 100_000  # source i holds the ids i*SPAN ... : every token tells which source it came from


def _streams(lengths=(5000, 3000, 4000)) -> list[np.ndarray]:
    return [np.arange(i * SPAN, i * SPAN + n, dtype=np.int64) for i, n in enumerate(lengths)]


def test_proportions_follow_the_weights_and_rows_come_from_their_source():
    weights = [0.5, 0.3, 0.2]
    s = MixtureSampler(_streams(), weights, seq_len=16, batch_size=100, seed=11)
    ids = np.concatenate([s.sources(step) for step in range(100)])  # 10,000 sequences
    share = np.bincount(ids, minlength=3) / len(ids)
    assert np.all(np.abs(share - np.array(weights)) < 0.01), share
    # unnormalized weights mean the same mixture
    assert np.array_equal(MixtureSampler(_streams(), [5, 3, 2], 16, 100, seed=11).sources(7), s.sources(7))
    for step in (0, 42):
        batch, src = s.global_batch(step), s.sources(step)
        assert batch.shape == (100, 17) and batch.dtype == torch.long
        assert torch.equal(batch // SPAN, torch.from_numpy(src)[:, None].expand(-1, 17))
        assert torch.equal(batch[:, 1:], batch[:, :-1] + 1)  # whole windows of one stream, labels shifted
    # the logged composition is the sampler's, computed from the config alone
    entries = [{"name": n, "path": "x", "weight": w} for n, w in zip("abc", weights, strict=True)]
    cfg = DataConfig(name="mixture", mixture=entries)
    got = step_source_tokens(mixture_sources(cfg), 100, 16, 42)
    want = np.bincount(s.sources(42), minlength=3) * 16
    assert got == {f"source_tokens/{n}": int(c) for n, c in zip("abc", want, strict=True)}


@pytest.mark.parametrize("pp,ep,microbatches", [(1, 1, 1), (1, 2, 2), (2, 1, 2), (1, 1, 4)])
def test_every_layout_of_two_ranks_cuts_the_one_process_batch(pp, ep, microbatches):
    """dp=2, ep=2 (within dp=2) and pp=2 on a world of 2: for each pipeline stage the data-parallel ranks'
    micro-batches, in rank order, are exactly the batch one process draws; pipeline ranks see the same."""
    s = MixtureSampler(_streams(), [0.6, 0.1, 0.3], seq_len=8, batch_size=16, seed=3)
    lay = Layout(world=2, pp=pp, ep=ep, gpus_per_node=2)
    for step in (0, 9, 1000):
        one = MixtureSampler(_streams(), [0.6, 0.1, 0.3], 8, 16, seed=3).global_batch(step)
        per_stage: dict[int, list[torch.Tensor]] = {}
        for rank in range(lay.world):
            pp_rank, edp_rank, ep_rank = lay.coords(rank)
            dp_rank = edp_rank * lay.ep + ep_rank
            mbs = s.shard(step, dp_rank, lay.dp, microbatches)
            assert len(mbs) == microbatches
            per_stage.setdefault(pp_rank, []).extend(mbs)
        assert len(per_stage) == pp
        for parts in per_stage.values():
            assert torch.equal(torch.cat(parts), one)


def test_resume_at_step_k_draws_the_uninterrupted_batch_k_plus_1():
    k = 17
    run = MixtureSampler(_streams(), [0.2, 0.5, 0.3], seq_len=8, batch_size=8, seed=5)
    uninterrupted = [run.global_batch(step) for step in range(k + 2)]
    resumed = MixtureSampler(_streams(), [0.2, 0.5, 0.3], seq_len=8, batch_size=8, seed=5)  # a new process
    assert torch.equal(resumed.global_batch(k + 1), uninterrupted[k + 1])
    assert torch.equal(torch.cat(resumed.shard(k + 1, 1, 2, 2)), uninterrupted[k + 1][4:])
    assert not torch.equal(uninterrupted[k], uninterrupted[k + 1])
    other_seed = MixtureSampler(_streams(), [0.2, 0.5, 0.3], seq_len=8, batch_size=8, seed=6)
    assert not torch.equal(other_seed.global_batch(k + 1), uninterrupted[k + 1])


@pytest.mark.parametrize(
    "mixture,key",
    [
        ([], "data.mixture=[]"),
        ([{"name": "a", "path": "p"}], "data.mixture[0].weight is missing"),
        ([{"name": "a", "path": "p", "weight": 0}], "data.mixture[0].weight=0"),
        ([{"name": "a", "path": "p", "weight": float("nan")}], "data.mixture[0].weight=nan"),
        ([{"name": "a", "path": "p", "weight": 1}, {"name": "a", "path": "q", "weight": 1}], "[1].name='a'"),
        ([{"name": "a b", "path": "p", "weight": 1}], "data.mixture[0].name='a b'"),
        ([{"name": "a", "path": "p", "weight": 1, "wieght": 2}], "data.mixture[0].wieght is not a key"),
        (["a"], "data.mixture[0]='a'"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(mixture, key):
    with pytest.raises(ConfigError) as e:
        mixture_sources(DataConfig(name="mixture", mixture=mixture))
    assert key in str(e.value) and "\n" not in str(e.value)


def test_mixture_without_data_name_mixture_is_an_error():
    with pytest.raises(ConfigError, match="data.name=mixture"):
        mixture_sources(DataConfig(name="stdlib", mixture=[{"name": "a", "path": "p", "weight": 1}]))
    assert mixture_sources(DataConfig(name="stdlib")) == []


def _corpus(tmp_path, name: str, *args: str) -> str:
    """A prepared corpus of five documents whose text differs with `name`."""
    src, out = tmp_path / f"{name}-src", tmp_path / name
    src.mkdir()
    for i, line in enumerate(["hello world", "alpha beta gamma", "def return", "beta hello", "gamma world"]):
        (src / f"{i}.txt").write_text(f"{name} {line}\n" * (20 + 10 * i), encoding="utf-8")
    assert prepare_main(["--out", str(out), "--val-fraction", "0.2", *args, str(src)]) == 0
    return str(out)


def _mixture(*paths: str) -> DataConfig:
    entries = [{"name": f"s{i}", "path": p, "weight": i + 1} for i, p in enumerate(paths)]
    return DataConfig(name="mixture", mixture=entries, seq_len=16)


def test_sources_must_share_the_tokenizer_by_its_hash(tmp_path):
    a, b = _corpus(tmp_path, "a"), _corpus(tmp_path, "b")
    ds = load_mixture(_mixture(a, b))
    assert ds.vocab_size == 257 and ds.eod_id == 256 and list(ds.val) == ["s0", "s1"]
    assert [s["weight"] for s in ds.info["sources"]] == pytest.approx([1 / 3, 2 / 3])

    hf = _corpus(tmp_path, "hf", "--tokenizer", _write_hf_tokenizer(tmp_path / "tok.json"))
    with pytest.raises(ValueError, match=r"data.mixture\[1\] \(s1\) has vocab_size=9") as e:
        load_mixture(_mixture(a, hf))
    assert "\n" not in str(e.value)

    # equal vocab and eod, another token mapping: told apart by the recorded hash
    meta_path = f"{b}/meta.json"
    meta = json.loads(open(meta_path).read())
    hashes = [k for k in ("tokenizer_hash", "tokenizer_fingerprint") if k in meta]
    assert hashes, "prepare records a tokenizer hash"
    with open(meta_path, "w") as f:
        json.dump(meta | dict.fromkeys(hashes, "other-tokenizer"), f)
    with pytest.raises(ValueError, match=r"data.mixture\[1\] \(s1\) has tokenizer_\w+='other-tokenizer'"):
        load_mixture(_mixture(a, b))

    # unknown (no hash recorded): refused, since compatibility cannot be shown
    with open(meta_path, "w") as f:
        json.dump({k: v for k, v in meta.items() if k not in hashes}, f)
    with pytest.raises(ValueError, match=r"data.mixture\[1\] \(s1\).*records no tokenizer_hash"):
        load_mixture(_mixture(a, b))
    with pytest.raises(ValueError, match=r"data.mixture\[0\] \(s0\).*records no tokenizer_hash"):
        load_mixture(_mixture(b, a))  # the unknown source is named, wherever it stands
    with pytest.raises(ValueError, match=r"data.mixture\[0\] \(s0\): .*val.bin holds \d+ tokens, fewer"):
        load_mixture(dataclasses.replace(_mixture(a, b), seq_len=1000))  # train has 2344 tokens, val 521
    with pytest.raises(FileNotFoundError, match=r"data.mixture\[0\] \(s0\).*absent"):
        load_mixture(_mixture(str(tmp_path / "absent"), a))


def _mixture_run(run: str, a: str, b: str, *layout: str) -> list[dict] | None:
    """A 2-step run on a 3:1 mixture of corpora a and b; the metrics records on the logging rank."""
    mix = f"[{{name:code,path:'{a}',weight:3}},{{name:prose,path:'{b}',weight:1}}]"
    overrides = [
        "data=mixture",
        f"data.mixture={mix}",
        "data.seq_len=16",
        "data.batch_size=8",
        "model.num_hidden_layers=2",
        "trainer.max_steps=2",
        "trainer.log_every=1",
        "trainer.eval_every=2",
        "trainer.eval_sequences=8",
        "trainer.progress=false",
        "logger.console=false",
        *layout,
    ]
    cfg = to_object(load_config(overrides))
    cfg.run_dir = run
    t = Trainer(cfg, run)
    t.run()
    return read_metrics(run) if t.mesh.is_logging_rank else None


def _layouts_on_2_processes(base: str, a: str, b: str) -> list[list[dict] | None]:
    layouts = [(), ("parallel.ep=2",), ("parallel.pp=2", "parallel.microbatches=2")]
    return [_mixture_run(f"{base}/{i}", a, b, *lay) for i, lay in enumerate(layouts)]


@pytest.mark.slow
def test_per_source_records_are_the_same_under_dp2_ep2_pp2(tmp_path):
    from tests.distributed import run_world

    a, b = _corpus(tmp_path, "a"), _corpus(tmp_path, "b")
    ref = _mixture_run(str(tmp_path / "one"), a, b)
    runs = run_world(2, _layouts_on_2_processes, str(tmp_path / "two"), a, b)[0]
    keys = [f"{k}/{n}" for k in ("source_tokens", "lm_loss", "val_loss") for n in ("code", "prose")]
    assert {k for r in ref for k in keys if k in r} == set(keys)
    for what, got in zip(("dp=2", "dp=2 ep=2", "pp=2"), runs, strict=True):
        assert len(got) == len(ref), what
        for r, g in zip(ref, got, strict=True):
            for k in [k for k in keys if k in r]:
                assert g[k] == pytest.approx(r[k], rel=1e-4), (what, r["step"], k)


def test_a_run_logs_tokens_and_losses_per_source(tmp_path):
    a, b = _corpus(tmp_path, "a"), _corpus(tmp_path, "b")
    run = tmp_path / "run"
    records = _mixture_run(str(run), a, b)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        tokens = {n: r[f"source_tokens/{n}"] for n in ("code", "prose")}
        assert sum(tokens.values()) == 8 * 16 and tokens["code"] > tokens["prose"] > 0
        # every sequence has seq_len tokens, so the batch's LM loss is the token-weighted mean of the
        # sources' losses: the per-source split loses and double-counts nothing
        mixed = sum(tokens[n] * r[f"lm_loss/{n}"] for n in tokens) / (8 * 16)
        assert mixed == pytest.approx(r["lm_loss"], rel=1e-5)
        assert r["lm_loss/code"] != r["lm_loss/prose"]
    (ev,) = [r for r in records if r["kind"] == "eval"]
    assert ev["val_sequences"] == 16  # each source's own held-out set
    assert ev["val_loss"] == pytest.approx(0.75 * ev["val_loss/code"] + 0.25 * ev["val_loss/prose"])
    assert ev["val_loss/code"] != ev["val_loss/prose"]
    info = json.loads((run / "run_info.json").read_text())["data"]
    assert [s["name"] for s in info["sources"]] == ["code", "prose"]


def test_a_run_resumed_at_step_1_trains_step_2_on_the_same_batch(tmp_path):
    """The trainer end to end: a resumed mixture run's step 2 has the uninterrupted run's losses, per
    source too, which it could not have with another batch."""
    a, b = _corpus(tmp_path, "a"), _corpus(tmp_path, "b")
    full = tmp_path / "full"
    ref = _mixture_run(str(full), a, b, "trainer.ckpt_every=1", "trainer.keep_last=5")
    resumed = _mixture_run(
        str(tmp_path / "resumed"), a, b, f"trainer.resume={full / 'checkpoints' / 'step_00000001'}"
    )
    (want,) = [r for r in ref if r["kind"] == "train" and r["step"] == 2]
    (got,) = [r for r in resumed if r["kind"] == "train"]
    keys = ["loss", "lm_loss", "lm_loss/code", "lm_loss/prose", "source_tokens/code", "source_tokens/prose"]
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
