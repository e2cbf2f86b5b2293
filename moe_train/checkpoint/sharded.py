"""Sharded checkpoints through `torch.distributed.checkpoint` (DCP), format `moe_train/dcp-v1`: every rank
writes its own tensors, nobody gathers the model, and any layout reads any other layout's checkpoint.

Layout-independent keys. Tensors are stored under the names a one-process model uses, with two changes that
make every key independent of how ranks split the model:
  - routed experts are stored one expert per key, by *global* expert index:
    `model.layers.3.mlp.experts.17.gate_up_proj` (a rank holding experts 16..31 writes 16 such keys);
  - optimizer state is stored per parameter: `optim.<param key>.exp_avg`, `.exp_avg_sq` (split per expert like
    the parameter), `optim.<param name>.step`.
Layer indices are global already (`layers.7...`, `mtp.0...`), so pipeline stages write disjoint keys; a tensor
several ranks hold (dense weights on every dp rank, the embedding on two pipeline stages, DualPipe's mirrored
chunks) is written once — DCP's planner deduplicates equal keys across ranks.

A reader asks for exactly the keys its own (partial) model holds, so a checkpoint saved at pp=2·ep=2 loads
at ep=4, at pp=4 or in one process; `load_model_state` rebuilds the whole one-process state dict (for HF
export and inference) on one process without a process group.

Verified atomic commit: all ranks write into `step_N.tmp/`; only after a barrier proves every rank finished
are the files read back — each by one rank — and checked against what DCP's `.metadata` says must exist
(integrity.py); then rank 0 records their checksums in meta.json and publishes the directory (directory.py).
A crash or a missing file at any point before the rename leaves the previous checkpoint complete and chosen
by `trainer.resume=auto`.

Besides the DCP files a checkpoint holds `rng/rank<R>.pt` (each rank's RNG states, restored when the layout is
the same) and the files every checkpoint has: `trainer.pt`, `config.yaml`, `meta.json` (with the layout that
wrote it).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from ..model.moe import RoutedExperts
from .directory import CheckpointError, checkpoint_name, publish, read_meta, write_common, write_meta
from .integrity import CHECKSUM, read_back
from .mismatch import check_keys
from .slices import TensorSlice

FORMAT = "moe_train/dcp-v1"
#: per-element optimizer state keys (split per expert like their parameter); other keys are scalars
MOMENTS = ("exp_avg", "exp_avg_sq")
#: env var for the crash test: `MOE_TRAIN_FAULT_SAVE=<step>` exits every rank after its shards of that
#: step's checkpoint are written and before the commit
FAULT_ENV = "MOE_TRAIN_FAULT_SAVE"


# ------------------------------------------------------------------------------------------------ keys
Splits = dict[str, tuple[str, str, int]]


def expert_splits(model: nn.Module) -> Splits:
    """Fused expert parameter name -> (module prefix, leaf name, first global expert this rank holds)."""
    out = {}
    for mod_name, m in model.named_modules():
        if isinstance(m, RoutedExperts):
            for leaf, _ in m.named_parameters(recurse=False):
                out[f"{mod_name}.{leaf}"] = (mod_name, leaf, m.first_expert)
    return out


def split_entries(name: str, t: torch.Tensor, splits: Splits) -> dict[str, torch.Tensor]:
    """`name` -> {layout-independent key: tensor (a view)}: one key per global expert for expert tensors."""
    if name not in splits or t.ndim == 0:
        return {name: t}
    prefix, leaf, first = splits[name]
    return {f"{prefix}.{first + i}.{leaf}": t[i] for i in range(t.shape[0])}


def model_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters and buffers under layout-independent keys (views: loading writes in place)."""
    splits = expert_splits(model)
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        for k, v in split_entries(name, t.detach(), splits).items():
            out[f"model.{k}"] = v
    return out


def entry_slices(model: nn.Module, held: dict[str, TensorSlice]) -> dict[str, TensorSlice]:
    """`held` (parameter name -> what the cut parameter holds of its whole tensor) by `model_entries` key:
    an expert parameter's slice applies to each of its per-expert keys, one dim lower."""
    splits = expert_splits(model)
    out: dict[str, TensorSlice] = {}
    for name, sl in held.items():
        if name not in splits:
            out[f"model.{name}"] = sl
            continue
        if 0 in sl.index or 0 in sl.pad:
            raise ValueError(
                f"{name}: cut along the expert dim; build the model with only its experts instead"
            )
        prefix, leaf, first = splits[name]
        for i in range(model.get_parameter(name).shape[0]):
            out[f"model.{prefix}.{first + i}.{leaf}"] = sl.shifted(-1)
    return out


def optim_entries(
    model: nn.Module, by_name: dict[str, dict[str, Any]], splits: Splits | None = None
) -> dict[str, torch.Tensor]:
    """Name-keyed optimizer state (this rank's parameters' shapes) under layout-independent keys."""
    splits = expert_splits(model) if splits is None else splits
    out: dict[str, torch.Tensor] = {}
    for name, st in by_name.items():
        for key, val in st.items():
            if not torch.is_tensor(val):
                val = torch.tensor(float(val))
            if key in MOMENTS:
                for k, v in split_entries(name, val, splits).items():
                    out[f"optim.{k}.{key}"] = v
            else:
                out[f"optim.{name}.{key}"] = val
    return out


def merge_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert keys back to the fused one-process tensors: `...experts.{e}.leaf` -> `...experts.leaf`."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        head, _, leaf = k.rpartition(".")
        prefix, _, idx = head.rpartition(".")
        if idx.isdigit() and prefix.endswith(".experts"):
            groups.setdefault(f"{prefix}.{leaf}", {})[int(idx)] = v
        else:
            out[k] = v
    for name, parts in groups.items():
        out[name] = torch.stack([parts[i] for i in range(len(parts))])
    return out


# ------------------------------------------------------------------------------------------------ save
@dataclass
class PendingSave:
    """A save whose shards may still be in flight (async: `future`); committed by `commit_pending`."""

    future: Any
    tmp: str
    final: str
    trainer_state: dict[str, Any]
    config_yaml: str
    meta: dict[str, Any]  # step, format, has_optim, layout: meta.json's fields besides the history and files


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _single() -> bool:
    return not (dist.is_initialized() and dist.get_world_size() > 1)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _prepare_dir(root: str, step: int) -> tuple[str, str]:
    """(tmp, final) for step; rank 0 clears leftovers of crashed saves (only the lease holder saves, so no
    other run's save is in progress here). Collective."""
    final = os.path.join(root, checkpoint_name(step))
    tmp = f"{final}.tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):
            if ".tmp" in name and name.startswith("step_"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    return tmp, final


def expected_files(tmp: str) -> dict[str, int]:
    """Every file a complete checkpoint in `tmp` must hold -> the size it must reach: DCP's `.metadata`, the
    data files it points into (up to their last byte it names), each rank's RNG file, trainer.pt, config.yaml.
    CheckpointError when `.metadata` is missing or unreadable."""
    try:
        md = dcp.FileSystemReader(tmp).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to read it means the same: no loadable checkpoint
        raise CheckpointError(f".metadata: missing or unreadable ({type(e).__name__})") from None
    out = {".metadata": 1, "trainer.pt": 1, "config.yaml": 0}
    for info in (md.storage_data or {}).values():
        out[info.relative_path] = max(out.get(info.relative_path, 0), info.offset + info.length)
    world = 1 if _single() else dist.get_world_size()
    out |= {f"rng/rank{r}.pt": 1 for r in range(world)}
    return out


def _commit(p: PendingSave, keep_last: int | None) -> None:
    """After every rank's shards are on disk (caller's barrier): read every file back once (one rank per
    file), then rank 0 records the checksums, publishes and prunes. Nothing is committed — and nothing
    pruned — unless every file is there. Collective."""
    injected = os.environ.get(FAULT_ENV)
    if injected and int(injected) == p.meta["step"]:
        print(
            f"fault injection: rank {_rank()} exits between shard write and commit of step {p.meta['step']}",
            flush=True,
        )
        os._exit(1)
    if _rank() == 0:
        write_common(p.tmp, p.trainer_state, p.config_yaml)
    _barrier()
    try:
        wanted, missing = expected_files(p.tmp), []
    except CheckpointError as e:  # still join the gather below: every rank must reach the same verdict
        wanted, missing = {}, [str(e)]
    files, problems = read_back(p.tmp, wanted)
    problems = missing + problems
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"checkpoint of step {p.meta['step']} not committed, {p.tmp}: {problems[0]}{more}; "
            "the previous checkpoint stays the latest"
        )
    if _rank() == 0:
        write_meta(p.tmp, p.meta, files, CHECKSUM)
        publish(p.tmp, p.final, keep_last)
    _barrier()


def save(
    root: str,
    step: int,
    tensors: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    rng: dict[str, Any],
    config_yaml: str,
    layout: dict[str, int],
    keep_last: int | None,
    async_save: bool = False,
    async_group: Any = None,
) -> str | PendingSave:
    """Write this rank's tensors and RNG states and commit; with async_save, stage the tensors to host memory,
    write them in the background (coordinating on `async_group`, a gloo group) and return a PendingSave to
    commit later. Collective."""
    tmp, final = _prepare_dir(root, step)
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(rng, os.path.join(tmp, "rng", f"rank{_rank()}.pt"))
    meta = {
        "step": step,
        "format": FORMAT,
        "has_optim": trainer_state.get("has_optim", True),
        "layout": layout,
    }
    pending = PendingSave(None, tmp, final, trainer_state, config_yaml, meta)
    if async_save:
        pending.future = dcp.async_save(
            tensors, checkpoint_id=tmp, process_group=async_group, no_dist=_single()
        )
        return pending
    dcp.save(tensors, checkpoint_id=tmp, no_dist=_single())
    _barrier()
    _commit(pending, keep_last)
    return final


def commit_pending(p: PendingSave, keep_last: int | None) -> str:
    """Wait for this rank's background writes, then commit once all ranks are done. Collective."""
    p.future.result()
    _barrier()
    _commit(p, keep_last)
    return p.final


# ------------------------------------------------------------------------------------------------ load
def is_sharded(path: str) -> bool:
    meta = read_meta(path)
    return meta is not None and meta.get("format") == FORMAT


def stored_shapes(path: str) -> dict[str, tuple[int, ...]]:
    md = dcp.FileSystemReader(path).read_metadata()
    return {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}


def has_optim(stored: dict[str, tuple[int, ...]]) -> bool:
    return any(k.startswith("optim.") for k in stored)


def load_into(path: str, tensors: dict[str, torch.Tensor], stored: dict[str, tuple[int, ...]]) -> None:
    """Fill `tensors` (views into this rank's model / optimizer state) from the checkpoint, in place;
    `stored`: the checkpoint's `stored_shapes`, read once by the caller."""
    check_keys(tensors, stored, path, whole_model=_single())
    dcp.load(tensors, checkpoint_id=path, no_dist=_single())


def load_model_state(path: str) -> dict[str, torch.Tensor]:
    """The whole one-process model state dict (fused experts, canonical names), on CPU, in one process —
    for HF export and inference, which run on one machine."""
    md = dcp.FileSystemReader(path).read_metadata()
    tensors = {
        k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if k.startswith("model.") and hasattr(v, "size")
    }
    dcp.load(tensors, checkpoint_id=path, no_dist=True)
    return merge_experts({k[len("model.") :]: v for k, v in tensors.items()})


def read_rng(path: str, rank: int) -> dict[str, Any] | None:
    f = os.path.join(path, "rng", f"rank{rank}.pt")
    return torch.load(f, weights_only=False) if os.path.isfile(f) else None
