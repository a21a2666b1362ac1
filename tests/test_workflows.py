"""Workflow files and cluster start-up: every ``workflows/*.toml`` loads and keeps the invariants
(one number for cores and threads, one worker process per job, dashboard on loopback, the GPU
workflow advertises its GPU); contradictory or nonsense settings are refused with the key named;
a failing ``sbatch`` fails fast with its own message and leaves no scheduler or job behind."""

from __future__ import annotations

import logging
import os
import re
import stat
import sys
import time
from pathlib import Path

import pytest
from slurm_local import LocalSlurm, slurm_available

from pipeline.cluster import (
    ClusterStartError,
    SchedulerConfig,
    _jobqueue_kwargs,
    binds_all_interfaces,
    load_workflow,
    start_client,
)
from pipeline.config import RunConfig, config_from_dict

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.toml"))
OFFLINE = {"host": "127.0.0.1"}  # the scheduler on loopback: no network needed


def test_there_are_workflows_of_every_kind():
    kinds = {load_workflow(p)[0].kind for p in WORKFLOWS}
    assert {"local", "slurm", "pbs"} <= kinds, [p.name for p in WORKFLOWS]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_and_keeps_the_invariants(path):
    sched, run_table = load_workflow(path)
    run = config_from_dict(RunConfig, run_table, where=f"{path} [run]")
    assert not binds_all_interfaces(sched.dashboard_address), f"{path.name}: dashboard on every interface"
    assert sched.gpus_per_worker == (1 if run.device == "gpu" else 0), path.name
    # each task single-threaded: a worker's threads_per_worker tasks fill as many cores, no more
    assert run.torch_threads == 1, f"{path.name}: torch_threads {run.torch_threads}"
    if sched.kind not in ("slurm", "pbs"):
        return
    from dask.utils import parse_bytes

    kwargs = _jobqueue_kwargs(sched)
    t = sched.threads_per_worker
    assert kwargs["cores"] == t and kwargs["processes"] == 1
    assert sched.cluster.get("cores", t) == t
    assert parse_bytes(kwargs["memory"]) / t >= 2e9, f"{path.name}: under 2 GB per task in flight"
    assert sched.worker_timeout_s > 0  # batch workflows give up on a job that never starts

    # the job script dask-jobqueue really writes: cores reserved == worker threads, GPU advertised
    import dask_jobqueue

    cls = dask_jobqueue.SLURMCluster if sched.kind == "slurm" else dask_jobqueue.PBSCluster
    kwargs.pop("interface", None)
    kwargs["scheduler_options"] = dict(kwargs["scheduler_options"], dashboard_address="localhost:0", **OFFLINE)
    with cls(**kwargs) as cluster:
        script = cluster.job_script()
    assert f"--nthreads {t} " in script, script
    assert ("--cpus-per-task=%d" % t if sched.kind == "slurm" else "ncpus=%d" % t) in script, script
    if run.device == "gpu":
        assert "--resources GPU=1" in script
        gpu_requests = [d for d in sched.cluster.get("job_extra_directives", []) if "gpu" in d.lower()]
        assert gpu_requests and all(d.rstrip().endswith("1") for d in gpu_requests), gpu_requests
    else:
        assert "GPU=" not in script


def test_the_gpu_workflow_runs_subtract_and_score_on_one_gpu():
    gpu = [p for p in WORKFLOWS if config_from_dict(RunConfig, load_workflow(p)[1]).device == "gpu"]
    assert "slurm-gpu.toml" in [p.name for p in gpu]
    for path in gpu:
        sched, _ = load_workflow(path)
        assert sched.gpus_per_worker == 1 and sched.threads_per_worker > 1, path.name  # CPU stages overlap GPU ones


def _workflow(tmp_path, scheduler: str, cluster: str = "") -> Path:
    path = tmp_path / "site.toml"
    path.write_text(f"[scheduler]\nkind = \"slurm\"\n{scheduler}\n[scheduler.cluster]\n{cluster}\n")
    return path


@pytest.mark.parametrize("scheduler, cluster, words", [
    ("threads_per_worker = 2", "cores = 8", ["[scheduler.cluster] cores = 8", "[scheduler] threads_per_worker = 2"]),
    ("threads_per_worker = 4", "processes = 2", ["[scheduler.cluster] processes = 2"]),
    ("threads_per_worker = 4", 'resource_spec = "select=1:ncpus=8:mem=16GB"',
     ["resource_spec", "ncpus=8", "threads_per_worker = 4"]),
    ("threads_per_worker = 4", 'memory = "lots"', ["[scheduler.cluster] memory", "lots"]),
    ("threads_per_worker = 4", 'security = "yes"', ["[scheduler.cluster] security"]),
    ("threads_per_worker = 4", 'scheduler_options = { dashboard_address = ":8787" }',
     ["[scheduler] dashboard_address"]),
    ("worker_timeout_s = -5", "", ["worker_timeout_s", "-5"]),
    ("jobs = 2\nworkers = 3", "", ["jobs", "workers"]),
])
def test_contradictory_workflow_is_refused_naming_file_and_keys(tmp_path, scheduler, cluster, words):
    path = _workflow(tmp_path, scheduler, cluster)
    with pytest.raises(ValueError) as info:
        load_workflow(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


def test_matching_cores_and_processes_one_are_accepted(tmp_path):
    sched, _ = load_workflow(_workflow(tmp_path, "threads_per_worker = 8", "cores = 8\nprocesses = 1"))
    assert _jobqueue_kwargs(sched)["cores"] == 8
    sched, _ = load_workflow(_workflow(tmp_path, "threads_per_worker = 3", ""))
    assert _jobqueue_kwargs(sched)["cores"] == 3  # cores follows threads_per_worker


@pytest.mark.parametrize("kwargs, word", [
    ({"worker_timeout_s": -1}, "worker_timeout_s"),
    ({"worker_timeout_s": float("nan")}, "worker_timeout_s"),
    ({"worker_timeout_s": float("inf")}, "worker_timeout_s"),
    ({"worker_timeout_s": True}, "worker_timeout_s"),
    ({"retries": -1}, "retries"),
    ({"gpus_per_worker": -1}, "gpus_per_worker"),
    ({"workers": 0}, "workers"),
    ({"threads_per_worker": 0}, "threads_per_worker"),
    ({"kind": "kubernetes"}, "kind"),
    ({"kind": "address"}, "address"),
    ({"kind": "slurm", "threads_per_worker": 2, "cluster": {"cores": 4}}, "cores"),
    ({"kind": "slurm", "cluster": "queue=gpu"}, "[scheduler.cluster]"),
])
def test_scheduler_config_rejects_nonsense(kwargs, word):
    with pytest.raises(ValueError) as info:
        SchedulerConfig(**kwargs)
    assert word in str(info.value)


def test_worker_timeout_of_the_wrong_type_is_refused_from_toml(tmp_path):
    with pytest.raises(ValueError, match="worker_timeout_s"):
        load_workflow(_workflow(tmp_path, 'worker_timeout_s = "ten minutes"'))


@pytest.mark.parametrize("address, public", [
    (":8787", True), ("8787", True), ("0.0.0.0:8787", True), ("[::]:8787", True), (":0", True),
    ("localhost:8787", False), ("127.0.0.1:0", False), ("[::1]:8787", False), ("localhost:8787,:8788", True),
])
def test_binds_all_interfaces(address, public):
    assert binds_all_interfaces(address) is public


def test_security_false_means_plain_tcp():
    sched = SchedulerConfig(kind="slurm", cluster={"security": False})
    assert "security" not in _jobqueue_kwargs(sched)  # dask-jobqueue would read False as "use TLS"


# ------------------------------------------------------------------ fake batch systems


def _fake_bin(tmp_path, **scripts: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        exe = folder / name
        exe.write_text("#!/bin/sh\n" + body + "\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.fixture
def recorded_clusters(monkeypatch):
    """Every SLURMCluster that start_client creates, to check it was closed."""
    import dask_jobqueue

    made = []

    class Recording(dask_jobqueue.SLURMCluster):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(dask_jobqueue, "SLURMCluster", Recording)
    return made


def _slurm(**kwargs) -> SchedulerConfig:
    cluster = {"queue": "nosuch", "memory": "2GB", "scheduler_options": dict(OFFLINE)}
    cluster.update(kwargs.pop("cluster", {}))
    return SchedulerConfig(kind="slurm", workers=2, dashboard_address=kwargs.pop("dashboard_address", "localhost:0"),
                           cluster=cluster, **kwargs)


@pytest.mark.timeout(60)
def test_failing_sbatch_fails_fast_with_its_message(tmp_path, monkeypatch, recorded_clusters, caplog):
    from distributed.core import Status

    calls = tmp_path / "sbatch-calls"
    bin_dir = _fake_bin(tmp_path, sbatch=f'echo "$@" >> {calls}\n'
                        'echo "sbatch: error: invalid partition specified: nosuch" >&2\n'
                        'echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2\n'
                        "exit 1")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(ClusterStartError) as info:
        start_client(_slurm(worker_timeout_s=600))
    elapsed = time.monotonic() - t0
    message = str(info.value)
    assert elapsed < 15, f"took {elapsed:.1f} s: waited for the timeout instead of the sbatch error"
    assert "sbatch: error: invalid partition specified: nosuch" in message
    assert "queue" in message and "[scheduler.cluster]" in message
    assert "\n" not in message  # one line for the user
    assert len(calls.read_text().splitlines()) == 2  # both jobs were tried
    assert [c.status for c in recorded_clusters] == [Status.closed]  # no scheduler left running
    # the failure was reported once, as the exception, not as tracebacks in the log
    assert not [r for r in caplog.records if r.exc_info and "sbatch" in str(r.exc_info[1])]
    assert not [r for r in caplog.records if "every network interface" in r.getMessage()]


@pytest.mark.timeout(60)
def test_jobs_submitted_before_an_sbatch_error_are_cancelled(tmp_path, monkeypatch, recorded_clusters):
    cancelled = tmp_path / "cancelled"
    first = tmp_path / "first"
    bin_dir = _fake_bin(
        tmp_path,
        sbatch=f'if mkdir {first} 2>/dev/null; then echo "Submitted batch job 4242"; exit 0; fi\n'
               'sleep 0.2; echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; exit 1',
        scancel=f'echo "$@" >> {cancelled}')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ClusterStartError, match="QOSMaxSubmitJobPerUserLimit") as info:
        start_client(_slurm())
    assert "4242" in str(info.value)
    assert cancelled.read_text().split() == ["4242"]


@pytest.mark.timeout(60)
def test_no_worker_within_the_timeout_gives_up_and_cancels(tmp_path, monkeypatch, recorded_clusters, caplog):
    from distributed.core import Status

    cancelled = tmp_path / "cancelled"
    bin_dir = _fake_bin(tmp_path, sbatch='echo "Submitted batch job 77"',  # accepted, never runs
                        scancel=f'echo "$@" >> {cancelled}')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(ClusterStartError) as info:
        start_client(_slurm(worker_timeout_s=1.5, dashboard_address=":0"))
    elapsed = time.monotonic() - t0
    message = str(info.value)
    assert 1.5 <= elapsed < 15
    assert re.search(r"within \d+ s", message) and "worker_timeout_s" in message and "queued" in message, message
    assert sorted(cancelled.read_text().split()) == ["77", "77"]
    assert [c.status for c in recorded_clusters] == [Status.closed]
    # a dashboard opened to every interface is warned about
    assert [r for r in caplog.records if r.levelno == logging.WARNING and "every network interface" in r.getMessage()]


@pytest.mark.timeout(60)
def test_unreachable_scheduler_address_is_one_clear_error():
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ClusterStartError, match=r"tcp://127\.0\.0\.1:9 .*--scheduler"):
            start_client(SchedulerConfig(kind="address", address="tcp://127.0.0.1:9"))


# ------------------------------------------------------------------ a real one-node SLURM


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_tls_option_runs_workers_over_tls_on_slurm(tmp_path, monkeypatch):
    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("cryptography")
    slurm = LocalSlurm(tmp_path / "slurm")
    slurm.start()
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    shared = tmp_path / "shared"
    shared.mkdir()
    try:
        sched = SchedulerConfig(
            kind="slurm", workers=1, threads_per_worker=1, dashboard_address="localhost:0", worker_timeout_s=120,
            cluster={"queue": "debug", "memory": "2GB", "walltime": "00:10:00", "python": sys.executable,
                     "log_directory": str(tmp_path / "logs"), "security": True,
                     "shared_temp_directory": str(shared), "scheduler_options": dict(OFFLINE)})
        client, cluster = start_client(sched)
        try:
            assert client.scheduler.address.startswith("tls://")
            workers = list(client.scheduler_info()["workers"])
            assert workers and all(w.startswith("tls://") for w in workers)
            assert client.submit(pow, 2, 10).result() == 1024
            keys = list(shared.glob(".pipeline-dask-tls-*/worker-key.pem"))
            assert len(keys) == 1 and stat.S_IMODE(keys[0].stat().st_mode) == 0o600
        finally:
            client.close()
            cluster.close()
        del client, cluster
        import gc

        gc.collect()
        assert list(shared.iterdir()) == []  # the worker key is gone with the cluster
        assert slurm.jobs_after_draining() == []
    finally:
        slurm.stop()
