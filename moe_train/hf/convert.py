"""Load Hugging Face DeepSeek-V3 checkpoints into moe_train models and write models back in that layout.

Loading builds the model on the meta device (shapes, no memory), allocates it once on the target device and
streams the checkpoint into it tensor by tensor, so peak memory is one model plus one tensor.  Everything
is checked from the safetensors headers before the first byte is copied: a wrong file fails in seconds, not
after an hour of reading, and never leaves a half-loaded model behind silently.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..checkpoint.slices import TensorSlice
from ..config import ModelConfig
from ..model import Transformer, build_empty_model, init_weights
from ..model.moe import RoutedExperts
from . import io
from .config import hf_config_to_model_config, math_mismatches, model_config_to_hf_config, shape_mismatches
from .keys import (
    COPY,
    DOWN,
    EMPTY,
    GATE,
    UP,
    Entry,
    hub_entries,
    mtp_depth,
    to_hub,
    write_ours,
    write_ours_slice,
)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or a CLI name (float32/fp32, bfloat16/bf16, float16/fp16); None stays."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def read_hf_config(path: str) -> ModelConfig:
    """The ModelConfig of the checkpoint directory `path` (its config.json)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} is not a Hugging Face checkpoint directory: no config.json")
    with open(file, encoding="utf-8") as f:
        return hf_config_to_model_config(json.load(f), source=file)


# --------------------------------------------------------------------------------------------------- loading


def _local_expert(model: nn.Module, entry: Entry) -> int | None:
    """The index of entry's expert inside the model's (possibly expert-parallel) slice, None if not held."""
    experts = model.get_submodule(entry.ours.rsplit(".", 1)[0])
    if not isinstance(experts, RoutedExperts):
        raise TypeError(f"{entry.ours} is not a RoutedExperts parameter")
    local = entry.expert - experts.first_expert
    return local if 0 <= local < experts.num_local else None


def _plan(
    model: nn.Module, cfg: ModelConfig, path: str, mtp: bool = True
) -> tuple[dict[str, str], list[Entry], list[int]]:
    """Check the files against the model; return (files, entries to read, MTP depths the files lack).
    mtp=False: the model was built without the MTP depths cfg has, and none of their tensors is read."""
    files = io.weight_files(path)
    shapes = io.tensor_shapes(files)
    table = hub_entries(cfg)
    known = {e.hub for e in table}
    unexpected = sorted(k for k in shapes if k not in known)
    if unexpected:
        hint = (
            " (FP8 scales: dequantize the checkpoint first)" if any("scale" in k for k in unexpected) else ""
        )
        raise ValueError(
            f"{path}: tensors moe_train does not know{hint}: {unexpected[:8]}" + _more(unexpected)
        )
    held = model.state_dict(keep_vars=True)
    wanted = [e for e in table if e.ours is None or e.ours in held]
    if not mtp:
        wanted = [e for e in wanted if mtp_depth(cfg, e.hub) is None]
    wanted = [e for e in wanted if e.kind not in (GATE, UP, DOWN) or _local_expert(model, e) is not None]
    absent = {e.hub for e in wanted if e.hub not in shapes}
    # A checkpoint written by transformers has no MTP tensors (it does not model MTP): such depths keep their
    # initialisation, with a warning, instead of failing the import.
    missing_depths = sorted(
        {d for e in wanted if (d := mtp_depth(cfg, e.hub)) is not None and e.hub in absent}
        - {d for k in shapes if (d := mtp_depth(cfg, k)) is not None}
    )
    missing = sorted(k for k in absent if mtp_depth(cfg, k) not in missing_depths)
    if missing:
        raise ValueError(f"{path}: tensors missing from the checkpoint: {missing[:8]}" + _more(missing))
    wanted = [e for e in wanted if e.hub not in absent]
    bad = []
    for e in wanted:
        shape, dtype = shapes[e.hub]
        if shape != e.shape:
            bad.append(f"{e.hub}: file {shape} vs expected {e.shape}")
        elif dtype.startswith("F8"):
            bad.append(f"{e.hub}: dtype {dtype} (FP8: dequantize the checkpoint to bf16 first)")
    if bad:
        raise ValueError(f"{path}: tensors do not fit the config: {bad[:8]}" + _more(bad))
    return files, wanted, missing_depths


def _more(items: list[Any]) -> str:
    return f" ... and {len(items) - 8} more" if len(items) > 8 else ""


@torch.no_grad()
def _stream_into(
    model: nn.Module,
    files: dict[str, str],
    entries: list[Entry],
    path: str,
    slices: dict[str, TensorSlice] | None = None,
) -> None:
    """Copy the planned tensors into the model, one tensor in memory at a time; then check the MTP copies.
    slices: parameters that hold only that part of their whole tensor, of which only that part is read."""
    held = model.state_dict(keep_vars=True)
    slices = slices or {}
    by_hub = {e.hub: e for e in entries}
    loads = [e.hub for e in entries if e.kind not in (COPY, EMPTY)]

    def local(e: Entry) -> int | None:
        return _local_expert(model, e) if e.kind in (GATE, UP, DOWN) else None

    for key, t in io.iter_tensors(files, [k for k in loads if by_hub[k].ours not in slices]):
        e = by_hub[key]
        write_ours(e, held[e.ours], t, local(e))
    for key, read in io.iter_readers(files, [k for k in loads if by_hub[k].ours in slices]):
        e = by_hub[key]
        write_ours_slice(e, held[e.ours], read, slices[e.ours], local(e))
    copies = [e.hub for e in entries if e.kind == COPY]
    differ = [
        key
        for key, t in io.iter_tensors(files, copies)
        if not torch.equal(t.to(held[by_hub[key].ours].dtype), held[by_hub[key].ours].detach().cpu())
    ]
    if differ:
        warnings.warn(
            f"{path}: MTP copies of the shared embedding/head differ from the main ones and were ignored "
            f"(moe_train's MTP shares the main embedding and head): {differ}",
            stacklevel=3,
        )


def _init_mtp(model: Transformer, depths: list[int], seed: int) -> None:
    """Deterministic init of MTP depths a checkpoint lacks, under their canonical names (mtp.{d}....)."""
    wrapper = nn.ModuleDict({"mtp": nn.ModuleDict({str(d): model.mtp[d] for d in depths})})
    init_weights(wrapper, seed, model.cfg.initializer_range)


def from_pretrained(
    path: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
    expert_slice: tuple[int, int] | None = None,
    mtp: bool = True,
) -> Transformer:
    """A moe_train model with the weights of the Hugging Face DeepSeek-V3 checkpoint directory `path`;
    expert_slice=(first, count): only those routed experts, whose tensors alone are read; mtp=False: without
    the MTP depths (generation does not use them), whose tensors are then not read.

    The router (gate weight and selection bias) stays fp32 whatever `dtype`: the router computes in fp32
    and the bias is far below bf16's resolution.  MTP depths the files lack (transformers does not save them)
    are initialised from `seed`, with a warning.
    """
    cfg = read_hf_config(path)
    dtype = as_dtype(dtype)
    built = cfg if mtp else replace(cfg, num_nextn_predict_layers=0)
    model = build_empty_model(built, device, dtype, expert_slice)
    files, entries, missing_depths = _plan(model, cfg, path, mtp)
    _stream_into(model, files, entries, path)
    if missing_depths:
        _init_mtp(model, missing_depths, seed)
        warnings.warn(
            f"{path}: no weights for MTP depths {missing_depths} (num_nextn_predict_layers="
            f"{cfg.num_nextn_predict_layers}); they start from a fresh initialisation",
            stacklevel=2,
        )
    return model


def load_hf_for_generation(
    model: Transformer, path: str, slices: dict[str, TensorSlice] | None = None
) -> None:
    """The weights of HF checkpoint `path` into a model built for generation from its config (no MTP depths,
    whose tensors stay unread; perhaps only some experts), perhaps cut (`slices`: what each cut parameter
    holds of its whole tensor, `parallel.tensor.cut_for_decode`), of which only those parts are read."""
    files, entries, _ = _plan(model, read_hf_config(path), path, mtp=False)
    _stream_into(model, files, entries, path, slices)


def load_hf_weights(model: Transformer, path: str) -> None:
    """Stream the weights of HF checkpoint `path` into an already built model (train.py model.init_from).

    The checkpoint's config.json must describe the same shapes as the model's config; the error names every
    field that differs.  Differences that keep the shapes (routing, rope, eps) only warn: continuing training
    with, e.g., another top-k is a legitimate choice.
    """
    found = read_hf_config(path)
    diffs = shape_mismatches(found, model.cfg)
    if diffs:
        raise ValueError(
            f"{path}/config.json does not fit the model config: {'; '.join(diffs)}. Make the model section "
            f"match the checkpoint (python -m moe_train.hf config {path} prints it)"
        )
    soft = math_mismatches(found, model.cfg)
    if soft:
        warnings.warn(f"{path}: the model config differs from config.json in {'; '.join(soft)}", stacklevel=2)
    files, entries, missing_depths = _plan(model, model.cfg, path)
    _stream_into(model, files, entries, path)
    if missing_depths:
        warnings.warn(
            f"{path}: no weights for MTP depths {missing_depths}; they keep the model's initialisation",
            stacklevel=2,
        )


# --------------------------------------------------------------------------------------------------- saving


def save_state_dict(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    path: str,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write a full moe_train state dict as a Hugging Face DeepSeek-V3 checkpoint directory.

    dtype None keeps each tensor's dtype; the selection bias is always written in fp32 (as DeepSeek does).
    """
    dtype = as_dtype(dtype)
    entries = hub_entries(cfg)
    expected = {e.ours for e in entries if e.ours is not None}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            "state dict does not fit the model config: "
            f"missing {missing[:8]}{_more(missing)}; unexpected {unexpected[:8]}{_more(unexpected)}"
        )
    by_hub = {e.hub: e for e in entries}
    main_dtype = dtype or state["embed_tokens.weight"].dtype

    def out_dtype(e: Entry) -> torch.dtype:
        if e.hub.endswith("e_score_correction_bias"):
            return torch.float32
        return dtype or (state[e.ours].dtype if e.ours else main_dtype)

    def nbytes(name: str) -> int:
        e = by_hub[name]
        return torch.Size(e.shape).numel() * torch.empty(0, dtype=out_dtype(e)).element_size()

    def tensor(name: str) -> torch.Tensor:
        e = by_hub[name]
        if e.kind == EMPTY:
            return torch.zeros(e.shape, dtype=out_dtype(e))
        return to_hub(e, state[e.ours]).to(out_dtype(e))

    hf = model_config_to_hf_config(cfg, torch_dtype=str(main_dtype).removeprefix("torch."))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
        f.write("\n")
    io.write_shards(path, [e.hub for e in entries], nbytes, tensor, io.parse_size(max_shard_size))


def save_pretrained(
    model: Transformer,
    path: str,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write `model` (all layers and experts in this process) as a Hugging Face DeepSeek-V3 checkpoint."""
    save_state_dict(model.state_dict(), model.cfg, path, dtype, max_shard_size)
