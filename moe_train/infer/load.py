"""Models for generation from our checkpoints (step dir / checkpoints dir / run dir) or HF directories.

Only the weights are read (a whole-model checkpoint's model.pt memory-mapped; a sharded checkpoint's
`model.*` keys), never the optimizer state (it is twice the model).  MTP depths are skipped: generation does
not use them, so they are neither built nor loaded.
With `offload` the weights are loaded into CPU memory and handed to ZeRO-Inference (infer/offload.py), which
streams them to `device` layer by layer: the model never has to fit on the GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch import nn

from ..checkpoint import load_model_state, resolve_checkpoint
from ..checkpoint.mismatch import check_keys, check_model_state
from ..checkpoint.sharded import entry_slices, is_sharded, model_entries, stored_shapes
from ..checkpoint.slices import (
    SlicedFileSystemReader,
    SlicedLoadPlanner,
    TensorSlice,
    copy_slice,
    held_shape,
)
from ..config import ModelConfig
from ..data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from ..hf.cli import read_model_config
from ..hf.convert import as_dtype, load_hf_for_generation, read_hf_config
from ..model import build_empty_model
from ..model.moe import RoutedExperts
from ..model.transformer import Transformer
from .forward import InferenceModel
from .offload import OffloadConfig, check_available, offload_model


@dataclass
class Loaded:
    model: Transformer | InferenceModel  # an InferenceModel when its weights are offloaded
    tokenizer: ByteTokenizer | HFTokenizer | None  # None: an HF directory without tokenizer.json
    source: str  # the checkpoint or HF directory actually read


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def model_config(path: str) -> ModelConfig:
    """The model config of an HF directory or of one of our checkpoints (run dir, checkpoints dir, step)."""
    return read_hf_config(path) if is_hf_dir(path) else read_model_config(resolve_checkpoint(path))


def _checkpoint_tokenizer(ckpt: str) -> str | None:
    """data.tokenizer of the run that wrote `ckpt` (None: bytes)."""
    with open(os.path.join(ckpt, "config.yaml"), encoding="utf-8") as f:
        data = OmegaConf.create(f.read()).get("data") or {}
    return data.get("tokenizer")


def _load_ours(model: nn.Module, ckpt: str, slices: dict[str, TensorSlice] | None = None) -> None:
    """A checkpoint of ours into `model`, reading only the tensors it holds from a sharded checkpoint (the
    per-expert keys make an expert slice a set of keys); a whole-model file is memory-mapped and sliced.
    slices: parameters that hold only that part of their whole tensor (`cut_for_decode`), of which only that
    part is read."""
    slices = slices or {}
    if is_sharded(ckpt):
        wanted, by_key = model_entries(model), entry_slices(model, slices)
        # the MTP keys stay unread
        check_keys(wanted, stored_shapes(ckpt), ckpt, whole_model=False, slices=by_key)
        dcp.load(
            wanted,
            storage_reader=SlicedFileSystemReader(ckpt),
            planner=SlicedLoadPlanner(by_key),
            no_dist=not dist.is_initialized(),
        )
        return
    state = load_model_state(ckpt)
    for m_name, m in model.named_modules():
        if isinstance(m, RoutedExperts):
            for p in ("gate_up_proj", "down_proj"):
                key = f"{m_name}.{p}"
                state[key] = state[key][m.first_expert : m.first_expert + m.num_local]
    held = model.state_dict(keep_vars=True)
    whole = {k: v for k, v in state.items() if k in held and k not in slices}
    check_model_state(
        {k: v for k, v in held.items() if k not in slices},
        {k: v for k, v in state.items() if k in whole},
        ckpt,
    )
    model.load_state_dict(whole, strict=False)
    for name, sl in slices.items():  # views of the memory-mapped file: only the slice's pages are read
        if held_shape(tuple(state[name].shape), sl) != tuple(held[name].shape):
            raise ValueError(f"checkpoint {ckpt}: {name} {tuple(state[name].shape)} does not fit the model")
        copy_slice(held[name].detach(), state[name].__getitem__, tuple(state[name].shape), sl)


def read_weights(model: nn.Module, source: str, slices: dict[str, TensorSlice] | None = None) -> None:
    """The weights of `source` (an HF directory, or a checkpoint of ours as `resolve_checkpoint` finds it)
    into `model`, built for generation from its config; `slices`: parameters holding only that part of their
    whole tensor (`parallel.tensor.cut_for_decode`), of which only that part is read."""
    if is_hf_dir(source):
        load_hf_for_generation(model, source, slices)
    else:
        _load_ours(model, source, slices)


def generation_config(source: str) -> ModelConfig:
    """The model config to build for generation from `source`: without MTP depths (generation does not use
    them, so their tensors are never read)."""
    return replace(model_config(source), num_nextn_predict_layers=0, init_from=None)


def load_for_inference(
    path: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    tokenizer: str | None = None,
    offload: OffloadConfig | str | None = None,
    expert_slice: tuple[int, int] | None = None,
) -> Loaded:
    """The model in eval mode on `device` in `dtype` (routers stay fp32, as in training and HF import).

    tokenizer: a tokenizer.json overriding the one the checkpoint names (or an HF directory's own).
    offload: "cpu" | "nvme" | an OffloadConfig: weights stay off the GPU and stream to `device` per layer.
    expert_slice: (first, count): build and read only those routed experts (expert-parallel decode; an HF
    directory's and a sharded checkpoint's other experts are not read, a whole-model file is memory-mapped).
    `parallel.tensor.load_for_decode` loads a model split over processes.
    """
    dtype = as_dtype(dtype) or torch.float32
    if isinstance(offload, str):
        offload = OffloadConfig(offload)
    if offload is not None:
        check_available(offload)
    where = "cpu" if offload is not None else device
    source = path if is_hf_dir(path) else resolve_checkpoint(path)
    model = build_empty_model(generation_config(source), where, dtype, expert_slice)
    read_weights(model, source)
    model.eval()
    tok = tokenizer_of(source, tokenizer)
    if offload is None:
        return Loaded(model, tok, source)
    return Loaded(offload_model(model, offload, device), tok, source)


def tokenizer_of(source: str, override: str | None) -> ByteTokenizer | HFTokenizer | None:
    """`override`, else an HF directory's own tokenizer.json (None without one), else the tokenizer the run
    that wrote checkpoint `source` named (bytes when it named none)."""
    if not is_hf_dir(source):
        return load_tokenizer(override or _checkpoint_tokenizer(source))
    own = os.path.join(source, "tokenizer.json")
    found = override or (own if os.path.isfile(own) else None)
    return load_tokenizer(found) if found else None
