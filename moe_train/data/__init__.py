"""Corpora, tokenizers and the layout-invariant batch sampler."""

from .dataset import TokenDataset, build_dataset
from .sampler import GlobalBatchSampler
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "TokenDataset",
    "build_dataset",
    "GlobalBatchSampler",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
]
