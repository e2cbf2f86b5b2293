"""A checkpoint that does not fit the model fails before anything is loaded, with one error naming the keys
that are missing, unexpected or of another shape — not a torch traceback."""

from __future__ import annotations

import torch

from .slices import TensorSlice, held_shape


def check_model_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """A whole-model state dict `found` against the one-process model's `expected`."""
    _raise_mismatch(
        source,
        missing=sorted(set(expected) - set(found)),
        unexpected=sorted(set(found) - set(expected)),
        shapes=sorted(
            f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in set(expected) & set(found)
            if tuple(expected[k].shape) != tuple(found[k].shape)
        ),
    )


def check_keys(
    wanted: dict[str, torch.Tensor],
    stored: dict[str, tuple[int, ...]],
    source: str,
    whole_model: bool,
    slices: dict[str, TensorSlice] | None = None,
) -> None:
    """The keys a rank asks for against a sharded checkpoint's stored shapes; `whole_model`: the rank holds
    the whole model, so stored model keys it does not ask for are unexpected; `slices`: keys whose tensor
    holds only that slice of the stored one."""
    slices = slices or {}
    missing = sorted(k for k in wanted if k not in stored)
    shapes = sorted(
        f"{k}: checkpoint {stored[k]} vs model {tuple(v.shape)}"
        for k, v in wanted.items()
        if k in stored and held_shape(stored[k], slices.get(k)) != tuple(v.shape)
    )
    unexpected: list[str] = []
    if whole_model:
        unexpected = sorted({k for k in stored if k.startswith("model.")} - set(wanted))
    _raise_mismatch(source, missing, unexpected, shapes)


def _raise_mismatch(source: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> None:
    """The one error for a checkpoint that does not fit the model: up to 8 names of each kind."""
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if names:
            parts.append(f"{label} {names[:8]}{' ...' if len(names) > 8 else ''}")
    raise ValueError(f"checkpoint {source} does not fit this model config: " + "; ".join(parts))
