"""Offline PNG plots from a run's ``metrics.jsonl``.

Every training run writes ``<run_dir>/metrics.jsonl`` whether or not wandb is enabled, so this module
gives users without wandb (or on an air-gapped cluster) the same at-a-glance picture: loss curves, the
learning-rate schedule, load-balance violation (MaxVio), a per-layer expert-load heatmap and throughput.

Usage::

    python -m moe_train.report RUN_DIR [--out DIR]

matplotlib is imported inside the plotting functions, and through its object-oriented API with an
explicit Agg canvas rather than ``pyplot``: importing ``moe_train`` stays fast, and calling
:func:`make_report` from a notebook does not switch the caller's backend or leak figures into pyplot's
global registry.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
MAX_HEATMAP_LAYERS = 16
_DPI = 110


# --------------------------------------------------------------------------- reading


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Parse a ``metrics.jsonl`` file into a list of records.

    A run killed mid-write leaves a truncated last line, and a report is most wanted exactly then, so
    lines that are not a JSON object are skipped with one warning (naming the line numbers) instead of
    failing. Blank lines are skipped silently.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file not found: {path}")
    records: list[dict[str, Any]] = []
    bad_lines: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad_lines.append(lineno)
                continue
            if isinstance(obj, dict):
                records.append(obj)
            else:
                bad_lines.append(lineno)
    if bad_lines:
        shown = ", ".join(str(n) for n in bad_lines[:10]) + (" ..." if len(bad_lines) > 10 else "")
        logger.warning("%s: skipped %d malformed line(s): %s", path, len(bad_lines), shown)
    return records


def _num(value: Any) -> float | None:
    """A plottable float, or None for absent/null/non-numeric values (bools are not metrics)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _step(record: dict[str, Any]) -> int | None:
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
        return None
    return int(step)


def _by_step(records: Iterable[dict[str, Any]], kind: str) -> list[tuple[int, dict[str, Any]]]:
    """Records of one kind, one per step, sorted by step.

    A resumed run re-logs the steps between its checkpoint and the crash; the later record is the one
    that belongs to the history that continued, so the last record for a step wins. Without this the
    curves would double back on themselves.
    """
    latest: dict[int, dict[str, Any]] = {}
    for rec in records:
        if rec.get("kind") != kind:
            continue
        step = _step(rec)
        if step is not None:
            latest[step] = rec
    return sorted(latest.items())


def _series(rows: Sequence[tuple[int, dict[str, Any]]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) for the rows where ``key`` holds a number; other rows are left out."""
    steps: list[int] = []
    values: list[float] = []
    for step, rec in rows:
        v = _num(rec.get(key))
        if v is not None:
            steps.append(step)
            values.append(v)
    return steps, values


def _layer_sort_key(layer: str) -> tuple[int, int | str]:
    """Numeric order for layer keys ("2" before "10"), non-numeric keys last."""
    try:
        return (0, int(layer))
    except ValueError:
        return (1, layer)


def _layers(rows: Sequence[tuple[int, dict[str, Any]]], key: str) -> list[str]:
    """Union of the layer keys of the per-layer dict field ``key``, in layer order."""
    found: set[str] = set()
    for _, rec in rows:
        d = rec.get(key)
        if isinstance(d, dict):
            found.update(str(k) for k in d)
    return sorted(found, key=_layer_sort_key)


def _per_layer_series(
    rows: Sequence[tuple[int, dict[str, Any]]], key: str, layer: str
) -> tuple[list[int], list[float]]:
    steps: list[int] = []
    values: list[float] = []
    for step, rec in rows:
        d = rec.get(key)
        if isinstance(d, dict):
            v = _num(d.get(layer))
            if v is not None:
                steps.append(step)
                values.append(v)
    return steps, values


# --------------------------------------------------------------------------- expert load


def _load_counts(record: dict[str, Any], layer: str) -> list[float] | None:
    loads = record.get("expert_load")
    if not isinstance(loads, dict):
        return None
    counts = loads.get(layer)
    if not isinstance(counts, list) or not counts:
        return None
    out = [_num(c) for c in counts]
    return [0.0 if c is None else c for c in out]


def load_steps_and_matrix(
    records: Sequence[dict[str, Any]], layer: int | str
) -> tuple[list[int], np.ndarray]:
    """Steps and the [experts x steps] token-share matrix of one MoE layer.

    Each column is that step's ``expert_load`` for the layer divided by its sum, so colour in the heatmap
    means "share of this layer's tokens" and stays comparable across steps with different batch sizes
    and across layers. A column whose counts sum to zero has no meaningful share and is NaN (drawn as a
    gap) rather than a misleading row of zeros. Steps that did not log this layer are left out.
    """
    layer = str(layer)
    steps: list[int] = []
    columns: list[list[float]] = []
    for step, rec in _by_step(records, "train"):
        counts = _load_counts(rec, layer)
        if counts is not None:
            steps.append(step)
            columns.append(counts)
    n_experts = max((len(c) for c in columns), default=0)
    mat = np.zeros((n_experts, len(columns)), dtype=np.float64)
    for j, counts in enumerate(columns):
        mat[: len(counts), j] = counts
    totals = mat.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mat = np.where(totals > 0, mat / totals, np.nan)
    return steps, mat


def load_matrix(records: Sequence[dict[str, Any]], layer: int | str) -> np.ndarray:
    """The [experts x steps] token-share matrix of one layer; each column sums to 1.

    See :func:`load_steps_and_matrix`, which also returns the step of each column.
    """
    return load_steps_and_matrix(records, layer)[1]


def _pick_layers(layers: list[str], cap: int) -> list[str]:
    """At most ``cap`` layers, spread evenly over depth.

    Imbalance typically differs between shallow and deep layers, so when there are too many layers to
    draw, an even sample (always keeping the first and last) says more than the first ``cap``.
    """
    if len(layers) <= cap:
        return layers
    idx = np.unique(np.linspace(0, len(layers) - 1, cap).round().astype(int))
    return [layers[i] for i in idx]


def _edges(centers: Sequence[float]) -> np.ndarray:
    """Cell edges for pcolormesh from (possibly unevenly spaced) cell centres, e.g. logged steps."""
    c = np.asarray(centers, dtype=np.float64)
    if c.size == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[:-1] + c[1:]) / 2
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


# --------------------------------------------------------------------------- plotting


def _new_figure(width: float = 8.0, height: float = 4.5) -> Any:
    """A figure bound to an Agg canvas, without touching pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=_DPI)
    return path


def _plot_loss(train: list, evals: list, out_dir: str, title: str) -> str | None:
    curves = [("loss", "train loss (total)"), ("lm_loss", "train lm_loss")]
    series = [(label, *_series(train, key)) for key, label in curves]
    series = [s for s in series if s[1]]
    val_steps, val = _series(evals, "val_loss")
    if not series and not val_steps:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    for label, steps, values in series:
        ax.plot(steps, values, label=label, linewidth=1.2)
    if val_steps:
        ax.plot(val_steps, val, "o-", label="val loss", color="black", markersize=4, linewidth=1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"Loss — {title}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, out_dir, "loss.png")


def _plot_simple(
    train: list, key: str, out_dir: str, name: str, title: str, ylabel: str, log_y: bool = False
) -> str | None:
    steps, values = _series(train, key)
    if not steps:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot(steps, values, linewidth=1.2)
    if log_y and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return _save(fig, out_dir, name)


def _plot_maxvio(train: list, evals: list, out_dir: str, title: str) -> str | None:
    steps, values = _series(train, "maxvio_batch")
    layers = _layers(train, "maxvio_batch_per_layer")
    g_steps, g_values = _series(evals, "maxvio_global")
    if not steps and not layers and not g_steps:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    for i, layer in enumerate(layers):
        ls, lv = _per_layer_series(train, "maxvio_batch_per_layer", layer)
        ax.plot(ls, lv, color="tab:blue", alpha=0.25, linewidth=0.6, label="per layer" if i == 0 else None)
    if steps:
        ax.plot(steps, values, color="tab:blue", linewidth=1.8, label="MaxVio_batch (mean over layers)")
    if g_steps:
        ax.plot(
            g_steps,
            g_values,
            "s--",
            color="tab:red",
            markersize=5,
            linewidth=1.0,
            label="MaxVio_global (eval)",
        )
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio (max load / mean load − 1)")
    ax.set_title(f"Expert load violation — {title}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, out_dir, "maxvio.png")


def _share_norm(
    data: list[tuple[str, list[int], np.ndarray]],
) -> tuple[Any, str, list[float], list[str], str]:
    """Colour scale for the heatmap: (norm, cmap, colourbar ticks, tick labels, colourbar label).

    What matters in a load heatmap is the departure from balance, and a linear scale wastes it: one hot
    expert early in training sets vmax, and every near-balanced cell afterwards gets the same colour. When
    all layers have the same expert count E, the colour is therefore a diverging map on a log scale
    centred on the balanced share 1/E (white), symmetric in the over/under-load ratio R, so that 2x over
    and 2x under load are equally visible; the plotted value is still the share itself.
    """
    from matplotlib.colors import LogNorm, Normalize

    counts = {m.shape[0] for _, _, m in data}
    finite = [m[np.isfinite(m)] for _, _, m in data]
    peak = max((float(v.max()) for v in finite if v.size), default=0.0)
    if len(counts) != 1 or peak <= 0:
        return Normalize(0.0, peak or 1.0), "viridis", [], [], "share of layer's tokens"
    n = counts.pop()
    ratio = peak * n
    r = float(2 ** int(np.clip(np.ceil(np.log2(max(ratio, 2.0))), 1, 4)))  # 2, 4, 8 or 16
    ratios = [1 / r, 1 / 2, 1.0, 2.0, r] if r > 2 else [1 / 2, 1.0, 2.0]
    ticks = [x / n for x in ratios]
    labels = [f"{x / n:.2g} ({x:g}×)" if x >= 1 else f"{x / n:.2g} (1/{1 / x:g}×)" for x in ratios]
    label = f"share of layer's tokens (log; × balanced share 1/{n})"
    return LogNorm(1 / (n * r), r / n, clip=True), "RdBu_r", ticks, labels, label


def _plot_expert_load(records: list[dict[str, Any]], train: list, out_dir: str, title: str) -> str | None:
    all_layers = _layers(train, "expert_load")
    data = []
    for layer in _pick_layers(all_layers, MAX_HEATMAP_LAYERS):
        steps, mat = load_steps_and_matrix(records, layer)
        if steps:
            data.append((layer, steps, mat))
    if not data:
        return None
    import matplotlib
    import matplotlib.ticker as mticker

    norm, cmap_name, ticks, tick_labels, cbar_label = _share_norm(data)
    cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="lightgrey")  # steps with no tokens
    n_experts = max(mat.shape[0] for _, _, mat in data)
    row_h = min(2.0, max(1.1, n_experts * 0.09))
    fig = _new_figure(width=10.0, height=1.2 + row_h * len(data))
    axes = fig.subplots(len(data), 1, sharex=True, squeeze=False)[:, 0]
    mesh = None
    for ax, (layer, steps, mat) in zip(axes, data, strict=True):
        # LogNorm would mask zero loads as "bad"; a dead expert must read as maximally under-loaded.
        shown = np.where(mat == 0, np.finfo(np.float64).tiny, mat)
        mesh = ax.pcolormesh(
            _edges(steps), np.arange(mat.shape[0] + 1) - 0.5, shown, cmap=cmap, norm=norm, shading="flat"
        )
        ax.set_ylabel(f"layer {layer}\nexpert")
        ax.yaxis.set_major_locator(mticker.MaxNLocator(nbins=4, integer=True))
    axes[-1].set_xlabel("step")
    cbar = fig.colorbar(mesh, ax=list(axes), label=cbar_label, shrink=min(1.0, 0.3 + 0.7 / len(data) ** 0.5))
    if ticks:
        cbar.ax.minorticks_off()
        cbar.set_ticks(ticks, labels=tick_labels)
    note = ""
    if len(all_layers) > len(data):
        note = f"\n(showing {len(data)} of {len(all_layers)} MoE layers, evenly spaced over depth)"
    fig.suptitle(f"Expert load per layer — {title}{note}")
    return _save(fig, out_dir, "expert_load.png")


# --------------------------------------------------------------------------- entry points


def make_report(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write the PNG plots for ``run_dir/metrics.jsonl`` and return the paths written.

    Each plot needs only its own fields, so a run logged with an older config or with some features off
    (no MTP, no ``expert_load``) still gets every plot it has data for; plots with no data are skipped.

    Raises:
        FileNotFoundError: ``run_dir/metrics.jsonl`` does not exist.
        ValueError: it holds no valid record.
    """
    path = os.path.join(run_dir, METRICS_FILE)
    records = read_metrics(path)
    if not records:
        raise ValueError(f"no metrics records in {path} (empty file or no valid JSON lines)")
    out_dir = out_dir if out_dir is not None else os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)

    title = os.path.basename(os.path.normpath(os.path.abspath(run_dir))) or run_dir
    train = _by_step(records, "train")
    evals = _by_step(records, "eval")
    written = [
        _plot_loss(train, evals, out_dir, title),
        _plot_simple(train, "lr", out_dir, "lr.png", f"Learning rate — {title}", "learning rate"),
        _plot_maxvio(train, evals, out_dir, title),
        _plot_expert_load(records, train, out_dir, title),
        _plot_simple(train, "tokens_per_s", out_dir, "throughput.png", f"Throughput — {title}", "tokens / s"),
    ]
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit status (non-zero when no report could be made)."""
    parser = argparse.ArgumentParser(
        prog="python -m moe_train.report",
        description="Write PNG plots (loss, lr, MaxVio, expert-load heatmap, throughput) from "
        "RUN_DIR/metrics.jsonl.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory containing metrics.jsonl")
    parser.add_argument(
        "--out", metavar="DIR", default=None, help="output directory (default: RUN_DIR/plots)"
    )
    args = parser.parse_args(argv)
    try:
        paths = make_report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not paths:
        print(f"error: nothing to plot in {os.path.join(args.run_dir, METRICS_FILE)}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
