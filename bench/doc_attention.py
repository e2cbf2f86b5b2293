"""Document-masked attention against cuDNN's causal SDPA, forward plus backward, at MLA's head dims.

The kernels `moe_train.ops.attention` runs (FlexAttention with a document block mask on CUDA) against
`scaled_dot_product_attention(is_causal=True)` on the cuDNN backend, on the DeepSeek-V2-Lite proxy's
attention shape: micro-batch 2, 16 heads, seq 4096, query/key head dim 192 (128 + 64 rope), value head dim
128, bf16. Documents per sequence: 1, 4, 16, in equal lengths and in random lengths (a fixed seed).

FLOPs count what a document-causal mask needs: 2·(d_qk + d_v) per (query, key) pair a document allows
(pairs = Σ L(L+1)/2 over its documents), forward; backward 2.5× that. The block mask is built once per
micro-batch and shared by every layer; its cost is reported beside the kernel's.

Usage (GPU machine): python bench/doc_attention.py [--batch 2 --heads 16 --seq 4096 --iters 20]
[--split-only: cuDNN causal per document; --ragged-only: cuDNN ragged attention through its private op;
--cudnn-only: the cuDNN frontend's ragged kernel the trainer runs where it is installed]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

from bench.common import median_ms  # noqa: E402
from moe_train.ops.attention import block_mask, dense_mask, document_attention  # noqa: E402
from moe_train.ops.cudnn_attention import capacity_for, ragged_docs, unavailable_reason  # noqa: E402


def _mask_mod(ids: torch.Tensor):
    def same_document_causal(b, h, q, kv):
        return (ids[b, q] == ids[b, kv]) & (q >= kv)

    return same_document_causal


def doc_ids(batch: int, seq: int, n_docs: int, random_lengths: bool, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(n_docs)
    rows = []
    for _ in range(batch):
        if random_lengths and n_docs > 1:
            cuts = torch.randperm(seq - 1, generator=g)[: n_docs - 1].sort().values + 1
        else:
            cuts = torch.arange(1, n_docs) * (seq // n_docs)
        starts = torch.zeros(seq, dtype=torch.int32)
        starts[cuts] = 1
        rows.append(starts.cumsum(0))
    return torch.stack(rows).to(device)


def pairs(ids: torch.Tensor) -> int:
    total = 0
    for row in ids.cpu():
        lengths = torch.unique_consecutive(row, return_counts=True)[1].double()
        total += int((lengths * (lengths + 1) / 2).sum())
    return total


def timed(fn, iters: int, back_to_back: int = 10) -> float:
    return median_ms(fn, iters, back_to_back)


class _CudnnRagged(torch.autograd.Function):
    """cuDNN's ragged (THD) attention through the private `_cudnn_attention_forward/backward` ops, with
    cumulative sequence lengths: one call for every document of a micro-batch, MLA's head dims as they are.
    Here, in the bench, until a measurement and a correctness check on the GPU image's torch say it belongs
    in `ops/attention.py` (torch 2.13's own `varlen_attn` leaves its cuDNN branch switched off)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, top, scale):  # noqa: ANN001, ANN205 - q, k, v: [total, H, d]
        out = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu, cu, top, top, True, 0.0, True, False, scale=scale
        )
        o, lse, seed, offset = out[0], out[1], out[6], out[7]
        ctx.save_for_backward(q, k, v, o, lse, seed, offset, cu)
        ctx.top, ctx.scale = top, scale
        return o

    @staticmethod
    def backward(ctx, go):  # noqa: ANN001, ANN205
        q, k, v, o, lse, seed, offset, cu = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
            go.contiguous(),
            q,
            k,
            v,
            o,
            lse,
            seed,
            offset,
            None,  # no bias: an empty tensor here fails inside the op with an IndexError on torch 2.11
            cu,
            cu,
            ctx.top,
            ctx.top,
            0.0,
            True,
            scale=ctx.scale,
        )
        return dq, dk, dv, None, None, None


class _EfficientRagged(torch.autograd.Function):
    """The memory-efficient (CUTLASS) kernel with cumulative sequence lengths, as SDPA runs it for nested
    tensors: one call for every document of a micro-batch, different q/k and v head dims allowed."""

    @staticmethod
    def forward(ctx, q, k, v, cu, top, scale):  # noqa: ANN001, ANN205 - q, k, v: [total, H, d]
        q, k, v = (t.unsqueeze(0) for t in (q, k, v))  # the kernel's layout: [1, total, H, d]
        o, lse, seed, offset, _, _ = torch.ops.aten._efficient_attention_forward(
            q, k, v, None, cu, cu, top, top, 0.0, 1, True, scale=scale
        )
        ctx.save_for_backward(q, k, v, o, lse, seed, offset, cu)
        ctx.top, ctx.scale = top, scale
        return o.squeeze(0)

    @staticmethod
    def backward(ctx, go):  # noqa: ANN001, ANN205
        q, k, v, o, lse, seed, offset, cu = ctx.saved_tensors
        dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
            go.unsqueeze(0).contiguous(),
            q,
            k,
            v,
            None,
            o,
            cu,
            cu,
            ctx.top,
            ctx.top,
            lse,
            0.0,
            seed,
            offset,
            1,
            False,
            scale=ctx.scale,
        )
        return dq.squeeze(0), dk.squeeze(0), dv.squeeze(0), None, None, None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--dqk", type=int, default=192)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--autotune", action="store_true", help="also FlexAttention compiled with max-autotune")
    ap.add_argument("--split-only", action="store_true", help="only cuDNN causal per document, beside cuDNN")
    ap.add_argument(
        "--ragged-only", action="store_true", help="only the ragged (cumulative-length) kernels, beside cuDNN"
    )
    ap.add_argument("--cudnn-only", action="store_true", help="only the cuDNN frontend's ragged kernel")
    a = ap.parse_args()
    dev = torch.device("cuda")
    B, H, T = a.batch, a.heads, a.seq
    gen = torch.Generator(device=dev).manual_seed(0)

    def t(d):
        return torch.randn(B, H, T, d, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()

    q, k, v = t(a.dqk), t(a.dqk), t(a.dv)
    go = torch.randn(B, H, T, a.dv, device=dev, dtype=torch.bfloat16, generator=gen)
    scale = a.dqk**-0.5
    per_pair = 2 * (a.dqk + a.dv) * H * 3.5  # forward + backward

    def step(attn):
        def f():
            q.grad = k.grad = v.grad = None
            attn().backward(go)

        return f

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, B={B} H={H} T={T}", a.dqk, a.dv)
    base = timed(step(cudnn), a.iters)
    causal_pairs = B * T * (T + 1) // 2
    print("| attention | docs/seq | lengths | fwd+bwd ms | vs cuDNN causal | TFLOP/s (doc pairs) | mask ms |")
    print("|---|---|---|---|---|---|---|")
    tflops = per_pair * causal_pairs / base / 1e9
    print(f"| cuDNN SDPA causal | 1 | - | {base:.3f} | 1.00 | {tflops:.0f} | - |")

    def ragged_rows() -> None:
        """The ragged kernels (private ops), checked against the document mask's kernel."""
        for (name, kernel), (n_docs, rnd) in itertools.product(
            (
                ("cuDNN ragged (private op)", _CudnnRagged),
                ("mem-efficient ragged (private op)", _EfficientRagged),
            ),
            ((1, False), (4, False), (4, True), (16, False), (16, True)),
        ):
            ids = doc_ids(B, T, n_docs, rnd, dev)
            rows = ids.cpu() + torch.arange(B)[:, None] * T
            lengths = torch.unique_consecutive(rows, return_counts=True)[1]
            cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(dev, torch.int32)
            top = int(lengths.max())

            def ragged(cu=cu, top=top, kernel=kernel):
                flat = [t.transpose(1, 2).reshape(B * T, H, -1) for t in (q, k, v)]
                o = kernel.apply(*flat, cu, top, scale)
                return o.view(B, T, H, a.dv).transpose(1, 2)

            def reference(ids=ids, n_docs=n_docs):
                return document_attention(q, k, v, block_mask(ids), scale) if n_docs > 1 else cudnn()

            def grads(fn):
                q.grad = k.grad = v.grad = None
                out = fn()
                out.backward(go)
                return [out.detach()] + [t.grad.clone() for t in (q, k, v)]

            try:  # the values and gradients of the document mask's kernel, else not timed
                pairs_ = zip(grads(ragged), grads(reference), strict=True)
                errs = [(x.float() - y.float()).abs().max().item() for x, y in pairs_]
                err = max(errs)
                ms = timed(step(ragged), a.iters)
                if (
                    not err < 5e-2
                ):  # timed all the same: a wrong kernel's time says whether it is worth fixing
                    diffs = ", ".join(f"{e:.1e}" for e in errs)
                    print(f"| {name} | {n_docs} | wrong: max diff out, dq, dk, dv {diffs} | {ms:.3f} | | | |")
                    continue
            except Exception as e:  # noqa: BLE001 - a private op that is missing or refuses is a row
                print(f"| {name} | {n_docs} | not run: {type(e).__name__}: {str(e)[:160]} | | | | |")
                continue
            lengths_kind = "random" if rnd else "equal"
            print(
                f"| {name}, max diff {err:.1e} | {n_docs} | {lengths_kind} | "
                f"{ms:.3f} | {ms / base:.2f} | {per_pair * pairs(ids) / ms / 1e9:.0f} | - |"
            )

    def cudnn_rows() -> None:
        """What the trainer runs where NVIDIA's cuDNN frontend is installed: `document_attention` over the
        documents as cuDNN's ragged batch (ops/cudnn_attention.py; entries padded up to a power of two, 6
        documents a row being a padded case), with its forward and gradients' max |error| against an fp32
        dense-mask reference, beside cuDNN causal's against its own; then the same step captured in a CUDA
        graph with one set of documents and replayed with another of the same capacity, against eager."""
        why = unavailable_reason(dev)
        if why is not None:
            print(f"cuDNN ragged (ops.attention): not run: {why}")
            return

        def entries(ids: torch.Tensor):  # what `Documents.of` and `Documents.mask` build
            return ragged_docs(ids, capacity_for(int(ids[:, -1].sum()) + ids.shape[0]))

        print(
            "| attention | docs/seq | lengths | entries | fwd+bwd ms | vs cuDNN causal | TFLOP/s (doc pairs) "
            "| err o, dq, dk, dv |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for n_docs, rnd in ((1, False), (4, False), (4, True), (6, True), (16, False), (16, True)):
            ids = doc_ids(B, T, n_docs, rnd, dev)
            docs = entries(ids)
            ms = timed(step(lambda docs=docs: document_attention(q, k, v, docs, scale)), a.iters)
            got = [document_attention(q, k, v, docs, scale)]
            got += torch.autograd.grad(got[0], (q, k, v), go)
            ref = [x.float().detach().requires_grad_() for x in (q, k, v)]
            o = F.scaled_dot_product_attention(*ref, attn_mask=dense_mask(ids), scale=scale)
            want = [o, *torch.autograd.grad(o, ref, go.float())]
            errs = ", ".join(
                f"{(g.float() - w).abs().max().item():.2e}" for g, w in zip(got, want, strict=True)
            )
            print(
                f"| cuDNN ragged (ops.attention) | {n_docs} | {'random' if rnd else 'equal'} | "
                f"{n_docs * B} of {docs.capacity} | {ms:.3f} | {ms / base:.2f} | "
                f"{per_pair * pairs(ids) / ms / 1e9:.0f} | {errs} |",
                flush=True,
            )
            del ref, o, want, got
        ref = [x.float().detach().requires_grad_() for x in (q, k, v)]
        o = F.scaled_dot_product_attention(*ref, is_causal=True, scale=scale)
        want = [o, *torch.autograd.grad(o, ref, go.float())]
        got = [cudnn()]
        got += torch.autograd.grad(got[0], (q, k, v), go)
        errs = ", ".join(f"{(g.float() - w).abs().max().item():.2e}" for g, w in zip(got, want, strict=True))
        print(f"| cuDNN SDPA causal, its error | 1 | - | - | {base:.3f} | 1.00 | - | {errs} |")

        # captured with n random documents a row, replayed with n + 1: the first such n of one capacity
        n = next(n for n in range(2, T) if capacity_for(B * n) == capacity_for(B * (n + 1)))
        first, second = doc_ids(B, T, n, True, dev), doc_ids(B, T, n + 1, True, dev)
        capacity = entries(first).capacity
        assert entries(second).capacity == capacity
        static = first.clone()

        def body() -> list[torch.Tensor]:  # reads nothing on the host: the capacity is fixed
            # inputs made inside the capture, as a step's are: leaves made outside it, on the default stream,
            # would have the backward sync with that stream, which a capture forbids
            x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = document_attention(*x, ragged_docs(static, capacity), scale)
            return [out.detach(), *torch.autograd.grad(out, x, go)]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()  # warm-up: the graphs of this capacity are built outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # as the trainer captures
            captured = body()
        static.copy_(second)
        graph.replay()
        static.copy_(second)
        eager = body()
        diffs = [(c.float() - e.float()).abs().max().item() for c, e in zip(captured, eager, strict=True)]
        print(f"CUDA graph captured with {n} documents a row, replayed with {n + 1}:", end=" ")
        print("max |replay - eager| of o, dq, dk, dv", diffs)

    if a.cudnn_only:
        cudnn_rows()
        return
    if a.ragged_only:
        ragged_rows()
        return
    for n_docs, rnd in ((4, False), (4, True), (8, True), (16, False), (16, True)):
        ids = doc_ids(B, T, n_docs, rnd, dev)
        spans = [torch.unique_consecutive(row, return_counts=True)[1].cumsum(0).tolist() for row in ids.cpu()]

        def split(spans=spans):
            """cuDNN's causal kernel on each document alone (lengths known on the host)."""
            rows = []
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                for b, ends in enumerate(spans):
                    parts, lo = [], 0
                    for hi in ends:
                        s = slice(lo, hi)
                        one = (t[b : b + 1, :, s] for t in (q, k, v))
                        parts.append(F.scaled_dot_product_attention(*one, is_causal=True, scale=scale))
                        lo = hi
                    rows.append(torch.cat(parts, 2))
            return torch.cat(rows)

        ms = timed(step(split), a.iters)
        print(
            f"| cuDNN causal per document | {n_docs} | {'random' if rnd else 'equal'} | {ms:.3f} | "
            f"{ms / base:.2f} | {per_pair * pairs(ids) / ms / 1e9:.0f} | - |"
        )
    if a.split_only:
        return
    kernels = {"flex": None}
    if a.autotune:
        kernels["flex, max-autotune"] = torch.compile(
            flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs"
        )
    for name, kernel in kernels.items():
        for n_docs in (1, 4, 16):
            for rnd in (False, True) if n_docs > 1 else (False,):
                ids = doc_ids(B, T, n_docs, rnd, dev)
                build = timed(lambda ids=ids: block_mask(ids), a.iters)
                mask = block_mask(ids)

                def attn(mask=mask, kernel=kernel):
                    if kernel is None:
                        return document_attention(q, k, v, mask, scale)
                    return kernel(q, k, v, block_mask=mask, scale=scale)

                ms = timed(step(attn), a.iters)
                p = pairs(ids)
                lengths = "random" if rnd else "equal"
                print(
                    f"| {name}, document mask | {n_docs} | {lengths} | {ms:.3f} | {ms / base:.2f} | "
                    f"{per_pair * p / ms / 1e9:.0f} | {build:.3f} |"
                )
    try:  # FlashAttention-2 varlen: one head dim for q, k and v, so v is padded to d_qk
        from torch.nn.attention.varlen import varlen_attn

        for n_docs, rnd in ((1, False), (4, False), (4, True), (16, False), (16, True)):
            ids = doc_ids(B, T, n_docs, rnd, dev)
            rows = ids.cpu() + torch.arange(B)[:, None] * T  # documents of different rows stay apart
            lengths = torch.unique_consecutive(rows, return_counts=True)[1]
            cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(dev, torch.int32)
            top = int(lengths.max())

            def fa2(cu=cu, top=top):
                flat = [t.transpose(1, 2).reshape(B * T, H, -1) for t in (q, k, F.pad(v, (0, a.dqk - a.dv)))]
                o = varlen_attn(*flat, cu, cu, top, top, scale=scale, window_size=(-1, 0))
                return o[..., : a.dv].view(B, T, H, a.dv).transpose(1, 2)

            ms = timed(step(fa2), a.iters)
            print(
                f"| varlen FA2 (v padded) | {n_docs} | {'random' if rnd else 'equal'} | {ms:.3f} | "
                f"{ms / base:.2f} | {per_pair * pairs(ids) / ms / 1e9:.0f} | - |"
            )
    except Exception as e:  # noqa: BLE001 - a missing or different API is reported, not fatal
        print(f"varlen FA2: not run ({type(e).__name__}: {str(e)[:200]})")
    ragged_rows()
    cudnn_rows()
    ids = doc_ids(B, T, 16, True, dev)
    mask_mod = _mask_mod(ids)
    generic = timed(lambda: create_block_mask(mask_mod, B, None, T, T, device=dev), a.iters, 1)
    print(f"create_block_mask over all T² pairs (16 random documents): {generic:.3f} ms")
    # the flex kernel's error against an fp32 reference, beside cuDNN's (one document per sequence)
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=scale)
        ids = doc_ids(B, T, 1, False, dev)
        e_flex = (document_attention(q, k, v, block_mask(ids), scale).float() - ref).abs().max().item()
        e_cudnn = (cudnn().float() - ref).abs().max().item()
    print(f"max |error| vs fp32: flex {e_flex:.2e}, cuDNN {e_cudnn:.2e}")


if __name__ == "__main__":
    main()
