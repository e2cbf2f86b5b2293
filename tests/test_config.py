"""Bad input fails with one line that names the key or the file, and a non-zero exit status.

Configs fail at start-up with an error that names the key, the value and what is allowed. BAD_INPUTS is the
table of what a user sees for each bad input — config keys, Hydra overrides, corpora, tokenizers,
checkpoints — run through train.py in this process (a subprocess per row would cost seconds each).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys

import numpy as np
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
        (["optim.lr=nan"], "optim.lr", "a finite number"),
        (["parallel.timeout_s=nan"], "parallel.timeout_s", "a finite number"),
        (["trainer.mtp_weight_switch_frac=2"], "trainer.mtp_weight_switch_frac", "between 0 and 1"),
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


@pytest.mark.slow  # train.py in subprocesses
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
    assert unknown_key.returncode == 2  # Hydra's own errors are bad input too (docs/launching.md)
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


# ------------------------------------------------------------------------------------ the bad-input table
# (id, train.py arguments, exit status, what the message says). `{name}` is a file or directory the
# `bad_files` fixture made. Every row also runs with BASE and its own hydra.run.dir.
BAD_INPUTS: list[tuple[str, list[str], int, str]] = [
    # Hydra: unknown keys, types, groups, syntax
    ("unknown key", ["trainer.max_stepz=3"], 2, "Key 'max_stepz' not in 'TrainerConfig'"),
    ("unknown section", ["optimizer.lr=1"], 2, "Key 'optimizer' not in 'TrainConfig'"),
    (
        "not an int",
        ["trainer.max_steps=abc"],
        2,
        "Value 'abc' of type 'str' could not be converted to Integer",
    ),
    ("float for an int", ["parallel.pp=1.5"], 2, "could not be converted to Integer"),
    ("not a bool", ["trainer.skip_nonfinite=maybe"], 2, "Value 'maybe' is not a valid bool"),
    ("not a float", ["optim.lr=fast"], 2, "could not be converted to Float"),
    ("unknown data group", ["data=nope"], 2, "Could not find 'data/nope'"),
    ("unknown model group", ["model=huge"], 2, "Could not find 'model/huge'"),
    ("override without =", ["optim.lr"], 2, "Error parsing override 'optim.lr'"),
    # NaN and infinity
    ("lr nan", ["optim.lr=nan"], 2, "optim.lr=nan is not allowed: a finite number"),
    ("lr inf", ["optim.lr=inf"], 2, "optim.lr=inf is not allowed: a finite number"),
    ("timeout nan", ["parallel.timeout_s=nan"], 2, "parallel.timeout_s=nan is not allowed: a finite number"),
    ("timeout -inf", ["parallel.timeout_s=-inf"], 2, "parallel.timeout_s=-inf is not allowed: a finite"),
    ("eps nan", ["optim.eps=nan"], 2, "optim.eps=nan is not allowed"),
    ("beta2 nan", ["optim.beta2=nan"], 2, "optim.beta2=nan is not allowed"),
    ("grad_clip inf", ["optim.grad_clip=inf"], 2, "optim.grad_clip=inf is not allowed"),
    ("rope_theta nan", ["model.rope_theta=nan"], 2, "model.rope_theta=nan is not allowed"),
    ("alpha nan", ["balance.seq_aux_alpha=nan"], 2, "balance.seq_aux_alpha=nan is not allowed"),
    ("peak_tflops inf", ["trainer.peak_tflops=inf"], 2, "trainer.peak_tflops=inf is not allowed"),
    ("mtp weight nan", ["trainer.mtp_weight=nan"], 2, "trainer.mtp_weight=nan is not allowed"),
    # ranges and choices
    ("lr zero", ["optim.lr=0"], 2, "optim.lr=0.0 is not allowed: must be a positive number"),
    ("lr negative", ["optim.lr=-1e-3"], 2, "optim.lr=-0.001 is not allowed: must be a positive number"),
    (
        "timeout zero",
        ["parallel.timeout_s=0"],
        2,
        "parallel.timeout_s=0.0 is not allowed: must be a positive",
    ),
    ("beta1 one", ["optim.beta1=1.0"], 2, "optim.beta1=1.0 is not allowed: in [0, 1)"),
    ("min_lr_ratio", ["optim.min_lr_ratio=2"], 2, "optim.min_lr_ratio=2.0 is not allowed: between 0 and 1"),
    ("weight decay", ["optim.weight_decay=-0.1"], 2, "optim.weight_decay=-0.1 is not allowed: >= 0"),
    ("warmup", ["optim.warmup_steps=-1"], 2, "optim.warmup_steps=-1 is not allowed: >= 0"),
    ("decay", ["optim.decay=linear"], 2, "optim.decay='linear' is not allowed: one of cosine, constant"),
    ("engine", ["optim.engine=adam"], 2, "optim.engine='adam' is not allowed: one of torch, deepspeed"),
    ("balance mode", ["balance.mode=magic"], 2, "balance.mode='magic' is not allowed: one of aux_free"),
    ("bias rate", ["balance.bias_update_rate=-1"], 2, "balance.bias_update_rate=-1.0 is not allowed: >= 0"),
    (
        "bias stop",
        ["balance.bias_update_stop_frac=1.5"],
        2,
        "balance.bias_update_stop_frac=1.5 is not allowed",
    ),
    (
        "mtp switch > 1",
        ["trainer.mtp_weight_switch_frac=1.5"],
        2,
        "trainer.mtp_weight_switch_frac=1.5 is not",
    ),
    ("mtp switch < 0", ["trainer.mtp_weight_switch_frac=-0.1"], 2, "trainer.mtp_weight_switch_frac=-0.1 is"),
    ("mtp switch nan", ["trainer.mtp_weight_switch_frac=nan"], 2, "trainer.mtp_weight_switch_frac=nan is"),
    (
        "skip bound",
        ["trainer.max_consecutive_skips=0"],
        2,
        "trainer.max_consecutive_skips=0 is not allowed: >= 1",
    ),
    ("max_steps", ["trainer.max_steps=0"], 2, "trainer.max_steps=0 is not allowed: must be a positive"),
    ("log_every", ["trainer.log_every=0"], 2, "trainer.log_every=0 is not allowed"),
    ("keep_last", ["trainer.keep_last=0"], 2, "trainer.keep_last=0 is not allowed: >= 1"),
    ("ckpt_every", ["trainer.ckpt_every=-1"], 2, "trainer.ckpt_every=-1 is not allowed: >= 0"),
    ("device", ["trainer.device=tpu"], 2, "trainer.device='tpu' is not allowed: one of auto, cpu, cuda"),
    ("dtype", ["trainer.dtype=fp16"], 2, "trainer.dtype='fp16' is not allowed: one of auto, fp32, bf16"),
    ("recompute", ["trainer.recompute=some"], 2, "trainer.recompute='some' is not allowed"),
    ("mtp weight", ["trainer.mtp_weight=-1"], 2, "trainer.mtp_weight=(-1.0, 0.1) is not allowed: >= 0"),
    ("seq_len", ["data.seq_len=0"], 2, "data.seq_len=0 is not allowed: must be a positive number"),
    ("seq_len > positions", ["data.seq_len=8192"], 2, "at most model.max_position_embeddings=4096"),
    ("val_fraction", ["data.val_fraction=0.7"], 2, "data.val_fraction=0.7 is not allowed: between 0 and 0.5"),
    ("synthetic vocab", ["data.synthetic_vocab=0"], 2, "data.synthetic_vocab=0 is not allowed"),
    (
        "reset positions without masks",
        ["data.document_mask=false", "data.reset_positions=true"],
        2,
        "data.reset_positions=True is not allowed: false or null when data.document_mask=false",
    ),
    ("hidden size", ["model.hidden_size=-8"], 2, "model.hidden_size=-8 is not allowed: must be a positive"),
    ("rms eps", ["model.rms_norm_eps=0"], 2, "model.rms_norm_eps=0.0 is not allowed"),
    ("vocab zero", ["model.vocab_size=0"], 2, "model.vocab_size=0 is not allowed"),
    ("vocab < data", ["model.vocab_size=100"], 2, "model.vocab_size=100 is smaller than the tokenizer's"),
    ("attention bias", ["model.attention_bias=true"], 2, "model.attention_bias=True is not allowed"),
    ("activation", ["model.hidden_act=gelu"], 2, "model.hidden_act='gelu' is not allowed: one of silu"),
    ("topk_group", ["model.topk_group=9"], 2, "model.topk_group=9 is not allowed: at most n_group=4"),
    ("pp zero", ["parallel.pp=0"], 2, "parallel.pp=0 is not allowed: must be a positive number"),
    ("pp > world", ["parallel.pp=2"], 2, "parallel.pp"),
    ("ep not a divisor", ["parallel.ep=3"], 2, "parallel.ep=3 is not allowed: a divisor of"),
    ("carveout", ["parallel.overlap_sm_carveout=-1"], 2, "parallel.overlap_sm_carveout=-1 is not allowed"),
    ("gpus_per_node", ["parallel.gpus_per_node=0"], 2, "parallel.gpus_per_node=0 is not allowed"),
    ("schedule", ["parallel.schedule=gpipe"], 2, "parallel.schedule='gpipe'"),
    ("dispatcher", ["parallel.dispatcher=magic"], 2, "parallel.dispatcher='magic'"),
    (
        "bound without bounded",
        ["parallel.dispatch_bound=2"],
        2,
        "parallel.dispatch_bound=2.0 is not allowed: null unless parallel.dispatcher=bounded",
    ),
    (
        "transport",
        ["parallel.dispatch_transport=ibgda"],
        2,
        "parallel.dispatch_transport='ibgda' is not allowed: one of alltoall, collective, peer_write, "
        "nvshmem",
    ),
    (
        "transport without bounded",
        ["parallel.dispatch_transport=nvshmem"],
        2,
        "parallel.dispatch_transport='nvshmem' is not allowed: alltoall unless parallel.dispatcher is one of "
        "bounded, hierarchical_bounded, direct",
    ),
    (
        "nvshmem with direct",
        ["parallel.dispatcher=direct", "parallel.dispatch_transport=nvshmem"],
        2,
        "parallel.dispatch_transport='nvshmem' is not allowed: one of alltoall, peer_write, collective with "
        "parallel.dispatcher=direct",
    ),
    (
        "peer_write with direct on cpu",
        ["parallel.dispatcher=direct", "parallel.dispatch_transport=peer_write"],
        2,
        "parallel.dispatch_transport=peer_write is not allowed here: symmetric memory needs CUDA",
    ),
    (
        "nvshmem on cpu",
        ["parallel.dispatcher=bounded", "parallel.dispatch_transport=nvshmem"],
        2,
        "parallel.dispatch_transport=nvshmem is not allowed here: symmetric memory needs CUDA",
    ),
    (
        "peer_write on cpu",
        ["parallel.dispatcher=hierarchical_bounded", "parallel.dispatch_transport=peer_write"],
        2,
        "parallel.dispatch_transport=peer_write is not allowed here: symmetric memory needs CUDA",
    ),
    (
        "bound zero",
        ["parallel.dispatcher=bounded", "parallel.dispatch_bound=0"],
        2,
        "parallel.dispatch_bound=0.0 is not allowed: a number > 0",
    ),
    ("microbatches", ["data.batch_size=4", "parallel.microbatches=3"], 2, "data.batch_size=4"),
    (
        "zero stage 3",
        ["optim.engine=deepspeed", "deepspeed.zero_stage=3"],
        2,
        "deepspeed.zero_stage=3 is not",
    ),
    # files: corpora, tokenizers, checkpoints
    ("memmap without path", ["data=memmap"], 2, "data.path=None is not allowed"),
    ("memmap dir missing", ["data=memmap", "data.path=/no/such/dir"], 2, "data.path='/no/such/dir' is not"),
    ("memmap no meta", ["data=memmap", "data.path={no_meta}"], 2, "meta.json not found"),
    ("memmap meta not json", ["data=memmap", "data.path={meta_not_json}"], 2, "meta.json is malformed"),
    (
        "memmap meta key",
        ["data=memmap", "data.path={meta_no_vocab}"],
        2,
        "it needs dtype, vocab_size, eod_id",
    ),
    ("memmap dtype", ["data=memmap", "data.path={float_dtype}"], 2, "has dtype='float32'; expected uint16"),
    ("memmap eod", ["data=memmap", "data.path={eod_outside}"], 2, "has eod_id=70 outside vocab_size=64"),
    (
        "memmap odd bytes",
        ["data=memmap", "data.path={odd_bytes}"],
        2,
        "train.bin has 8001 bytes, not a positive",
    ),
    ("memmap id >= vocab", ["data=memmap", "data.path={ids_over_vocab}"], 2, "train.bin holds token id 99"),
    ("memmap short", ["data=memmap", "data.path={short_train}"], 2, "train.bin holds 2000 tokens but"),
    ("mixture empty", ["data=mixture"], 2, "data.mixture=[] is not allowed"),
    (
        "mixture weight",
        ["data=mixture", "data.mixture=[{{name:a,path:'/x',weight:-1}}]"],
        2,
        "data.mixture[0].weight=-1 is not allowed",
    ),
    (
        "mixture vocab",
        [
            "data=mixture",
            "data.mixture=[{{name:a,path:'{mix_a}',weight:1}},{{name:b,path:'{mix_b}',weight:1}}]",
        ],
        2,
        "data.mixture[1] (b) has vocab_size=65 but data.mixture[0] (a) has 64",
    ),
    ("tokenizer missing", ["data.tokenizer=/no/tok.json"], 2, "data.tokenizer='/no/tok.json' is not allowed"),
    (
        "tokenizer not json",
        ["data=stdlib", "data.tokenizer={tok_not_json}"],
        2,
        "tokenizer.json is not a valid",
    ),
    ("resume missing", ["trainer.resume=/no/ckpt"], 2, "trainer.resume='/no/ckpt' is not allowed"),
    ("resume empty dir", ["trainer.resume={empty_dir}"], 2, "no complete checkpoint at"),
    ("ckpt meta not json", ["trainer.resume={ckpt_meta_not_json}"], 2, "meta.json is not valid JSON"),
    ("ckpt trainer.pt", ["trainer.resume={ckpt_garbage_state}"], 2, "does not verify: trainer.pt"),
    # what the first steps find
    (
        "loss overflows",
        ["optim.lr=1e30", "optim.grad_clip=0", "trainer.max_steps=3"],
        3,
        "non-finite loss nan",
    ),
]

BASE = [
    "data=synthetic",
    "data.synthetic_tokens=20000",
    "data.seq_len=32",
    "data.batch_size=8",
    "model.num_hidden_layers=2",
    "trainer.max_steps=1",
    "trainer.eval_every=1000",
    "trainer.eval_sequences=8",
    "trainer.progress=false",
    "logger.console=false",
]


# Hydra's own logging set-up and .hydra/ files cost a third of a row's time and say nothing about the input
LEAN = ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


def _memmap(d, meta: dict | str | None, n_train: int = 4000, top: int = 60, dtype=np.uint16) -> str:
    os.makedirs(d)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", 400)):
        rng.integers(0, top, size=n).astype(dtype).tofile(os.path.join(d, f"{split}.bin"))
    if meta is not None:
        with open(os.path.join(d, "meta.json"), "w") as f:
            f.write(meta if isinstance(meta, str) else json.dumps(meta))
    return str(d)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    from moe_train.train.trainer import Trainer
    from tests.tiny_cfg import tiny_cfg

    root = tmp_path_factory.mktemp("bad")
    meta = {"dtype": "uint16", "vocab_size": 64, "eod_id": 63}
    files = {
        "no_meta": _memmap(root / "no_meta", None),
        "meta_not_json": _memmap(root / "meta_not_json", "{dtype: uint16"),
        "meta_no_vocab": _memmap(root / "meta_no_vocab", {"dtype": "uint16", "eod_id": 1}),
        "float_dtype": _memmap(root / "float_dtype", {**meta, "dtype": "float32"}),
        "eod_outside": _memmap(root / "eod_outside", {**meta, "eod_id": 70}),
        "ids_over_vocab": _memmap(root / "ids_over_vocab", meta, top=100),
        "short_train": _memmap(root / "short_train", {**meta, "n_train_tokens": 4000}, n_train=2000),
        "empty_dir": str(root / "empty"),
        "mix_a": _memmap(root / "mix_a", meta),
        "mix_b": _memmap(root / "mix_b", {**meta, "vocab_size": 65}),
    }
    files["odd_bytes"] = _memmap(root / "odd_bytes", meta)
    with open(os.path.join(files["odd_bytes"], "train.bin"), "ab") as f:
        f.write(b"x")
    os.makedirs(files["empty_dir"])
    files["tok_not_json"] = str(root / "tokenizer.json")
    with open(files["tok_not_json"], "w") as f:
        f.write('{"version": "1.0", "model": ')
    run = str(root / "run")  # one real checkpoint, then damaged copies
    Trainer(tiny_cfg(run, *BASE[4:6], steps=1), run).run()
    good = os.path.join(run, "checkpoints", "step_00000001")
    for name, damaged, text in (
        ("ckpt_meta_not_json", "meta.json", '{"step": 1, "format"'),
        ("ckpt_garbage_state", "trainer.pt", "garbage, not a pickle"),
    ):
        files[name] = str(root / name)
        shutil.copytree(good, files[name])
        with open(os.path.join(files[name], damaged), "w") as f:
            f.write(text)
    return files


def _user_sees(args: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of `python train.py ARGS`, run in this process."""
    argv, err = sys.argv, io.StringIO()
    sys.argv = ["train.py", *args]
    status = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    except SystemExit as e:
        status = int(e.code or 0)
    finally:
        sys.argv = argv
    return status, err.getvalue()


def test_bad_input_table_has_50_inputs():
    assert len(BAD_INPUTS) >= 50 and len({row[0] for row in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("name, args, status, says", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_gets_one_clear_line(name, args, status, says, bad_files, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_TRAIN_CACHE", str(tmp_path / "cache"))
    args = [a.format(**bad_files) for a in args]
    got, err = _user_sees([*BASE, *args, *LEAN, f"hydra.run.dir={tmp_path / 'run'}"])
    assert got == status, err[-3000:]
    assert says in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
