"""Hydra overrides injected by train.py before Hydra starts, so every rank of a launch shares one run dir.

Under torchrun each rank runs its own Hydra: each would stamp its own `${now:}` run dir and write its own
`.hydra/`. Rank 0's dir is broadcast to the others later (`shared_run_dir`), but the writes would already be
done, and an elastic restart (new processes, new time stamps) would start a fresh dir where
`trainer.resume=auto` finds no checkpoint. So: ranks other than 0 write no `.hydra/`, and when the launcher
names the job (torchrun's rendezvous id, SLURM's job id) the run dir is derived from that name, which stays
the same across restarts and requeues.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def launch_id(env: Mapping[str, str]) -> str | None:
    """A name for this launch that survives restarts: SLURM job id, else a non-default torchrun run id."""
    job = env.get("SLURM_JOB_ID")
    if job:
        return f"slurm-{job}"
    rdzv = env.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":  # torchrun's default when --rdzv-id is not given
        return f"torchrun-{rdzv}"
    return None


def rank_overrides(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Overrides to append to argv (empty for a plain single-process run, so its behaviour is unchanged)."""
    args = list(argv)
    out: list[str] = []
    multirun = "-m" in args or "--multirun" in args
    if env.get("RANK", "0") != "0" and not any(a.startswith("hydra.output_subdir=") for a in args):
        out.append("hydra.output_subdir=null")
    ident = launch_id(env)
    if ident and not multirun and not any(a.startswith("hydra.run.dir=") for a in args):
        out.append(f"hydra.run.dir=outputs/{ident}")
    return out
