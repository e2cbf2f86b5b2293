"""Document masks: a packed sequence computes what each of its documents computes alone.

The kernels (ops/attention.py) are checked against each other on CPU — the FlexAttention block mask (eager
forward, the CUDA path's mask) against the dense mask of the same ids, and both against attention over each
document alone — and the model is checked end to end: fp32 logits, the LM loss and the MTP loss of a packed
sequence equal those of its documents run one by one at restarted positions.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from ragged_twin import ragged_twin  # noqa: F401 - a fixture

from moe_train.config import ModelConfig
from moe_train.model import build_model
from moe_train.model.documents import Documents
from moe_train.ops.attention import block_mask, dense_mask, document_attention, ragged_available
from moe_train.ops.cudnn_attention import capacity_for, ragged_docs

EOD = 96


def test_documents_of_tokens():
    x = torch.tensor([[5, 6, EOD, 7, 8, 9, EOD, 1], [1, 2, 3, 4, 5, 6, 7, 8], [EOD, 1, 2, EOD, EOD, 3, 4, 5]])
    d = Documents.of(x, EOD)
    # an end-of-document token closes its document; the next token opens the next one
    assert d.ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0] * 8, [0, 1, 1, 1, 2, 3, 3, 3]]
    assert d.positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], list(range(8)), [0, 0, 1, 2, 0, 0, 1, 2]]
    assert not d.single
    assert d.same(2).tolist()[0] == [True, False, False, True, True, False]
    assert Documents.of(x, EOD, reset_positions=False).positions is None
    one = Documents.of(x[1:2], EOD)
    assert one.single and one.positions is None


def test_documents_as_cudnn_ragged_batch():
    """The entries of cuDNN's ragged attention (ops/cudnn_attention.py; the kernel itself runs on a GPU only,
    checked there by bench/doc_attention.py against the dense mask): a power-of-two capacity counted on the
    host, the documents in row order with their first rows, then one-token entries over the spare rows; a
    shorter prefix (MTP) keeps the capacity."""
    x = torch.tensor([[5, 6, EOD, 7, 8, 9, EOD, 1], [1, 2, 3, 4, 5, 6, 7, 8], [EOD, 1, 2, EOD, EOD, 3, 4, 5]])
    d = Documents.of(x, EOD)
    assert d.capacity == 8  # 8 documents
    r = ragged_docs(d.ids, d.capacity)
    assert (r.rows, r.T, r.capacity, r.packed_rows) == (3, 8, 8, 32)
    assert r.cum.tolist() == [0, 3, 7, 8, 16, 17, 20, 21, 24]
    assert r.seq.flatten().tolist() == [3, 4, 1, 8, 1, 3, 1, 3]
    assert r.offsets(16).flatten().tolist() == [16 * c for c in r.cum.tolist()]
    odd = Documents.of(torch.tensor([[5, 6, EOD, 7, 8, 9, EOD, 1], [1] * 8, [1, EOD, 2, 3, 4, 5, 6, 7]]), EOD)
    assert odd.capacity == 8
    r = ragged_docs(odd.ids, odd.capacity)  # 6 documents, then 2 padding entries of a spare row each
    assert r.seq.flatten().tolist() == [3, 4, 1, 8, 2, 6, 1, 1]
    assert r.cum.tolist() == [0, 3, 7, 8, 16, 18, 24, 25, 26]
    p = ragged_docs(d.prefix(5).ids, d.prefix(5).capacity)
    assert p.seq.flatten().tolist() == [3, 2, 5, 1, 3, 1, 1, 1] and p.cum[-1] == 15 + 2
    assert d.to(torch.device("cpu")).capacity == d.capacity
    assert Documents.of(torch.randint(0, 9, (4, 64)), 0).capacity in (8, 16, 32, 64, 128, 256)
    many = Documents.of(torch.full((2, 20), EOD), EOD)  # 40 one-token documents
    assert many.capacity == 64
    assert not ragged_available(torch.device("cpu"), torch.bfloat16)


@pytest.mark.usefixtures("ragged_twin")
def test_ragged_entries_with_padding_give_the_dense_masks_attention():
    """The packing around the kernel (token-major rows, spare rows for the padding entries, the output
    and the gradients cut back) gives the dense mask's attention and gradients, with padding entries and
    without, for a whole sequence and its MTP prefix."""
    gen = torch.Generator().manual_seed(3)
    for T, B in ((24, 3), (40, 2)):
        ids = _random_ids(B, T, gen)
        count = int(ids[:, -1].sum()) + B
        padded = Documents(ids, None, False, capacity=capacity_for(count))
        assert padded.capacity > count
        exact = Documents(ids, None, False, capacity=count)
        for docs in (exact, padded, padded.prefix(T - 3)):
            n = docs.ids.shape[1]
            q, k = (torch.randn(B, 2, n, 12, generator=gen, requires_grad=True) for _ in range(2))
            v = torch.randn(B, 2, n, 8, generator=gen, requires_grad=True)
            go = torch.randn(B, 2, n, 8, generator=gen)
            want = document_attention(q, k, v, dense_mask(docs.ids), 0.3)
            got = document_attention(q, k, v, docs.mask(q.dtype), 0.3)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            wanted = torch.autograd.grad(want, (q, k, v), go)
            for a, b in zip(torch.autograd.grad(got, (q, k, v), go), wanted, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_packing_for_the_ragged_kernel_passes_its_gradient_back_as_a_view():
    """q, k, v go token-major with zero spare rows, and their gradients come back as views of the packed
    gradients: no copy in backward (copies into slices under autograd cloned the whole packed gradient)."""
    from moe_train.ops.cudnn_attention import _Packed

    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    packed = _Packed.apply(x, 7)
    assert packed.shape == (2 * 5 + 7, 3, 4)
    assert torch.equal(packed[:10].view(2, 5, 3, 4), x.transpose(1, 2))
    assert not packed[10:].any()
    g = torch.randn_like(packed)
    (gx,) = torch.autograd.grad(packed, x, g)
    assert gx.data_ptr() == g.data_ptr()
    assert torch.equal(gx, g[:10].view(2, 5, 3, 4).transpose(1, 2))


def test_cudnn_ragged_entries_and_kernel_stay_out_of_compiled_attention(monkeypatch):
    """`trainer.compile=phases` compiles the attention around the document mask: the ragged entries are
    built once per micro-batch and the kernel is a cuDNN call, so both run outside the compiled graph;
    traced, every new capacity would recompile the attention. Here on CPU, with
    the cuDNN path switched on and its kernel call replaced by a plain-torch stand-in."""
    import torch._dynamo.testing

    from moe_train.model import documents
    from moe_train.ops import cudnn_attention

    class StandIn(torch.autograd.Function):  # the cuDNN kernel's shape contract, not its math
        @staticmethod
        def forward(ctx, q, k, v, docs, scale):  # noqa: ANN001, ANN205
            return v * scale

        @staticmethod
        def backward(ctx, do):  # noqa: ANN001, ANN205
            return None, None, do, None, None

    monkeypatch.setattr(documents, "ragged_available", lambda device, dtype: True)
    monkeypatch.setattr(cudnn_attention, "_RaggedAttention", StandIn)
    counter = torch._dynamo.testing.CompileCounter()

    def attention(q, k, v, docs):  # noqa: ANN001, ANN202
        return document_attention(q * 2, k, v, docs.mask(q.dtype), 0.1) + 1

    compiled = torch.compile(attention, backend=counter, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    frames = []
    for _ in range(6):  # six micro-batches, each with other document lengths
        docs = Documents.of(torch.randint(0, 10, (2, 32), generator=gen), 9)
        q, v = torch.randn(2, 2, 32, 8), torch.randn(2, 2, 32, 4)
        for _layer in range(2):  # the first layer builds the mask, inside the compiled function
            compiled(q, q, v, docs)
        assert isinstance(docs.mask(q.dtype), cudnn_attention.RaggedDocs)
        frames.append(counter.frame_count)
    torch._dynamo.reset()
    assert frames[-1] == frames[0], frames  # nothing recompiled after the first micro-batch


def _random_ids(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.zeros(B, T, dtype=torch.int32)
    for b in range(B):
        n = int(torch.randint(0, 6, (), generator=gen))
        starts[b, torch.randperm(T - 1, generator=gen)[:n] + 1] = 1
    return starts.cumsum(1)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on CPU, on purpose
@pytest.mark.parametrize("T,tile", [(40, 8), (37, 8), (50, 16)])
def test_block_mask_and_dense_mask_agree_and_equal_each_document_alone(T, tile):
    """The flex block mask (tiles listed from each tile's first and last id, padding when T is not a
    multiple of the tile) gives flex the same attention as the dense mask, and each document's rows equal
    causal attention over that document alone. Eager flex has no CPU backward; the GPU bench checks it."""
    gen = torch.Generator().manual_seed(T)
    B, H = 3, 2
    for _ in range(4):
        ids = _random_ids(B, T, gen)
        q, k = (torch.randn(B, H, T, 12, generator=gen) for _ in range(2))
        v = torch.randn(B, H, T, 8, generator=gen)
        dense = document_attention(q, k, v, dense_mask(ids), 0.3)
        flex = document_attention(q, k, v, block_mask(ids, tile), 0.3, compiled=False)
        torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
        for b in range(B):
            for doc in ids[b].unique():
                cols = (ids[b] == doc).nonzero().squeeze(1)
                lo, hi = int(cols[0]), int(cols[-1]) + 1
                alone = F.scaled_dot_product_attention(
                    q[b : b + 1, :, lo:hi],
                    k[b : b + 1, :, lo:hi],
                    v[b : b + 1, :, lo:hi],
                    is_causal=True,
                    scale=0.3,
                )
                torch.testing.assert_close(dense[b : b + 1, :, lo:hi], alone, rtol=1e-5, atol=1e-5)


def _tiny(**kw) -> ModelConfig:
    return dataclasses.replace(ModelConfig(vocab_size=97, num_nextn_predict_layers=1), **kw)


@pytest.mark.parametrize("q_lora", [None, 32])
def test_packed_sequence_equals_each_document_alone(q_lora):
    """fp32 logits at every position, the LM loss and the MTP loss of a row packing three documents (the
    last one cut by the window) equal those of the documents run alone at positions 0.., with each
    document's labels running on into the next document as in the packed row."""
    torch.manual_seed(0)
    model = build_model(_tiny(q_lora_rank=q_lora), seed=0).eval()
    lengths = [9, 14, 7]  # tokens per document, its end-of-document token included (the last one has none)
    docs = [torch.randint(0, EOD, (n,)) for n in lengths]
    for d in docs[:-1]:
        d[-1] = EOD
    row = torch.cat(docs + [torch.randint(0, EOD, (1,))])  # one more token: the last position's label
    x, y = row[None, :-1], row[None, 1:]
    T, k = x.shape[1], 1
    with torch.no_grad():
        packed = model(x, y, return_logits=True, docs=Documents.of(x, EOD))
        start, lm_sum, mtp_sum = 0, 0.0, 0.0
        for n in lengths:
            xa, ya = x[:, start : start + n], y[:, start : start + n]
            alone = model(xa, ya, return_logits=True)
            torch.testing.assert_close(
                packed.logits[:, start : start + n], alone.logits, rtol=1e-5, atol=1e-5
            )
            lm_sum += float(alone.lm_loss) * n
            mtp_sum += float(alone.mtp_loss) * (n - k)
            start += n
    torch.testing.assert_close(float(packed.lm_loss), lm_sum / T, rtol=1e-5, atol=0)
    # MTP targets in another document count zero; the mean divides by every MTP position of the row
    torch.testing.assert_close(float(packed.mtp_loss), mtp_sum / (T - k), rtol=1e-5, atol=0)
    # without masks the same row attends across documents: the logits after the first document differ
    plain = model(x, y, return_logits=True)
    assert not torch.allclose(plain.logits[:, lengths[0] :], packed.logits[:, lengths[0] :], atol=1e-4)


def test_rows_of_one_document_take_the_plain_causal_path_bit_for_bit():
    model = build_model(_tiny(), seed=0).eval()
    x = torch.randint(0, EOD, (2, 16))
    with torch.no_grad():
        a = model(x, x, return_logits=True)
        b = model(x, x, return_logits=True, docs=Documents.of(x, EOD))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_loss, b.mtp_loss)


def test_mfu_counts_the_pairs_the_masks_allow(tmp_path):
    """A step's FLOPs count attention over each document's causal pairs (Σ L(L+1)/2), fewer than a causal
    row's; without masks, or on a corpus without documents, the causal count. MFU divides by every device."""
    from moe_train.train.metrics import Throughput
    from moe_train.train.setup import StepFlops, build_data
    from tiny_cfg import tiny_cfg

    cfg = tiny_cfg(str(tmp_path), "data.synthetic_doc_tokens=8", steps=1)
    data = build_data(cfg)
    flops = StepFlops(cfg, data)
    pairs = 0
    for row in data.sampler.global_batch(3)[:, :-1].tolist():
        n = 0
        for tok in row:
            n += 1
            pairs += n
            n = 0 if tok == data.dataset.eod_id else n
    T = cfg.data.seq_len
    causal = flops.per_token * flops.tokens
    expected = causal + flops.per_pair * (pairs - cfg.data.batch_size * T * T / 2)
    assert flops(3) == pytest.approx(expected, rel=1e-12) and flops(3) < causal
    unmasked = tiny_cfg(str(tmp_path), "data.synthetic_doc_tokens=8", "data.document_mask=false", steps=1)
    assert StepFlops(unmasked, build_data(unmasked))(3) == causal
    one, two = (Throughput(flops.tokens, flops, 100.0, devices) for devices in (1, 2))
    for meter in (one, two):
        meter.add(3)
        meter.since -= 100.0  # a window of about 100 s, so the two windows' lengths differ by < 1e-4
    mfu = [meter.take(torch.device("cpu"))["mfu"] for meter in (one, two)]
    assert mfu[1] == pytest.approx(mfu[0] / 2, rel=1e-3)
    assert mfu[0] == pytest.approx(flops(3) / 100.0 / 100e12, rel=1e-3)


def test_inputs_bound_for_the_cpu_stay_where_they_are():
    """`staged` pins a micro-batch's host tensors only for a CUDA device (pinning needs one); for the CPU the
    tensor itself is used, no copy."""
    from moe_train.model.documents import staged

    t = torch.arange(12).view(3, 4)
    assert staged(t, torch.device("cpu")) is t
