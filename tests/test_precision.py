"""fp32 master weights (`trainer.dtype=bf16_master`): bf16 parameters, fp32 masters, gradients accumulated,
reduced and clipped in fp32, checkpoints in fp32 that other precisions resume (optim/master.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from distributed import run_world
from moe_train.checkpoint import full_gradients
from moe_train.config import ConfigError, validate
from moe_train.optim.adamw import StoredMomentsAdamW
from moe_train.optim.engine import TorchEngine
from moe_train.optim.master import MasterWeights, precision
from moe_train.train.trainer import Trainer
from tiny_cfg import tiny_cfg

MICRO = "parallel.microbatches=2"


def test_auto_is_bf16_master_on_cuda_under_either_engine_and_fp32_on_cpu():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert precision("auto", cuda) == "bf16_master"  # either engine: under DeepSpeed ZeRO holds the masters
    assert precision("auto", cpu) == "fp32"
    assert [precision(d, cuda) for d in ("fp32", "bf16")] == ["fp32", "bf16"]


def _trainer(run_dir, *overrides: str, steps: int = 3) -> Trainer:
    return Trainer(tiny_cfg(str(run_dir), "trainer.resume=none", *overrides, steps=steps), str(run_dir))


def _with_masters(t: Trainer, dtype: torch.dtype) -> Trainer:
    """Swap `t`'s plain engine for one with fp32 masters of its parameters, cast to `dtype`."""
    old = t.engine
    t.engine = TorchEngine(t.model, t.cfg, t.mesh, t.ties, old.owned, False, MasterWeights(t.model, dtype))
    t.executor.backward_fn = t.engine.backward
    return t


def _steps(t: Trainer, n: int) -> list[dict]:
    return [t.train_step(s) for s in range(n)]


def _moments(t: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    opt = t.engine.optimizer
    return {
        name: opt.state[p]
        for g in opt.param_groups
        for name, p in zip(g["names"], g["params"], strict=True)
        if p in opt.state
    }


def _weights(t: Trainer) -> dict[str, torch.Tensor]:
    """The fp32 weights the optimizer updates: the masters, else the parameters."""
    masters = getattr(t.engine, "masters", None)
    return dict(masters.named) if masters is not None else dict(t.model.named_parameters())


def test_masters_over_fp32_parameters_reproduce_the_fp32_path_bit_for_bit(tmp_path):
    """The master machinery without the cast (separate masters, hooks, fp32 accumulation over 2
    micro-batches, clipping and AdamW on the masters, copy-back) is the plain fp32 step exactly."""
    over = ("trainer.dtype=fp32", MICRO, "optim.grad_clip=0.5")
    plain = _trainer(tmp_path / "plain", *over)
    master = _with_masters(_trainer(tmp_path / "master", *over), torch.float32)
    a, b = _steps(plain, 4), _steps(master, 4)
    assert all(r["grad_norm"] > 0.5 for r in a)  # clipping acted on every step
    assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b]
    masters = dict(master.engine.masters.named)
    for name, p in plain.model.named_parameters():
        q = dict(master.model.named_parameters())[name]
        assert torch.equal(p, q) and torch.equal(p, masters[name]), name
    assert all(masters[n] is not p for n, p in master.model.named_parameters())  # separate copies
    ma, mb = _moments(plain), _moments(master)
    assert ma.keys() == mb.keys() and ma
    for name in ma:
        assert torch.equal(ma[name]["exp_avg_sq"], mb[name]["exp_avg_sq"]), name


def test_bf16_master_trains_with_bf16_params_and_fp32_accumulation(tmp_path):
    t = _trainer(tmp_path / "bf16m", "trainer.dtype=bf16_master", MICRO)
    params = dict(t.model.named_parameters())
    routers = {n for n in params if n.endswith("mlp.gate.weight")}
    gains = {n for n in params if n.endswith("norm.weight")}  # each RMSNorm's: *_layernorm, norm, enorm…
    assert routers and all(params[n].dtype == torch.float32 for n in routers)
    assert len(gains) > 2 * len(routers) and all(params[n].dtype == torch.float32 for n in gains)
    assert all(p.dtype == torch.bfloat16 for n, p in params.items() if n not in routers | gains)
    buffers = dict(t.model.named_buffers())
    assert all(b.dtype == torch.float32 for n, b in buffers.items() if "e_score_correction_bias" in n)
    opt_params = [p for g in t.engine.optimizer.param_groups for p in g["params"]]
    assert all(p.dtype == torch.float32 for p in opt_params)
    assert not {id(p) for p in opt_params} & {id(p) for p in params.values()}
    assert t.memory.state_bytes == 18 * t.memory.params  # bf16 + master + fp32 grad + 2 moments

    # each micro-batch's (bf16) gradient, as autograd hands it to the parameter
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    handles = [p.register_hook(lambda g, n=n: seen[n].append(g.clone())) for n, p in params.items()]
    t.engine.begin_step()
    sums, _ = t.forward_backward(0)
    for h in handles:
        h.remove()
    masters = dict(t.engine.masters.named)
    bf16_sum_differs = False
    for n, grads in seen.items():
        assert len(grads) == 2, n
        assert params[n].grad is None, n  # the bf16 gradient was moved to the master
        assert masters[n].grad.dtype == torch.float32
        assert torch.equal(masters[n].grad, grads[0].float() + grads[1].float()), n
        bf16_sum_differs |= not torch.equal(masters[n].grad, (grads[0] + grads[1]).float())
    assert bf16_sum_differs  # summing in bf16 would have rounded
    full = full_gradients(t.model, t.mesh, t.engine.masters.named)  # the diagnostic view reads the masters
    assert all(torch.equal(full[n], masters[n].grad) for n in masters)
    t.engine.step(1e-3)
    t.engine.zero_grad()
    for n, p in params.items():  # one cast per optimizer step, from the updated masters
        assert torch.equal(p, masters[n].to(p.dtype)), n

    ref = _trainer(tmp_path / "fp32", "trainer.dtype=fp32", MICRO, steps=1)
    first = ref.forward_backward(0)[0]["loss"]
    assert sums["loss"] == pytest.approx(first, rel=2e-2)
    losses = [r["loss"] for r in _steps(_trainer(tmp_path / "run", "trainer.dtype=bf16_master", MICRO), 3)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[0] == pytest.approx(first, rel=2e-2)


def _ckpt(run_dir, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


@pytest.mark.parametrize("saver,loader", [("bf16_master", "fp32"), ("fp32", "bf16_master")])
def test_checkpoints_hold_fp32_weights_any_precision_resumes(tmp_path, saver, loader):
    src = tmp_path / "src"
    t = Trainer(tiny_cfg(str(src), f"trainer.dtype={saver}", "trainer.ckpt_every=2", steps=2), str(src))
    t.run()
    weights, moments = _weights(t), _moments(t)
    # fp32 values that bf16 cannot hold: a bf16 file would not give them back
    assert any(not torch.equal(w, w.bfloat16().float()) for w in weights.values())

    dst = tmp_path / "dst"
    r = Trainer(
        tiny_cfg(str(dst), f"trainer.dtype={loader}", f"trainer.resume={_ckpt(src, 2)}", steps=3), str(dst)
    )
    assert r.step == 2
    got, params = _weights(r), dict(r.model.named_parameters())
    assert got.keys() == weights.keys()
    for n, w in weights.items():
        assert torch.equal(got[n], w), n
        assert torch.equal(params[n], w.to(params[n].dtype)), n  # bf16 params re-cast from the masters
    got_m = _moments(r)
    assert got_m.keys() == moments.keys()
    for n, m in moments.items():
        assert torch.equal(got_m[n]["exp_avg"], m["exp_avg"]), n
    record = r.train_step(2)
    assert torch.isfinite(torch.tensor(record["loss"]))


# A checkpoint written by commit a938955 (before fp32 masters existed) with this model, step 2:
# `python train.py` at that commit with OLD_MODEL, data=synthetic, data.synthetic_vocab=64, data.seq_len=32,
# data.batch_size=8, trainer.max_steps=2, optim.warmup_steps=2.
OLD_CKPT = os.path.join(os.path.dirname(__file__), "data", "ckpt_a938955")
OLD_MODEL = (
    "data.synthetic_vocab=64",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.moe_intermediate_size=16",
    "model.n_routed_experts=4",
    "model.num_experts_per_tok=2",
    "model.n_group=2",
    "model.topk_group=1",
    "model.q_lora_rank=16",
    "model.kv_lora_rank=16",
    "model.num_attention_heads=2",
    "model.qk_rope_head_dim=8",
    "model.qk_nope_head_dim=8",
    "model.v_head_dim=8",
)


def test_a_checkpoint_of_the_old_commit_resumes_under_either_precision(tmp_path):
    """Its fp32 weights and moments come back under fp32 and as the masters under bf16_master, and both
    train on; a fresh model of the same seed holds other weights, so nothing was left at its init."""
    runs = {}
    for dtype in ("fp32", "bf16_master"):
        run = tmp_path / dtype
        cfg = tiny_cfg(str(run), *OLD_MODEL, f"trainer.dtype={dtype}", f"trainer.resume={OLD_CKPT}", steps=3)
        runs[dtype] = Trainer(cfg, str(run))
    fresh = _trainer(tmp_path / "fresh", *OLD_MODEL, "trainer.dtype=fp32")
    plain, master = _weights(runs["fp32"]), _weights(runs["bf16_master"])
    assert runs["fp32"].step == runs["bf16_master"].step == 2
    assert plain.keys() == master.keys() == _weights(fresh).keys()
    assert all(torch.equal(plain[n], master[n]) for n in plain)
    assert any(not torch.equal(plain[n], w) for n, w in _weights(fresh).items())
    moments = _moments(runs["bf16_master"])
    assert moments and all(int(m["step"]) == 2 for m in moments.values())
    for t in runs.values():
        assert torch.isfinite(torch.tensor(t.train_step(2)["loss"]))


def test_fp8_with_deepspeed_is_a_config_error(tmp_path):
    validate(tiny_cfg(str(tmp_path), "trainer.dtype=bf16_master", "optim.engine=deepspeed", steps=1))
    cfg = tiny_cfg(str(tmp_path), "trainer.dtype=fp8", "optim.engine=deepspeed", steps=1)
    with pytest.raises(ConfigError, match=r"trainer\.dtype='fp8'.*optim\.engine=deepspeed"):
        validate(cfg)


# ------------------------------------------------------------------------------- bf16 AdamW moments
def test_stored_moments_adamw_in_fp32_is_torch_adamw_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (4, 4)]

    def groups():
        ps = [
            torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
            for i, s in enumerate(shapes)
        ]
        return ps, [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]

    mine, mine_groups = groups()
    theirs, their_groups = groups()
    hyper = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    a = StoredMomentsAdamW(mine_groups, torch.float32, **hyper)
    b = torch.optim.AdamW(their_groups, foreach=False, **hyper)
    for step in range(5):
        for group in (a.param_groups, b.param_groups):
            for pg in group:
                pg["lr"] = 1e-2 / (step + 1)
        for p, q in zip(mine, theirs, strict=True):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(mine, theirs, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"])


def test_bf16_moments_are_stored_bf16_track_fp32_and_resume_exactly(tmp_path):
    bf16 = ("optim.moments_dtype=bf16", "trainer.dtype=bf16_master", "trainer.ckpt_every=2")
    src = tmp_path / "src"
    t = Trainer(tiny_cfg(str(src), *bf16, steps=3), str(src))
    assert t.engine.state_sharding().optimizer_bytes == 4
    t.run()
    moments = _moments(t)
    assert moments and all(
        m[k].dtype == torch.bfloat16 for m in moments.values() for k in ("exp_avg", "exp_avg_sq")
    )
    fp32 = _trainer(tmp_path / "fp32", "trainer.dtype=bf16_master", steps=3)
    losses = [r["loss"] for r in _steps(fp32, 3)]
    with open(src / "metrics.jsonl") as f:
        got = [json.loads(line)["loss"] for line in f if '"train"' in line]
    assert got[0] == losses[0]  # the first step's loss is taken before any update
    assert got[1:] == pytest.approx(losses[1:], rel=2e-3)
    assert got[1:] != losses[1:]  # the moments' rounding shows

    dst = tmp_path / "dst"
    r = Trainer(tiny_cfg(str(dst), *bf16, f"trainer.resume={_ckpt(src, 2)}", steps=3), str(dst))
    record = r.train_step(2)
    assert record["loss"] == got[2]
    after, want = _weights(r), _weights(t)
    for n, w in want.items():
        assert torch.equal(after[n], w), n


@pytest.mark.parametrize("saver,loader", [("fp32", "bf16"), ("bf16", "fp32")])
def test_moments_of_either_dtype_resume_under_the_other(tmp_path, saver, loader):
    src = tmp_path / "src"
    t = Trainer(tiny_cfg(str(src), f"optim.moments_dtype={saver}", "trainer.ckpt_every=2", steps=2), str(src))
    t.run()
    saved = _moments(t)
    dst = tmp_path / "dst"
    resume = f"trainer.resume={_ckpt(src, 2)}"
    r = Trainer(tiny_cfg(str(dst), f"optim.moments_dtype={loader}", resume, steps=3), str(dst))
    record = r.train_step(2)
    assert torch.isfinite(torch.tensor(record["loss"]))
    got = _moments(r)
    want_dtype = torch.bfloat16 if loader == "bf16" else torch.float32
    assert got.keys() == saved.keys()
    for n, m in got.items():
        assert m["exp_avg"].dtype == want_dtype, n
        assert int(m["step"]) == 3, n  # the loaded count, advanced once


# ------------------------------------------------------------------------------------------ gloo
def _run(run_dir: str, *overrides: str) -> dict:
    t = Trainer(tiny_cfg(run_dir, "trainer.dtype=bf16_master", *overrides, steps=3), run_dir)
    records = [t.train_step(s) for s in range(3)]
    weights = {n: w.detach().clone() for n, w in _weights(t).items()}
    return {"records": records, "weights": weights, "sync": t.engine.grad_sync is not None}


def _layouts(base: str) -> list[dict]:
    return [
        _run(f"{base}/dp2"),  # dp=2: the overlapped gradient reduction on the masters
        _run(f"{base}/pp2", "parallel.pp=2", MICRO),  # bf16 residual stream between stages, tied embedding
        _run(f"{base}/ep2", "parallel.ep=2"),  # bf16 rows through the all-to-all, expert masters by name
    ]


@pytest.mark.slow
def test_bf16_master_dp2_pp2_ep2_on_2_processes_match_one_process(tmp_path):
    # one thread, as in the worker processes: a CPU bf16 matmul's rounding depends on how its threads split
    # the work, and Adam turns a 1e-9 gradient difference on a near-zero element into a visible one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = _run(str(tmp_path / "ref"), MICRO)
    finally:
        torch.set_num_threads(threads)
    dp2, pp2, ep2 = run_world(2, _layouts, str(tmp_path))[0]
    assert dp2["sync"]
    # the norms after two updates: bf16 weights that differ in a last bit move tokens near a routing tie
    # (measured against one process at trainer.seed=0..2, step 3: pp=2 rel 6e-5 to 1e-3, ep=2 6e-4 to 1.6e-3)
    for got, what in ((dp2, "dp=2"), (pp2, "pp=2"), (ep2, "ep=2")):
        for a, b in zip(ref["records"], got["records"], strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (what, a["step"])
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=3e-3), (what, a["step"])
    for n, w in dp2["weights"].items():
        torch.testing.assert_close(w, ref["weights"][n], rtol=1e-4, atol=1e-6, msg=f"dp=2 {n}")
