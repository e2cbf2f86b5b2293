"""The decode step over static buffers, run eagerly or replayed from a CUDA graph.

Why graphs: a decode step is one token per sequence, so on a GPU its kernels are tiny and the step is bound
by launching a few hundred of them from Python.  A CUDA graph records the step once and replays it with one
launch.  A replay reuses the recorded addresses and shapes and runs without the host, so everything the step
touches is a static buffer:

- the input ids (batch, 1), copied in before each replay;
- the cache, allocated for max_len up front, and its `lengths`: the step derives the positions from them
  and advances them itself;
- the last position's logits (batch, vocab), the graph's output; or, for greedy decoding, the next tokens:
  the argmax runs inside the step and writes the input ids, so each replay feeds the next with no launch
  between them.

And nothing in the step may read a tensor on the host: the static attention reads every cache slot (the mask
alone hides unused ones), the cache write skips its bounds check, and the MoE experts take the grouped path
(row counts stay on the device).  Where that is impossible — a CPU, experts not in bf16 or no
`torch._grouped_mm`, weights streamed through DeepSpeed's hooks, an op that refuses capture — `capture`
returns the reason and the step runs eagerly.  Sampling other than greedy stays outside the graph, on its
logits.
"""

from __future__ import annotations

import torch

from ..model.moe import MoE
from ..ops.grouped_gemm import grouped_mm_available
from .cache import LatentCache
from .forward import InferenceModel


def sync_free_reason(model: InferenceModel) -> str | None:
    """Why the static decode step would still read tensors on the host; None when it does not."""
    if model.device.type != "cuda":
        return f"the model is on {model.device.type}, and CUDA graphs need a CUDA device"
    probe = torch.empty(0, dtype=model.dtype, device=model.device)
    grouped = grouped_mm_available(probe) and probe.dtype == torch.bfloat16
    if any(isinstance(s.layer.mlp, MoE) for s in model.layers) and not grouped:
        return (
            f"routed experts in {model.dtype} run a per-expert loop that reads expert counts on the host; "
            "capture needs bf16 weights and torch._grouped_mm"
        )
    return None


def graph_unsupported_reason(model: InferenceModel) -> str | None:
    """Why the decode step cannot be captured in a CUDA graph; None when it can be tried."""
    reason = sync_free_reason(model)
    if reason is None and model.offload:
        reason = (
            f"weights are streamed by DeepSpeed ZeRO-3 hooks (offload={model.offload}), host code every layer"
        )
    return reason


class DecodeStep:
    """`step(tokens)` feeds one token per sequence at its cache length and returns the logits (B, vocab), or
    with greedy=True the next tokens (B,): the argmax ends the step, written into the step's own input, so
    passing the returned tokens back needs no copy (the next call overwrites them: read or copy them first).

    static=True runs the sync-free form of the step (see module docstring) — required for `capture`, and
    what CUDA decode uses eagerly too, so that graph and eager runs execute the same kernels.
    """

    def __init__(
        self, model: InferenceModel, cache: LatentCache, absorb: bool, static: bool, greedy: bool = False
    ) -> None:
        self.model, self.cache, self.absorb, self.static = model, cache, absorb, static
        self.greedy = greedy
        self.ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=model.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None  # the graph's output buffer

    def _run(self) -> torch.Tensor:
        positions = self.cache.lengths.unsqueeze(1)
        logits = self.model(self.ids, positions, self.cache, self.absorb, self.static)
        self.cache.lengths.add_(1)
        if not self.greedy:
            return logits[:, -1]
        self.ids.copy_(logits[:, -1].argmax(dim=-1, keepdim=True))
        return self.ids.view(-1)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.data_ptr() != self.ids.data_ptr():
            self.ids.copy_(tokens.view(-1, 1))
        if self.graph is None:
            return self._run()
        self.graph.replay()
        assert self.out is not None
        return self.out

    def capture(self) -> str | None:
        """Record the step in a CUDA graph; returns why not (the step then stays eager), or None."""
        reason = graph_unsupported_reason(self.model)
        if reason is None and not self.static:
            reason = "the decode step was built without static buffers"
        if reason is not None:
            return reason
        lengths, ids = self.cache.lengths.clone(), self.ids.clone()
        try:
            # Warm-up on a side stream (lazy initialisation must not happen inside capture). It writes the
            # slots at `lengths`, which the next real step overwrites before anything attends to them.
            side = torch.cuda.Stream(self.model.device)
            side.wait_stream(torch.cuda.current_stream(self.model.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run()
                    self.cache.lengths.copy_(lengths)
                    self.ids.copy_(ids)
            torch.cuda.current_stream(self.model.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._run()
        except Exception as e:  # noqa: BLE001 - any refusal to capture means: decode eagerly, and say why
            self.cache.lengths.copy_(lengths)
            self.ids.copy_(ids)
            return f"capture failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        self.graph, self.out = graph, out
        return None
