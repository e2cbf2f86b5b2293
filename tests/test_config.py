"""Bad configs fail at start-up with an error that names the key, the value and what is allowed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moe_train.config import ConfigError, load_config, to_object, validate
from moe_train.parallel.layout import check_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_with(*overrides: str):
    return to_object(load_config(list(overrides)))


def check(cfg, world: int = 1) -> None:
    """The start-up checks of `moe_train.train.main`: the keys, then the layout."""
    validate(cfg)
    check_layout(cfg, world)


def test_default_config_is_valid():
    check(cfg_with())


@pytest.mark.parametrize(
    "overrides, key, allowed",
    [
        (
            ["model.num_experts_per_tok=20"],
            "model.num_experts_per_tok",
            "at most topk_group*experts_per_group",
        ),
        (["model.topk_group=5"], "model.topk_group", "at most n_group=4"),
        (["model.n_group=3"], "model.n_routed_experts", "divisible by n_group=3"),
        (["model.num_key_value_heads=2"], "model.num_key_value_heads", "num_attention_heads=4"),
        (["model.qk_rope_head_dim=15"], "model.qk_rope_head_dim", "even"),
        (["model.hidden_size=0"], "model.hidden_size", "positive"),
        (["model.first_k_dense_replace=9"], "model.first_k_dense_replace", "at most num_hidden_layers=4"),
        (["model.scoring_func=relu"], "model.scoring_func", "sigmoid, softmax"),
        (["data=memmap", "data.path=/nonexistent/dir"], "data.path", "an existing directory"),
        (["data.tokenizer=/nonexistent/tokenizer.json"], "data.tokenizer", "an existing tokenizer.json"),
        (["data.batch_size=-1"], "data.batch_size", "positive"),
        (["parallel.microbatches=3"], "data.batch_size", "multiple of dp*parallel.microbatches"),
        (
            ["parallel.pp=2", "parallel.schedule=dualpipe", "parallel.microbatches=3"],
            "parallel.microbatches",
            "parallel.schedule=dualpipe",
        ),
        (["parallel.ep=3"], "parallel.ep", "a divisor of model.n_routed_experts=16"),
        (["balance.mode=aux_free", "model.scoring_func=softmax"], "balance.mode", "scoring_func=sigmoid"),
        (["trainer.resume=/no/such/ckpt"], "trainer.resume", "auto, none"),
        (["optim.beta2=1.5"], "optim.beta2", "in [0, 1)"),
    ],
)
def test_cross_field_rules(overrides, key, allowed):
    with pytest.raises(ConfigError) as e:
        check(cfg_with(*overrides))
    msg = str(e.value)
    assert msg.startswith(key + "=") and allowed in msg, msg


def test_unknown_choice_of_group_or_key_is_rejected_by_hydra():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="model.n_experts"):
        load_config(["model.n_experts=8"])


def test_cli_error_is_one_message_and_nonzero_exit(tmp_path):
    """Through train.py: no traceback wall, a non-zero exit, the key named."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    bad_value = subprocess.run(
        [sys.executable, "train.py", "model.topk_group=9", f"hydra.run.dir={tmp_path}/a"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad_value.returncode == 2
    assert "model.topk_group=9" in bad_value.stderr and "Traceback" not in bad_value.stderr
    unknown_key = subprocess.run(
        [sys.executable, "train.py", "trainer.max_stepz=3", f"hydra.run.dir={tmp_path}/b"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unknown_key.returncode != 0
    assert "max_stepz" in unknown_key.stderr and "Traceback" not in unknown_key.stderr


def test_every_key_is_documented():
    import dataclasses

    from moe_train.config import TrainConfig

    doc = open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8").read()

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            name = prefix + f.name
            if dataclasses.is_dataclass(f.type) or (isinstance(f.default_factory, type)):
                sub = f.default_factory if callable(f.default_factory) else None
                if sub is not None and dataclasses.is_dataclass(sub):
                    yield from keys(sub, name + ".")
                    continue
            yield name

    # a key is documented by its full name in backticks, or as `.field` after its sibling in a shared row
    missing = [
        k for k in keys(TrainConfig) if f"`{k}`" not in doc and f"`.{k.rsplit('.', 1)[-1]}`" not in doc
    ]
    assert missing == []
