"""A compute sub-step of the overlap engine: a piece of a stage's forward whose autograd graph is its own.

Its inputs are fresh leaves (the graph ends there and their gradients are handed on by hand), its outputs
keep their graph, and its extra roots are the balance-loss terms routers recorded inside it. The backward
runs in two ways: 'BW' (input and parameter gradients in one traversal) or 'B' (input gradients only, the
output gradients kept) followed later by `weights` (W), which never repeats a communication. With taps —
(projection output, weight) pairs a deferrable phase reports (ops/grouped_gemm.Taps) — B stops short of
every weight-gradient GEMM and W starts from the taps' output gradients, so no GEMM of the input path runs
twice.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.stats import MoEStats
from ..ops.grouped_gemm import Taps

# where a tensor came from: (index of the producing record on the tape, output index); (-1, 0) is the
# stage input
Ref = tuple[int, int]


class SubStep:
    """One sub-step: consecutive Compute ops of a program with no cut between them."""

    def __init__(self, layer: int | str, n0: int) -> None:
        self.layer = layer
        self.names: list[str] = []
        self.n0 = n0  # router records before this sub-step (its balance terms follow)
        self.leaves: list[torch.Tensor] = []
        self.origins: list[Ref | None] = []
        self.cuts: dict[int, torch.Tensor] = {}  # id of a tensor from outside -> its leaf (forward only)
        self.outs: list[torch.Tensor] = []
        self.own: set[int] = set()  # ids of `outs` (forward only: joined ops use them without a cut)
        self.roots: list[torch.Tensor] = []
        # Taps must name every parameter of the sub-step: W starts from the taps alone.
        self.taps: Taps = []
        self.tap_name: str | None = None
        self._w: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._w_taps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (output, weight, grad)

    @property
    def name(self) -> str:
        return "+".join(self.names)

    def close(self, stats: MoEStats | None, weight: float) -> None:
        """The forward of this sub-step is over: collect its balance terms, drop forward-only maps."""
        self.roots = balance_roots(stats, self.n0, weight)
        self.cuts, self.own = {}, set()

    def backward(self, grads: list[torch.Tensor | None], mode: str) -> list[torch.Tensor | None]:
        """Gradients of the leaves from those of the outputs. mode 'BW': parameters' `.grad` accumulate in
        the same pass; 'B': only the leaves' gradients, the output gradients are kept for `weights`."""
        pairs = [(o, g) for o, g in zip(self.outs, grads, strict=True) if g is not None and o.requires_grad]
        pairs += [(r, torch.ones_like(r)) for r in self.roots]
        if not pairs:
            return [None] * len(self.leaves)
        tensors, grad_tensors = [p[0] for p in pairs], [p[1] for p in pairs]
        need = [x for x in self.leaves if x.requires_grad]
        if mode == "BW":
            torch.autograd.backward(tensors, grad_tensors)  # leaves' and parameters' .grad, one traversal
            found = {id(x): x.grad for x in need}
        elif self.taps:
            # leaf gradients and the taps' output gradients in one traversal that stops short of every
            # weight-gradient GEMM; W starts from the taps (no GEMM of the input path runs twice)
            outs = [t for t, _ in self.taps]
            got = torch.autograd.grad(
                tensors, need + outs, grad_tensors, retain_graph=True, allow_unused=True
            )
            found = {id(x): g for x, g in zip(need, got[: len(need)], strict=True)}
            self._w_taps = [(t, w, g) for (t, w), g in zip(self.taps, got[len(need) :], strict=True)]
            self.taps = []
        else:
            got = (
                torch.autograd.grad(tensors, need, grad_tensors, retain_graph=True, allow_unused=True)
                if need
                else ()
            )
            found = {id(x): g for x, g in zip(need, got, strict=True)}
            self._w = (tensors, grad_tensors)
        self.outs = self.roots = []  # the graph is referenced by the autograd nodes (or `_w`) from here on
        return [found.get(id(x)) for x in self.leaves]

    @property
    def has_weights(self) -> bool:
        """A B pass left weight gradients to compute."""
        return bool(self._w_taps) or self._w is not None

    def weights(self, params: list[nn.Parameter] | None = None) -> None:
        """The deferred weight gradients of a B pass; only `params` accumulate (None: every tapped weight;
        unreachable ones are skipped)."""
        if self._w_taps:
            wanted = None if params is None else {id(p) for p in params}
            by_weight: dict[int, tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = {}
            for t, w, g in self._w_taps:
                if g is not None and (wanted is None or id(w) in wanted):
                    _, ts, gs = by_weight.setdefault(id(w), (w, [], []))
                    ts.append(t)
                    gs.append(g)
            self._w_taps = []
            # one traversal per weight: from a down-projection output towards the gate/up weight would
            # run the input path's GEMMs again (and count that weight's gradient twice); the traversals
            # may share nodes (no rows: one zero output stands for both), so all but the last keep them
            todo = list(by_weight.values())
            for i, (w, ts, gs) in enumerate(todo):
                torch.autograd.backward(ts, gs, inputs=[w], retain_graph=i < len(todo) - 1)
        if self._w is not None:
            if params is None:
                raise ValueError("a sub-step without taps needs the parameters its W pass may update")
            tensors, grad_tensors = self._w
            self._w = None
            torch.autograd.backward(tensors, grad_tensors, inputs=params)


def balance_roots(stats: MoEStats | None, n0: int, weight: float) -> list[torch.Tensor]:
    """The balance-loss terms routers recorded since record n0, weighted (they join the loss with weight)."""
    if stats is None:
        return []
    return [r.balance_loss * weight for r in stats.records[n0:] if r.balance_loss is not None]
