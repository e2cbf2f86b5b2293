"""Hydra overrides injected by train.py before Hydra starts, so every rank of a launch shares one run dir.

Under torchrun each rank runs its own Hydra: each would stamp its own `${now:}` run dir and write its own
`.hydra/`. Rank 0's dir is broadcast to the others later (`shared_run_dir`), but the writes would already be
done, and an elastic restart (new processes, new time stamps) would start a fresh dir where
`trainer.resume=auto` finds no checkpoint. So: when the launcher names the job (torchrun's rendezvous id,
SLURM's job id) the run dir is derived from that name, which stays the same across restarts and requeues.

And Hydra writes no `.hydra/` itself: it would write it before the run starts, so a second run pointed at a
busy run dir would overwrite the first run's record before it is refused (the run dir's writer lease is
taken later, by the trainer). Rank 0 writes the same three files once it holds the lease
(`write_hydra_record`); train.py tells it where through `HYDRA_RECORD_ENV`. A user's own
`hydra.output_subdir` is left to Hydra.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

# set by train.py to the `.hydra` subdir rank 0 writes after taking the run dir (unset: Hydra wrote it)
HYDRA_RECORD_ENV = "MOE_TRAIN_HYDRA_RECORD"


def launch_id(env: Mapping[str, str]) -> str | None:
    """A name for this launch that survives restarts: SLURM job id, else a non-default torchrun run id."""
    job = env.get("SLURM_JOB_ID")
    if job:
        return f"slurm-{job}"
    rdzv = env.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":  # torchrun's default when --rdzv-id is not given
        return f"torchrun-{rdzv}"
    return None


def _sets_output_subdir(argv: Sequence[str]) -> bool:
    """The user chose where Hydra writes its record (then Hydra writes it, as usual)."""
    return any(a.startswith("hydra.output_subdir=") for a in argv)


def rank_overrides(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Overrides to append to argv (empty for a plain single-process run, so its behaviour is unchanged)."""
    args = list(argv)
    out: list[str] = []
    multirun = "-m" in args or "--multirun" in args
    if not _sets_output_subdir(args):
        out.append("hydra.output_subdir=null")  # rank 0 writes it later: `write_hydra_record`
    ident = launch_id(env)
    if ident and not multirun and not any(a.startswith("hydra.run.dir=") for a in args):
        out.append(f"hydra.run.dir=outputs/{ident}")
    return out


def hydra_record_dir(argv: Sequence[str], env: Mapping[str, str]) -> str | None:
    """The subdir rank 0 writes Hydra's record into once it holds the run dir, or None (another rank, or
    the user chose `hydra.output_subdir`, which Hydra then writes itself)."""
    if env.get("RANK", "0") != "0" or _sets_output_subdir(argv):
        return None
    return ".hydra"


def write_hydra_record(run_dir: str, task_cfg: Any) -> None:
    """Hydra's `config.yaml`, `hydra.yaml` and `overrides.yaml` under `$HYDRA_RECORD_ENV` of `run_dir`, each
    written whole (a temporary file, then a rename); nothing outside a Hydra app or where it is unset."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    subdir = os.environ.get(HYDRA_RECORD_ENV)
    if not subdir or not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    out = os.path.join(run_dir, subdir)
    os.makedirs(out, exist_ok=True)
    hydra_cfg = OmegaConf.create({"hydra": OmegaConf.to_container(hc)})
    for name, cfg in (("config", task_cfg), ("hydra", hydra_cfg), ("overrides", hc.overrides.task)):
        path = os.path.join(out, f"{name}.yaml")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(OmegaConf.to_yaml(cfg))
        os.replace(path + ".tmp", path)
