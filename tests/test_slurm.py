"""A real one-node SLURM cluster on this machine (Debian's slurmctld/slurmd/munge, run as root).

Skipped only when the daemons are missing and cannot be installed. The cluster lives in a temporary folder
and is stopped by its pid files; `SLURM_CONF` points the client commands at it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKGS = ["slurmctld", "slurmd", "slurm-client", "munge"]
pytestmark = pytest.mark.slow


def _have_slurm() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))


def _install() -> bool:
    if _have_slurm():
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PKGS]):
        if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
            return False
    return _have_slurm()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(d: str, host: str) -> str:
    cpus = os.cpu_count() or 2
    return "\n".join(
        [
            "ClusterName=moetest",
            f"SlurmctldHost={host}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={d}/slurmctld.log",
            f"SlurmdLogFile={d}/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            # SLURM holds a requeued job back for the credential lifetime plus 1 s (120 s by default), so that
            # its new launch credential is newer than the one slurmd revoked at the requeue (slurmd compares
            # whole seconds and refuses the launch otherwise). A short lifetime keeps that rule and the test
            # short; the main scheduling loop then has to look at pending jobs every second, not every 60 s.
            "AuthInfo=cred_expire=10",
            "SchedulerParameters=sched_interval=1",
            f"NodeName={host} CPUs={cpus} RealMemory=20000 State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def _stop(pidfile: str) -> None:
    try:
        pid = int(open(pidfile).read().strip())
        os.kill(pid, 15)
    except (OSError, ValueError):
        pass


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not _install():
        pytest.skip("slurmctld/slurmd/munge are not installed and apt-get could not install them")
    d = str(tmp_path_factory.mktemp("slurm"))
    host = socket.gethostname().split(".")[0]
    os.makedirs(f"{d}/state")
    os.makedirs(f"{d}/spool")
    conf = os.path.join(d, "slurm.conf")
    with open(conf, "w") as f:
        f.write(_conf(d, host))
    key = "/etc/munge/munge.key"
    if not os.path.exists(key):
        subprocess.run(["mungekey", "--create", "--keyfile", key], check=False, capture_output=True)
        if not os.path.exists(key):
            with open(key, "wb") as f:
                f.write(os.urandom(1024))
    for p in ("/var/lib/munge", "/var/log/munge", "/run/munge"):
        os.makedirs(p, exist_ok=True)
    for p in ("/etc/munge", key, "/var/lib/munge", "/var/log/munge", "/run/munge"):
        shutil.chown(p, "munge", "munge")
    os.chmod(key, 0o400)
    munge_pid = None
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:  # no munged answering yet
        munge_pid = "/run/munge/munged.pid"
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    env = dict(os.environ, SLURM_CONF=conf)
    try:
        subprocess.run(["slurmctld", "-f", conf], env=env, check=True)
        subprocess.run(["slurmd", "-f", conf], env=env, check=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if out.strip() in ("idle", "mixed"):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"SLURM node not idle: {out!r}; {open(f'{d}/slurmctld.log').read()[-2000:]}")
        yield env
    finally:
        # end every job while slurmd is still there to clean up its steps, then the daemons
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True, check=False)
        deadline = time.time() + 20
        while time.time() < deadline:
            q = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
            if q.returncode != 0 or not q.stdout.strip():
                break
            time.sleep(0.5)
        _stop(f"{d}/slurmd.pid")
        _stop(f"{d}/slurmctld.pid")
        if munge_pid:
            _stop(munge_pid)


def _losses(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


TINY = [
    "data=synthetic",
    "data.synthetic_tokens=100000",
    "data.seq_len=32",
    "data.batch_size=4",
    "trainer.max_steps=3",
    "trainer.log_every=1",
    "trainer.progress=false",
]


def test_sbatch_two_cpu_workers(slurm, tmp_path):
    env = dict(slurm, PYTHONPATH=ROOT, MOE_TRAIN_CACHE=str(tmp_path / "cache"), NPROC="2", PORT="29611")
    env["MOE_TRAIN_ROOT"] = ROOT
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    out = tmp_path / "job.out"
    res = subprocess.run(
        ["sbatch", "--wait", f"--output={out}", "launch/slurm.sbatch", *TINY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    log = out.read_text() if out.exists() else ""
    assert res.returncode == 0, res.stdout + res.stderr + log[-3000:]
    job = res.stdout.split()[-1]
    run_dir = os.path.join(ROOT, "outputs", f"slurm-{job}")
    try:
        train = [r for r in _losses(run_dir) if r["kind"] == "train"]
        assert [r["step"] for r in train] == [1, 2, 3]
        info = json.load(open(os.path.join(run_dir, "run_info.json")))
        assert info["world_size"] == 2
        assert log.count("run summary") == 1
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_hydra_sweep_through_submitit(slurm, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    env = dict(slurm, PYTHONPATH=ROOT, MOE_TRAIN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=slurm", *TINY, "optim.lr=1e-3,3e-4"]
    cmd += [f"hydra.sweep.dir={sweep}", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=5"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    lrs = []
    for sub in ("0", "1"):
        train = [r for r in _losses(sweep / sub) if r["kind"] == "train"]
        assert [r["step"] for r in train] == [1, 2, 3], sub
        lrs.append(train[0]["lr"])
    assert lrs[0] > lrs[1]
    assert list(sweep.glob(".submitit/*/*_log.out")), "the points did not run as SLURM jobs"


def _job(env: dict, job: str) -> dict[str, str]:
    """`scontrol show job` as key -> value (the first of each key)."""
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    fields: dict[str, str] = {}
    for word in out.split():
        key, _, value = word.partition("=")
        fields.setdefault(key, value)
    return fields


def test_sbatch_usr1_checkpoints_exits_75_requeues_and_resumes(slurm, tmp_path):
    """SIGUSR1 to the batch script (what `--signal=B:USR1@120` sends): every worker saves, the job step ends
    with 75 without a torchrun restart, and the script requeues the job (same id, so the same run dir). The
    requeued job resumes from that checkpoint in that run dir and runs to the end."""
    env = dict(slurm, PYTHONPATH=ROOT, MOE_TRAIN_CACHE=str(tmp_path / "cache"), NPROC="2", PORT="29612")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    steps = 30
    over = [*TINY[:-3], f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.progress=false"]
    log = tmp_path / "job.out"
    # append: the requeued run writes after the first one instead of over it
    cmd = ["sbatch", "--parsable", "--open-mode=append", f"--output={log}", "launch/slurm.sbatch", *over]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    run_dir = os.path.join(ROOT, "outputs", f"slurm-{job}")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(metrics) and len(_losses(run_dir)) >= 3):
            time.sleep(0.2)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
        while time.time() < deadline and _job(env, job).get("Restarts") != "1":
            time.sleep(0.5)
        assert _job(env, job).get("Restarts") == "1", _job(env, job)
        recs = _losses(run_dir)
        stop = [r for r in recs if r["kind"] == "preempted"]
        assert len(stop) == 1 and 3 <= stop[0]["step"] < steps, recs[-3:]
        step = stop[0]["step"]
        assert os.path.isfile(os.path.join(run_dir, "checkpoints", f"step_{step:08d}", "meta.json"))
        # SLURM itself starts the requeued job again, 11 s after the requeue (cred_expire in the fixture).
        # Starting it earlier by hand (`scontrol update StartTime=now`) is unsafe: a launch within the second
        # of the requeue carries a credential slurmd takes for revoked, and slurmctld ends the job FAILED.
        deadline = time.time() + 120
        while time.time() < deadline and log.read_text().count("job exit status") < 2:
            time.sleep(0.5)
        while time.time() < deadline and _job(env, job).get("JobState") != "COMPLETED":
            time.sleep(0.5)
        text = log.read_text()
        assert _job(env, job).get("JobState") == "COMPLETED", (_job(env, job), text[-3000:])
        ends = [line for line in text.splitlines() if line.startswith("job exit status")]
        assert ends == ["job exit status 75", "job exit status 0"], text[-3000:]
        assert "will restart worker group" not in text, text[-3000:]
        assert f"resumed from {os.path.join(run_dir, 'checkpoints', f'step_{step:08d}')}" in text, text[
            -3000:
        ]
        train = [r["step"] for r in _losses(run_dir) if r["kind"] == "train"]
        assert train == list(range(1, steps + 1)), train  # one run dir: the resumed steps follow the stop
    finally:
        subprocess.run(["scancel", job], env=env, check=False)
        shutil.rmtree(run_dir, ignore_errors=True)
