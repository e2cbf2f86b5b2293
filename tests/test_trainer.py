"""The single-process trainer: resume exactness, balance modes, MTP schedule, decay groups, bad losses."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

from moe_train.config import load_config, to_object
from moe_train.optim import split_decay
from moe_train.train.faults import NonFiniteLossError
from moe_train.train.trainer import Trainer


def make_cfg(run_dir, *overrides: str):
    cfg = to_object(
        load_config(
            [
                "data=synthetic",
                "data.synthetic_tokens=200000",
                "data.seq_len=32",
                "data.batch_size=8",
                "trainer.log_every=1",
                "trainer.eval_every=1000",
                "trainer.eval_sequences=16",
                "trainer.progress=false",
                "logger.console=false",
                *overrides,
            ]
        )
    )
    cfg.run_dir = str(run_dir)
    cfg.data.cache_dir = str(run_dir) + "_cache"
    return cfg


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def test_resume_continues_with_identical_losses(tmp_path):
    full = tmp_path / "full"
    Trainer(
        make_cfg(full, "trainer.max_steps=6", "trainer.ckpt_every=3", "trainer.keep_last=5"), str(full)
    ).run()
    ref = train_losses(full)
    assert os.path.isdir(full / "checkpoints" / "step_00000003")

    # resume=auto in a run dir whose latest checkpoint is step 3
    part = tmp_path / "part"
    os.makedirs(part / "checkpoints")
    shutil.copytree(full / "checkpoints" / "step_00000003", part / "checkpoints" / "step_00000003")
    (part / "checkpoints" / "latest").write_text("step_00000003\n")
    t = Trainer(make_cfg(part, "trainer.max_steps=6", "trainer.ckpt_every=3"), str(part))
    assert t.step == 3
    t.run()
    resumed = train_losses(part)
    assert sorted(resumed) == [4, 5, 6]
    for s in (4, 5, 6):
        assert resumed[s] == ref[s], (s, resumed[s], ref[s])

    # resume from an explicit path
    other = tmp_path / "other"
    path = str(full / "checkpoints" / "step_00000003")
    Trainer(make_cfg(other, "trainer.max_steps=6", f"trainer.resume={path}"), str(other)).run()
    assert train_losses(other) == {s: ref[s] for s in (4, 5, 6)}


def test_incomplete_checkpoint_is_ignored_by_auto_resume(tmp_path):
    run = tmp_path / "run"
    Trainer(
        make_cfg(run, "trainer.max_steps=2", "trainer.ckpt_every=1", "trainer.keep_last=5"), str(run)
    ).run()
    # a crash between writing shards and the rename leaves a *.tmp-PID directory and no new `latest`
    os.makedirs(run / "checkpoints" / "step_00000009.tmp-1234")
    (run / "checkpoints" / "step_00000009.tmp-1234" / "model.pt").write_bytes(b"partial")
    t = Trainer(make_cfg(run, "trainer.max_steps=3"), str(run))
    assert t.step == 2


def test_keep_last_prunes_old_checkpoints(tmp_path):
    run = tmp_path / "run"
    Trainer(
        make_cfg(run, "trainer.max_steps=4", "trainer.ckpt_every=1", "trainer.keep_last=2"), str(run)
    ).run()
    assert sorted(d for d in os.listdir(run / "checkpoints") if d.startswith("step_")) == [
        "step_00000003",
        "step_00000004",
    ]


def test_checkpoint_of_another_model_names_the_mismatch(tmp_path):
    run = tmp_path / "run"
    Trainer(make_cfg(run, "trainer.max_steps=1"), str(run)).run()
    path = str(run / "checkpoints" / "step_00000001")
    with pytest.raises(ValueError, match="hidden_size|shape mismatch"):
        Trainer(
            make_cfg(tmp_path / "b", "model.hidden_size=64", f"trainer.resume={path}"), str(tmp_path / "b")
        )


def test_metrics_fields_and_mtp_weight_schedule(tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(
        run,
        "trainer.max_steps=4",
        "trainer.mtp_weight=0.3",
        "trainer.mtp_weight_final=0.1",
        "trainer.mtp_weight_switch_frac=0.5",
        "trainer.eval_every=4",
    )
    Trainer(cfg, str(run)).run()
    recs = read_metrics(run)
    train = [r for r in recs if r["kind"] == "train"]
    for key in ("step", "loss", "lm_loss", "lr", "grad_norm", "tokens_per_s", "maxvio_batch", "expert_load"):
        assert key in train[0], key
    assert [r["mtp_weight"] for r in train] == [0.3, 0.3, 0.1, 0.1]
    # total = lm + lambda * mtp + balance
    for r in train:
        assert r["loss"] == pytest.approx(
            r["lm_loss"] + r["mtp_weight"] * r["mtp_loss"] + r["balance_loss"], rel=1e-6
        )
    ev = [r for r in recs if r["kind"] == "eval"]
    assert ev and {"val_loss", "maxvio_global"} <= set(ev[0])
    assert [r for r in recs if r["kind"] == "summary"]


def test_microbatches_do_not_change_the_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    Trainer(make_cfg(a, "trainer.max_steps=3"), str(a)).run()
    Trainer(make_cfg(b, "trainer.max_steps=3", "parallel.microbatches=4"), str(b)).run()
    la, lb = train_losses(a), train_losses(b)
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-5)


def test_aux_free_bias_moves_against_load_and_none_leaves_it(tmp_path):
    t = Trainer(
        make_cfg(tmp_path / "a", "trainer.max_steps=1", "balance.bias_update_rate=0.01"), str(tmp_path / "a")
    )
    rec = t.train_step(0)
    for moe in t.model.moe_layers():
        load = torch.tensor(rec["expert_load"][str(moe.layer_id)], dtype=torch.float32)
        expected = 0.01 * torch.sign(load.mean() - load)
        torch.testing.assert_close(moe.gate.e_score_correction_bias, expected)
    t2 = Trainer(make_cfg(tmp_path / "b", "trainer.max_steps=1", "balance=none"), str(tmp_path / "b"))
    t2.train_step(0)
    assert all(torch.count_nonzero(m.gate.e_score_correction_bias) == 0 for m in t2.model.moe_layers())


def test_bias_update_stops_after_stop_fraction(tmp_path):
    t = Trainer(
        make_cfg(tmp_path, "trainer.max_steps=10", "balance.bias_update_stop_frac=0.5"), str(tmp_path)
    )
    assert t.bias.gamma(4) == 1e-3 and t.bias.gamma(5) == 0.0


def test_weight_decay_skips_norms_biases_and_embedding(tmp_path):
    t = Trainer(make_cfg(tmp_path, "trainer.max_steps=1"), str(tmp_path))
    decay, skip = split_decay(t.model)
    assert "embed_tokens.weight" in skip and "norm.weight" in skip
    assert all(("norm" in n) or n == "embed_tokens.weight" for n in skip)
    assert {"lm_head.weight", "layers.1.mlp.experts.gate_up_proj", "layers.1.mlp.gate.weight"} <= set(decay)
    wd = {g["weight_decay"] for g in t.engine.optimizer.param_groups if "embed_tokens.weight" in g["names"]}
    assert wd == {0.0}


def test_nonfinite_loss_stops_without_touching_weights(tmp_path):
    t = Trainer(make_cfg(tmp_path, "trainer.max_steps=2"), str(tmp_path))
    with torch.no_grad():
        t.model.layers["0"].self_attn.o_proj.weight.fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    # steps count from 1, as in the log: train_step(0) is step 1
    with pytest.raises(NonFiniteLossError, match="non-finite loss nan at step 1 "):
        t.train_step(0)
    for n, p in t.model.named_parameters():
        assert torch.equal(p, before[n]) or (torch.isnan(p).all() and torch.isnan(before[n]).all()), n


@pytest.mark.slow
def test_aux_free_lowers_maxvio_against_none(tmp_path):
    """Same data, same seed: bias balancing must give clearly lower MaxVio_batch than no balancing."""
    results = {}
    for mode in ("none", "aux_free"):
        run = tmp_path / mode
        cfg = make_cfg(
            run,
            "trainer.max_steps=80",
            f"balance={mode}",
            "balance.bias_update_rate=0.01",
            "data=stdlib",
            "data.seq_len=64",
            "data.batch_size=8",
        )
        Trainer(cfg, str(run)).run()
        mv = [r["maxvio_batch"] for r in read_metrics(run) if r["kind"] == "train"][-20:]
        results[mode] = float(np.mean(mv))
    assert results["aux_free"] < 0.6 * results["none"], results


@pytest.mark.parametrize("overlap", [False, True])
def test_forwards_run_under_autocast_and_backwards_outside_it(tmp_path, overlap):
    """trainer.dtype=bf16: every forward runs under autocast, and no backward does — autocast asks for
    backwards outside it (inside, each backward matmul re-casts the fp32 gradients it meets and keeps the
    copies). With overlap an F&B pair interleaves the two, so the context follows each side."""
    over = ["parallel.overlap=true"] if overlap else []
    t = Trainer(make_cfg(tmp_path, "trainer.dtype=bf16", "parallel.microbatches=2", *over), str(tmp_path))
    forward, backward = [], []
    layer = t.model.layers["1"]
    layer.self_attn.register_forward_pre_hook(lambda m, a: forward.append(torch.is_autocast_enabled("cpu")))
    for p in layer.parameters():
        p.register_hook(lambda g: backward.append(torch.is_autocast_enabled("cpu")))
    t.train_step(0)
    assert forward and all(forward), forward
    assert backward and not any(backward), backward


def test_tokens_per_s_leaves_checkpoints_and_evaluations_out(tmp_path):
    """A window's tokens/s is its steps' own: a save or an evaluation at a step does not slow the number
    (here both take over PAUSE seconds, more than a tiny step's whole window)."""
    pause = 1.5
    run = tmp_path / "run"
    t = Trainer(
        make_cfg(run, "trainer.max_steps=2", "trainer.ckpt_every=1", "trainer.eval_every=1"), str(run)
    )
    save, evaluate = t.save, t.evaluate
    t.save = lambda **kw: (time.sleep(pause), save(**kw))[1]
    t.evaluate = lambda: (time.sleep(pause), evaluate())[1]
    t.run()
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    tokens = t.cfg.data.batch_size * t.cfg.data.seq_len
    assert [r["step"] for r in train] == [1, 2]
    assert tokens / train[1]["tokens_per_s"] < pause, train  # the window after step 1's save and evaluation
