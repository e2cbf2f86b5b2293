"""Checkpoint directories under <run dir>/checkpoints/: naming, `latest`, pruning, and the whole-model format.

Training writes sharded checkpoints (train/sharded.py, format `moe_train/dcp-v1`). The whole-model format
below (`moe_train/single-v1`) is what `python -m moe_train.hf import` writes and what runs before sharded
checkpoints wrote; both resume, export and generate.

Layout of one checkpoint, `checkpoints/step_00000100/`:
  model.pt          model state dict (canonical names; router biases included)
  optim.pt          optimizer state dict (absent in model-only checkpoints, e.g. HF imports)
  trainer.pt        step, RNG states, wandb run id, anything else the trainer needs to continue
  config.yaml       the resolved config of the run that wrote it
  meta.json         written last inside the temporary directory: its presence marks a complete checkpoint
A checkpoint is written into `step_X.tmp-<pid>` and renamed into place, then `latest` (a one-line file) is
replaced atomically; a crash at any point leaves the previous checkpoint valid and `latest` pointing to it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any

import torch

_STEP_RE = re.compile(r"^step_(\d+)$")


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    ckpt_root: str,
    step: int,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep_last: int | None = None,
) -> str:
    os.makedirs(ckpt_root, exist_ok=True)
    final = os.path.join(ckpt_root, checkpoint_name(step))
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.perf_counter()
    torch.save(model_state, os.path.join(tmp, "model.pt"))
    if optim_state is not None:
        torch.save(optim_state, os.path.join(tmp, "optim.pt"))
    torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(config_yaml)
    meta = {
        "step": step,
        "format": "moe_train/single-v1",
        "time": time.time(),
        "has_optim": optim_state is not None,
    }
    _atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(meta))
    if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    _atomic_write_text(os.path.join(ckpt_root, "latest"), checkpoint_name(step) + "\n")
    if keep_last:
        prune(ckpt_root, keep_last)
    meta["save_seconds"] = time.perf_counter() - t0
    return final


def list_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    """Complete checkpoints (with meta.json), oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    for name in os.listdir(ckpt_root):
        m = _STEP_RE.match(name)
        path = os.path.join(ckpt_root, name)
        if m and os.path.isfile(os.path.join(path, "meta.json")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def prune(ckpt_root: str, keep_last: int) -> None:
    ckpts = list_checkpoints(ckpt_root)
    for _, path in ckpts[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(ckpt_root: str) -> str | None:
    """The checkpoint `latest` names if complete, else the newest complete one, else None."""
    pointer = os.path.join(ckpt_root, "latest")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            path = os.path.join(ckpt_root, f.read().strip())
        if os.path.isfile(os.path.join(path, "meta.json")):
            return path
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1][1] if ckpts else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a directory of checkpoints (its latest), or a run dir (its latest)."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    for root in (path, os.path.join(path, "checkpoints")):
        found = latest_checkpoint(root)
        if found:
            return found
    raise FileNotFoundError(
        f"no complete checkpoint at {path!r}: expected a step_N directory with meta.json, "
        "a checkpoints directory, or a run directory that has one"
    )


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = resolve_checkpoint(path)
    out: dict[str, Any] = {"path": path}
    with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
        out["meta"] = json.load(f)
    out["model"] = torch.load(os.path.join(path, "model.pt"), map_location=map_location, weights_only=True)
    optim_path = os.path.join(path, "optim.pt")
    out["optim"] = (
        torch.load(optim_path, map_location=map_location, weights_only=False)
        if os.path.exists(optim_path)
        else None
    )
    trainer_path = os.path.join(path, "trainer.pt")
    out["trainer"] = torch.load(trainer_path, weights_only=False) if os.path.exists(trainer_path) else {}
    cfg_path = os.path.join(path, "config.yaml")
    out["config_yaml"] = open(cfg_path, encoding="utf-8").read() if os.path.exists(cfg_path) else None
    return out


def load_model_state(path: str) -> dict[str, torch.Tensor]:
    """The whole one-process model state dict of a checkpoint of either format, on CPU (memory-mapped for
    whole-model checkpoints); for HF export and inference."""
    from .sharded import is_sharded
    from .sharded import load_model_state as load_sharded

    path = resolve_checkpoint(path)
    if is_sharded(path):
        return load_sharded(path)
    return torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True, mmap=True)


def check_model_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """A checkpoint of another model config fails with the mismatching keys named, not a torch traceback."""
    raise_mismatch(
        source,
        missing=sorted(set(expected) - set(found)),
        unexpected=sorted(set(found) - set(expected)),
        shapes=sorted(
            f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in set(expected) & set(found)
            if tuple(expected[k].shape) != tuple(found[k].shape)
        ),
    )


def raise_mismatch(source: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> None:
    """The one error for a checkpoint that does not fit the model: up to 8 names of each kind."""
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if names:
            parts.append(f"{label} {names[:8]}{' ...' if len(names) > 8 else ''}")
    raise ValueError(f"checkpoint {source} does not fit this model config: " + "; ".join(parts))
