"""What the `peer_write` transport (parallel/dispatch/symm.py) relies on, checked on one GPU: torch's CUDA
symmetric-memory backend on a one-rank group — rendezvous, a peer buffer's view written by ordinary kernels
(`index_copy_`) and by a Triton kernel through the peers' pointer table, the barrier kernel, capture in a
CUDA graph — with the times of those writes beside a plain copy of the same rows.

    python bench/symm_memory.py         # CUDA only
"""

import os
import time
import traceback

import torch
import torch.distributed as dist

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29517")
dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
dist.init_process_group("nccl", rank=0, world_size=1, device_id=dev)
import torch.distributed._symmetric_memory as symm_mem  # noqa: E402

name = dist.group.WORLD.group_name
print("backend", symm_mem.get_backend(dev), "torch", torch.__version__)
R, H = 8192 * 6, 2048
try:
    buf = symm_mem.empty(R, H, dtype=torch.bfloat16, device=dev)
    h = symm_mem.rendezvous(buf, name)
    print("rendezvous ok", type(h).__name__, "world", h.world_size, "rank", h.rank)
    print("attrs", [a for a in dir(h) if not a.startswith("_")])
    peer = h.get_buffer(0, (R, H), torch.bfloat16)
    x = torch.randn(8192, H, dtype=torch.bfloat16, device=dev)
    src = torch.randint(0, 8192, (R,), device=dev)
    pos = torch.randperm(R, device=dev)
    peer.index_copy_(0, pos, x.index_select(0, src))
    h.barrier(channel=0)
    torch.cuda.synchronize()
    ref = torch.empty_like(buf)
    ref[pos] = x[src]
    print("index_copy into peer view equal:", torch.equal(buf, ref))
    # graph capture of peer write + barrier
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        buf.zero_()
        peer.index_copy_(0, pos, x.index_select(0, src))
        h.barrier(channel=0)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        peer.index_copy_(0, pos, x.index_select(0, src))
        h.barrier(channel=0)
    buf.zero_()
    g.replay()
    torch.cuda.synchronize()
    print("graph replay equal:", torch.equal(buf, ref))
    # timing: copy of R rows vs gather+scatter into peer view
    for name_, fn in [
        ("copy", lambda: ref.copy_(buf)),
        ("gather+index_copy", lambda: peer.index_copy_(0, pos, x.index_select(0, src))),
        ("index_put", lambda: peer.index_put_((pos,), x.index_select(0, src))),
    ]:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        print(f"{name_}: {(time.perf_counter() - t) / 20 * 1e3:.3f} ms")
    # Triton kernel writing through the device pointer array
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def put_rows(x_ptr, src_ptr, dst_rank_ptr, pos_ptr, ptrs_ptr, n, H: tl.constexpr, BH: tl.constexpr):
            i = tl.program_id(0)
            row = tl.load(src_ptr + i)
            rank = tl.load(dst_rank_ptr + i)
            p = tl.load(pos_ptr + i)
            base = tl.load(ptrs_ptr + rank).to(tl.pointer_type(tl.bfloat16))
            for c in range(0, H, BH):
                cols = c + tl.arange(0, BH)
                v = tl.load(x_ptr + row * H + cols)
                tl.store(base + p * H + cols, v)

        ptrs = h.buffer_ptrs_dev
        print("buffer_ptrs_dev", ptrs, type(ptrs))
        ptr_t = torch.tensor(list(h.buffer_ptrs), dtype=torch.int64, device=dev)
        buf.zero_()
        rank = torch.zeros(R, dtype=torch.int32, device=dev)
        put_rows[(R,)](x, src, rank, pos, ptr_t, R, H=H, BH=1024)
        torch.cuda.synchronize()
        print("triton put equal:", torch.equal(buf, ref))
        for _ in range(3):
            put_rows[(R,)](x, src, rank, pos, ptr_t, R, H=H, BH=1024)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            put_rows[(R,)](x, src, rank, pos, ptr_t, R, H=H, BH=1024)
        torch.cuda.synchronize()
        print(f"triton put: {(time.perf_counter() - t) / 20 * 1e3:.3f} ms")
    except Exception:
        traceback.print_exc()
    # profile: the kernels the peer write and the barrier launch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        peer.index_copy_(0, pos, x.index_select(0, src))
        h.barrier(channel=0)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8))
except Exception:
    traceback.print_exc()
dist.destroy_process_group()
