"""Gradient reduction overlapped with backward (`parallel.overlap_grad_reduce`, torch engine, no pipeline).

Without it, dense gradients are summed over dp (experts over expert-dp) after the last micro-batch's backward,
exposed (its cost on GPUs: docs/performance.md, "Weak scaling"). Here the parameters are cut into buckets in
reverse registration order — roughly the order their gradients are finished by backward — and a bucket's
all-reduce starts, asynchronously, as soon as every parameter in it has accumulated its gradient for the
step's last micro-batch, while backward goes on with earlier layers.

Why results do not change: the same gradients are summed over the same groups (the all-reduce is
elementwise), only earlier. Why ranks cannot disagree: buckets are launched strictly in bucket order — a ready
bucket waits for every bucket before it — so every rank issues the same collectives in the same order,
whatever order its gradients finish in. A parameter that got no gradient (or a bucket not launched by the
end of backward) is reduced at `finish`, as before.

Hooks count accumulations only while armed (`arm` at the start of a training step), so code that calls
backward on its own (tests, evaluation) and then reduces with `grads.reduce_gradients` is unaffected.

Under fp32 master weights (optim/master.py) a parameter's gradient lives on its master: `holder` maps each
parameter to the tensor whose `.grad` is reduced. The master's own hook, registered first, has moved the
micro-batch's gradient there by the time this class's hook counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .grads import split_params
from .mesh import Mesh


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    group: Any
    ready: int = 0
    flat: torch.Tensor | None = None
    work: Any = None
    launched: bool = False
    counts: dict[int, int] = field(default_factory=dict)


class OverlappedGradReduce:
    def __init__(
        self,
        model: nn.Module,
        mesh: Mesh,
        microbatches: int,
        bucket_bytes: int = 64 << 20,
        holder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.microbatches = microbatches
        self.holder = holder or (lambda p: p)
        self.armed = False
        self.buckets: list[_Bucket] = []
        self._next = 0
        _, expert = split_params(model)
        expert_ids = {id(p) for p in expert}
        groups = {
            "dense": mesh.group("dp") if mesh.layout.dp > 1 else None,
            "expert": mesh.group("edp") if mesh.layout.edp > 1 else None,
        }
        params = [p for p in reversed(list(model.parameters())) if p.requires_grad]
        open_: dict[str, _Bucket] = {}
        sizes: dict[str, int] = {}
        for p in params:
            kind = "expert" if id(p) in expert_ids else "dense"
            if groups[kind] is None:
                continue
            if kind not in open_:
                open_[kind] = _Bucket([], groups[kind])
                self.buckets.append(open_[kind])
                sizes[kind] = 0
            open_[kind].params.append(p)
            sizes[kind] += p.numel() * self.holder(p).element_size()
            if sizes[kind] >= bucket_bytes:
                del open_[kind]
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        for b in self.buckets:
            for p in b.params:
                p.register_post_accumulate_grad_hook(self._on_grad)

    @property
    def active(self) -> bool:
        return bool(self.buckets)

    def arm(self) -> None:
        """Start counting this step's accumulations (call before the step's first backward)."""
        self.armed = True
        self._next = 0
        for b in self.buckets:
            b.ready, b.flat, b.work, b.launched = 0, None, None, False
            b.counts.clear()

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        b = self._bucket_of[id(p)]
        n = b.counts.get(id(p), 0) + 1
        b.counts[id(p)] = n
        if n == self.microbatches:
            b.ready += 1
            if b.ready == len(b.params):
                self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if b.ready < len(b.params):
                return
            self._launch(b)
            self._next += 1

    def _launch(self, b: _Bucket) -> None:
        grads = []
        for h in map(self.holder, b.params):
            if h.grad is None:
                h.grad = torch.zeros_like(h)
            grads.append(h.grad)
        b.flat = _flatten_dense_tensors(grads)
        b.work = dist.all_reduce(b.flat, group=b.group, async_op=True)
        b.launched = True

    def finish(self) -> None:
        """Launch what backward did not (in bucket order), wait for every reduction, write the sums back."""
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1
        for b in self.buckets:
            b.work.wait()
            grads = [self.holder(p).grad for p in b.params]
            for g, new in zip(grads, _unflatten_dense_tensors(b.flat, grads), strict=True):
                g.copy_(new)
            b.flat, b.work = None, None
        self.armed = False
