"""Evaluation cut like a training step, checkpoints committed before it, failures it survives, and the
time-based checkpoint; the pp=2 and ep=2 cases run inside tests/test_layout_invariance.py's process
groups."""

from __future__ import annotations

import json
import os

import pytest

from moe_train.checkpoint import latest_checkpoint
from moe_train.model.memory import GIB
from moe_train.train import main
from moe_train.train.faults import EXIT_EVAL
from moe_train.train.trainer import Trainer
from tests.test_trainer import make_cfg, read_metrics


def evaluate_watching_rows(trainer: Trainer) -> tuple[dict, set[int]]:
    """The trainer's eval record, and the row counts of every forward it ran on this rank (seen at the
    embedding, which the first stage and, for MTP, the last stage hold)."""
    rows: set[int] = set()
    embed = trainer.model.embed_tokens
    hook = None if embed is None else embed.register_forward_pre_hook(lambda m, a: rows.add(a[0].shape[0]))
    try:
        return trainer.evaluate(), rows
    finally:
        if hook is not None:
            hook.remove()


def test_eval_runs_the_training_microbatches_with_the_same_val_loss(tmp_path):
    """k micro-batches: every eval forward has the training micro-batch's rows (batch_size / k), and the
    val loss is the one-micro-batch one; eval_sequences rounds up to whole batches."""
    got = {}
    for k in (1, 4):
        run = tmp_path / f"k{k}"
        t = Trainer(make_cfg(run, "trainer.eval_sequences=12", f"parallel.microbatches={k}"), str(run))
        got[k] = evaluate_watching_rows(t)
    for k, (record, rows) in got.items():
        assert rows == {8 // k}, (k, rows)
        assert record["val_sequences"] == 16  # 12 rounded up to two batches of data.batch_size=8
    assert got[4][0]["val_loss"] == pytest.approx(got[1][0]["val_loss"], rel=1e-6)
    assert got[4][0]["maxvio_global"] == pytest.approx(got[1][0]["maxvio_global"], rel=1e-6)


def test_eval_fault_at_last_step_keeps_the_checkpoint_and_resume_evaluates(tmp_path, monkeypatch, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    overrides = ("trainer.max_steps=3", "trainer.async_save=true")
    want = Trainer(make_cfg(ref, *overrides), str(ref)).run()

    monkeypatch.setenv("MOE_TRAIN_FAULT_EVAL_OOM", "3")
    with pytest.raises(SystemExit) as exit_info:
        main(make_cfg(run, *overrides))
    assert exit_info.value.code == EXIT_EVAL
    err = capsys.readouterr().err
    assert "evaluation at step 3 ran out of memory on cpu" in err and "parallel.microbatches" in err, err
    ckpt = latest_checkpoint(str(run / "checkpoints"))
    assert ckpt is not None and ckpt.endswith("step_00000003"), ckpt
    assert ckpt in err  # the message names the checkpoint to continue from
    failed = [r for r in read_metrics(run) if r["kind"] == "eval_failed"]
    assert [r["step"] for r in failed] == [3]

    monkeypatch.delenv("MOE_TRAIN_FAULT_EVAL_OOM")
    summary = main(make_cfg(run, *overrides))  # trainer.resume=auto; returning is exit status 0
    assert summary["steps"] == 3 and summary["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)
    recs = read_metrics(run)
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3]  # nothing trained twice
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [3]


def test_time_based_checkpoint_before_ckpt_every_is_reached(tmp_path):
    def steps_saved(run, minutes: str) -> list[str]:
        cfg = make_cfg(run, "trainer.max_steps=3", "trainer.ckpt_every=100", "trainer.keep_last=5", minutes)
        Trainer(cfg, str(run)).run()
        return sorted(d for d in os.listdir(run / "checkpoints") if d.startswith("step_"))

    # any step outlasts a microsecond: every step is due by time
    timed = steps_saved(tmp_path / "timed", "trainer.ckpt_every_minutes=1e-8")
    assert timed == ["step_00000001", "step_00000002", "step_00000003"]
    assert steps_saved(tmp_path / "off", "trainer.ckpt_every_minutes=0") == ["step_00000003"]


def test_memory_estimate_covers_evaluation_and_warns_when_it_does_not_fit(tmp_path, capsys):
    est = {}
    for k in (1, 4):
        run = tmp_path / f"k{k}"
        t = Trainer(make_cfg(run, f"parallel.microbatches={k}"), str(run))
        est[k] = t.memory
        info = json.loads((run / "run_info.json").read_text())["memory_estimate_rank0"]
        assert info["eval_total_bytes"] == t.memory.eval_total_bytes
    assert "evaluation ~" in capsys.readouterr().out
    # evaluation runs the training micro-batch: its activations shrink with k, and stay within training's
    assert est[4].eval_activation_bytes * 4 == est[1].eval_activation_bytes
    m = est[1]
    assert 0 < m.eval_activation_bytes <= m.activation_bytes
    assert m.warnings(None) == [] and m.warnings(m.total_bytes) == []
    (train_only,) = m.warnings(m.total_bytes - 1)
    assert train_only.startswith("warning: a training step needs")
    both = m.warnings(m.eval_total_bytes - 1)
    assert len(both) == 2 and both[1].startswith("warning: evaluation needs")
    assert f"{(m.eval_total_bytes - 1) / GIB:.1f} GiB" in both[1]
