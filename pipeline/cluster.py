"""Dask schedulers: threads, a LocalCluster with its dashboard, a running scheduler, or HPC via dask-jobqueue.

Workflow files (``workflows/*.toml``) describe a scheduler and, optionally,
run-configuration overrides::

    [scheduler]
    kind = "slurm"            # threads | local | address | slurm | pbs
    jobs = 2                  # worker jobs to submit (slurm/pbs) or workers (local)
    threads_per_worker = 4    # THE number of cores of a worker: it runs this many tasks at once
    dashboard_address = "localhost:8787"
    worker_timeout_s = 600    # give up when no worker has connected after this long (0: wait forever)
    address = ""              # for kind = "address": tcp://host:port

    [scheduler.cluster]       # passed to dask_jobqueue.SLURMCluster / PBSCluster as is
    # cores defaults to threads_per_worker; an explicit, different value is an error
    memory = "16GB"

    [run]                     # RunConfig overrides (mode, device, nested stage configs...)
    device = "cpu"

One number decides a worker's CPU share: ``threads_per_worker``.  A worker job reserves that
many cores (``cores``), runs one Dask worker process (``processes = 1``) with that many threads,
and every task in it runs single-threaded BLAS/OpenMP (so ``threads_per_worker`` tasks fill
``threads_per_worker`` cores without oversubscribing them).

When the worker jobs cannot be submitted (``sbatch``/``qsub`` exits with an error),
:func:`start_client` raises :class:`ClusterStartError` with the batch system's own message
as soon as the error is seen, after cancelling any job it did submit; when no worker has
connected within ``worker_timeout_s`` it raises too, and cancels the queued jobs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

from pipeline.config import config_from_dict, load_toml

__all__ = [
    "SchedulerConfig",
    "ClusterStartError",
    "load_workflow",
    "start_client",
    "binds_all_interfaces",
    "dashboard_link",
    "default_threads",
]

logger = logging.getLogger(__name__)

_KINDS = ("threads", "local", "address", "slurm", "pbs")
_BATCH_KINDS = ("slurm", "pbs")
#: How often start_client looks for a connected worker or a submission error (seconds).
_POLL_S = 0.25
#: Loggers through which a failed job submission is reported by distributed / dask-jobqueue:
#: the scale-up runs as a tornado callback (``tornado.application`` logs its exception), its
#: unretrieved task exceptions go to ``asyncio``.
_SUBMISSION_LOGGERS = ("tornado.application", "asyncio", "distributed.deploy.spec", "dask_jobqueue.core")


class ClusterStartError(RuntimeError):
    """The cluster could not be started: jobs not submitted, no worker connected, scheduler unreachable.

    The message is one line that quotes the batch system's or the scheduler's own error and
    names the setting to change.  Whatever was started (scheduler, submitted jobs) has been
    closed or cancelled when it is raised.
    """


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Where the Dask tasks run.

    Attributes
    ----------
    kind : str
        ``threads`` (no cluster), ``local`` (a LocalCluster with dashboard), ``address``
        (a running scheduler at ``address``), ``slurm`` or ``pbs`` (dask-jobqueue).
    workers : int
        Worker processes (local) or worker jobs (slurm/pbs; ``jobs`` in a workflow file);
        threads for ``threads`` (default 2).
    threads_per_worker : int
        Threads in each worker, i.e. tasks it runs at once (default 1).  For slurm/pbs this is
        also the number of cores each job reserves: ``cluster["cores"]`` defaults to it and may
        not differ from it.  Each task runs single-threaded BLAS/OpenMP.
    dashboard_address : str
        Where the dashboard listens (default ``localhost:8787``: reachable through an SSH tunnel,
        not from the network; ``:8787`` opens it on every interface, without TLS or login, and
        logs a warning; ``localhost:0`` picks a free port).
    address : str
        Scheduler address for ``kind = "address"``.
    retries : int
        Times a task is retried when its worker dies (default 2).
    gpus_per_worker : int
        ``{"GPU": n}`` resource advertised by each worker (needed for ``device="gpu"``; default 0).
    worker_timeout_s : float
        For ``slurm``, ``pbs`` and ``address``: how long :func:`start_client` waits for the first
        worker to connect before it gives up, cancels the jobs and raises
        :class:`ClusterStartError` (default 600 s: batch jobs may queue a while).  ``0`` waits
        forever.  A job *submission* error does not wait for this: it fails at once.
    cluster : dict
        Extra keyword arguments of the dask-jobqueue cluster class (queue, account, memory,
        walltime, log_directory...), passed as is, except: ``cores`` follows
        ``threads_per_worker``; ``processes`` must be 1 (one worker process per job, so
        ``gpus_per_worker`` counts the job's GPUs); empty strings mean the site default;
        ``security = true`` runs scheduler and workers over TLS with a certificate made for the
        run (needs ``cryptography``), the workers' copy written to a private folder under
        ``shared_temp_directory`` (default ``~``; it must be visible from the compute nodes) and
        removed with the cluster.
    """

    kind: str = "threads"
    workers: int = 2
    threads_per_worker: int = 1
    dashboard_address: str = "localhost:8787"
    address: str = ""
    retries: int = 2
    gpus_per_worker: int = 0
    worker_timeout_s: float = 600.0
    cluster: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"scheduler kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "address" and not self.address:
            raise ValueError("scheduler kind 'address' needs an address (tcp://host:port)")
        if self.workers < 1 or self.threads_per_worker < 1:
            raise ValueError("scheduler workers and threads_per_worker must be >= 1")
        if self.retries < 0:
            raise ValueError(f"[scheduler] retries must be >= 0, got {self.retries}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"[scheduler] gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        timeout = self.worker_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or timeout < 0:
            raise ValueError(f"[scheduler] worker_timeout_s must be a finite number of seconds >= 0 "
                             f"(0: wait forever), got {timeout!r}")
        if not isinstance(self.cluster, dict):
            raise ValueError(f"[scheduler.cluster] must be a table, got {self.cluster!r}")
        _check_cluster_table(self)


def _check_cluster_table(config: SchedulerConfig) -> None:
    """Reject ``[scheduler.cluster]`` values that contradict ``[scheduler]`` (one source of truth)."""
    table = config.cluster
    t = config.threads_per_worker
    cores = table.get("cores")
    if cores not in (None, "") and cores != t:
        raise ValueError(
            f"[scheduler.cluster] cores = {cores!r} disagrees with [scheduler] threads_per_worker = {t}: "
            f"a worker job reserves as many cores as its worker has threads; set threads_per_worker "
            f"and drop cores (it defaults to threads_per_worker)")
    processes = table.get("processes")
    if processes not in (None, "") and processes != 1:
        raise ValueError(
            f"[scheduler.cluster] processes = {processes!r}: must be 1 (one worker process per job, "
            f"so the job's cores are [scheduler] threads_per_worker and gpus_per_worker counts the "
            f"job's GPUs); to use more cores raise threads_per_worker, or submit more jobs")
    memory = table.get("memory")
    if memory not in (None, ""):
        from dask.utils import parse_bytes

        try:
            nbytes = parse_bytes(memory)
        except (ValueError, TypeError):
            nbytes = -1
        if nbytes <= 0:
            raise ValueError(f"[scheduler.cluster] memory = {memory!r}: expected a size such as \"16GB\"")
    spec = table.get("resource_spec")
    if isinstance(spec, str):
        m = re.search(r"\bncpus=(\d+)", spec)
        if m and int(m.group(1)) != t:
            raise ValueError(
                f"[scheduler.cluster] resource_spec {spec!r} asks for ncpus={m.group(1)} but [scheduler] "
                f"threads_per_worker = {t}; drop resource_spec (it is then made from threads_per_worker "
                f"and memory) or make them agree")
    if "security" in table and not isinstance(table["security"], bool):
        raise ValueError(f"[scheduler.cluster] security = {table['security']!r}: expected true (TLS with a "
                         f"temporary certificate) or false")
    options = table.get("scheduler_options") or {}
    if table.get("dashboard_address") is not None or (isinstance(options, dict) and "dashboard_address" in options):
        raise ValueError("set the dashboard in [scheduler] dashboard_address, not in [scheduler.cluster]")


def load_workflow(path: str | Path) -> tuple[SchedulerConfig, dict[str, Any]]:
    """Read a workflow TOML: its scheduler section and its ``[run]`` overrides.

    Parameters
    ----------
    path : str or Path
        The workflow file (``workflows/*.toml``).

    Returns
    -------
    scheduler : SchedulerConfig
        From the ``[scheduler]`` table (``jobs`` is an alias of ``workers``) and its
        ``[scheduler.cluster]`` sub-table.
    run : dict
        The ``[run]`` table, ``RunConfig`` overrides (not checked here).

    Raises
    ------
    ValueError
        Naming the file and the setting: unknown sections or keys, wrong types, or settings that
        contradict each other (e.g. ``[scheduler.cluster] cores`` different from
        ``[scheduler] threads_per_worker``).
    FileNotFoundError
        If the file does not exist.
    """
    data = load_toml(path)
    unknown = set(data) - {"scheduler", "run", "description"}
    if unknown:
        raise ValueError(f"{path}: unknown workflow section(s) {sorted(unknown)}; expected scheduler, run")
    sched = dict(data.get("scheduler", {}))
    if "jobs" in sched:
        if "workers" in sched:
            raise ValueError(f"{path}: [scheduler] sets both jobs and workers; they are the same setting, keep one")
        sched["workers"] = sched.pop("jobs")
    try:
        config = config_from_dict(SchedulerConfig, sched, where=f"{path} [scheduler]")
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise type(exc)(f"{path}: {exc}") from None
    return config, dict(data.get("run", {}))


def binds_all_interfaces(address: str | int | None) -> bool:
    """Whether a Dask ``dashboard_address`` listens on every network interface.

    ``":8787"``, ``"8787"``, ``"0.0.0.0:8787"`` and ``"[::]:8787"`` do; ``"localhost:8787"`` and
    ``"127.0.0.1:8787"`` do not.  Comma-separated lists are true if any entry is.
    """
    if address is None:
        return False
    for part in str(address).split(","):
        part = part.strip()
        host = part.rpartition(":")[0] if ":" in part else ""
        if host.strip("[]") in ("", "0.0.0.0", "::", "*"):
            return True
    return False


def _warn_if_public(dashboard: Any, where: str) -> None:
    if binds_all_interfaces(dashboard):
        logger.warning(
            "the Dask dashboard listens on every network interface (%s = %r), without TLS or login: anyone "
            "who can reach this host can see the run and stop its tasks; use \"localhost:8787\" and an "
            "SSH tunnel unless that is what you want", where, dashboard)


def _worker_env() -> dict[str, str]:
    # one BLAS/OpenMP thread per task: a worker runs threads_per_worker tasks on as many cores
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _jobqueue_kwargs(config: SchedulerConfig) -> dict[str, Any]:
    """Keyword arguments of the dask-jobqueue cluster class for ``config``."""
    kwargs = {k: v for k, v in config.cluster.items() if v not in ("", None)}  # empty: site default
    if kwargs.get("security") is False:  # dask-jobqueue reads any non-None security as "use TLS"
        del kwargs["security"]
    kwargs["cores"] = config.threads_per_worker
    kwargs["processes"] = 1
    kwargs.setdefault("memory", "4GB")
    env = [f"export {k}={v}" for k, v in _worker_env().items()]
    kwargs["job_script_prologue"] = list(kwargs.get("job_script_prologue", [])) + env
    scheduler_options = dict(kwargs.pop("scheduler_options", {}))
    scheduler_options["dashboard_address"] = config.dashboard_address
    kwargs["scheduler_options"] = scheduler_options
    if config.gpus_per_worker:
        kwargs["worker_extra_args"] = list(kwargs.get("worker_extra_args", [])) + [
            f"--resources GPU={config.gpus_per_worker}"]
    return kwargs


def _tls_security(shared_dir: str):
    """A TLS ``Security`` with a certificate made for this run; the worker's files in a private folder.

    The scheduler and this process keep their key in memory; the workers read theirs from
    ``<shared_dir>/.pipeline-dask-tls-XXXX/`` (mode 0700, files 0600), which the compute nodes
    must see.  Returns ``(security, folder)``; the caller removes the folder.
    """
    from distributed.security import Security

    try:
        temporary = Security.temporary()
    except ImportError as exc:
        raise ClusterStartError("[scheduler.cluster] security = true needs the cryptography package "
                                "(pip install cryptography)") from exc
    base = os.path.expanduser(os.path.expandvars(shared_dir))
    try:
        folder = tempfile.mkdtemp(prefix=".pipeline-dask-tls-", dir=base)
    except OSError as exc:
        raise ClusterStartError(f"[scheduler.cluster] shared_temp_directory = {shared_dir!r}: cannot create the "
                                f"folder for the workers' TLS certificate: {exc}") from exc
    paths = {}
    for name, pem in (("ca", temporary.tls_ca_file), ("cert", temporary.tls_worker_cert),
                      ("key", temporary.tls_worker_key)):
        paths[name] = os.path.join(folder, f"worker-{name}.pem")
        fd = os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(pem)
    security = Security(
        require_encryption=True, tls_ca_file=paths["ca"],
        tls_worker_cert=paths["cert"], tls_worker_key=paths["key"],
        tls_scheduler_cert=temporary.tls_scheduler_cert, tls_scheduler_key=temporary.tls_scheduler_key,
        tls_client_cert=temporary.tls_client_cert, tls_client_key=temporary.tls_client_key,
    )
    return security, folder


class _SubmissionErrors(logging.Filter):
    """Collects job-submission errors logged by distributed/tornado while a cluster starts.

    A dask-jobqueue job is submitted in a callback on the cluster's event loop; when ``sbatch``
    fails the exception is only logged.  This filter, attached to the loggers that report it,
    keeps the exception (to be raised as one clear :class:`ClusterStartError`) and drops the
    record instead of printing its traceback.  Only records whose traceback passes through
    dask-jobqueue are taken; everything else is left alone.
    """

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []
        self._loggers = [logging.getLogger(name) for name in _SUBMISSION_LOGGERS]

    def __enter__(self) -> "_SubmissionErrors":
        for lg in self._loggers:
            lg.addFilter(self)
        return self

    def __exit__(self, *exc_info) -> None:
        for lg in self._loggers:
            lg.removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not _raised_in_jobqueue(exc):
            return True
        if not any(exc is e for e in self.errors):
            self.errors.append(exc)
        return False


def _raised_in_jobqueue(exc: BaseException) -> bool:
    import dask_jobqueue

    root = os.path.dirname(dask_jobqueue.__file__)
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(root):
            return True
        tb = tb.tb_next
    return False


def _describe_submission_error(exc: BaseException) -> str:
    """One line from a dask-jobqueue submission exception: the command and its stderr."""
    text = str(exc)
    m = re.search(r"Exit code: (\S+)\s+Command:\s*\n(.*?)\n\s*stdout:\n(.*?)\nstderr:\n(.*)", text, re.S)
    if m:
        code, command, stdout, stderr = m.groups()
        program = os.path.basename(command.split()[0]) if command.split() else "the submit command"
        said = " | ".join(line.strip() for line in (stderr.strip() or stdout.strip()).splitlines() if line.strip())
        return f"{program} exited with status {code}: {said or '(no output)'}"
    return " | ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def _failed_jobs(cluster) -> list[str]:
    """Names of the cluster's jobs whose submission failed (tried, but no job id)."""
    # SpecCluster adds a job to .workers once its submission has been tried; a job id is
    # set only when the submission succeeded
    return [name for name, job in list(getattr(cluster, "workers", {}).items())
            if hasattr(job, "job_id") and job.job_id is None]


def _job_ids(cluster) -> list[str]:
    return [str(job.job_id) for job in list(getattr(cluster, "workers", {}).values())
            if getattr(job, "job_id", None)]


def _close_quietly(client, cluster) -> None:
    if cluster is not None:
        from distributed.core import Status

        # The start failed, and so did its jobs. SpecCluster's close asserts that every job it
        # made is closed or failed, but a dask-jobqueue job's close only cancels it (scancel/qdel,
        # whatever its status) and leaves its status "created" (submission failed) or "running"
        # (queued): mark them failed so that close cancels them and completes.
        for job in list(getattr(cluster, "workers", {}).values()):
            if hasattr(job, "job_id") and job.status in (Status.created, Status.running):
                job.status = Status.failed
    for thing in (client, cluster):
        if thing is None:
            continue
        try:
            thing.close()
        except Exception as exc:  # closing after a failed start: report, keep the first error
            logger.debug("closing %r after a failed start: %s", thing, exc)


def _wait_for_first_worker(client, cluster, config: SchedulerConfig, caught: _SubmissionErrors | None) -> None:
    """Return once a worker is connected; raise ClusterStartError on a submission error or timeout."""
    timeout = config.worker_timeout_s
    t0 = time.monotonic()
    failed_seen_at = None
    while True:
        if caught is not None and caught.errors:
            break
        if cluster is not None and _failed_jobs(cluster):
            # the failure is logged right after the job is marked; give the log a moment to arrive
            failed_seen_at = failed_seen_at or time.monotonic()
            if time.monotonic() - failed_seen_at > 2.0:
                break
        try:
            client.wait_for_workers(1, timeout=_POLL_S)
            return
        except TimeoutError:
            pass
        if timeout and time.monotonic() - t0 > timeout:
            waited = time.monotonic() - t0
            if config.kind in _BATCH_KINDS:
                submit = getattr(cluster.job_cls, "submit_command", config.kind)
                ids = _job_ids(cluster)
                raise ClusterStartError(
                    f"no Dask worker connected within {waited:.0f} s of submitting {config.workers} "
                    f"{config.kind.upper()} job(s) with {submit}"
                    + (f" (job ids {', '.join(ids)}, now cancelled)" if ids else "")
                    + "; the jobs may still have been queued (a busy or wrong queue) or failed at start-up "
                    "(see their output in [scheduler.cluster] log_directory); raise [scheduler] worker_timeout_s "
                    "(0 waits forever) if the queue is just slow")
            raise ClusterStartError(
                f"no Dask worker connected to the scheduler {config.address or ''} within {waited:.0f} s; "
                f"start workers for it, or raise [scheduler] worker_timeout_s (0 waits forever)")
    kind = config.kind.upper()
    if caught is not None and caught.errors:
        said = []
        for exc in caught.errors:
            line = _describe_submission_error(exc)
            if line not in said:
                said.append(line)
        detail = "; ".join(said)
    else:
        detail = "the submit command failed (its message was not captured; run with DEBUG logging to see it)"
    submitted = _job_ids(cluster)
    raise ClusterStartError(
        f"{kind} job submission failed: {detail}. Check queue, account, walltime, memory and "
        f"job_extra_directives in the workflow's [scheduler.cluster] table"
        + (f"; the job(s) that were submitted ({', '.join(submitted)}) were cancelled" if submitted else ""))


def start_client(config: SchedulerConfig):
    """Start (or connect to) the cluster and wait for its first worker.

    Parameters
    ----------
    config : SchedulerConfig
        Which scheduler.

    Returns
    -------
    client : distributed.Client or None
        ``None`` for the threads scheduler.
    cluster : LocalCluster, SLURMCluster, PBSCluster or None
        The cluster this call started (close it after the client), ``None`` for ``threads`` and
        ``address``.

    Raises
    ------
    ClusterStartError
        When the worker jobs cannot be submitted (with ``sbatch``'s / ``qsub``'s own message, as
        soon as it is seen), when no worker connects within ``config.worker_timeout_s``, or when
        the scheduler at ``config.address`` cannot be reached.  The scheduler started here is
        closed and any submitted job cancelled before it is raised.
    """
    if config.kind == "threads":
        return None, None
    from distributed import Client

    if config.kind == "address":
        try:
            client = Client(config.address)
        except (OSError, TimeoutError) as exc:
            raise ClusterStartError(
                f"cannot reach the Dask scheduler at {config.address} (--scheduler / [scheduler] address): "
                f"{exc}") from exc
        try:
            _wait_for_first_worker(client, None, config, None)
        except BaseException:
            _close_quietly(client, None)
            raise
        return client, None
    resources = {"GPU": config.gpus_per_worker} if config.gpus_per_worker else None
    if config.kind == "local":
        from distributed import LocalCluster

        _warn_if_public(config.dashboard_address, "[scheduler] dashboard_address")
        try:
            cluster = LocalCluster(
                n_workers=config.workers, threads_per_worker=config.threads_per_worker, processes=True,
                dashboard_address=config.dashboard_address, resources=resources, env=_worker_env(),
            )
        except Exception as exc:
            raise ClusterStartError(f"cannot start a LocalCluster of {config.workers} worker(s): {exc}") from exc
        return Client(cluster), cluster
    import dask_jobqueue

    kwargs = _jobqueue_kwargs(config)
    _warn_if_public(kwargs["scheduler_options"]["dashboard_address"], "[scheduler] dashboard_address")
    cls = dask_jobqueue.SLURMCluster if config.kind == "slurm" else dask_jobqueue.PBSCluster
    tls_folder = None
    if kwargs.get("security") is True:
        kwargs["security"], tls_folder = _tls_security(str(kwargs.pop("shared_temp_directory", "~")))
    try:
        cluster = cls(**kwargs)
    except Exception as exc:
        if tls_folder:
            shutil.rmtree(tls_folder, ignore_errors=True)
        raise ClusterStartError(f"cannot set up the {cls.__name__} from the workflow's [scheduler.cluster] table: "
                                f"{exc}") from exc
    remove_tls = weakref.finalize(cluster, shutil.rmtree, tls_folder, ignore_errors=True) if tls_folder else None
    if not kwargs.get("security"):
        logger.info("the Dask scheduler %s accepts unencrypted connections from the network; set "
                    "[scheduler.cluster] security = true for TLS", cluster.scheduler_address)
    client = None
    with _SubmissionErrors() as caught:
        try:
            # the client first: connecting awaits the cluster, which would submit failed jobs again
            client = Client(cluster)
            cluster.scale(jobs=config.workers)
            _wait_for_first_worker(client, cluster, config, caught)
        except BaseException:
            # cancel the submitted jobs and stop the scheduler before the error reaches the user
            # (still inside the filter: what closing logs about the failed jobs is not repeated)
            _close_quietly(client, cluster)
            if remove_tls is not None:
                remove_tls()
            raise
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
