"""Document-causal attention as cuDNN's ragged (THD) SDPA, through NVIDIA's cuDNN frontend (`pip install
nvidia-cudnn-frontend`, module `cudnn`; the cuDNN library itself is torch's).

Why this kernel: every document of a micro-batch becomes one entry of a ragged batch, so attention is causal
within each document and no work is spent on pairs across documents, in cuDNN's own fused kernel. It takes
MLA's different query/key (192) and value (128) head dims; FlexAttention's Triton kernel rounds the former up
to 256 and loses to cuDNN's dense causal kernel where documents are few and long (docs/performance.md).
torch's own routes to this kernel are private or switched off (docs/performance.md, "Document masks").

Layout: q, k, v are packed token-major, [N + capacity, H, d] for the N = rows·T tokens of the micro-batch
and `capacity` spare rows after them; a document is a run of consecutive tokens. The entries are a fixed
number, `capacity` (a power of two at least the documents count, from the host's count): the documents in
row order, then one-token entries over the spare rows, whose outputs are dropped. So one graph serves every
micro-batch whose documents fit in its capacity, and the entries are computed on the device from the
documents' ids: a CUDA graph captures them and recomputes them from the ids it replays with. Padding entries
hold one token rather than none: cuDNN's own tests allow empty entries only from 9.25.

Both the entries and the kernel stay out of `torch.compile` (`trainer.compile=phases` compiles the attention
around them): the kernel is a call into cuDNN, and traced entries would specialise on each capacity.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

#: cuDNN backend versions: ragged (token-major) softmax statistics need 9.6
MIN_BACKEND = 90600

# graph tensor uids
U_Q, U_K, U_V, U_O, U_STATS, U_DO, U_DQ, U_DK, U_DV, U_SEQ, U_RQK, U_RV, U_RST = range(1, 14)


@dataclass
class RaggedDocs:
    """A micro-batch's documents as cuDNN's ragged attention takes them: `rows` rows of `T` tokens, packed
    with `capacity` spare rows after them; `capacity` entries, the documents in row order and then one-token
    entries over the spare rows; `cum` [capacity+1] int64, each entry's first row; `seq` [capacity] int32,
    each entry's length."""

    rows: int
    T: int
    capacity: int
    cum: torch.Tensor
    seq: torch.Tensor
    _offsets: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def packed_rows(self) -> int:
        """Rows of the packed q, k, v: the tokens, then the spare rows."""
        return self.rows * self.T + self.capacity

    def offsets(self, width: int) -> torch.Tensor:
        """Entry starts in elements of a packed [packed_rows, H, d] tensor, width = H·d (cached per width)."""
        if width not in self._offsets:
            self._offsets[width] = (self.cum * width).view(-1, 1, 1, 1)
        return self._offsets[width]


def capacity_for(count: int) -> int:
    """The entries of a micro-batch with `count` documents: a power of two, so that micro-batches of nearby
    counts share one cuDNN graph (and one CUDA graph of the step)."""
    return 1 << max(3, (count - 1).bit_length())


def ragged_docs(ids: torch.Tensor, capacity: int) -> RaggedDocs:
    """The ragged entries of documents `ids` ([rows, T], each row counting up from 0 along T), on ids' device
    without a host read: at most `capacity` documents in all (the caller counts them on the host)."""
    rows, T = ids.shape
    opens = torch.ones(rows, T, dtype=torch.bool, device=ids.device)
    opens[:, 1:] = ids[:, 1:] != ids[:, :-1]
    entry = torch.cumsum(opens.view(-1), 0) - 1  # each token's entry
    seq = torch.zeros(capacity, dtype=torch.int64, device=ids.device)
    seq.index_add_(0, entry, torch.ones_like(entry))
    real = torch.arange(capacity, device=ids.device) <= entry[-1]
    seq = torch.where(real, seq, 1)  # padding entries: one spare row each
    cum = torch.zeros(capacity + 1, dtype=torch.int64, device=ids.device)
    cum[1:] = torch.cumsum(seq, 0)
    return RaggedDocs(rows, T, capacity, cum, seq.to(torch.int32).view(-1, 1, 1, 1))


@functools.cache
def _frontend() -> Any:
    try:
        return importlib.import_module("cudnn")
    except ImportError:
        return None


@functools.cache
def unavailable_reason(device: torch.device) -> str | None:
    """Why this kernel cannot run on `device`; None where it can."""
    if device.type != "cuda":
        return f"it needs a CUDA device, not {device.type}"
    cudnn = _frontend()
    if cudnn is None:
        return "the cuDNN frontend is not installed (pip install nvidia-cudnn-frontend)"
    if cudnn.backend_version() < MIN_BACKEND:
        return f"cuDNN {cudnn.backend_version_string()} is older than 9.6"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return "it is validated on SM90 (Hopper) and later only"
    return None


@functools.cache
def _handle(device_index: int) -> Any:
    return _frontend().create_handle()


@functools.cache
def _graphs(
    batch: int, S: int, N: int, H: int, dqk: int, dv: int, scale: float, fp16: bool
) -> tuple[Any, Any]:
    """The forward and backward graphs for `batch` entries of at most S tokens among N packed rows, H
    heads."""
    cudnn = _frontend()
    io = cudnn.data_type.HALF if fp16 else cudnn.data_type.BFLOAT16
    f32, i32, i64 = cudnn.data_type.FLOAT, cudnn.data_type.INT32, cudnn.data_type.INT64
    mask = dict(
        attn_scale=scale,
        use_padding_mask=True,
        diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
        diagonal_band_right_bound=0,  # causal within each entry
    )
    handle = _handle(torch.cuda.current_device())

    def graph() -> Any:
        return cudnn.pygraph(
            io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle
        )

    def thd(g: Any, uid: int, d: int) -> Any:  # logical [batch, H, S, d] over a packed [N, H, d] buffer
        return g.tensor(uid=uid, dim=[batch, H, S, d], stride=[S * H * d, d, H * d, 1], data_type=io)

    def column(g: Any, uid: int, n: int, dt: Any) -> Any:
        return g.tensor(uid=uid, dim=[n, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt)

    def inputs(g: Any) -> tuple[Any, ...]:
        q, k, v = thd(g, U_Q, dqk), thd(g, U_K, dqk), thd(g, U_V, dv)
        r_qk, r_v, r_st = (column(g, u, batch + 1, i64) for u in (U_RQK, U_RV, U_RST))
        q.set_ragged_offset(r_qk)
        k.set_ragged_offset(r_qk)
        v.set_ragged_offset(r_v)
        return q, k, v, r_qk, r_v, r_st, column(g, U_SEQ, batch, i32)

    def stats(t: Any, r_st: Any) -> Any:  # softmax statistics, token-major [N, H, 1]
        t.set_dim([batch, H, S, 1]).set_stride([S * H, 1, H, 1]).set_data_type(f32)
        t.set_ragged_offset(r_st)
        return t

    def done(g: Any) -> Any:
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        return g

    g = graph()
    q, k, v, _, r_v, r_st, seq = inputs(g)
    o, st = g.sdpa(name="fwd", q=q, k=k, v=v, generate_stats=True, seq_len_q=seq, seq_len_kv=seq, **mask)
    o.set_uid(U_O).set_output(True).set_dim([batch, H, S, dv]).set_stride([S * H * dv, dv, H * dv, 1])
    o.set_data_type(io).set_ragged_offset(r_v)
    stats(st.set_uid(U_STATS).set_output(True), r_st)
    fwd = done(g)

    g = graph()
    q, k, v, r_qk, r_v, r_st, seq = inputs(g)
    o, do = thd(g, U_O, dv), thd(g, U_DO, dv)
    o.set_ragged_offset(r_v)
    do.set_ragged_offset(r_v)
    st = stats(g.tensor(uid=U_STATS, dim=[batch, H, S, 1], stride=[S * H, 1, H, 1], data_type=f32), r_st)
    total = (N + 63) // 64 * 64
    grads = g.sdpa_backward(
        name="bwd",
        q=q,
        k=k,
        v=v,
        o=o,
        dO=do,
        stats=st,
        seq_len_q=seq,
        seq_len_kv=seq,
        max_total_seq_len_q=total,
        max_total_seq_len_kv=total,
        **mask,
    )
    for t, uid, d, r in zip(grads, (U_DQ, U_DK, U_DV), (dqk, dqk, dv), (r_qk, r_qk, r_v), strict=True):
        t.set_uid(uid).set_output(True).set_dim([batch, H, S, d]).set_stride([S * H * d, d, H * d, 1])
        t.set_data_type(io).set_ragged_offset(r)
    return fwd, done(g)


def _run(graph: Any, pack: dict[int, torch.Tensor], device: torch.device) -> None:
    cudnn = _frontend()
    handle = _handle(device.index if device.index is not None else torch.cuda.current_device())
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
    workspace = torch.empty(max(graph.get_workspace_size(), 1), dtype=torch.uint8, device=device)
    graph.execute(pack, workspace, handle=handle)


class _RaggedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: RaggedDocs, scale: float):
        N, H, dqk = q.shape
        dv = v.shape[-1]
        if N != docs.packed_rows or k.shape[0] != N or v.shape[0] != N or not q.dtype == k.dtype == v.dtype:
            raise ValueError(
                f"ragged attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} ({q.dtype}, "
                f"{k.dtype}, {v.dtype}) do not hold the {docs.rows}×{docs.T} tokens of their documents and "
                f"{docs.capacity} spare rows"
            )
        fwd, bwd = _graphs(docs.capacity, docs.T, N, H, dqk, dv, scale, q.dtype == torch.float16)
        o = torch.empty(N, H, dv, dtype=q.dtype, device=q.device)
        stats = torch.empty(N, H, 1, dtype=torch.float32, device=q.device)
        pack = {U_Q: q, U_K: k, U_V: v, U_O: o, U_STATS: stats, U_SEQ: docs.seq}
        pack |= {U_RQK: docs.offsets(H * dqk), U_RV: docs.offsets(H * dv), U_RST: docs.offsets(H)}
        _run(fwd, pack, q.device)
        ctx.save_for_backward(q, k, v, o, stats)
        ctx.docs, ctx.bwd = docs, bwd
        return o

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor):
        q, k, v, o, stats = ctx.saved_tensors
        docs, (_, H, dqk), dv = ctx.docs, q.shape, v.shape[-1]
        dq, dk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        pack = {U_Q: q, U_K: k, U_V: v, U_O: o, U_STATS: stats, U_SEQ: docs.seq, U_DO: do.contiguous()}
        pack |= {U_DQ: dq, U_DK: dk, U_DV: dvv}
        pack |= {U_RQK: docs.offsets(H * dqk), U_RV: docs.offsets(H * dv), U_RST: docs.offsets(H)}
        _run(ctx.bwd, pack, q.device)
        return dq, dk, dvv, None, None


class _Packed(torch.autograd.Function):
    """x [B, H, T, d] → token-major [B·T + spare, H, d], the spare rows zero. Its own function so that the
    gradient is a view of the packed gradient: copying into slices of an empty tensor under autograd would
    record in-place copies whose backward clones the whole packed gradient once per copy."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, spare: int) -> torch.Tensor:
        B, H, T, d = x.shape
        out = torch.empty(B * T + spare, H, d, dtype=x.dtype, device=x.device)
        out[: B * T].view(B, T, H, d).copy_(x.transpose(1, 2))
        out[B * T :].zero_()
        ctx.shape = (B, H, T, d)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        B, H, T, d = ctx.shape
        return g[: B * T].reshape(B, T, H, d).transpose(1, 2), None  # a view where g is contiguous


@torch.compiler.disable
def ragged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: RaggedDocs, scale: float
) -> torch.Tensor:
    """q, k: [rows, H, T, d_qk]; v: [rows, H, T, d_v] (fp16 or bf16, CUDA) → [rows, H, T, d_v], each
    position attending to earlier positions of its own document."""
    B, H, T, _ = q.shape
    spare = docs.packed_rows - B * T
    o = _RaggedAttention.apply(*(_Packed.apply(x, spare) for x in (q, k, v)), docs, scale)
    return o[: B * T].view(B, T, H, -1).transpose(1, 2)
