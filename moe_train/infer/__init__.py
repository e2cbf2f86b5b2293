"""Inference for trained models: MLA's latent KV cache, absorbed decode, batched sampling.

`python -m moe_train.generate CHECKPOINT --prompt ...` is the command line; docs/inference.md explains the
cache layout and what is not done yet (CUDA graphs, ZeRO-Inference offload).
"""

from .cache import LatentCache, mha_cache_elements, mla_cache_elements
from .engine import GenerationResult, generate
from .forward import forward_step, new_cache
from .load import Loaded, load_for_inference
from .sampling import SamplingConfig, filter_logits, sample

__all__ = [
    "GenerationResult",
    "LatentCache",
    "Loaded",
    "SamplingConfig",
    "filter_logits",
    "forward_step",
    "generate",
    "load_for_inference",
    "mha_cache_elements",
    "mla_cache_elements",
    "new_cache",
    "sample",
]
