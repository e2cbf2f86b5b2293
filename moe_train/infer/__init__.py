"""Inference for trained models: MLA's latent KV cache, absorbed decode, batched sampling.

`python -m moe_train.generate CHECKPOINT --prompt ...` is the command line; docs/inference.md explains the
cache layout, the CUDA-graph decode step and ZeRO-Inference weight offload.
"""

from .cache import LatentCache, mha_cache_elements, mla_cache_elements
from .decode import DecodeStep, graph_unsupported_reason
from .engine import GenerationResult, GraphFallbackWarning, generate
from .forward import InferenceModel, forward_step, new_cache
from .load import Loaded, load_for_inference
from .sampling import SamplingConfig, filter_logits, sample

__all__ = [
    "DecodeStep",
    "GenerationResult",
    "GraphFallbackWarning",
    "InferenceModel",
    "LatentCache",
    "Loaded",
    "SamplingConfig",
    "filter_logits",
    "forward_step",
    "generate",
    "graph_unsupported_reason",
    "load_for_inference",
    "mha_cache_elements",
    "mla_cache_elements",
    "new_cache",
    "sample",
]
