"""Every DeepSpeed name the ZeRO adapter relies on, in one table, and the only code touching private ones.

DeepSpeed has no public interface for what the adapter does (expert groups without its MoE layer, a clipping
norm over pipeline stages, optimizer state read by parameter name before the first step), so the adapter
leans on private registries, methods and attribute names. They change between releases without notice; each
is listed in `INTERNALS` with what it is used for and what the adapter expects of it (leading parameters, the
names its code still reads), and `check_internals` reports, naming the internal and the version the adapter
was written for, any that a newer DeepSpeed moved, renamed or rewired (tests/test_deepspeed_internals.py).
The rest of the adapter reaches DeepSpeed only through `resolve` and the helpers below.
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

#: the DeepSpeed release the adapter was written and tested against, and the range of releases it accepts
WRITTEN_FOR = "0.19.8"
TESTED_RANGE = ("0.19.8", "0.20")  # [first, first release not tested)


@dataclass(frozen=True)
class Internal:
    """One DeepSpeed name: `module:attr.attr`, why the adapter needs it, and how to recognise it unchanged."""

    path: str
    why: str
    params: tuple[str, ...] = ()  # a callable's leading parameters, in this order (passed positionally)
    keywords: tuple[str, ...] = ()  # parameters the adapter passes by name
    reads: tuple[str, ...] = ()  # attribute names / dict keys the callable's code must still use
    value: Any = None  # the value of a constant, or the type of a module-level registry
    private: bool = False


_GROUPS = "deepspeed.utils.groups"
_ENGINE = "deepspeed.runtime.engine:DeepSpeedEngine"
_ZERO = "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer"

INTERNALS: dict[str, Internal] = {
    # --- expert groups, registered as DeepSpeed's own MoE layer would register them
    "ep_groups": Internal(
        f"{_GROUPS}:_EXPERT_PARALLEL_GROUP", "our ep groups by name", value=dict, private=True
    ),
    "ep_ranks": Internal(
        f"{_GROUPS}:_EXPERT_PARALLEL_GROUP_RANKS", "ranks of our ep groups", value=dict, private=True
    ),
    "edp_groups": Internal(
        f"{_GROUPS}:_EXPERT_DATA_PARALLEL_GROUP", "our expert-dp groups by name", value=dict, private=True
    ),
    "edp_ranks": Internal(
        f"{_GROUPS}:_EXPERT_DATA_PARALLEL_GROUP_RANKS",
        "ranks of our expert-dp groups",
        value=dict,
        private=True,
    ),
    "get_ep_group": Internal(
        f"{_GROUPS}:_get_expert_parallel_group",
        "ZeRO looks ep groups up in the registry we write",
        params=("group_name",),
        reads=("_EXPERT_PARALLEL_GROUP",),
        private=True,
    ),
    "get_edp_group": Internal(
        f"{_GROUPS}:_get_expert_data_parallel_group",
        "ZeRO looks expert-dp groups up in the registry we write",
        params=("group_name",),
        reads=("_EXPERT_DATA_PARALLEL_GROUP",),
        private=True,
    ),
    # --- the marks that make our expert parameters DeepSpeed MoE parameters
    "is_moe_param": Internal(
        "deepspeed.moe.utils:is_moe_param",
        "expert parameters are those with allreduce=False",
        params=("param",),
        reads=("allreduce",),
    ),
    "moe_param_group": Internal(
        f"{_ZERO}.is_moe_group",
        "expert param groups are marked moe=True",
        params=("self", "group"),
        reads=("moe",),
    ),
    "moe_group_name": Internal(
        f"{_ZERO}._configure_moe_settings",
        "an expert param group's `name` is its registered expert group",
        reads=("name",),
        private=True,
    ),
    "param_group_name": Internal(
        f"{_ZERO}.average_tensor",
        "an expert parameter's `group_name` picks its expert-dp group for the reduction",
        reads=("group_name",),
        private=True,
    ),
    "pipe_replicated": Internal(
        "deepspeed.runtime.constants:PIPE_REPLICATED",
        "copies owned by another pipeline stage are left out of the norm",
        value="ds_pipe_replicated",
    ),
    "configure_distributed_model": Internal(
        f"{_ENGINE}._configure_distributed_model",
        "overridden: MoE is detected from the parameter marks, not from DeepSpeed's MoE module class",
        params=("self", "model"),
        reads=("has_moe_layers",),
        private=True,
    ),
    # --- bf16 parameters with fp32 masters and fp32 gradient accumulation (trainer.dtype=bf16_master)
    "optimizer_wrapper": Internal(
        f"{_ENGINE}._do_optimizer_sanity_check",
        "overridden: ZeRO-1 with bf16 parameters and fp32 accumulation stays on the ZeRO optimizer",
        params=("self", "basic_optimizer"),
        reads=("BFLOAT16", "ZERO_OPTIMIZATION", "zero_optimization_stage"),
        private=True,
    ),
    "bf16_wrapper": Internal(
        "deepspeed.runtime.constants:BFLOAT16",
        "the wrapper name for DeepSpeed's BF16_Optimizer",
        value="bf16",
    ),
    "zero_wrapper": Internal(
        "deepspeed.runtime.zero.config:ZERO_OPTIMIZATION",
        "the wrapper name for the ZeRO optimizer",
        value="zero_optimization",
    ),
    "fp32_accumulation": Internal(
        f"{_ZERO}.process_gradients",
        "each gradient hook adds a bf16 gradient to its fp32 accumulator (stage 1) or reduces it (stage 2), "
        "whichever backward ran",
        params=("self", "param"),
        reads=("_fill_param_grad_accum_attribute", "reduce_ready_partitions_and_remove_grads"),
        private=True,
    ),
    "cast_params": Internal(
        f"{_ENGINE}._cast_module_mixed_precision",
        "overridden: the parameters the torch engine keeps fp32 (routers, norm gains) keep their fp32 data",
        params=("self", "param_dtype", "buffer_dtype", "is_zero_init_model"),
        private=True,
    ),
    "step_gradient": Internal(
        f"{_ZERO}.get_param_gradient_attribute",
        "the tensor ZeRO-1 reduces at the step: `.grad`, or under fp32 accumulation the fp32 `grad_accum`",
        params=("self", "param"),
        reads=("grad_accum", "use_grad_accum_attribute"),
        private=True,
    ),
    "get_full_fp32": Internal(
        "deepspeed.utils:safe_get_full_fp32_param", "a parameter's full master weight", params=("param",)
    ),
    # --- the clipping norm and the overflow flag over pipeline stages
    "scaled_global_norm": Internal(
        f"{_ZERO}.scaled_global_norm",
        "wrapped per optimizer: the stage norms' squares are summed over pp",
        params=("self", "norm_type"),
        private=True,
    ),
    "has_overflow": Internal(
        f"{_ZERO}.has_overflow",
        "wrapped per optimizer: the overflow flag (bf16) is maximised over pp",
        params=("self", "partition_gradients"),
        private=True,
    ),
    "check_overflow": Internal(
        f"{_ZERO}._check_overflow",
        "the step reads its overflow flag through the attribute we wrap",
        params=("self", "partition_gradients"),
        reads=("has_overflow",),
        private=True,
    ),
    "zero_step": Internal(
        f"{_ZERO}.step",
        "the step reads its clipping norm through the attribute we wrap",
        reads=("scaled_global_norm",),
    ),
    # --- optimizer state by parameter name
    "relink_state": Internal(
        f"{_ZERO}._lazy_init_hp_params_optimizer_state",
        "re-links every parameter to its slice of the Adam moments once the flag is cleared",
        params=("self",),
        reads=("_hp_optimizer_states_linked",),
        private=True,
    ),
    "get_full_state": Internal(
        "deepspeed.utils:safe_get_full_optimizer_state",
        "a parameter's full moment",
        params=("param", "optim_state_key"),
    ),
    "set_full_fp32": Internal(
        "deepspeed.utils:safe_set_full_fp32_param", "a parameter's master weight", params=("param", "value")
    ),
    "set_full_state": Internal(
        "deepspeed.utils:safe_set_full_optimizer_state",
        "a parameter's full moment",
        params=("param", "value", "optim_state_key"),
    ),
    # --- building the engine under our own process groups and backward
    "init_distributed": Internal(
        "deepspeed.comm:init_distributed",
        "DeepSpeed's comm wraps our process group",
        keywords=("dist_backend", "dist_init_required"),
    ),
    "config_class": Internal(
        "deepspeed.runtime.config:DeepSpeedConfig", "the config parsed with our mpu", params=("config", "mpu")
    ),
    "engine": Internal(
        _ENGINE,
        "the engine built from our param groups, mpu and generated config",
        keywords=(
            "args",
            "model",
            "optimizer",
            "model_parameters",
            "mpu",
            "dist_init_required",
            "config",
            "config_class",
        ),
    ),
    "engine_backward": Internal(
        f"{_ENGINE}.backward",
        "losses already weighted by their share of the global batch",
        params=("self", "loss"),
        keywords=("scale_wrt_gas",),
    ),
    "engine_step": Internal(
        f"{_ENGINE}.step", "the accumulation boundary: reduce, clip, update", params=("self",)
    ),
    "global_grad_norm": Internal(f"{_ENGINE}.get_global_grad_norm", "the step's norm", params=("self",)),
    "managed_accumulation_key": Internal(
        "deepspeed.runtime.constants:MANAGED_GRADIENT_ACCUMULATION",
        "our backward passes only accumulate; the step is the boundary",
        value="managed_gradient_accumulation",
    ),
    "allreduce_op_key": Internal(
        "deepspeed.runtime.constants:GRADIENT_ALLREDUCE_OP",
        "gradients are summed, not averaged",
        value="gradient_allreduce_op",
    ),
}


def _lookup(path: str) -> Any:
    module, _, attrs = path.partition(":")
    obj: Any = importlib.import_module(module)
    for attr in attrs.split("."):
        obj = getattr(obj, attr)
    return obj


def resolve(key: str) -> Any:
    """The object `INTERNALS[key]` names (imports DeepSpeed on first use)."""
    return _lookup(INTERNALS[key].path)


# ----------------------------------------------------------------------------------------- checks
def _parse(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:3] if part.isdigit())


def version_problem(installed: str) -> str | None:
    """Why `installed` is outside the tested range, or None."""
    first, stop = TESTED_RANGE
    if _parse(first) <= _parse(installed) < _parse(stop):
        return None
    return (
        f"DeepSpeed {installed} is outside the range the ZeRO adapter was tested with ({first} <= version < "
        f"{stop}; written for {WRITTEN_FOR}): check every entry of "
        "moe_train/optim/deepspeed_zero/internals.py against it, then widen TESTED_RANGE"
    )


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names) | {c for c in code.co_consts if isinstance(c, str)}
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _code_names(c)
    return names


def _unwrap(obj: Any) -> Any:
    """The decorated function itself: DeepSpeed's nvtx decorator returns a `(*args, **kwargs)` closure
    without `functools.wraps`."""
    obj = inspect.unwrap(obj)
    while isinstance(obj, types.FunctionType) and obj.__closure__:
        inner = [c.cell_contents for c in obj.__closure__ if isinstance(c.cell_contents, types.FunctionType)]
        if len(inner) != 1 or obj.__code__.co_argcount:
            break
        obj = inspect.unwrap(inner[0])
    return obj


def _problem(entry: Internal, obj: Any) -> str | None:
    if entry.value is not None:
        if isinstance(entry.value, type):
            return (
                None
                if isinstance(obj, entry.value)
                else f"is a {type(obj).__name__}, not a {entry.value.__name__}"
            )
        return None if obj == entry.value else f"is {obj!r}, expected {entry.value!r}"
    if not callable(obj):
        return f"is not callable ({type(obj).__name__})"
    obj = _unwrap(obj)
    if entry.params or entry.keywords:
        names = list(inspect.signature(obj).parameters)
        if names[: len(entry.params)] != list(entry.params):
            return f"parameters start {names[: len(entry.params)]}, expected {list(entry.params)}"
        missing = [k for k in entry.keywords if k not in names]
        if missing:
            return f"has no parameter {missing} (parameters: {names})"
    if entry.reads:
        code = getattr(obj, "__code__", None)
        if code is None:
            return "has no Python code to inspect"
        gone = [r for r in entry.reads if r not in _code_names(code)]
        if gone:
            return f"no longer uses {gone}"
    return None


def check_internals(table: dict[str, Internal] | None = None, installed: str | None = None) -> list[str]:
    """One message per internal that is missing or changed (empty when all match what the adapter expects)."""
    if installed is None:
        import deepspeed

        installed = deepspeed.__version__
    out = []
    for key, entry in (INTERNALS if table is None else table).items():
        try:
            problem = _problem(entry, _lookup(entry.path))
        except (ImportError, AttributeError) as e:
            problem = f"is missing ({e})"
        if problem is not None:
            kind = "private " if entry.private else ""
            out.append(
                f"DeepSpeed {installed}: {kind}internal {entry.path} [{key}: {entry.why}] {problem}; "
                f"the ZeRO adapter (moe_train/optim/deepspeed_zero) was written for DeepSpeed {WRITTEN_FOR}"
            )
    return out


# ------------------------------------------------------------------------- the private parts, applied
def register_expert_groups(name: str, ep: Any, ep_ranks: list[int], edp: Any, edp_ranks: list[int]) -> None:
    """Name our ep/edp groups in DeepSpeed's group registry as its MoE layer would."""
    resolve("ep_groups")[name] = ep
    resolve("ep_ranks")[name] = ep_ranks
    resolve("edp_groups")[name] = edp
    resolve("edp_ranks")[name] = edp_ranks


def mark_expert_param(p: nn.Parameter, group_name: str) -> None:
    """DeepSpeed's MoE marks: reduced over the expert-dp group registered under `group_name`, not over dp."""
    p.allreduce = False
    p.group_name = group_name


#: our mark on a parameter that stays fp32 while DeepSpeed casts the rest to bf16
KEEP_FP32 = "moe_train_keep_fp32"


def mark_kept_fp32(p: nn.Parameter) -> None:
    """A parameter DeepSpeed's bf16 cast leaves fp32 (`moe_engine_class`)."""
    setattr(p, KEEP_FP32, True)


def mark_pipe_replicated(p: nn.Parameter) -> None:
    """A copy whose owner on another pipeline stage counts it in the norm."""
    setattr(p, resolve("pipe_replicated"), True)


def moe_engine_class() -> type:
    """DeepSpeed's engine, recognising MoE by the expert parameter marks (what its ZeRO optimizer works
    from) rather than by its own `MoE` module class, so the model code stays free of parallelism."""
    is_moe_param = resolve("is_moe_param")

    bf16_wrapper, zero_wrapper = resolve("bf16_wrapper"), resolve("zero_wrapper")

    class _MoEEngine(resolve("engine")):
        def _configure_distributed_model(self, model: nn.Module) -> None:
            super()._configure_distributed_model(model)
            if any(is_moe_param(p) for p in self.module.parameters()):
                self.has_moe_layers = True

        def _cast_module_mixed_precision(
            self, param_dtype: Any, buffer_dtype: Any, *args: Any, **kw: Any
        ) -> None:
            """DeepSpeed's cast of every parameter to the training dtype, except the marked ones, which keep
            their fp32 data (`mark_kept_fp32`); their param groups hold nothing else (ZeRO flattens a group
            into one dtype)."""
            kept = [(p, p.data) for p in self.module.parameters() if getattr(p, KEEP_FP32, False)]
            super()._cast_module_mixed_precision(param_dtype, buffer_dtype, *args, **kw)
            for p, data in kept:
                p.data = data

        def _do_optimizer_sanity_check(self, basic_optimizer: Any) -> Any:
            """ZeRO-1 with bf16 parameters and fp32 accumulation on the ZeRO optimizer, as ZeRO-2 is:
            DeepSpeed would hand it to its BF16_Optimizer, which adds every micro-batch's bf16 gradient to
            the fp32 buffer at each engine backward without clearing it, so under our caller-owned
            accumulation earlier micro-batches count again; and one optimizer class keeps one set of
            internals here. The ZeRO optimizer's gradient hooks accumulate in fp32 at both stages."""
            wrapper = super()._do_optimizer_sanity_check(basic_optimizer)
            return zero_wrapper if wrapper == bf16_wrapper and self.zero_optimization() else wrapper

    return _MoEEngine


def span_stages(zero_optimizer: Any, pp_group: Any, device: torch.device) -> None:
    """Make the ZeRO optimizer's step decisions global over pipeline stages, so every stage takes the same
    branch of its step and the collectives below pair up:

    - the clipping norm: its own covers this stage (dp partitions summed, experts over ep, replicated copies
      skipped); the squares of the stages add. One collective per step on every rank, whatever param groups
      the stage holds.
    - the overflow flag (checked first under bf16: a non-finite gradient skips the step): its own is
      reduced over the stage's dp group only; a stage that skipped would otherwise leave the others waiting
      in the norm's collective. Taken as the maximum over pp."""
    stage_norm: Callable[[int], torch.Tensor] = zero_optimizer.scaled_global_norm
    stage_overflow: Callable[..., bool] = zero_optimizer.has_overflow

    def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
        sq = stage_norm(norm_type).float() ** 2
        dist.all_reduce(sq, group=pp_group)
        return sq.sqrt()

    def has_overflow(partition_gradients: bool = True) -> bool:
        flag = torch.tensor([float(stage_overflow(partition_gradients))], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pp_group)
        return bool(flag.item())

    zero_optimizer.scaled_global_norm = scaled_global_norm
    zero_optimizer.has_overflow = has_overflow


def step_gradient(zero_optimizer: Any, p: nn.Parameter) -> torch.Tensor:
    """The gradient of `p` ZeRO-1 reduces at the step, where its hooks accumulated it: `.grad`, or the fp32
    `grad_accum` beside a bf16 parameter. A parameter without one this step gets zeros there, so every copy
    of a tied parameter takes part in the sum over its pipeline group."""
    g = zero_optimizer.get_param_gradient_attribute(p)
    if g is None:
        fp32 = zero_optimizer.use_grad_accum_attribute
        g = torch.zeros_like(p, dtype=torch.float32 if fp32 else p.dtype)
        if fp32:
            p.grad_accum = g
        else:
            p.grad = g
    return g


def relink_optimizer_state(zero_optimizer: Any) -> None:
    """Link every parameter to its slice of the Adam moments again. DeepSpeed links them once, right after
    stepping the first param group, so later groups' parameters would stay linked to nothing."""
    zero_optimizer._hp_optimizer_states_linked = False
    zero_optimizer._lazy_init_hp_params_optimizer_state()
