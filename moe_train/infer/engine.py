"""Batched generation: one plain-path prefill of all prompts, then absorbed-path decode steps.

Prompts of different lengths share one batch without left padding: the prefill batch is right-padded, every
sequence's tokens sit at positions 0..len-1 (RoPE and cache slots as in a one-by-one run), and each
sequence's next token comes from the logits at its own last prompt token.  Decode then feeds one token per
sequence at position `cache.lengths[b]`.  Rows that finished (stop token or budget) keep stepping until all
have — the batch keeps a static shape, which a CUDA-graph decode step will need — but their tokens are
dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..model.transformer import Transformer
from .forward import forward_step, new_cache
from .sampling import SamplingConfig, sample

# on_token(row, token): called for every kept token, in order, for streaming output
TokenCallback = Callable[[int, int], None]


@dataclass
class GenerationResult:
    """tokens[b]: the generated ids of prompt b (its stop token included when one ended it)."""

    tokens: list[list[int]]
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    stopped: list[bool] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_tokens: Sequence[int] = (),
    absorb: bool = True,
    on_token: TokenCallback | None = None,
    cache_dtype: torch.dtype | None = None,
) -> GenerationResult:
    """Continue every prompt by up to `max_new_tokens` tokens, stopping a row at any of `stop_tokens`.

    absorb=False runs decode through the plain path too (a check and a baseline, not faster).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    sampling = sampling or SamplingConfig()
    device = model.lm_head.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    B, T = len(prompts), int(lengths.max())
    cache = new_cache(model, B, T + max_new_tokens, cache_dtype)
    gen = torch.Generator(device=device).manual_seed(sampling.seed)
    result = GenerationResult([[] for _ in prompts], stopped=[False] * B)
    if max_new_tokens <= 0:
        return result
    stops = set(int(t) for t in stop_tokens)
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    positions = torch.arange(T, device=device).expand(B, T)

    t0 = time.perf_counter()
    logits = forward_step(model, ids, positions, cache, absorb=False)  # matrix-matrix: the plain path
    cache.lengths.copy_(lengths)
    nxt = sample(logits[torch.arange(B, device=device), lengths - 1], sampling, gen)
    done = _keep(result, nxt, stops, on_token, [False] * B)
    result.prefill_tokens, result.prefill_seconds = int(lengths.sum()), time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        if all(done):
            break
        positions = cache.lengths.unsqueeze(1)
        logits = forward_step(model, nxt.unsqueeze(1), positions, cache, absorb)
        cache.lengths += 1
        nxt = sample(logits[:, -1], sampling, gen)
        before = sum(len(t) for t in result.tokens)
        done = _keep(result, nxt, stops, on_token, done)
        result.decode_tokens += sum(len(t) for t in result.tokens) - before
    result.decode_seconds = time.perf_counter() - t0
    return result


def _keep(
    result: GenerationResult,
    nxt: torch.Tensor,
    stops: set[int],
    on_token: TokenCallback | None,
    done: list[bool],
) -> list[bool]:
    """Append each unfinished row's token; a row is done at a stop token (kept) or nothing (next call)."""
    out = list(done)
    for b, tok in enumerate(nxt.tolist()):
        if out[b]:
            continue
        result.tokens[b].append(tok)
        if on_token is not None:
            on_token(b, tok)
        if tok in stops:
            out[b] = result.stopped[b] = True
    return out
