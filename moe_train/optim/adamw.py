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
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    for k in MOMENTS:
                        state[k] = torch.zeros_like(p, dtype=self.moments_dtype)
                for k in MOMENTS:  # a loaded state dict comes back in the parameter's dtype
                    if state[k].dtype != self.moments_dtype:
                        state[k] = state[k].to(self.moments_dtype)
                state["step"] += 1
                t = state["step"].item()
                grad = p.grad.float()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)  # fp32 state: itself, in place
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                p.mul_(1 - lr * wd)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**t))
                for k, v in zip(MOMENTS, (exp_avg, exp_avg_sq), strict=True):
                    if v is not state[k]:  # fp32 state was updated in place; a bf16 one gets the rounding
                        state[k].copy_(v)
        return loss
