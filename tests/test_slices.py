"""Reading parts of stored tensors (checkpoint/slices.py): what a rank of a tensor-parallel decode keeps of a
whole tensor is read from safetensors, from DCP and from a memory-mapped tensor box by box, and equals
cutting the whole tensor in memory."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from moe_train.checkpoint.slices import (
    SlicedFileSystemReader,
    SlicedLoadPlanner,
    TensorSlice,
    blocks,
    copy_slice,
    held_shape,
)
from moe_train.hf import io as hf_io

WHOLE = torch.arange(6 * 10 * 4, dtype=torch.float32).reshape(6, 10, 4)


def _cut(t: torch.Tensor, sl: TensorSlice) -> torch.Tensor:
    """What `sl` holds, cut from the whole tensor in memory (the reference)."""
    for d, idx in sl.index.items():
        t = t.index_select(d, idx)
    for d, n in sl.pad.items():
        t = torch.cat([t, t.new_zeros(*t.shape[:d], n, *t.shape[d + 1 :])], dim=d)
    return t


# gate rows then up rows of a tp rank (two runs), a column block, an uneven last head shard with padding
SLICES = [
    TensorSlice({1: torch.tensor([2, 3, 7, 8])}),
    TensorSlice({2: torch.tensor([1, 2])}),
    TensorSlice({0: torch.tensor([4, 5])}, {0: 1}),
    TensorSlice().cut(1, torch.arange(5, 10)).cut(1, torch.tensor([0, 1, 3])).cut(2, torch.tensor([3])),
]


def test_blocks_read_only_the_runs_and_fill_the_slice():
    for sl in SLICES:
        reads: list[int] = []

        def read(box, reads=reads):
            reads.append(WHOLE[box].numel())
            return WHOLE[box]

        dest = torch.full(held_shape(tuple(WHOLE.shape), sl), float("nan"))
        copy_slice(dest, read, tuple(WHOLE.shape), sl)
        assert torch.equal(dest, _cut(WHOLE, sl)), sl
        assert sum(reads) == _cut(WHOLE, sl).numel() - sum(n * dest[0].numel() for n in sl.pad.values()), sl
    # runs are merged: the gate and up rows of one expert cut are two boxes, not one per row
    assert len(blocks(tuple(WHOLE.shape), SLICES[0])) == 2


def test_a_box_of_the_whole_takes_only_its_part():
    """An expert's up rows are rows [5, 10) of the fused tensor: its slice's rows 7, 8 come from rows 2, 3
    of the stored up tensor and land after the gate rows."""
    sl = SLICES[0].shifted(-1)  # one expert's [10, 4] of the fused [E, 10, 4]
    up = WHOLE[0, 5:]
    dest = torch.zeros(4, 4)
    copy_slice(dest, up.__getitem__, (10, 4), sl, box={0: (5, 5)})
    assert torch.equal(dest[2:], WHOLE[0, [7, 8]]) and not dest[:2].any()


def test_safetensors_and_dcp_read_the_slice(tmp_path):
    save_file({"w": WHOLE}, str(tmp_path / "model.safetensors"))
    files = hf_io.weight_files(str(tmp_path))
    dcp.save({"w": WHOLE, "b": torch.ones(3)}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    for sl in SLICES:
        want = _cut(WHOLE, sl)
        ((_, read),) = hf_io.iter_readers(files, ["w"])
        got = torch.full_like(want, float("nan"))
        copy_slice(got, read, tuple(WHOLE.shape), sl)
        assert torch.equal(got, want), sl
        state = {"w": torch.full_like(want, float("nan")), "b": torch.zeros(3)}
        dcp.load(
            state, checkpoint_id=str(tmp_path / "dcp"), planner=SlicedLoadPlanner({"w": sl}), no_dist=True
        )
        assert torch.equal(state["w"], want) and torch.equal(state["b"], torch.ones(3)), sl


def test_one_process_loads_for_decode_as_for_inference(tmp_path):
    """Without a process group `load_for_decode` is a world of one: nothing cut, the same tokens."""
    from test_infer import byte_model_checkpoint

    from moe_train.infer import generate, load_for_inference
    from moe_train.parallel.tensor import load_for_decode

    byte_model_checkpoint(str(tmp_path))
    split, plain = load_for_decode(str(tmp_path)), load_for_inference(str(tmp_path))
    assert split.source == plain.source and type(split.tokenizer) is type(plain.tokenizer)
    prompt = [list(b"hello")]
    assert generate(split.model, prompt, 5).tokens == generate(plain.model, prompt, 5).tokens


def test_dcp_reads_only_the_slices_bytes(tmp_path):
    """The sliced reader fetches the bytes of the boxes it is asked for — runs of rows, a row's columns — and
    nothing else of the stored tensor (torch's reader loads each item whole); the values equal the cut."""
    big = torch.arange(64 * 48, dtype=torch.bfloat16).reshape(64, 48)
    dcp.save({"w": big, "b": torch.ones(3)}, checkpoint_id=str(tmp_path), no_dist=True)
    for sl in (
        TensorSlice({0: torch.tensor([*range(8, 16), *range(40, 48)])}),  # two runs of rows
        TensorSlice({1: torch.arange(24, 48)}),  # a column block: one run per row
        TensorSlice({0: torch.arange(0, 32)}, {0: 1}),  # the head's padded shard
    ):
        want = _cut(big, sl)
        state = {"w": torch.full_like(want, float("nan")), "b": torch.zeros(3)}
        reader = SlicedFileSystemReader(str(tmp_path))
        dcp.load(state, storage_reader=reader, planner=SlicedLoadPlanner({"w": sl}), no_dist=True)
        assert torch.equal(state["w"], want) and torch.equal(state["b"], torch.ones(3)), sl
        padding = sum(n * want[0].numel() for n in sl.pad.values())
        assert reader.bytes_read == (want.numel() - padding) * big.element_size() < big.nbytes, sl
    # a tensor saved with other strides (a transposed view keeps its storage) goes through torch's reader
    dcp.save({"w": big.t()}, checkpoint_id=str(tmp_path / "t"), no_dist=True)
    sl = TensorSlice({0: torch.arange(4, 12)})
    state = {"w": torch.zeros(8, 64, dtype=big.dtype)}
    reader = SlicedFileSystemReader(str(tmp_path / "t"))
    dcp.load(state, storage_reader=reader, planner=SlicedLoadPlanner({"w": sl}), no_dist=True)
    assert torch.equal(state["w"], big.t()[4:12]) and reader.bytes_read == 0
