"""Tests for the offline plot report built from metrics.jsonl."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from moe_train.report import load_matrix, load_steps_and_matrix, main, make_report, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_EXPERTS = 8
LAYERS = ("1", "2")  # layer 0 dense, as in DeepSeek-V3's first_k_dense


def _expert_load(step: int, layer: str) -> list[int]:
    """Deterministic, uneven loads; layer 2 grows a hot expert so the heatmap shows structure."""
    base = [100 + 10 * e + step for e in range(N_EXPERTS)]
    if layer == "2":
        base[3] += 40 * step
    return base


def _train_record(step: int) -> dict:
    loads = {layer: _expert_load(step, layer) for layer in LAYERS}
    per_layer = {layer: max(v) / (sum(v) / len(v)) - 1 for layer, v in loads.items()}
    return {
        "kind": "train",
        "step": step,
        "loss": 10.0 - 0.5 * step,
        "lm_loss": 9.8 - 0.5 * step,
        "mtp_loss": None,
        "balance_loss": None,
        "lr": 1e-3 * min(1.0, step / 4),
        "grad_norm": 1.0,
        "tokens_per_s": 5000.0 + step,
        "maxvio_batch": sum(per_layer.values()) / len(per_layer),
        "maxvio_batch_per_layer": per_layer,
        "expert_load": loads,
        "some_future_field": {"ignored": True},
    }


TRAIN_STEPS = list(range(1, 11))


def _write_run(run_dir: Path, with_expert_load: bool = True, garbage: bool = True) -> Path:
    lines = []
    for step in TRAIN_STEPS:
        rec = _train_record(step)
        if not with_expert_load:
            del rec["expert_load"]
        lines.append(json.dumps(rec))
        if step == 5:
            lines.append(
                json.dumps(
                    {
                        "kind": "eval",
                        "step": 5,
                        "val_loss": 8.0,
                        "maxvio_global": 0.3,
                        "maxvio_global_per_layer": {"1": 0.2, "2": 0.4},
                    }
                )
            )
    lines.append(
        json.dumps(
            {
                "kind": "eval",
                "step": 10,
                "val_loss": 6.0,
                "maxvio_global": 0.25,
                "maxvio_global_per_layer": {"1": 0.2, "2": 0.3},
            }
        )
    )
    lines.append(json.dumps({"kind": "summary", "steps": 10}))
    text = "\n".join(lines) + "\n"
    if garbage:
        text += '{"kind": "train", "step": 11, "loss": 4.'  # truncated by a killed run
    path = run_dir / "metrics.jsonl"
    path.write_text(text)
    return path


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, f"{path} suspiciously small ({len(data)} bytes)"


def test_make_report_writes_all_plots(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="moe_train.report"):
        paths = make_report(str(tmp_path))
    assert "malformed" in caplog.text  # the truncated line is reported, not fatal
    names = sorted(Path(p).name for p in paths)
    assert names == sorted(["loss.png", "lr.png", "maxvio.png", "expert_load.png", "throughput.png"])
    for p in paths:
        assert Path(p).parent == tmp_path / "plots"
        _assert_png(Path(p))


def test_out_dir_and_missing_fields_skip_plot(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _write_run(run, with_expert_load=False, garbage=False)
    out = tmp_path / "elsewhere"
    paths = make_report(str(run), str(out))
    names = {Path(p).name for p in paths}
    assert "expert_load.png" not in names
    assert {"loss.png", "lr.png", "maxvio.png", "throughput.png"} <= names
    assert all(Path(p).parent == out for p in paths)
    assert not (run / "plots").exists()


def test_read_metrics_skips_garbage(tmp_path: Path) -> None:
    path = _write_run(tmp_path)
    records = read_metrics(str(path))
    assert [r["kind"] for r in records].count("train") == len(TRAIN_STEPS)
    assert [r["kind"] for r in records].count("eval") == 2


def test_load_matrix_shape_and_normalisation(tmp_path: Path) -> None:
    records = read_metrics(str(_write_run(tmp_path)))
    for layer in LAYERS:
        mat = load_matrix(records, layer)
        assert mat.shape == (N_EXPERTS, len(TRAIN_STEPS))
        np.testing.assert_allclose(mat.sum(axis=0), 1.0)
        expected = np.array(_expert_load(7, layer), dtype=float)
        np.testing.assert_allclose(mat[:, TRAIN_STEPS.index(7)], expected / expected.sum())
    # int layer index is accepted as well as the JSON string key
    np.testing.assert_array_equal(load_matrix(records, 2), load_matrix(records, "2"))
    # the hot expert of layer 2 gains share over time
    hot = load_matrix(records, "2")[3]
    assert hot[-1] > hot[0]


def test_load_matrix_resumed_run_and_zero_column() -> None:
    records = [
        {"kind": "train", "step": 2, "expert_load": {"1": [1, 3]}},
        {"kind": "train", "step": 1, "expert_load": {"1": [1, 1]}},
        {"kind": "train", "step": 2, "expert_load": {"1": [3, 1]}},  # re-logged after resume: wins
        {"kind": "train", "step": 3, "expert_load": {"1": [0, 0]}},
        {"kind": "train", "step": 4},  # layer not logged this step
    ]
    steps, mat = load_steps_and_matrix(records, 1)
    assert steps == [1, 2, 3]
    np.testing.assert_allclose(mat[:, :2], [[0.5, 0.75], [0.5, 0.25]])
    assert np.isnan(mat[:, 2]).all()  # no tokens: no share, drawn as a gap
    assert load_matrix(records, "9").shape == (0, 0)


def test_main_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main([str(missing)]) != 0
    err = capsys.readouterr().err
    assert str(missing / "metrics.jsonl") in err


def test_main_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    assert main([str(tmp_path)]) != 0
    assert str(tmp_path / "metrics.jsonl") in capsys.readouterr().err


def test_main_prints_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path, garbage=False)
    assert main([str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 5
    assert all(Path(p).is_file() for p in printed)
