"""Dask schedulers: threads, a LocalCluster with its dashboard, a running scheduler, or HPC via dask-jobqueue.

Workflow files (``workflows/*.toml``) describe a scheduler and, optionally,
run-configuration overrides::

    [scheduler]
    kind = "slurm"            # threads | local | address | slurm | pbs
    jobs = 2                  # worker jobs to submit (slurm/pbs) or workers (local)
    threads_per_worker = 1
    dashboard_address = ":8787"
    address = ""              # for kind = "address": tcp://host:port

    [scheduler.cluster]       # passed to dask_jobqueue.SLURMCluster / PBSCluster as is
    cores = 2
    memory = "8GB"

    [run]                     # RunConfig overrides (mode, device, nested stage configs...)
    device = "cpu"
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from pipeline.config import config_from_dict, load_toml

__all__ = ["SchedulerConfig", "load_workflow", "start_client"]

_KINDS = ("threads", "local", "address", "slurm", "pbs")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Where the Dask tasks run.

    Attributes
    ----------
    kind : str
        ``threads`` (no cluster), ``local`` (a LocalCluster with dashboard), ``address``
        (a running scheduler at ``address``), ``slurm`` or ``pbs`` (dask-jobqueue).
    workers : int
        Worker processes (local) or worker jobs (slurm/pbs); threads for ``threads`` (default 2).
    threads_per_worker : int
        Threads in each worker (default 1: the CNN and FFTs get one core each).
    dashboard_address : str
        Where the dashboard listens (default ``localhost:8787``; ``:0`` picks a free port).
    address : str
        Scheduler address for ``kind = "address"``.
    retries : int
        Times a task is retried when its worker dies (default 2).
    gpus_per_worker : int
        ``{"GPU": n}`` resource advertised by each worker (needed for ``device="gpu"``).
    cluster : dict
        Extra keyword arguments of the dask-jobqueue cluster class.
    """

    kind: str = "threads"
    workers: int = 2
    threads_per_worker: int = 1
    dashboard_address: str = "localhost:8787"
    address: str = ""
    retries: int = 2
    gpus_per_worker: int = 0
    cluster: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"scheduler kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "address" and not self.address:
            raise ValueError("scheduler kind 'address' needs an address (tcp://host:port)")
        if self.workers < 1 or self.threads_per_worker < 1:
            raise ValueError("scheduler workers and threads_per_worker must be >= 1")


def load_workflow(path: str | Path) -> tuple[SchedulerConfig, dict[str, Any]]:
    """Read a workflow TOML: its scheduler section and its ``[run]`` overrides."""
    data = load_toml(path)
    unknown = set(data) - {"scheduler", "run", "description"}
    if unknown:
        raise ValueError(f"{path}: unknown workflow section(s) {sorted(unknown)}; expected scheduler, run")
    sched = dict(data.get("scheduler", {}))
    if "jobs" in sched:
        sched["workers"] = sched.pop("jobs")
    return config_from_dict(SchedulerConfig, sched, where=f"{path} [scheduler]"), dict(data.get("run", {}))


def _worker_env(threads: int) -> dict[str, str]:
    # BLAS/OpenMP pools sized to the worker's threads so workers don't oversubscribe cores
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def start_client(config: SchedulerConfig):
    """Start (or connect to) the cluster; returns ``(client, cluster_or_None)``.

    Returns ``(None, None)`` for the threads scheduler.
    """
    if config.kind == "threads":
        return None, None
    from distributed import Client

    if config.kind == "address":
        return Client(config.address), None
    resources = {"GPU": config.gpus_per_worker} if config.gpus_per_worker else None
    if config.kind == "local":
        from distributed import LocalCluster

        cluster = LocalCluster(
            n_workers=config.workers, threads_per_worker=config.threads_per_worker, processes=True,
            dashboard_address=config.dashboard_address, resources=resources,
            env=_worker_env(config.threads_per_worker),
        )
        return Client(cluster), cluster
    import dask_jobqueue

    kwargs = {k: v for k, v in config.cluster.items() if v not in ("", None)}  # empty: site default
    kwargs.setdefault("cores", config.threads_per_worker)
    kwargs.setdefault("processes", 1)
    kwargs.setdefault("memory", "4GB")
    env = [f"export {k}={v}" for k, v in _worker_env(config.threads_per_worker).items()]
    kwargs["job_script_prologue"] = list(kwargs.get("job_script_prologue", [])) + env
    scheduler_options = dict(kwargs.pop("scheduler_options", {}))
    scheduler_options.setdefault("dashboard_address", config.dashboard_address)
    if resources:
        kwargs["worker_extra_args"] = list(kwargs.get("worker_extra_args", [])) + [f"--resources GPU={config.gpus_per_worker}"]
    cls = dask_jobqueue.SLURMCluster if config.kind == "slurm" else dask_jobqueue.PBSCluster
    cluster = cls(scheduler_options=scheduler_options, **kwargs)
    cluster.scale(jobs=config.workers)
    client = Client(cluster)
    return client, cluster


def dashboard_link(client) -> str | None:
    """The dashboard URL of a client's scheduler, if any."""
    if client is None:
        return None
    try:
        return client.dashboard_link
    except Exception:
        return None


def default_threads() -> int:
    """Cores available to this process."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
