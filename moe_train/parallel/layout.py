"""Start-up checks of the parallel layout: the config's parallel keys against WORLD_SIZE, the schedule, the
dispatcher and the model's layer and expert counts.

`moe_train.config.validate` checks each key on its own and rules between keys that need nothing from
`parallel/`; the rules here need the schedule registry, the mesh arithmetic and the dispatcher registry, so
they live beside them (config imports nothing from `parallel/`).  `moe_train.train.main` runs both on every
rank before any process group or model is built; every error is a `ConfigError` whose message names the
key, the value and what is allowed.
"""

from __future__ import annotations

import os

from ..config import ConfigError, TrainConfig
from .dispatch import BOUNDED, TRANSPORTS, check_dispatcher, transport_refused
from .mesh import Layout, MeshError
from .pipeline.actions import Kind, Schedule
from .pipeline.schedules import schedule_for
from .pipeline.stages import split_layers


def _fail(key: str, value: object, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def check_layout(cfg: TrainConfig, world_size: int) -> Schedule:
    """Raise `ConfigError` if the layout cannot run on `world_size` processes; return the schedule it runs."""
    p, m = cfg.parallel, cfg.model
    try:
        schedule = schedule_for(p)
        split_layers(m.num_hidden_layers, schedule.n_chunks, p.stage_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.optim.engine == "deepspeed" and cfg.deepspeed.zero_stage == 2 and schedule.n_stages > 1:
        _fail(
            "deepspeed.zero_stage",
            2,
            "1 with pipeline schedules: stage 2 reduces each gradient inside backward, before the pipeline "
            "sums the copies a parameter has on several stages (embedding/head ties, DualPipe's mirrored "
            "chunks)",
        )
    if p.overlap:
        _check_overlap(cfg, schedule)
    if world_size % (p.pp * p.ep):
        _fail("WORLD_SIZE", world_size, f"a multiple of parallel.pp*parallel.ep={p.pp * p.ep}")
    dp = world_size // p.pp
    if dp % p.ep:
        _fail("parallel.ep", p.ep, f"a divisor of dp = WORLD_SIZE/parallel.pp = {dp}")
    gpus_per_node = p.gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    try:
        layout = Layout(world_size, p.pp, p.ep, gpus_per_node)
        check_dispatcher(p.dispatcher, layout, m.n_routed_experts, m.n_group)
    except MeshError as e:  # the dispatcher refuses this layout
        raise ConfigError(f"parallel.dispatcher={p.dispatcher}: {e}") from None
    except ValueError as e:  # no such dispatcher
        raise ConfigError(str(e)) from None
    redo = p.dispatcher in BOUNDED and p.dispatch_bound is not None and p.ep > 1
    if redo and cfg.optim.engine == "deepspeed" and cfg.deepspeed.zero_stage == 2:
        _fail(
            "parallel.dispatch_bound",
            p.dispatch_bound,
            "null with deepspeed.zero_stage=2: a step that overflows the buffers runs again, and its first "
            "pass's gradients are already reduced into ZeRO-2's partitions (no overflow with null)",
        )
    if p.dispatch_transport not in TRANSPORTS:
        _fail("parallel.dispatch_transport", p.dispatch_transport, f"one of {', '.join(TRANSPORTS)}")
    refused = transport_refused(p.dispatch_transport, p.dispatcher)
    if refused is not None:
        _fail("parallel.dispatch_transport", p.dispatch_transport, refused)
    if cfg.data.batch_size % (dp * p.microbatches):
        _fail(
            "data.batch_size",
            cfg.data.batch_size,
            f"a multiple of dp*parallel.microbatches={dp}*{p.microbatches}={dp * p.microbatches}",
        )
    return schedule


def _check_overlap(cfg: TrainConfig, schedule: Schedule) -> None:
    """parallel.overlap hides the expert all-to-all under the other direction's compute (parallel/overlap.py):
    it needs that all-to-all, something to pair, and sub-steps it can cut."""
    p, t = cfg.parallel, cfg.trainer
    if p.ep == 1:
        _fail("parallel.ep", p.ep, "> 1 with parallel.overlap=true (ep=1 has no all-to-all to hide)")
    if t.recompute == "full":
        _fail(
            "trainer.recompute",
            t.recompute,
            "none or selective with parallel.overlap=true (the overlap engine cuts each block into "
            "sub-steps; a whole-block checkpoint would repeat their exchanges inside backward)",
        )
    paired = any(a.kind is Kind.FB for acts in schedule.ranks for a in acts)
    if p.pp == 1 and not paired:
        _fail(
            "parallel.microbatches",
            p.microbatches,
            ">= 2 with parallel.overlap=true and parallel.pp=1 (micro-batch i's forward runs paired with "
            "micro-batch i-1's backward)",
        )
    if cfg.optim.engine == "deepspeed" and cfg.deepspeed.zero_stage == 2:
        _fail(
            "deepspeed.zero_stage",
            2,
            "1 with parallel.overlap=true (the overlap engine runs backward through the pipeline executor, "
            "which ZeRO-2's in-backward reduction does not follow)",
        )


__all__ = ["check_layout"]
