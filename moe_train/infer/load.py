"""Models for generation from our checkpoints (step dir / checkpoints dir / run dir) or HF directories.

Only the weights are read (a whole-model checkpoint's model.pt memory-mapped; a sharded checkpoint's
`model.*` keys), never the optimizer state (it is twice the model).  MTP depths are skipped: generation does
not use them, so they are neither built nor loaded.
With `offload` the weights are loaded into CPU memory and handed to ZeRO-Inference (infer/offload.py), which
streams them to `device` layer by layer: the model never has to fit on the GPU.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace

import torch
from omegaconf import OmegaConf

from ..checkpoint import load_model_state, resolve_checkpoint
from ..data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from ..hf import from_pretrained
from ..hf.cli import read_model_config
from ..hf.convert import as_dtype
from ..model import build_empty_model
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


def _checkpoint_tokenizer(ckpt: str) -> str | None:
    """data.tokenizer of the run that wrote `ckpt` (None: bytes)."""
    with open(os.path.join(ckpt, "config.yaml"), encoding="utf-8") as f:
        data = OmegaConf.create(f.read()).get("data") or {}
    return data.get("tokenizer")


def load_for_inference(
    path: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    tokenizer: str | None = None,
    offload: OffloadConfig | str | None = None,
) -> Loaded:
    """The model in eval mode on `device` in `dtype` (routers stay fp32, as in training and HF import).

    tokenizer: a tokenizer.json overriding the one the checkpoint names (or an HF directory's own).
    offload: "cpu" | "nvme" | an OffloadConfig: weights stay off the GPU and stream to `device` per layer.
    """
    dtype = as_dtype(dtype) or torch.float32
    if isinstance(offload, str):
        offload = OffloadConfig(offload)
    if offload is not None:
        check_available(offload)
    where = "cpu" if offload is not None else device
    if is_hf_dir(path):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*MTP depths.*")  # MTP is not used here
            model = from_pretrained(path, device=where, dtype=dtype)
        own = os.path.join(path, "tokenizer.json")
        tok_path = tokenizer or (own if os.path.isfile(own) else None)
        tok = load_tokenizer(tok_path) if tok_path else None
        source = path
    else:
        ckpt = resolve_checkpoint(path)
        cfg = replace(read_model_config(ckpt), num_nextn_predict_layers=0, init_from=None)
        state = load_model_state(ckpt)
        state = {k: v for k, v in state.items() if not k.startswith("mtp.")}
        model = build_empty_model(cfg, where, dtype)
        model.load_state_dict(state, strict=True)
        tok = load_tokenizer(tokenizer or _checkpoint_tokenizer(ckpt))
        source = ckpt
    model.eval()
    if offload is None:
        return Loaded(model, tok, source)
    return Loaded(offload_model(model, offload, device), tok, source)
