"""Pipeline parallelism: schedules as data (docs/pipeline_schedules.md).

``schedules`` builds per-rank action lists (1F1B, DualPipe, DualPipeV); ``analysis`` checks them and times
them without a model; ``draw`` renders them.  The executor runs the same lists.
"""

from moe_train.parallel.pipeline.analysis import (
    Durations,
    ScheduleError,
    bubble,
    check,
    paper_bubble,
    peak_activations,
    simulate,
    validate,
)
from moe_train.parallel.pipeline.schedules import (
    SCHEDULES,
    Action,
    Kind,
    Schedule,
    build_schedule,
    dualpipe,
    dualpipev,
    one_f_one_b,
)

__all__ = [
    "SCHEDULES",
    "Action",
    "Durations",
    "Kind",
    "Schedule",
    "ScheduleError",
    "bubble",
    "build_schedule",
    "check",
    "dualpipe",
    "dualpipev",
    "one_f_one_b",
    "paper_bubble",
    "peak_activations",
    "simulate",
    "validate",
]
