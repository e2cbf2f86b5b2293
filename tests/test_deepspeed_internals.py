"""The DeepSpeed internals the ZeRO adapter relies on are still there, shaped as it expects.

In-process and fast: nothing is built, DeepSpeed's modules are only imported and inspected. A DeepSpeed
upgrade that moves, renames or rewires one of them fails here, naming the internal and the release the
adapter was written for, instead of deep inside a distributed run (or, worse, silently: a registry DeepSpeed
no longer reads would leave experts reduced over the wrong group).
"""

from __future__ import annotations

import inspect
import pathlib

import pytest

from moe_train.config import ModelConfig
from moe_train.model.memory import StateSharding, estimate_memory
from moe_train.optim.deepspeed_zero import DeepSpeedZero
from moe_train.optim.deepspeed_zero.internals import (
    INTERNALS,
    WRITTEN_FOR,
    Internal,
    check_internals,
    version_problem,
)
from moe_train.optim.engine import OptimizerEngine, TorchEngine

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "moe_train"


def test_installed_deepspeed_is_in_the_tested_range():
    import deepspeed

    problem = version_problem(deepspeed.__version__)
    assert problem is None, problem


def test_every_internal_the_adapter_uses_is_unchanged():
    problems = check_internals()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (Internal("deepspeed.utils.groups:_NO_SUCH_REGISTRY", "a gone registry", value=dict), "is missing"),
        (Internal("deepspeed.no_such_module:f", "a gone module"), "is missing"),
        (
            Internal("deepspeed.moe.utils:is_moe_param", "renamed parameter", params=("tensor",)),
            "parameters start",
        ),
        (
            Internal("deepspeed.comm:init_distributed", "gone keyword", keywords=("no_such",)),
            "has no parameter",
        ),
        (
            Internal("deepspeed.moe.utils:is_moe_param", "rewired", reads=("no_longer_read",)),
            "no longer uses",
        ),
        (Internal("deepspeed.runtime.constants:PIPE_REPLICATED", "renamed mark", value="other"), "expected"),
    ],
)
def test_a_changed_internal_is_reported_by_name_and_version(entry: Internal, expected: str):
    (msg,) = check_internals({"probe": entry}, installed="9.9.9")
    assert entry.path in msg and expected in msg and entry.why in msg, msg
    assert "DeepSpeed 9.9.9" in msg and f"written for DeepSpeed {WRITTEN_FOR}" in msg, msg


def test_a_version_outside_the_range_is_refused():
    assert version_problem(WRITTEN_FOR) is None
    for other in ("0.20.0", "1.0.0", "0.19.7"):
        msg = version_problem(other)
        assert msg is not None and other in msg and WRITTEN_FOR in msg, msg


def test_every_private_internal_is_in_the_table():
    """The names the adapter's helpers touch directly are each pinned by an entry."""
    pinned = " ".join(e.path + " " + " ".join(e.reads) for e in INTERNALS.values())
    for name in (
        "_EXPERT_PARALLEL_GROUP",
        "_EXPERT_PARALLEL_GROUP_RANKS",
        "_EXPERT_DATA_PARALLEL_GROUP",
        "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
        "_configure_distributed_model",
        "has_moe_layers",
        "scaled_global_norm",
        "_lazy_init_hp_params_optimizer_state",
        "_hp_optimizer_states_linked",
        "allreduce",
        "group_name",
    ):
        assert name in pinned, name


def test_deepspeed_is_reached_only_through_the_adapter_table():
    """Training code imports DeepSpeed nowhere but in internals.py; the model knows no DeepSpeed notion."""
    adapter = PACKAGE / "optim" / "deepspeed_zero" / "internals.py"
    for sub in ("optim", "train", "parallel", "model"):
        for path in (PACKAGE / sub).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if path != adapter:
                assert "import deepspeed" not in text and "from deepspeed" not in text, path
            if sub == "model":
                assert "deepspeed" not in text.lower() and "ZeRO" not in text, path


def test_both_engines_implement_the_interface():
    methods = [n for n, v in vars(OptimizerEngine).items() if not n.startswith("_") and callable(v)]
    assert {"backward", "step", "zero_grad", "drop_step", "begin_step", "state_sharding"} <= set(methods)
    for cls in (TorchEngine, DeepSpeedZero):
        for name in [*methods, "sharded_state"]:
            assert hasattr(cls, name), (cls, name)
            if name in methods:
                want = list(inspect.signature(getattr(OptimizerEngine, name)).parameters)
                assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls, name)
        assert "self.optimizer = " in inspect.getsource(cls.__init__), cls


def test_state_sharding_bytes():
    """Replicated AdamW: fp32 weight + grad + 2 moments (+ bf16 copy); ZeRO: master + moments over the shards,
    gradients too from stage 2, nothing on the device when offloaded."""
    from torch import nn

    model = nn.Linear(10, 10, bias=False)  # 100 parameters
    c = ModelConfig()  # no stages: only the state part is counted
    for bf16, extra in ((False, 0), (True, 2)):
        assert estimate_memory(model, c, [], 0, 1, "none", bf16).state_bytes == 100 * (16 + extra)
    zero1 = StateSharding(optimizer_bytes=12, dense_shards=4, expert_shards=2, expert_params=40)
    assert estimate_memory(model, c, [], 0, 1, "none", False, zero1).state_bytes == 60 * 11 + 40 * 14
    zero2 = StateSharding(12, 4, 2, 40, grads_sharded=True)
    assert estimate_memory(model, c, [], 0, 1, "none", False, zero2).state_bytes == 60 * 8 + 40 * 12
    offloaded = StateSharding(12, 4, 2, 40, offloaded=True)
    assert estimate_memory(model, c, [], 0, 1, "none", True, offloaded).state_bytes == 100 * 10
