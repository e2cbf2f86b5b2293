"""Cross-entropy of a linear head, computed a chunk of rows at a time so that the full [tokens, vocab] fp32
logits never exist.

The plain head materialises the logits in the model's dtype, an fp32 copy of them, the fp32 log-softmax and,
in backward, an fp32 gradient of the same size: at DeepSeek's vocabularies (100k+) that is several GB per
micro-batch and as many bytes of memory traffic. Here each chunk's logits are made, reduced to their losses,
and turned straight into that chunk's contribution to the input and weight gradients (softmax − one-hot is
the logits' gradient), so only one chunk's logits are alive at a time. The gradients are therefore computed
in the forward, as Liger-Kernel's fused linear cross-entropy does, and backward only scales them by the
incoming gradient. That is why the op returns a reduced scalar: a per-token gradient could not be folded in
afterwards. Per-token weights known in advance (an MTP target outside its document counts zero) go in as
`token_weights`.

Pure PyTorch: the same code is the CPU path and the CUDA path; it is deterministic wherever the matmuls are.
"""

from __future__ import annotations

import torch

from .fused import compiled_on_cuda

# Logits held at once: rows per chunk = CHUNK_ELEMENTS // vocab. Every chunk adds its product into the fp32
# weight gradient (vocab × hidden), so fewer, larger chunks mean fewer passes over it; 2**28 elements is a
# quarter of the proxy's logits (vocab 102400, 8192 tokens): 512 MiB per bf16 tensor on CUDA, where the
# compiled elementwise step makes no fp32 copy, and a 1 GiB fp32 copy on the eager path.
CHUNK_ELEMENTS = 1 << 28


def _logits_grad(
    logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's losses (fp32) and the gradient of scale·loss with respect to its logits, in the logits'
    dtype: softmax − one-hot, computed in fp32. Written as one elementwise expression so that, compiled, it
    reads the chunk's logits once and writes the gradient once, with no fp32 copy in memory."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    losses = lse - x.gather(1, labels[:, None]).squeeze(1)
    target = torch.arange(x.shape[1], device=x.device)[None, :] == labels[:, None]
    g = (torch.exp(x - lse[:, None]) - target.float()) * scale
    return losses, g.to(logits.dtype)


# compiled on CUDA (one fused pass per chunk), also inside the autograd function's forward, where autograd
# does not record; the same expression eager elsewhere
_fused_logits_grad = compiled_on_cuda(_logits_grad, training_only=False)


def _chunks(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    rows: int,
) -> torch.Tensor:
    """Each token's loss [N] (fp32); fills grad_h / grad_w (when given; grad_w fp32, its contents
    overwritten) with the gradient of Σ_i w_i · loss_i / N."""
    n = h.shape[0]
    losses = torch.empty(n, dtype=torch.float32, device=h.device)
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        hc, yc = h[lo:hi], labels[lo:hi]
        logits = hc @ weight.t()
        if grad_h is None and grad_w is None:
            x = logits.float()
            losses[lo:hi] = torch.logsumexp(x, dim=-1) - x.gather(1, yc[:, None]).squeeze(1)
            continue
        scale = (1.0 / n) if token_weights is None else token_weights[lo:hi, None].float() / n
        losses[lo:hi], g = _fused_logits_grad(logits, yc, scale)
        del logits
        if grad_h is not None:
            torch.mm(g, weight, out=grad_h[lo:hi])
        if grad_w is None:
            continue
        same = g.dtype == grad_w.dtype
        if lo == 0:  # the first chunk writes, the others add: no pass over a zeroed buffer
            if same:
                torch.mm(g.t(), hc, out=grad_w)
            else:
                grad_w.copy_(g.t() @ hc)
        elif same:
            grad_w.addmm_(g.t(), hc)
        else:  # bf16 chunk products summed in fp32
            grad_w += (g.t() @ hc).float()
    if n == 0 and grad_w is not None:
        grad_w.zero_()
    return losses


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, token_weights, rows):  # noqa: ANN001, ANN205 - autograd's signature
        needs_h, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if needs_h else None
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if needs_w else None
        losses = _chunks(h, weight, labels, token_weights, grad_h, grad_w, rows)
        weighted = losses if token_weights is None else losses * token_weights
        # grad_w stays fp32 until the incoming gradient is applied: one rounding to the weight's dtype
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(losses)
        return weighted.sum() / h.shape[0], losses

    @staticmethod
    def backward(ctx, grad_loss, _grad_losses):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors
        grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        grad_w = None if grad_w is None else (grad_w * grad_loss.float()).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of logits = h @ weight.T against labels, without the full logits.

    h: [N, D]; weight: [V, D]; labels: [N] in [0, V); token_weights: [N] or None (all 1).
    Returns (Σ_i w_i · loss_i / N, differentiable; each token's loss [N], fp32, detached). Under autocast the
    matmuls run in the autocast dtype, as the plain `nn.Linear` head's would; the softmax is always fp32."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        h, weight = h.to(dtype), weight.to(dtype)
    rows = max(1, chunk_elements // weight.shape[0])
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h, weight, labels, token_weights, rows)
        losses = _chunks(h, weight, labels, token_weights, None, None, rows)
        weighted = losses if token_weights is None else losses * token_weights
        return weighted.sum() / h.shape[0], losses
