"""Surviving the cluster: preemption, non-finite steps, collective timeouts (docs/launching.md)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from moe_train.parallel.dispatch import CommCounters
from moe_train.train.faults import EXIT_PREEMPTED
from moe_train.train.trainer import Trainer
from tests.distributed import run_world
from tests.test_trainer import make_cfg, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAST = (
    "data=synthetic",
    "data.synthetic_tokens=100000",
    "data.seq_len=32",
    "data.batch_size=4",
    "trainer.log_every=1",
    "trainer.eval_every=1000",
    "trainer.eval_sequences=4",
    "trainer.progress=false",
    "trainer.keep_last=10",
)


def _train_cmd(run_dir, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", *FAST, f"hydra.run.dir={run_dir}", *overrides]


def _env(tmp_path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT, MOE_TRAIN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")


def _losses(run_dir) -> dict[int, float]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


@pytest.mark.slow
def test_sigusr1_saves_exits_75_and_resume_matches_uninterrupted(tmp_path):
    steps = 12
    env = _env(tmp_path)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = subprocess.Popen(_train_cmd(ref_dir, f"trainer.max_steps={steps}"), cwd=ROOT, env=env)
    proc = subprocess.Popen(
        _train_cmd(run_dir, f"trainer.max_steps={steps}"),
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while len(_losses(run_dir)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "preempted" in err
    stopped = max(_losses(run_dir))
    assert 2 <= stopped < steps, stopped
    assert os.path.isfile(run_dir / "checkpoints" / f"step_{stopped:08d}" / "meta.json")
    recs = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert recs[-1] == {"kind": "preempted", "step": stopped, "signal": "SIGUSR1"}

    again = subprocess.run(
        _train_cmd(run_dir, f"trainer.max_steps={steps}", "trainer.resume=auto"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert ref.wait(timeout=180) == 0
    want, got = _losses(ref_dir), _losses(run_dir)
    assert sorted(got) == list(range(1, steps + 1))
    assert got == want


def _nan_at(trainer: Trainer, bad_steps: set[int]) -> None:
    """Make the all-reduced loss of the given (0-based) steps NaN, after real gradients were computed."""
    real = trainer.forward_backward

    def fake(step: int):
        sums, stats = real(step)
        if step in bad_steps:
            sums = dict(sums, loss=float("nan"))
            for p in trainer.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return sums, stats

    trainer.forward_backward = fake  # type: ignore[method-assign]


def test_skip_nonfinite_skips_the_step_and_default_stops(tmp_path):
    run = tmp_path / "skip"
    t = Trainer(make_cfg(run, "trainer.max_steps=4", "trainer.skip_nonfinite=true"), str(run))
    _nan_at(t, {1})
    t.train_step(0)
    t.step = 1
    params = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    moments = {k: {n: v.clone() for n, v in s.items()} for k, s in t.engine.optimizer.state.items()}
    rec = t.train_step(1)
    assert rec["skipped_steps"] == 1 and math.isnan(rec["loss"])
    for n, p in t.model.named_parameters():
        assert torch.equal(p, params[n]), n  # router biases are buffers or params: either way unchanged
        assert p.grad is None, n
    for k, s in t.engine.optimizer.state.items():
        for n, v in s.items():
            assert torch.equal(v, moments[k][n])
    # the run carries on and counts the skipped step
    run2 = tmp_path / "run2"
    t2 = Trainer(make_cfg(run2, "trainer.max_steps=4", "trainer.skip_nonfinite=true"), str(run2))
    _nan_at(t2, {2})
    summary = t2.run()
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1
    train = [r for r in read_metrics(run2) if r["kind"] == "train"]
    assert [r["skipped_steps"] for r in train] == [0, 0, 1, 1]
    assert math.isfinite(train[-1]["loss"])


def test_nonfinite_loss_exits_3_by_default(tmp_path):
    run = tmp_path / "run"
    res = subprocess.run(
        _train_cmd(run, "trainer.max_steps=2", "optim.lr=1e30", "optim.grad_clip=0"),
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 3, res.stderr[-2000:]
    assert "non-finite loss" in res.stderr and "skip_nonfinite" in res.stderr


def _mismatched_collective(timeout_s: float) -> str:
    """Rank 0 all-reduces, rank 1 never joins: rank 0 gives up after timeout_s naming rank and phase."""
    import torch.distributed as dist

    from moe_train.parallel.mesh import build_mesh
    from moe_train.train.faults import CollectiveError, guarded

    mesh = build_mesh(device="cpu", timeout_s=timeout_s)
    if mesh.rank == 1:
        time.sleep(timeout_s + 3)
        return ""
    t0 = time.perf_counter()
    try:
        with guarded(mesh, "gradient reduction of step 7"):
            dist.all_reduce(torch.ones(1))
    except CollectiveError as e:
        return f"{time.perf_counter() - t0:.1f}s {e}"
    return "no error"


@pytest.mark.slow
def test_hung_collective_times_out_naming_rank_and_phase():
    msg = run_world(2, _mismatched_collective, 2.0)[0]
    secs, _, text = msg.partition(" ")
    assert "rank 0 of 2" in text and "gradient reduction of step 7" in text, msg
    assert "parallel.timeout_s" in text and "Timed out" in text, msg
    assert float(secs.rstrip("s")) < 10, msg


def test_rank_overrides_share_one_run_dir():
    from moe_train.train.hydra_args import hydra_record_dir, rank_overrides

    # Hydra writes no .hydra/ itself (rank 0 does, once the run dir is its own), unless the user says where
    null = "hydra.output_subdir=null"
    assert rank_overrides([], {}) == [null]
    assert rank_overrides(["a=1"], {"RANK": "0", "TORCHELASTIC_RUN_ID": "none"}) == [null]
    assert rank_overrides(["hydra.output_subdir=cfg"], {}) == []
    assert rank_overrides([], {"RANK": "1", "TORCHELASTIC_RUN_ID": "job7"}) == [
        null,
        "hydra.run.dir=outputs/torchrun-job7",
    ]
    assert hydra_record_dir([], {}) == ".hydra" and hydra_record_dir([], {"RANK": "1"}) is None
    assert hydra_record_dir(["hydra.output_subdir=cfg"], {}) is None
    # SLURM's job id wins (stable across requeues); an explicit run dir or a sweep is left alone
    env = {"RANK": "0", "TORCHELASTIC_RUN_ID": "x", "SLURM_JOB_ID": "42"}
    assert rank_overrides([], env) == [null, "hydra.run.dir=outputs/slurm-42"]
    assert rank_overrides(["hydra.run.dir=/r"], env) == [null]
    assert rank_overrides(["-m", "optim.lr=1,2"], env) == [null]


@pytest.mark.slow  # two train.py processes
def test_local_sweep_writes_one_run_dir_per_value(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", *FAST, "trainer.max_steps=2", "optim.lr=1e-3,3e-4"]
    cmd.append(f"hydra.sweep.dir={sweep}")
    res = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lrs = []
    for sub in ("0", "1"):
        assert sorted(_losses(sweep / sub)) == [1, 2], sub
        lrs.append(next(r["lr"] for r in read_metrics(sweep / sub) if r["kind"] == "train"))
    assert lrs[0] > lrs[1]


def _torchrun(tmp_path, rdzv_id: str, *overrides: str, env_extra: dict | None = None) -> subprocess.Popen:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--max-restarts=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id={rdzv_id}",
        os.path.join(ROOT, "train.py"),
        *FAST,
        *overrides,
    ]
    # workers re-created by a restart must not read the dead attempt's addresses from the shared rendezvous
    # store (docs/launching.md): the agent then gives every attempt a fresh store
    env = dict(_env(tmp_path), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **(env_extra or {}))
    return subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_torchrun_restart_after_a_lost_worker_matches_uninterrupted(tmp_path):
    """Rank 1 dies after step 3 on the first attempt; torchrun restarts both ranks, which resume from the
    last checkpoint in the run dir named by the rendezvous id, and end on the uninterrupted run's losses."""
    common = ("trainer.max_steps=6", "trainer.ckpt_every=1", "trainer.resume=auto", "parallel.timeout_s=10")
    ref = _torchrun(tmp_path, "ref", *common)
    hurt = _torchrun(tmp_path, "hurt", *common, env_extra={"MOE_TRAIN_FAULT_EXIT": "1@3"})
    out_hurt, _ = hurt.communicate(timeout=300)
    out_ref, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out_ref[-3000:]
    assert hurt.returncode == 0, out_hurt[-3000:]
    assert "fault injection: rank 1 exits after step 3" in out_hurt
    ref_dir, run_dir = tmp_path / "outputs" / "torchrun-ref", tmp_path / "outputs" / "torchrun-hurt"
    assert "resumed from" in out_hurt
    want, got = _losses(ref_dir), _losses(run_dir)
    assert sorted(want) == list(range(1, 7))
    assert got[6] == want[6], (got, want)
    # one run dir for the launch: no per-rank or per-attempt dirs, and only rank 0 wrote .hydra/
    assert sorted(os.listdir(tmp_path / "outputs")) == ["torchrun-hurt", "torchrun-ref"]
    assert os.path.isfile(run_dir / ".hydra" / "config.yaml")


def test_nonfinite_weights_stop_the_run_and_are_never_committed(tmp_path):
    """Weights that became non-finite make every later loss non-finite: with skipping on, the run stops after
    trainer.max_consecutive_skips skipped steps in a row, and no checkpoint of such weights is committed."""
    run = tmp_path / "run"
    small = ("model.num_hidden_layers=2", "data.batch_size=4", "trainer.keep_last=5")
    Trainer(make_cfg(run, *small, "trainer.max_steps=1", "trainer.ckpt_every=1"), str(run)).run()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"

    def poisoned(*overrides: str) -> Trainer:
        t = Trainer(make_cfg(run, *small, "trainer.skip_nonfinite=true", *overrides), str(run))
        assert t.step == 1
        with torch.no_grad():
            next(iter(t.model.parameters())).fill_(float("nan"))
        return t

    # the bound: steps 2 and 3 skipped, the third non-finite step in a row stops the run
    t = poisoned("trainer.max_steps=20", "trainer.max_consecutive_skips=2")
    with pytest.raises(RuntimeError, match=r"non-finite loss on 3 steps in a row \(steps 2 to 4"):
        t.run()
    assert t.step == 3 and t.skipped_steps == 2
    # under the bound, the save refuses the weights: step 2 is never committed
    t = poisoned("trainer.max_steps=2", "trainer.ckpt_every=1")
    with pytest.raises(RuntimeError, match="non-finite weights after step 2"):
        t.run()
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000001"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"


def test_sm_carveout_is_left_alone_on_cpu(tmp_path):
    """The SM carveout steers CUDA matmuls only; on CPU the overlap engine must not set it (torch prints a
    warning for it on every process)."""
    from moe_train.parallel.mesh import build_mesh
    from moe_train.train.setup import build_data, build_stages

    cfg = make_cfg(tmp_path, "parallel.overlap=true", "parallel.overlap_sm_carveout=4", "trainer.device=cpu")
    stages = build_stages(cfg, build_mesh(device="cpu"), CommCounters(), build_data(cfg))
    assert stages.executor.engine is not None and stages.executor.engine.sm_carveout == 0


def _exit_paths(ports: list[int], run_root: str) -> dict[str, tuple[int, list[str], bool, str]]:
    """On each rank of a 2-rank world, main() through every ending; per ending: (exit status, the process
    groups in the order they were destroyed, whether a group is left, the status rank 0 recorded)."""
    import logging
    import threading

    import torch.distributed as dist

    from moe_train.config import load_config
    from moe_train.parallel.mesh import build_mesh
    from moe_train.train import main

    rank = int(os.environ["RANK"])
    destroyed: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            destroyed.append(record.getMessage().rpartition(" ")[2])

    log = logging.getLogger("moe_train.parallel.mesh")
    log.setLevel(logging.DEBUG)
    log.addHandler(Collect())
    status_file = os.path.join(run_root, "status")
    os.environ["MOE_TRAIN_STATUS_FILE"] = status_file
    base = [*FAST, "parallel.ep=2", "parallel.timeout_s=5", "trainer.device=cpu", "logger.console=false"]
    cases = {
        "normal end": ["trainer.max_steps=1"],
        "error exit": ["trainer.max_steps=1", "model.vocab_size=100"],  # below the data's 257, found in build
        "preemption": ["trainer.max_steps=200"],
        "timeout": ["trainer.max_steps=3", "parallel.timeout_s=2"],
    }
    out = {}
    for (name, overrides), port in zip(cases.items(), ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        run_dir = os.path.join(run_root, name.replace(" ", "_"))
        cfg = load_config([*base, *overrides, f"run_dir={run_dir}"])
        destroyed.clear()
        if name == "timeout" and rank == 1:  # joins the world, then never reaches a collective of training
            mesh = build_mesh(1, 2, None, "cpu", None, 2.0)
            time.sleep(6)
            mesh.close()
            continue
        if name == "preemption" and rank == 0:

            def signal_after_a_step(watched: str) -> None:
                while not _losses(watched):
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGUSR1)

            threading.Thread(target=signal_after_a_step, args=(run_dir,), daemon=True).start()
        status = 0
        try:
            main(cfg)
        except SystemExit as e:
            status = int(e.code)
        recorded = open(status_file).read().strip() if rank == 0 else ""
        out[name] = (status, list(destroyed), dist.is_initialized(), recorded)
    return out


@pytest.mark.slow
def test_every_exit_path_destroys_the_process_groups_in_order(tmp_path):
    """Normal end, error exit, preemption and collective timeout: each destroys the mesh's subgroups newest
    first and the default group last, on every rank, and rank 0 records the exit status for the scripts."""
    import socket

    ports = []
    for _ in range(4):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    ranks = run_world(2, _exit_paths, ports, str(tmp_path))
    order = ["inter_node", "intra_node", "pp", "edp", "ep", "dp", "world"]
    want = {"normal end": 0, "error exit": 2, "preemption": EXIT_PREEMPTED, "timeout": 4}
    for rank, out in enumerate(ranks):
        for name, (status, destroyed, left, recorded) in out.items():
            assert status == want[name], (rank, name, status)
            assert destroyed == order, (rank, name, destroyed)
            assert not left, (rank, name)
            assert recorded == ("" if rank else str(want[name])), (rank, name, recorded)
    assert set(ranks[0]) == set(want) and set(ranks[1]) == set(want) - {"timeout"}


def _workers(root: int) -> list[int]:
    """The training processes torchrun started below `root` (the launch script)."""
    parent, cmd = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(f.read().rpartition(")")[2].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue

    def below_root(pid: int) -> bool:
        while pid in parent and pid != root:
            pid = parent[pid]
        return pid == root

    def is_agent(line: str) -> bool:
        return any(os.path.basename(a) == "torchrun" or a == "torch.distributed.run" for a in line.split())

    agents = {p for p in cmd if below_root(p) and is_agent(cmd[p])}
    return sorted(p for p in cmd if parent.get(p) in agents and "train.py" in cmd[p])


@pytest.mark.slow
def test_torchrun_preemption_of_one_worker_ends_the_job_with_75_and_no_restart(tmp_path):
    """launch/torchrun_single_node.sh with 2 workers: SIGUSR1 to one worker stops both after the same step
    with one checkpoint; torchrun does not restart them (which would resume and train on), and the script
    exits 75, the status train.py documents for a preemption."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    env = dict(_env(tmp_path), NPROC="2", RUN_ID="preempt", PORT=str(port), MAX_RESTARTS="2")
    env["MOE_TRAIN_STATUS_FILE"] = str(tmp_path / "status")
    cmd = ["launch/torchrun_single_node.sh", *FAST, "trainer.max_steps=200", f"hydra.run.dir={run_dir}"]
    script = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 180
        while len(_losses(run_dir)) < 2 and script.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        workers = _workers(script.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGUSR1)
        out, _ = script.communicate(timeout=180)
    finally:
        if script.poll() is None:
            script.kill()
    assert script.returncode == EXIT_PREEMPTED, out[-3000:]
    recs = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    stops = [r for r in recs if r["kind"] == "preempted"]
    assert len(stops) == 1 and recs[-1] == stops[0], recs[-3:]
    step = stops[0]["step"]
    assert 2 <= step < 200
    assert max(_losses(run_dir)) == step  # nothing trained after the stop: no restarted attempt
    assert "resumed from" not in out and "will restart worker group" not in out, out[-3000:]
    assert os.path.isfile(run_dir / "checkpoints" / f"step_{step:08d}" / "meta.json")
    assert (tmp_path / "status").read_text().strip() == str(EXIT_PREEMPTED)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: room for the run's logs, not for a checkpoint (mounting needs root)."""
    where = tmp_path / "disk"
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a size-capped tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_disk_full_at_save_says_no_space_left_and_where(small_disk, capsys):
    """The save fails inside DCP (a CheckpointException wrapping torch's `unexpected pos` error): the user
    reads one line saying there is no space left on the device and which directory, and the run exits 2."""
    from moe_train.train import main

    run = small_disk / "run"
    with pytest.raises(SystemExit) as e:
        main(make_cfg(run, "trainer.max_steps=1"))
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-2000:]
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert "no space left on device" in line and str(run / "checkpoints") in line, line
    assert "saving the checkpoint of step 1" in line, line
    assert not os.path.exists(run / "checkpoints" / "latest")
