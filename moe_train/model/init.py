"""Deterministic, layout-independent initialisation.

Every parameter draws from its own generator, seeded by (seed, parameter name) — and each routed expert by
(seed, name, global expert index) — so a rank that holds only some layers or some experts produces exactly
the values the one-process model has for them.  This is where layout invariance starts (step 0).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from .moe import RoutedExperts, Router
from .norm import RMSNorm


def _generator(seed: int, key: str, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1))
    return g


@torch.no_grad()
def _normal_(t: torch.Tensor, std: float, seed: int, key: str) -> None:
    g = _generator(seed, key, t.device)
    t.copy_(torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32).mul_(std).to(t.dtype))


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, std: float) -> None:
    """N(0, std) for matrices and embeddings, ones for norms; names are the model's canonical names."""
    for mod_name, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            for pname, p in module.named_parameters(recurse=False):
                for j in range(module.num_local):
                    e = module.first_expert + j
                    _normal_(p[j], std, seed, f"{mod_name}.{pname}.{e}")
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            _normal_(module.weight, std, seed, f"{mod_name}.weight")
        elif isinstance(module, Router):
            module.e_score_correction_bias.zero_()
            _normal_(module.weight, std, seed, f"{mod_name}.weight")
