"""Run a function in N gloo processes on this machine (the project's multi-process test harness).

Process starts cost seconds on 2 cores, so each test spawns one group and runs several cases inside it.
Each rank's return value is pickled to a file and handed back to the test in rank order.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str, env: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
        **env,
    )
    import torch

    torch.set_num_threads(1)
    try:
        result: Any = ("ok", fn(*args))
    except BaseException as e:  # noqa: BLE001 - reported back to the test with the traceback
        result = ("error", f"rank {rank}: {e!r}\n{traceback.format_exc()}")
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def run_world(world: int, fn: Callable, *args: Any, env: dict[str, str] | None = None) -> list[Any]:
    """fn(*args) on every rank of a fresh gloo world; per-rank results, or the first rank's error."""
    with tempfile.TemporaryDirectory() as out_dir:
        crash = None
        try:
            worker_args = (world, _free_port(), fn, args, out_dir, env or {})
            mp.start_processes(_worker, args=worker_args, nprocs=world, start_method="spawn")
        except mp.ProcessExitedException as e:  # a rank that failed first may have made a peer abort
            crash = e
        results, errors = [], []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            (errors if status == "error" else results).append(value)
        if errors:
            raise AssertionError(errors[0])
        if crash is not None:
            raise crash
        return results
