"""Batched generation: one plain-path prefill of all prompts, then absorbed-path decode steps.

Prompts of different lengths share one batch without left padding: the prefill batch is right-padded, every
sequence's tokens sit at positions 0..len-1 (RoPE and cache slots as in a one-by-one run), and each
sequence's next token comes from the logits at its own last prompt token.  Decode then feeds one token per
sequence at position `cache.lengths[b]`.  Rows that finished (stop token or budget) keep stepping until all
have — the batch keeps a static shape, which the CUDA-graph decode step needs — but their tokens are
dropped.

On CUDA with grouped experts the decode step is the static one (infer/decode.py) whether or not it is
captured, so `cuda_graph=True` changes how the same kernels are launched, not what they compute.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..model.transformer import Transformer
from .decode import DecodeStep, sync_free_reason
from .forward import InferenceModel, as_inference_model
from .sampling import SamplingConfig, sample

# on_token(row, token): called for every kept token, in order, for streaming output
TokenCallback = Callable[[int, int], None]


@dataclass
class GenerationResult:
    """tokens[b]: the generated ids of prompt b (its stop token included when one ended it).

    decode_path: "eager" (host-synced step), "eager, static" (the sync-free step, not captured) or
    "cuda graph"; graph_fallback: why a requested graph was not used.  capture_seconds is not part of
    decode_seconds.
    """

    tokens: list[list[int]]
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    stopped: list[bool] = field(default_factory=list)
    decode_path: str = "eager"
    graph_fallback: str | None = None
    capture_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class GraphFallbackWarning(RuntimeWarning):
    """cuda_graph=True was asked for but the decode step runs eagerly (the message says why)."""


@torch.no_grad()
def generate(
    model: Transformer | InferenceModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_tokens: Sequence[int] = (),
    absorb: bool = True,
    on_token: TokenCallback | None = None,
    cache_dtype: torch.dtype | None = None,
    cuda_graph: bool = False,
) -> GenerationResult:
    """Continue every prompt by up to `max_new_tokens` tokens, stopping a row at any of `stop_tokens`.

    absorb=False runs decode through the plain path too (a check and a baseline, not faster).
    cuda_graph=True captures the decode step in a CUDA graph and replays it; where that is impossible a
    `GraphFallbackWarning` says why, `result.graph_fallback` keeps the reason, and decoding runs eagerly.
    model may be an `InferenceModel` (e.g. one whose weights ZeRO-Inference streams, infer/offload.py).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    sampling = sampling or SamplingConfig()
    model = as_inference_model(model)
    device = model.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    B, T = len(prompts), int(lengths.max())
    cache = model.new_cache(B, T + max_new_tokens, cache_dtype)
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
    logits = model(ids, positions, cache, absorb=False, last=lengths - 1)  # matrix-matrix: the plain path
    cache.lengths.copy_(lengths)
    nxt = sample(logits[:, 0], sampling, gen)
    done = _keep(result, nxt.tolist(), stops, on_token, [False] * B)
    result.prefill_tokens, result.prefill_seconds = int(lengths.sum()), time.perf_counter() - t0

    static = sync_free_reason(model) is None
    greedy = sampling.temperature == 0.0  # the argmax then runs inside the step (and its graph)
    step = DecodeStep(model, cache, absorb, static, greedy)
    result.decode_path = "eager, static" if static else "eager"
    if cuda_graph and max_new_tokens > 1 and not all(done):
        t0 = time.perf_counter()
        result.graph_fallback = step.capture()
        result.capture_seconds = time.perf_counter() - t0
        if result.graph_fallback is None:
            result.decode_path = "cuda graph"
        else:
            warnings.warn(
                f"cuda_graph: decoding eagerly: {result.graph_fallback}", GraphFallbackWarning, stacklevel=3
            )

    # The host reads each step's tokens one step late: step i is queued before step i-1's tokens are read,
    # so the device runs step i while the host keeps, streams and checks stops for step i-1, instead of
    # idling on every read. The price is one wasted step after the last row stops.
    reader = _TokenReader(B, device)
    unread: _Pending | None = None
    t0 = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        if _all_done(done, model.collective, device):
            break
        nxt = step(nxt) if greedy else sample(step(nxt), sampling, gen)
        queued = reader.put(nxt)
        if unread is not None:
            done = _keep(result, reader.get(unread), stops, on_token, done)
        unread = queued
    if unread is not None:
        done = _keep(result, reader.get(unread), stops, on_token, done)
    result.decode_tokens = sum(len(t) for t in result.tokens) - B  # the prefill kept one a row
    result.decode_seconds = time.perf_counter() - t0
    return result


@dataclass
class _Pending:
    """Tokens copied (or being copied) to the host; `event` marks the copy's end on the device."""

    host: torch.Tensor
    event: torch.cuda.Event | None


class _TokenReader:
    """Reads a step's tokens without waiting for the steps queued after it: on CUDA an asynchronous copy
    into one of two pinned buffers (two, since step i+1's copy is queued while step i's is unread),
    awaited through its own event; elsewhere a plain read."""

    def __init__(self, batch: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.buffers = (
            [torch.empty(batch, dtype=torch.long, pin_memory=True) for _ in range(2)] if self.cuda else []
        )
        self.turn = 0

    def put(self, tokens: torch.Tensor) -> _Pending:
        if not self.cuda:  # a copy, since a greedy step's tokens are its next input, overwritten by it
            return _Pending(tokens.clone(), None)
        host = self.buffers[self.turn]
        self.turn ^= 1
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Pending(host, event)

    def get(self, pending: _Pending) -> list[int]:
        if pending.event is not None:
            pending.event.synchronize()
        return pending.host.tolist()


def _all_done(done: list[bool], group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether decoding stops: every row here is done and, where the model's forwards are collectives over
    several ranks (weights spread over them), every row of every rank (one small all-reduce a step)."""
    if group is None:
        return all(done)
    flag = torch.tensor([int(all(done))], device=device)
    dist.all_reduce(flag, dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _keep(
    result: GenerationResult,
    nxt: list[int],
    stops: set[int],
    on_token: TokenCallback | None,
    done: list[bool],
) -> list[bool]:
    """Append each unfinished row's token; a row is done at a stop token (kept) or nothing (next call)."""
    out = list(done)
    for b, tok in enumerate(nxt):
        if out[b]:
            continue
        result.tokens[b].append(tok)
        if on_token is not None:
            on_token(b, tok)
        if tok in stops:
            out[b] = result.stopped[b] = True
    return out
