"""`optim.engine=deepspeed` (DeepSpeed ZeRO-1/2 on its CPU accelerator over gloo) against the torch engine.

The reference is the one-process torch-engine run; every DeepSpeed layout must follow its losses and gradient
norms (rel ≤ 1e-4), hold about 1/dp of the dense and 1/expert-dp of the expert Adam moments, keep DualPipe's
mirrored copies identical, and resume from checkpoints written by either engine.
"""

from __future__ import annotations

import json

import pytest
import torch

from distributed import run_world
from moe_train.config import ConfigError, validate
from moe_train.parallel.layout import check_layout
from moe_train.train.trainer import Trainer
from tiny_cfg import tiny_cfg

STEPS = 10


def make_cfg(run_dir: str, *overrides: str, steps: int = STEPS):
    # the clip is active (norms ~1.5): the global norm must be exact
    return tiny_cfg(run_dir, "optim.grad_clip=0.5", *overrides, steps=steps)


def trajectory(
    run_dir: str, *overrides: str, steps: int = STEPS, save_at: int | None = None
) -> tuple[list[tuple[float, float]], Trainer]:
    t = Trainer(make_cfg(run_dir, "trainer.resume=none", *overrides, steps=steps), run_dir)
    out = []
    for s in range(steps):
        r = t.train_step(s)
        t.step = s + 1
        out.append((r["loss"], r["grad_norm"]))
        if save_at == t.step:
            t.save()
    return out, t


def resumed(run_dir: str, source: str, *overrides: str, steps: int = 6) -> tuple[int, list]:
    """A fresh trainer resuming from `source` (a run dir: its latest checkpoint), run to `steps`."""
    t = Trainer(make_cfg(run_dir, f"trainer.resume={source}", *overrides, steps=steps), run_dir)
    start = t.step
    return start, [(r["loss"], r["grad_norm"]) for r in (t.train_step(s) for s in range(start, steps))]


def moment_bytes(t: Trainer) -> dict[str, int]:
    """Adam moment bytes this rank holds, dense vs experts, for either engine."""
    if t.engine.sharded_state is not None:
        b = t.engine.sharded_state.state_bytes()
        return {"dense": b["dense"], "expert": b["expert"]}
    from moe_train.parallel.expert import expert_param_names

    experts = expert_param_names(t.model)
    out = {"dense": 0, "expert": 0}
    for name, p in t.model.named_parameters():
        st = t.engine.optimizer.state.get(p, {})
        n = sum(v.numel() * v.element_size() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
        out["expert" if name in experts else "dense"] += n
    return out


def assert_follows(ref: list[tuple[float, float]], got: list[tuple[float, float]], what: str) -> None:
    assert len(ref) == len(got), what
    for i, ((la, na), (lb, nb)) in enumerate(zip(ref, got, strict=True)):
        assert lb == pytest.approx(la, rel=1e-4), (what, i, "loss", la, lb)
        assert nb == pytest.approx(na, rel=1e-4), (what, i, "grad_norm", na, nb)


# ------------------------------------------------------------------------------------------- config


def test_config_errors_name_the_key():
    def bad(*overrides: str, world: int = 1) -> str:
        cfg = make_cfg("/tmp/unused", "optim.engine=deepspeed", *overrides)
        with pytest.raises(ConfigError) as e:
            validate(cfg)
            check_layout(cfg, world)
        return str(e.value)

    assert "deepspeed.zero_stage=3" in bad("deepspeed.zero_stage=3")
    msg = bad("deepspeed.zero_stage=2", "parallel.pp=2", "parallel.microbatches=2", world=2)
    assert "deepspeed.zero_stage=2" in msg and "pipeline" in msg
    assert "deepspeed.offload_optimizer" in bad("deepspeed.offload_optimizer=cpu", "trainer.device=cpu")
    assert "deepspeed.offload_optimizer='nvme'" in bad("deepspeed.offload_optimizer=nvme")
    assert "deepspeed.overlap_comm" in bad("deepspeed.overlap_comm=true")
    msg = bad("+deepspeed.extra.train_batch_size=64")
    assert "deepspeed.extra.train_batch_size" in msg and "data.batch_size" in msg
    assert "trainer.skip_nonfinite" in bad("deepspeed.zero_stage=2", "trainer.skip_nonfinite=true")
    # allowed: stage 2 without pipelining, a passthrough key DeepSpeed knows
    ok = make_cfg("/tmp/unused", "optim.engine=deepspeed", "deepspeed.zero_stage=2")
    validate(ok)
    check_layout(ok, 2)


def test_generated_json_and_passthrough():
    from moe_train.optim.deepspeed_zero import build_ds_config

    cfg = make_cfg(
        "/tmp/unused",
        "optim.engine=deepspeed",
        "deepspeed.zero_stage=2",
        "deepspeed.overlap_comm=true",
        "parallel.microbatches=2",
        "+deepspeed.extra.zero_optimization.round_robin_gradients=true",
        "+deepspeed.extra.steps_per_print=7",
    )
    ds = build_ds_config(cfg.deepspeed, cfg.optim, cfg.data.batch_size, 2, 2, torch.device("cpu"))
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] is True
    assert zero["round_robin_gradients"] is True and zero["reduce_bucket_size"] == 500_000_000  # merged
    assert ds["steps_per_print"] == 7
    assert ds["gradient_clipping"] == 0.5 and ds["gradient_allreduce_op"] == "sum"
    assert ds["optimizer"]["params"]["betas"] == [cfg.optim.beta1, cfg.optim.beta2]


# ----------------------------------------------------------------------------------- one process


def _one_process(base: str) -> dict:
    """In a spawned process: DeepSpeed initialises torch.distributed, which the test process must not."""
    out: dict = {}
    out["torch"], _ = trajectory(f"{base}/torch", steps=6, save_at=3)
    out["ds1"], _ = trajectory(f"{base}/ds1", "optim.engine=deepspeed", steps=6, save_at=3)
    with open(f"{base}/ds1/deepspeed_config.json") as f:
        out["json"] = json.load(f)
    # DeepSpeed resumed from its own step-3 checkpoint in a fresh trainer; a torch-engine checkpoint too
    out["resumed_at"], out["ds_resumed"] = resumed(f"{base}/r1", f"{base}/ds1", "optim.engine=deepspeed")
    out["cross_at"], out["cross"] = resumed(f"{base}/r2", f"{base}/torch", "optim.engine=deepspeed")
    out["ds2"], _ = trajectory(f"{base}/ds2", "optim.engine=deepspeed", "deepspeed.zero_stage=2", steps=6)
    return out


@pytest.mark.slow
def test_one_process_follows_torch_and_resumes(tmp_path):
    (res,) = run_world(1, _one_process, str(tmp_path))
    assert_follows(res["torch"], res["ds1"], "zero-1, one process")
    assert_follows(res["torch"], res["ds2"], "zero-2, one process")
    assert res["json"]["zero_optimization"]["stage"] == 1
    assert res["json"]["managed_gradient_accumulation"] is False
    assert res["resumed_at"] == 3 and res["cross_at"] == 3
    assert res["ds_resumed"] == res["ds1"][3:], "resuming in the same layout and engine is exact"
    assert_follows(res["torch"][3:], res["cross"], "torch checkpoint resumed by DeepSpeed")


# ---------------------------------------------------------------------------------------- layouts

LAYOUTS = {
    "dp4_ep2_zero1": ("parallel.ep=2",),
    "dp4_ep2_zero2": ("parallel.ep=2", "deepspeed.zero_stage=2", "parallel.microbatches=2"),
    "pp2_dp2_zero1": ("parallel.pp=2", "parallel.microbatches=2"),
    # the overlap engine runs backward through the pipeline executor (pp=1: overlapped 1F1B)
    "dp4_ep2_overlap_zero1": ("parallel.ep=2", "parallel.overlap=true", "parallel.microbatches=2"),
    # stage 0 holds only the dense layer: no expert param group there, one on stage 1
    "pp2_ep2_1f1b_zero1": ("parallel.pp=2", "parallel.ep=2", "parallel.microbatches=2"),
    "pp2_ep2_dualpipe_zero1": (
        "parallel.pp=2",
        "parallel.ep=2",
        "parallel.schedule=dualpipe",
        "parallel.microbatches=4",
    ),
}


def _copies_identical(t: Trainer) -> bool:
    """Every parameter held by several pipeline ranks (DualPipe's mirrored chunks, ties) has equal values."""
    import torch.distributed as dist

    params = dict(t.model.named_parameters())
    ok = True
    for group, names in t.ties:
        for n in names:
            mine = params[n].detach().clone()
            biggest = mine.clone()
            dist.all_reduce(biggest, op=dist.ReduceOp.MAX, group=group)
            ok &= bool(torch.equal(mine, biggest))
    return ok


def _layouts(base: str, names: list[str]) -> dict:
    out = {}
    for name in names:
        overrides = LAYOUTS[name]
        torch_run, t_torch = trajectory(f"{base}/{name}_torch", *overrides, steps=1)
        got, t = trajectory(f"{base}/{name}", "optim.engine=deepspeed", *overrides)
        out[name] = {
            "traj": got,
            "ds_bytes": moment_bytes(t),
            "torch_bytes": moment_bytes(t_torch),
            "copies_identical": _copies_identical(t) if t.ties else None,
            # the start-up estimate's optimizer part (beyond fp32 weight + grad) vs ZeRO's real partitions
            "estimated_opt": t.memory.state_bytes - 8 * t.memory.params * (1 if "zero1" in name else 0),
            "measured_opt": sum(t.engine.sharded_state.state_bytes().values()),
            "n_ties": len(t.ties),
        }
        t.mesh.barrier()
    return out


@pytest.mark.slow
def test_layouts_follow_the_one_process_torch_run(tmp_path):
    ref, _ = trajectory(str(tmp_path / "ref"))
    results = run_world(4, _layouts, str(tmp_path / "w"), list(LAYOUTS))
    for name, overrides in LAYOUTS.items():
        cfg = make_cfg("/tmp/unused", *overrides)
        pp = cfg.parallel.pp
        dp = 4 // pp
        edp = dp // cfg.parallel.ep
        for rank, res in enumerate(results):
            r = res[name]
            assert_follows(ref, r["traj"], f"{name} rank {rank}")
            ds, full = r["ds_bytes"], r["torch_bytes"]
            # ZeRO pads each flat group to a multiple of dp; otherwise the moments are split exactly
            if cfg.parallel.ep > 1:
                assert ds["dense"] == pytest.approx(full["dense"] / dp, rel=0.02), (name, rank, ds, full)
                assert ds["expert"] == pytest.approx(full["expert"] / edp, rel=0.02), (name, rank, ds, full)
            else:  # experts are ordinary data-parallel parameters
                total = full["dense"] + full["expert"]
                assert ds["dense"] == pytest.approx(total / dp, rel=0.02), (name, rank, ds, full)
            if "zero1" in name:
                assert r["estimated_opt"] == pytest.approx(r["measured_opt"], rel=0.02), (name, rank, r)
        if "dualpipe" in name:
            assert all(res[name]["n_ties"] > 0 and res[name]["copies_identical"] for res in results)
