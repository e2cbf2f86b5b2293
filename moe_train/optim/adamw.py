"""AdamW with its moments stored in bf16 (`optim.moments_dtype=bf16`).

The two moments are 8 of the 16–18 bytes a trained parameter costs. DeepSeek-V3 keeps them in bf16 (its
report, §3.3.2) and halves that. torch's AdamW stores its state in the parameter's dtype, and the parameters
the optimizer sees are fp32 (the weights, or their fp32 masters), so the storage is chosen here: each
parameter's moments are read into fp32, updated by exactly torch's single-tensor AdamW arithmetic, and
written back rounded to bf16. The weight update itself stays fp32.

bf16 holds 8 mantissa bits: a second-moment update (1 − β2)·(g² − v) smaller than v·2⁻⁹ rounds away, so β2
must leave 1 − β2 above that resolution (config rules refuse β2 > 1 − 2⁻⁸; DeepSeek-V3 trains with 0.95).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


class StoredMomentsAdamW(torch.optim.AdamW):
    """torch's AdamW update (decoupled weight decay, no amsgrad) with the moments kept in `moments_dtype`.

    With `moments_dtype=torch.float32` the arithmetic is torch's own single-tensor path, op for op (the tests
    hold it to `torch.optim.AdamW(foreach=False)` bit for bit); the state dict has torch's keys, so
    checkpoints and the name-keyed state code see no difference but the moments' dtype."""

    def __init__(
        self, params: Iterable[Any], moments_dtype: torch.dtype = torch.bfloat16, **kwargs: Any
    ) -> None:
        super().__init__(params, foreach=False, **kwargs)
        self.moments_dtype = moments_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """torch's single-tensor AdamW arithmetic, as multi-tensor ops over the group's parameters (one launch
        per op on CUDA, not one per parameter), in fp32 over moments read from and rounded back to their
        stored dtype."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if not state:
                state["step"] = torch.tensor(0.0)
                for k in MOMENTS:
                    state[k] = torch.zeros_like(p, dtype=self.moments_dtype)
            for k in MOMENTS:  # a loaded state dict comes back in the parameter's dtype
                if state[k].dtype != self.moments_dtype:
                    state[k] = state[k].to(self.moments_dtype)
        torch._foreach_add_([st["step"] for st in states], 1)
        grads = [p.grad.float() for p in params]
        stored = {k: [st[k] for st in states] for k in MOMENTS}
        exp_avg, exp_avg_sq = ([m.float() for m in stored[k]] for k in MOMENTS)  # fp32 state: itself
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        torch._foreach_mul_(params, 1 - lr * wd)
        by_step: dict[float, list[int]] = {}  # parameters that missed steps have their own bias correction
        for i, t in enumerate(torch.stack([st["step"] for st in states]).tolist()):
            by_step.setdefault(t, []).append(i)
        for t, idx in by_step.items():
            denom = torch._foreach_sqrt([exp_avg_sq[i] for i in idx])
            torch._foreach_div_(denom, math.sqrt(1 - beta2**t))
            torch._foreach_add_(denom, eps)
            ps, ms = [params[i] for i in idx], [exp_avg[i] for i in idx]
            torch._foreach_addcdiv_(ps, ms, denom, value=-lr / (1 - beta1**t))
        for k, updated in zip(MOMENTS, (exp_avg, exp_avg_sq), strict=True):
            if updated[0] is not stored[k][0]:  # fp32 state was updated in place; bf16 gets the rounding
                torch._foreach_copy_(stored[k], updated)
