"""What a run may not lose or corrupt (docs/checkpoints.md, "What is guaranteed"): one writer per run dir,
verified commits, pruning by commit history, checksums with fallback, a writable checkpoints dir at start-up.

Real processes where a second process is the point (a second run, a requeued job); everything else in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from moe_train import checkpoint as ckpt
from moe_train.checkpoint import Checkpointer, CheckpointError, RunLease
from moe_train.checkpoint.directory import recover
from moe_train.parallel.mesh import build_mesh
from moe_train.train import main
from moe_train.train.trainer import Trainer
from tiny_cfg import tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_IDS = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    """This process is a plain run, whatever launched pytest (a CI job under SLURM)."""
    for k in LAUNCH_IDS:
        monkeypatch.delenv(k, raising=False)


def _env(tmp_path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_IDS}
    return (
        env | {"PYTHONPATH": ROOT, "MOE_TRAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"} | extra
    )


def _steps(run_dir) -> list[int]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if r["kind"] == "train"]


def _names(d) -> list[str]:
    """Committed-looking checkpoint names in `d` (not the temporary `.tmp` ones)."""
    return (
        sorted(n for n in os.listdir(d) if n.startswith("step_") and "." not in n) if os.path.isdir(d) else []
    )


# ------------------------------------------------------------------------------------- one writer


@pytest.mark.slow
def test_a_second_run_on_a_busy_run_dir_exits_2_and_the_first_is_unharmed(tmp_path, capsys):
    run_dir, steps = tmp_path / "run", 8
    cmd = [
        sys.executable,
        "train.py",
        "data=synthetic",
        "data.synthetic_tokens=20000",
        "data.seq_len=32",
        "data.batch_size=4",
        "trainer.log_every=1",
        "trainer.eval_every=1000",
        "trainer.progress=false",
        f"trainer.max_steps={steps}",
        "trainer.ckpt_every=1",
        "trainer.keep_last=3",
        f"hydra.run.dir={run_dir}",
    ]
    first = subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[1][-2000:]
    with pytest.raises(SystemExit) as e:
        main(tiny_cfg(str(run_dir), "trainer.resume=auto", steps=steps))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by another run" in err[0] and "writer.lease" in err[0], err
    assert f"pid {first.pid}" in err[0]
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-2000:]
    # the first run's records are its own, once each; its checkpoints are whole and verify
    assert _steps(run_dir) == list(range(1, steps + 1))
    names = _names(run_dir / "checkpoints")
    assert names == [f"step_{s:08d}" for s in (steps - 2, steps - 1, steps)], names
    for n in names:
        assert ckpt.verify(str(run_dir / "checkpoints" / n)) is None, n
    assert not (run_dir / "writer.lease").exists()  # released at the end


_HOLDER = """
import sys, time
from moe_train.checkpoint import RunLease
RunLease(sys.argv[1], sys.argv[2], float(sys.argv[3])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holders(tmp_path, specs: dict[str, tuple[str, float]]) -> dict[str, subprocess.Popen]:
    """A process holding a lease per run dir: {dir name: (run id, T)}, started together (imports are slow)."""
    procs = {}
    for name, (run_id, timeout_s) in specs.items():
        os.makedirs(tmp_path / name)
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(tmp_path / name), run_id, str(timeout_s)],
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            text=True,
        )
    for p in procs.values():
        assert p.stdout.readline().strip() == "held"
    return procs


@pytest.mark.slow
def test_the_same_run_takes_a_silent_lease_over_within_T_and_other_runs_exit(tmp_path):
    T = 2.0
    # an old attempt per way a run comes back (a SLURM requeue, a torchrun elastic restart); one that dies
    procs = _holders(
        tmp_path, {"slurm-77": ("slurm-77", T), "torchrun-abc": ("torchrun-abc", T), "dead": ("x", 600)}
    )
    try:
        for rid in ("slurm-77", "torchrun-abc"):
            old = procs[rid]
            old.send_signal(signal.SIGSTOP)  # alive but silent: a hung node, a job the scheduler still runs
            for other in ("slurm-78", None):
                t0 = time.monotonic()
                with pytest.raises(
                    CheckpointError, match=rf"in use by another run.*pid {old.pid}.*run {rid}"
                ):
                    RunLease(str(tmp_path / rid), other, T).acquire()
                assert time.monotonic() - t0 < 1.0  # no waiting for another run's lease
            new = RunLease(str(tmp_path / rid), rid, T)
            t0 = time.monotonic()
            new.acquire()
            waited = time.monotonic() - t0
            # it waited for the old attempt's last heartbeat to age past T, and no longer than T + a beat
            assert T * 0.5 <= waited <= T + T / 4 + 1.0, waited
            assert new.held()
            with open(tmp_path / rid / "writer.lease") as f:
                assert json.loads(f.read())["pid"] == os.getpid()
            new.release()
            assert not (tmp_path / rid / "writer.lease").exists()
        # an old attempt on this host that is gone leaves nothing to wait for, whoever comes next
        procs["dead"].kill()
        procs["dead"].wait()
        t0 = time.monotonic()
        lease = RunLease(str(tmp_path / "dead"), None, 600.0)
        lease.acquire()
        assert time.monotonic() - t0 < 1.0 and lease.held()
        lease.release()
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


@pytest.mark.slow
def test_a_refused_run_leaves_the_busy_run_dirs_hydra_record_alone(tmp_path):
    """Hydra would write `.hydra/` before the trainer takes the run dir's lease: the refused second run would
    overwrite the first run's record of its config. Rank 0 writes it once the lease is held."""
    procs = _holders(tmp_path, {"run": ("first", 600.0)})
    try:
        record = tmp_path / "run" / ".hydra"
        record.mkdir()
        (record / "config.yaml").write_text("the first run's config\n")
        cmd = [
            sys.executable,
            "train.py",
            "data=synthetic",
            "trainer.seed=7",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
        r = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "in use by another run" in r.stderr, r.stderr[-2000:]
        assert sorted(os.listdir(record)) == ["config.yaml"]
        assert (record / "config.yaml").read_text() == "the first run's config\n"
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_a_commit_needs_every_file_read_back(tmp_path):
    run_dir = str(tmp_path / "run")
    t = Trainer(tiny_cfg(run_dir, "trainer.resume=none", "trainer.async_save=true", steps=3), run_dir)
    root = os.path.join(run_dir, "checkpoints")
    t.step = 1
    t.save()
    t.checkpoints.finish()
    for step, (name, damage) in enumerate(
        [(".metadata", "delete"), ("__0_0.distcp", "truncate"), ("rng/rank0.pt", "delete")], start=2
    ):
        t.step = step
        t.save()  # async: the shards are in flight until finish() commits them
        pending = t.checkpoints._pending
        pending.future.result()
        path = os.path.join(pending.tmp, name)
        if damage == "delete":
            os.remove(path)
        else:
            os.truncate(path, os.path.getsize(path) // 2)
        with pytest.raises(CheckpointError, match=rf"step {step} not committed.*{name}: "):
            t.checkpoints.finish()
        assert _names(root) == ["step_00000001"]  # nothing committed, nothing pruned
        assert ckpt.latest_checkpoint(root).endswith("step_00000001")


# ----------------------------------------------------------------------------------------- history


def test_resuming_an_earlier_step_with_keep_last_1_supersedes_the_later_ones(tmp_path):
    run_dir = str(tmp_path / "run")
    root = os.path.join(run_dir, "checkpoints")
    Trainer(
        tiny_cfg(run_dir, "trainer.resume=none", "trainer.ckpt_every=1", "trainer.keep_last=5", steps=4),
        run_dir,
    ).run()
    assert _names(root) == [f"step_{s:08d}" for s in (1, 2, 3, 4)]
    old3 = ckpt.load_model_state(os.path.join(root, "step_00000003"))

    # roll back to step 2, change the run (another lr), keep one checkpoint
    branch = ("trainer.ckpt_every=1", "trainer.keep_last=1", "optim.lr=1e-2")
    t = Trainer(tiny_cfg(run_dir, f"trainer.resume={root}/step_00000002", *branch, steps=3), run_dir)
    assert t.step == 2
    # the old branch's later steps are moved aside at once, not reused, not deleted
    assert _names(root) == ["step_00000001", "step_00000002"]
    assert _names(os.path.join(root, "superseded")) == ["step_00000003", "step_00000004"]
    t.run()
    assert _names(root) == ["step_00000003"]  # keep_last=1 kept the newest commit: the new step 3
    assert ckpt.latest_checkpoint(root).endswith("step_00000003")
    with open(os.path.join(root, "latest")) as f:
        assert os.path.isdir(os.path.join(root, f.read().strip()))
    new3 = ckpt.load_model_state(os.path.join(root, "step_00000003"))
    want = t.model.state_dict()
    assert all(torch.equal(new3[k], want[k]) for k in want)
    assert not all(torch.equal(new3[k], old3[k]) for k in want)

    # resume=auto continues the new branch, never the stale step 4
    again = Trainer(tiny_cfg(run_dir, "trainer.resume=auto", *branch, steps=5), run_dir)
    assert again.step == 3
    assert _names(os.path.join(root, "superseded")) == ["step_00000003", "step_00000004"]


def test_a_replaced_step_survives_a_crash_inside_the_commit(tmp_path):
    root = str(tmp_path / "checkpoints")
    state = {"w": torch.ones(2)}
    ckpt.save_checkpoint(root, 5, state, None, {"step": 5}, "a: 1\n")
    ckpt.save_checkpoint(root, 5, {"w": torch.zeros(2)}, None, {"step": 5}, "a: 2\n")  # replaced whole
    assert torch.equal(ckpt.load_model_state(os.path.join(root, "step_00000005"))["w"], torch.zeros(2))
    assert _names(root) == ["step_00000005"]
    # a crash after the old copy was renamed aside and before the new one arrived: the old one comes back
    os.rename(os.path.join(root, "step_00000005"), os.path.join(root, "step_00000005.replaced"))
    recover(root)
    assert _names(root) == ["step_00000005"] and ckpt.verify(os.path.join(root, "step_00000005")) is None
    # a crash after the new one arrived: the old copy is deleted
    shutil.copytree(os.path.join(root, "step_00000005"), os.path.join(root, "step_00000005.replaced"))
    recover(root)
    assert sorted(os.listdir(root)) == ["latest", "step_00000005"]


# ----------------------------------------------------------------------------------------- checksums


def _garbage_inside(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(os.urandom(4096))


def _garbage_whole(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(os.urandom(size))


CORRUPTIONS = {
    "__0_0.distcp": ("truncated shard", lambda p: os.truncate(p, os.path.getsize(p) // 3)),
    ".metadata": ("deleted DCP metadata", os.remove),
    "trainer.pt": ("garbage trainer.pt", _garbage_whole),
    "rng/rank0.pt": ("deleted rng file", os.remove),
}


def _resume_auto(run_dir: str) -> str | None:
    """What `trainer.resume=auto` takes in `run_dir`: the trainer's own Checkpointer, without a model."""
    return Checkpointer(
        tiny_cfg(run_dir, "trainer.resume=auto", steps=4), run_dir, build_mesh(device="cpu")
    ).to_resume()


def test_corrupt_checkpoints_fall_back_to_the_newest_that_verifies(tmp_path, capsys):
    base = str(tmp_path / "base")
    Trainer(
        tiny_cfg(base, "trainer.resume=none", "trainer.ckpt_every=1", "trainer.keep_last=5", steps=3), base
    ).run()
    want2 = ckpt.load_model_state(os.path.join(base, "checkpoints", "step_00000002"))
    cases = {**CORRUPTIONS, "__0_0.distcp ": ("4 KiB of garbage inside a shard", _garbage_inside)}
    for i, (name, (what, damage)) in enumerate(cases.items()):
        run_dir = str(tmp_path / f"case{i}")
        shutil.copytree(os.path.join(base, "checkpoints"), os.path.join(run_dir, "checkpoints"))
        damage(os.path.join(run_dir, "checkpoints", "step_00000003", name.strip()))
        capsys.readouterr()
        assert _resume_auto(run_dir) == os.path.join(run_dir, "checkpoints", "step_00000002"), what
        err = capsys.readouterr().err
        assert f"skips {run_dir}/checkpoints/step_00000003: {name.strip()}: " in err, (what, err)
        assert _names(os.path.join(run_dir, "checkpoints", "superseded")) == ["step_00000003"], what
    # the trainer itself: garbage inside a shard once loaded silently; now it resumes step 2's weights
    run_dir = str(tmp_path / "two")
    shutil.copytree(os.path.join(base, "checkpoints"), os.path.join(run_dir, "checkpoints"))
    _garbage_inside(os.path.join(run_dir, "checkpoints", "step_00000003", "__0_0.distcp"))
    t = Trainer(tiny_cfg(run_dir, "trainer.resume=auto", steps=4), run_dir)
    assert t.step == 2 and all(torch.equal(v, want2[k]) for k, v in t.model.state_dict().items())
    # two bad ones: the fallback goes on to the next
    run_dir = str(tmp_path / "three")
    shutil.copytree(os.path.join(base, "checkpoints"), os.path.join(run_dir, "checkpoints"))
    capsys.readouterr()
    for step in (2, 3):
        _garbage_inside(os.path.join(run_dir, "checkpoints", f"step_{step:08d}", "__0_0.distcp"))
    assert _resume_auto(run_dir).endswith("step_00000001")
    assert capsys.readouterr().err.count("checksum mismatch") == 2
    # none verifies: an error, not a silent fresh start
    _garbage_inside(os.path.join(run_dir, "checkpoints", "step_00000001", "__0_0.distcp"))
    shutil.move(
        os.path.join(run_dir, "checkpoints", "superseded", "step_00000002"),
        os.path.join(run_dir, "checkpoints"),
    )
    with pytest.raises(
        CheckpointError,
        match=r"no checkpoint in .* verifies: step_00000001 \(__0_0.distcp: checksum.*; step_00000002 \(",
    ):
        _resume_auto(run_dir)


def test_an_explicit_resume_to_a_corrupt_checkpoint_is_one_clear_error(tmp_path, capsys):
    base = str(tmp_path / "base")
    Trainer(tiny_cfg(base, "trainer.resume=none", steps=1), base).run()
    path = os.path.join(base, "checkpoints", "step_00000001")
    _garbage_inside(os.path.join(path, "__0_0.distcp"))
    other = str(tmp_path / "other")
    with pytest.raises(SystemExit) as e:
        main(tiny_cfg(other, f"trainer.resume={path}", steps=2))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint {path} does not verify: __0_0.distcp: "), (
        err
    )
    os.remove(os.path.join(path, "trainer.pt"))
    assert ckpt.verify(path).startswith("__0_0.distcp: checksum mismatch")
    assert ckpt.verify(path).endswith("(and 1 more)")


# ---------------------------------------------------------------------------------------- start-up


def _make_unwritable(d) -> bool:
    """Make directory `d` unwritable even for root (immutable attribute); False if this machine cannot."""
    os.makedirs(d)
    if os.geteuid() != 0:
        os.chmod(d, 0o555)
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(d)]).returncode != 0:
        return False
    try:
        open(os.path.join(d, "probe"), "w").close()
    except OSError:
        return True
    os.remove(os.path.join(d, "probe"))
    return False


def test_an_unwritable_checkpoints_dir_stops_the_run_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    if not _make_unwritable(ckpts):
        pytest.skip("cannot make a directory unwritable here")
    try:
        with pytest.raises(SystemExit) as e:
            main(tiny_cfg(str(run_dir), steps=2))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"checkpoints directory {ckpts} is not writable" in err[0], err
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "run_info.json").exists()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ckpts)])
        os.chmod(ckpts, 0o755)
