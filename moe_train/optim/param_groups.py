"""Which parameters get weight decay.

Decay applies to matrices that multiply activations (attention, MLP, experts, router, output head).
Norm gains, biases and the input embedding are excluded: decaying a norm gain or a bias pulls it towards
zero rather than towards "small weights", and an embedding row only gets gradient when its token appears,
so decay would shrink rare tokens' rows every step they are absent.
"""

from __future__ import annotations

from torch import nn

from ..model.norm import RMSNorm


def split_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of (decayed, not decayed) trainable parameters."""
    no_decay: set[str] = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, (RMSNorm, nn.Embedding)):
            no_decay.update(prefix + n for n, _ in module.named_parameters(recurse=False))
        for n, p in module.named_parameters(recurse=False):
            if p.ndim < 2:
                no_decay.add(prefix + n)
    decay, skip = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (skip if n in no_decay else decay).append(n)
    return decay, skip
