"""Corpora, tokenizers, weighted mixtures and the layout-invariant batch samplers."""

from .dataset import TokenDataset, build_dataset
from .mixture import MixtureDataset, MixtureSampler, load_mixture
from .sampler import GlobalBatchSampler
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "TokenDataset",
    "build_dataset",
    "GlobalBatchSampler",
    "MixtureDataset",
    "MixtureSampler",
    "load_mixture",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
]
