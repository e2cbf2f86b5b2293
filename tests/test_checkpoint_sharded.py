"""Sharded (DCP) checkpoints: layout-independent keys, resharding on resume, atomic commit, async save.

The reference for every resume is an uninterrupted run: steps k+1.. after resuming must give its losses —
identical in the same layout, rel ≤ 1e-4 in another layout (fp32, different reduction orders).
"""

from __future__ import annotations

import os

import pytest
import torch

from distributed import run_world
from moe_train import checkpoint as ckpt
from moe_train.checkpoint import sharded
from moe_train.train.trainer import Trainer
from tiny_cfg import tiny_cfg

STEPS, SAVE_AT = 6, 3


def make_cfg(run_dir: str, *overrides: str, steps: int = STEPS):
    return tiny_cfg(run_dir, *overrides, steps=steps)


def run(
    run_dir: str, *overrides: str, steps: int = STEPS, save_at: int | None = None
) -> tuple[list, Trainer]:
    """Losses of steps [resume point, steps) of a trainer on run_dir (resume from `trainer.resume=`)."""
    t = Trainer(make_cfg(run_dir, *overrides, steps=steps), run_dir)
    losses = []
    for s in range(t.step, steps):
        losses.append(t.train_step(s)["loss"])
        t.step = s + 1
        if save_at == t.step:
            t.save()
    t.checkpoints.finish()
    return losses, t


# ------------------------------------------------------------------------------------ one process


def test_keys_are_per_expert_and_the_whole_state_reads_back(tmp_path):
    _, t = run(str(tmp_path / "a"), "trainer.resume=none", steps=2, save_at=2)
    path = ckpt.latest_checkpoint(str(tmp_path / "a" / "checkpoints"))
    stored = sharded.stored_shapes(path)
    n_exp = t.cfg.model.n_routed_experts
    fused = t.model.state_dict()["layers.1.mlp.experts.gate_up_proj"]
    for e in (0, n_exp - 1):
        assert stored[f"model.layers.1.mlp.experts.{e}.gate_up_proj"] == tuple(fused.shape[1:])
        assert f"optim.layers.1.mlp.experts.{e}.gate_up_proj.exp_avg" in stored
    assert "model.layers.1.mlp.experts.gate_up_proj" not in stored
    assert "optim.layers.1.mlp.experts.gate_up_proj.step" in stored
    back = ckpt.load_model_state(path)
    want = t.model.state_dict()
    assert set(back) == set(want)
    for k, v in want.items():
        assert torch.equal(back[k], v), k


def test_same_layout_resume_is_identical_and_async_save_commits(tmp_path):
    ref, _ = run(str(tmp_path / "ref"), "trainer.resume=none")
    first, _ = run(str(tmp_path / "a"), "trainer.resume=none", "trainer.async_save=true", save_at=SAVE_AT)
    assert first == ref
    # the step-6 save was never asked for; the step-3 one is committed (async, at the end of the run)
    assert ckpt.latest_checkpoint(str(tmp_path / "a" / "checkpoints")).endswith("step_00000003")
    again, t = run(str(tmp_path / "a"), "trainer.resume=auto")
    assert t.cfg.trainer.resume == "auto" and again == ref[SAVE_AT:]


def test_incompatible_model_config_names_the_keys(tmp_path):
    run(str(tmp_path / "a"), "trainer.resume=none", steps=1, save_at=1)
    with pytest.raises(
        ValueError, match=r"does not fit this model config.*shape mismatch.*model\.embed_tokens"
    ):
        Trainer(
            make_cfg(str(tmp_path / "a"), "trainer.resume=auto", "model.hidden_size=64"), str(tmp_path / "a")
        )
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.2\."):
        Trainer(
            make_cfg(str(tmp_path / "a"), "trainer.resume=auto", "model.num_hidden_layers=3"),
            str(tmp_path / "a"),
        )


def _train_with_saves(run_dir: str, steps: int) -> None:
    t = Trainer(make_cfg(run_dir, "trainer.resume=none", "trainer.ckpt_every=2", steps=steps), run_dir)
    t.run()


@pytest.mark.slow  # a multi-process crash and restart (the fast tier keeps the single-process safety tests)
def test_a_crash_between_shard_write_and_commit_leaves_the_previous_checkpoint(tmp_path):
    root = str(tmp_path / "r")
    import torch.multiprocessing as mp

    with pytest.raises(mp.ProcessExitedException):  # every rank exits (os._exit) after step 4's shards
        run_world(2, _train_with_saves, root, 4, env={sharded.FAULT_ENV: "4"})
    names = sorted(os.listdir(os.path.join(root, "checkpoints")))
    assert "step_00000004.tmp" in names and "step_00000004" not in names, names
    assert ckpt.latest_checkpoint(os.path.join(root, "checkpoints")).endswith("step_00000002")
    # resume=auto takes step 2 and continues like the uninterrupted run
    ref, _ = run(str(tmp_path / "ref"), "trainer.resume=none", steps=4)
    got, t = run(root, "trainer.resume=auto", steps=4)
    assert got == pytest.approx(ref[2:], rel=1e-4)
    # the next save clears the crashed one's leftovers
    t.save()
    assert not [n for n in os.listdir(os.path.join(root, "checkpoints")) if n.endswith(".tmp")]


def test_hf_export_and_generation_from_a_sharded_checkpoint(tmp_path):
    from moe_train.hf import from_pretrained
    from moe_train.hf.cli import export_checkpoint
    from moe_train.infer import load_for_inference

    _, t = run(str(tmp_path / "a"), "trainer.resume=none", steps=1, save_at=1)
    want = t.model.state_dict()
    export_checkpoint(str(tmp_path / "a"), str(tmp_path / "hf"))
    for k, v in from_pretrained(str(tmp_path / "hf")).state_dict().items():
        assert torch.equal(v, want[k]), k
    loaded = load_for_inference(str(tmp_path / "a"))  # the run dir: its latest, sharded
    got = loaded.model.state_dict()
    assert got and all(torch.equal(v, want[k]) for k, v in got.items())


# ---------------------------------------------------------------------------------------- layouts

SAVED_UNDER = ("parallel.pp=2", "parallel.ep=2", "parallel.microbatches=2")
RESUMED_UNDER = {
    "ep4": ("parallel.ep=4",),
    "pp1_dp4": (),
    "same": SAVED_UNDER,
}


def _world(base: str, hf_dir: str) -> dict:
    out: dict = {}
    # torch engine: save at step 3 under pp=2·ep=2; resume in every other layout of this world
    out["uninterrupted_same"], _ = run(f"{base}/same_ref", "trainer.resume=none", *SAVED_UNDER)
    run(f"{base}/saved", "trainer.resume=none", *SAVED_UNDER, steps=SAVE_AT, save_at=SAVE_AT)
    for name, layout in RESUMED_UNDER.items():
        out[name], t = run(f"{base}/{name}", f"trainer.resume={base}/saved", *layout)
        out[f"{name}_start"] = t.step - len(out[name])
    # DeepSpeed ZeRO-1: the same, saved under pp=2·ep=2 and resumed under ep=4
    ds = ("optim.engine=deepspeed",)
    run(f"{base}/ds_saved", "trainer.resume=none", *ds, *SAVED_UNDER, steps=SAVE_AT, save_at=SAVE_AT)
    out["ds_ep4"], _ = run(f"{base}/ds_ep4", f"trainer.resume={base}/ds_saved", *ds, "parallel.ep=4")
    # HF weights straight into a pp=2·ep=2 layout: every rank reads only its tensors
    from moe_train.checkpoint import full_state

    t = Trainer(
        make_cfg(f"{base}/hf", "trainer.resume=none", f"model.init_from={hf_dir}", *SAVED_UNDER), f"{base}/hf"
    )
    model_sd, _ = full_state(t.model, t.engine.optimizer, t.mesh)
    out["hf_state"] = model_sd if t.mesh.is_logging_rank else None
    return out


@pytest.mark.slow
def test_resume_under_other_layouts_engines_and_one_process(tmp_path):
    from moe_train.hf import from_pretrained, save_pretrained
    from moe_train.model import build_model

    ref, _ = run(str(tmp_path / "ref"), "trainer.resume=none")
    mcfg = make_cfg(str(tmp_path / "x")).model
    mcfg.vocab_size = 257
    save_pretrained(build_model(mcfg, seed=77), str(tmp_path / "hf_dir"))
    results = run_world(4, _world, str(tmp_path / "w"), str(tmp_path / "hf_dir"))
    r = results[0]
    for name in RESUMED_UNDER:
        assert r[f"{name}_start"] == SAVE_AT, name
    assert r["same"] == r["uninterrupted_same"][SAVE_AT:], "same layout: identical"
    for name in ("ep4", "pp1_dp4", "ds_ep4"):
        assert r[name] == pytest.approx(ref[SAVE_AT:], rel=1e-4), name
    # ... and in one process, from the pp=2·ep=2 checkpoint
    one, t = run(str(tmp_path / "one"), f"trainer.resume={tmp_path}/w/saved")
    assert t.step == STEPS and one == pytest.approx(ref[SAVE_AT:], rel=1e-4)
    # a sharded HF load equals the one-process HF load
    want = from_pretrained(str(tmp_path / "hf_dir")).state_dict()
    got = r["hf_state"]
    assert set(got) >= set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
