"""fp32 master weights behind bf16 parameters (`trainer.dtype=bf16_master`).

Under plain bf16 autocast the model keeps fp32 weights and casts each one to bf16 per forward region: 4 bytes
of weight plus a 2-byte cast per parameter, and every matmul's weight is re-cast each micro-batch. Large-scale
trainers (Megatron-LM, DeepSpeed's bf16 mode) instead hold the parameters in bf16 and keep an fp32 *master*
copy on the optimizer side: forward and backward touch only bf16 weights, while the update, which adds
lr-sized steps far below bf16's resolution (8 bits of mantissa), is applied to the fp32 masters and cast to
bf16 once per optimizer step.

Gradients accumulate in fp32 too. Each bf16 parameter carries a post-accumulate-grad hook that adds the
micro-batch's gradient into its master's `.grad` (fp32) and frees the bf16 one, so summing micro-batches
never rounds to bf16 and at most one micro-batch's bf16 gradient per parameter is alive. After backward
every reduction, the clipping norm and AdamW work on the masters by the model's parameter names
(`parallel.grads` and `build_optimizer` take named tensors).

Router weights stay fp32 parameters (router math is fp32: `model/moe.py`), and buffers (the selection bias,
RoPE tables) are untouched: only parameters are cast, never the module. Checkpoints hold the masters under
the parameters' names (`as_parameters`), so they are the same fp32 files any other precision writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..model.moe import Router
from ..model.norm import RMSNorm


def kept_fp32(model: nn.Module) -> set[str]:
    """Parameters that stay fp32 whatever the training dtype: the routers' (their math runs in fp32) and the
    RMSNorm gains. A gain near 1 stored in bf16 moves in steps of 2^-7, coarser than most of its updates,
    so the model would see a quantised copy of its fp32 master; the gains are few (a hidden-sized vector
    per norm) and the norm's math is fp32 anyway."""
    out = set()
    for mod_name, m in model.named_modules():
        if isinstance(m, (Router, RMSNorm)):
            out.update(f"{mod_name}.{n}" for n, _ in m.named_parameters(recurse=False))
    return out


def precision(trainer_dtype: str, device: torch.device) -> str:
    """What `trainer.dtype` means on `device`: `auto` becomes `bf16_master` on CUDA (bf16 weights, fp32
    masters: the large-scale trainers' default; under DeepSpeed its ZeRO partition holds the masters) and
    `fp32` on CPU, where bf16 matmuls are slower and tests compare against fp32 references; any other value
    stands as given."""
    if trainer_dtype != "auto":
        return trainer_dtype
    return "bf16_master" if device.type == "cuda" else "fp32"


def param_dtype(resolved: str) -> torch.dtype | None:
    """The dtype a resolved precision (`precision`) gives the model's parameters, or None where they stay as
    built (fp32)."""
    return torch.bfloat16 if resolved in ("bf16_master", "fp8") else None  # fp8: bf16 weights, FP8 GEMMs


class MasterWeights:
    """fp32 masters (and their gradients) for every trainable parameter of `model`, which is cast to `dtype`
    (router weights and norm gains excepted: `kept_fp32`). `dtype=torch.float32` keeps the parameters fp32
    but runs the same machinery: separate masters, hooks, copy-back (the tests hold that to the plain fp32
    path bit for bit)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype
        keep = kept_fp32(model)
        self.named: list[tuple[str, nn.Parameter]] = []  # masters, by the model's parameter names
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []  # (model parameter, its master)
        self._master_of: dict[int, nn.Parameter] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            master = nn.Parameter(p.detach().to(torch.float32, copy=True))
            if name not in keep:
                p.data = p.data.to(dtype)
            p.grad = None
            self.named.append((name, master))
            self._pairs.append((p, master))
            self._master_of[id(p)] = master
            p.register_post_accumulate_grad_hook(self._accumulate)

    def master_of(self, p: torch.Tensor) -> torch.Tensor:
        """The master of model parameter `p` (its `.grad` holds p's gradient)."""
        return self._master_of[id(p)]

    def _accumulate(self, p: torch.Tensor) -> None:
        """Move the gradient autograd just accumulated into `p` onto its master, in fp32."""
        master, g = self._master_of[id(p)], p.grad
        if g is None:
            return
        if master.grad is None:
            master.grad = g.to(torch.float32)  # no copy when g is fp32 already: p lets go of it below
        else:
            master.grad.add_(g)
        p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Cast the masters into the model's parameters (after each optimizer step, after loading)."""
        # one multi-tensor copy (casting) instead of a kernel launch per parameter on CUDA
        torch._foreach_copy_([p for p, _ in self._pairs], [m for _, m in self._pairs])

    @contextlib.contextmanager
    def as_parameters(self) -> Iterator[None]:
        """Let the model's parameters *be* the masters for the duration, then re-cast them.

        Checkpoint code reads and writes parameters in place through `model.state_dict()` views, under every
        format (sharded, whole, asynchronous); presenting the masters' storage there makes it save and load
        fp32 values under the usual names without knowing about masters."""
        lows = [p.data for p, _ in self._pairs]
        for p, master in self._pairs:
            p.data = master.data
        try:
            yield
        finally:
            for (p, _), low in zip(self._pairs, lows, strict=True):
                p.data = low
            self.copy_to_model()
