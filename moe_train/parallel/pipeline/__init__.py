"""Pipeline parallelism: schedules as data (docs/pipeline_schedules.md).

``actions`` is the data model; ``schedules`` holds the registry of builders (1F1B here, DualPipe and
DualPipeV in ``dualpipe``); ``analysis`` checks them and times them without a model; ``draw`` renders them.
The executor runs the same lists.
"""

from moe_train.parallel.pipeline.analysis import (
    ScheduleError,
    bubble,
    check,
    peak_activations,
    simulate,
    validate,
)
from moe_train.parallel.pipeline.schedules import (
    SCHEDULES,
    Action,
    Durations,
    Kind,
    Schedule,
    build_schedule,
    dualpipe,
    dualpipev,
    one_f_one_b,
    schedule_for,
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
    "peak_activations",
    "schedule_for",
    "simulate",
    "validate",
]
