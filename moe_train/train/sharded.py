"""Sharded training checkpoints through `torch.distributed.checkpoint` (DCP): every rank writes its own
tensors, nobody gathers the model, and any layout reads any other layout's checkpoint.

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

Atomic commit: all ranks write into `step_N.tmp/`, then — only after a barrier proves every rank finished —
rank 0 writes `meta.json`, renames the directory to `step_N/` and replaces `latest`. A crash at any point
before the rename leaves the previous checkpoint complete and chosen by `trainer.resume=auto`.

Besides the DCP files a checkpoint holds `trainer.pt` (step, wandb run id, skipped steps), `rng/rank<R>.pt`
(each rank's RNG states, restored when the layout is the same), `config.yaml` and `meta.json`. The learning
rate and the data position are functions of the step (`optim.schedule.lr_at`, the step-seeded sampler), so
the step restores both.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from ..model.moe import RoutedExperts
from . import checkpoint as ckpt

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


def split_entries(
    name: str, t: torch.Tensor, splits: dict[str, tuple[str, str, int]]
) -> dict[str, torch.Tensor]:
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
    """An asynchronous save whose shards may still be in flight; committed by `commit_pending`."""

    future: Any
    tmp: str
    final: str
    step: int
    files: Callable[[], None]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _single() -> bool:
    return not (dist.is_initialized() and dist.get_world_size() > 1)


def _barrier(group=None) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=group)


def prepare_dir(root: str, step: int) -> tuple[str, str]:
    """(tmp, final) for step; rank 0 clears leftovers of crashed saves. Collective."""
    final = os.path.join(root, ckpt.checkpoint_name(step))
    tmp = f"{final}.tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):
            if ".tmp" in name and name.startswith("step_"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    return tmp, final


def write_side_files(
    tmp: str, trainer_state: dict[str, Any], rng: dict[str, Any], config_yaml: str, layout: dict[str, int]
) -> Callable[[], None]:
    """Every rank's RNG file now; rank 0's files (trainer.pt, config.yaml) at commit (returned callable)."""
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(rng, os.path.join(tmp, "rng", f"rank{_rank()}.pt"))

    def rank0_files() -> None:
        torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
        with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(config_yaml)
        meta = {
            "step": trainer_state["step"],
            "format": FORMAT,
            "time": time.time(),
            "has_optim": trainer_state.get("has_optim", True),
            "layout": layout,
        }
        ckpt._atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(meta))

    return rank0_files


def commit(tmp: str, final: str, step: int, rank0_files: Callable[[], None], keep_last: int | None) -> None:
    """After every rank's shards are on disk (caller's barrier): meta.json, rename, latest, prune."""
    injected = os.environ.get(FAULT_ENV)
    if injected and int(injected) == step:
        print(
            f"fault injection: rank {_rank()} exits between shard write and commit of step {step}", flush=True
        )
        os._exit(1)
    if _rank() == 0:
        rank0_files()
        if os.path.exists(final):  # re-saving a step (after a resume): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        root = os.path.dirname(final)
        ckpt._atomic_write_text(os.path.join(root, "latest"), os.path.basename(final) + "\n")
        if keep_last:
            ckpt.prune(root, keep_last)
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
    async_group=None,
) -> str | PendingSave:
    """Write this rank's tensors and commit; with async_save, stage them to host memory, write in the
    background (coordinating on `async_group`, a gloo group) and return a PendingSave to commit later."""
    tmp, final = prepare_dir(root, step)
    files = write_side_files(tmp, trainer_state, rng, config_yaml, layout)
    if async_save:
        future = dcp.async_save(tensors, checkpoint_id=tmp, process_group=async_group, no_dist=_single())
        return PendingSave(future, tmp, final, step, files)
    dcp.save(tensors, checkpoint_id=tmp, no_dist=_single())
    _barrier()
    commit(tmp, final, step, files, keep_last)
    return final


def commit_pending(p: PendingSave, keep_last: int | None) -> str:
    """Wait for this rank's background writes, then commit once all ranks are done. Collective."""
    p.future.result()
    _barrier()
    commit(p.tmp, p.final, p.step, p.files, keep_last)
    return p.final


# ------------------------------------------------------------------------------------------------ load
def is_sharded(path: str) -> bool:
    meta = os.path.join(path, "meta.json")
    if not os.path.isfile(meta):
        return False
    with open(meta, encoding="utf-8") as f:
        return json.load(f).get("format") == FORMAT


def stored_shapes(path: str) -> dict[str, tuple[int, ...]]:
    md = dcp.FileSystemReader(path).read_metadata()
    return {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}


def check_keys(wanted: dict[str, torch.Tensor], stored: dict[str, tuple[int, ...]], path: str) -> None:
    """A checkpoint of another model config fails naming the keys that are missing or differ in shape."""
    missing = sorted(k for k in wanted if k not in stored)
    shapes = sorted(
        f"{k}: checkpoint {stored[k]} vs model {tuple(v.shape)}"
        for k, v in wanted.items()
        if k in stored and stored[k] != tuple(v.shape)
    )
    model_keys = {k for k in stored if k.startswith("model.")}
    unexpected: list[str] = []
    if not dist.is_initialized() or dist.get_world_size() == 1:  # one process holds every key
        unexpected = sorted(model_keys - set(wanted))
    ckpt.raise_mismatch(path, missing, unexpected, shapes)


def load_into(path: str, tensors: dict[str, torch.Tensor], stored: dict[str, tuple[int, ...]]) -> None:
    """Fill `tensors` (views into this rank's model / optimizer state) from the checkpoint, in place;
    `stored`: the checkpoint's `stored_shapes`, read once by the caller."""
    check_keys(tensors, stored, path)
    dcp.load(tensors, checkpoint_id=path, no_dist=_single())


def has_optim(stored: dict[str, tuple[int, ...]]) -> bool:
    return any(k.startswith("optim.") for k in stored)


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
