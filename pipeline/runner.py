"""Execute a run: build the graph, schedule it, gather per-CCD results, write the catalog and run.json."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cluster import SchedulerConfig, dashboard_link, default_threads, start_client
from pipeline.config import RunConfig, config_to_dict
from pipeline.graph import (
    STAGES,
    CcdState,
    _json_default,
    build_graph,
    ccd_outputs_complete,
    collect_catalog,
    config_hash,
    status_record,
)
from pipeline.io import PairEntry, atomic_path

__all__ = ["RunResult", "run_pipeline", "format_summary", "versions"]

#: exit status of a run in which some (not all) CCDs failed
EXIT_SOME_FAILED = 3
#: exit status of a run in which every CCD failed
EXIT_ALL_FAILED = 4


@dataclasses.dataclass
class RunResult:
    """What a run produced: per-CCD records, the merged catalog and where things were written."""

    records: list[dict]
    catalog: Any
    out_dir: Path
    wall_s: float
    dashboard: str | None = None

    @property
    def n_failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.records)

    @property
    def exit_status(self) -> int:
        if not self.records or self.n_failed == 0:
            return 0
        return EXIT_ALL_FAILED if self.n_failed == len(self.records) else EXIT_SOME_FAILED


def versions() -> dict[str, str]:
    """Versions of Python and the packages that decide the results."""
    out = {"python": platform.python_version()}
    for name in ("numpy", "scipy", "astropy", "photutils", "reproject", "torch", "dask", "distributed", "cupy"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception:
            continue
    try:
        from importlib.metadata import version

        out["transient-pipeline"] = version("transient-pipeline")
    except Exception:
        pass
    return out


def _device_description(config: RunConfig) -> str:
    if config.device == "gpu":
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(0)
            return f"gpu: {props['name'].decode() if isinstance(props['name'], bytes) else props['name']}"
        except Exception as exc:
            return f"gpu (unavailable: {exc})"
    return f"cpu: {platform.processor() or platform.machine()}, {default_threads()} cores"


def _tune_threads(config: RunConfig, scheduler: SchedulerConfig) -> RunConfig:
    """Give the FFTs as many threads as a task may use, unless set explicitly."""
    if config.psf_match.fft_workers is not None:
        return config
    if scheduler.kind == "threads":
        per_task = max(1, default_threads() // max(1, scheduler.workers))
    else:
        per_task = scheduler.threads_per_worker
    return dataclasses.replace(config, psf_match=dataclasses.replace(config.psf_match, fft_workers=per_task))


def run_pipeline(
    entries: list[PairEntry],
    config: RunConfig,
    out_dir: str | Path,
    scheduler: SchedulerConfig = SchedulerConfig(),
    *,
    resume: bool = False,
    progress: bool = True,
    client=None,
    on_dashboard=None,
) -> RunResult:
    """Run the pipeline on CCD pairs and write ``candidates.fits``, ``candidates.parquet`` and ``run.json``.

    Parameters
    ----------
    entries : list of PairEntry
        The CCD pairs (from a manifest).
    config : RunConfig
        What to compute.
    out_dir : path
        Output folder (created).
    scheduler : SchedulerConfig
        Where to compute (ignored when ``client`` is given).
    resume : bool
        Skip CCDs whose outputs are complete and were made with the same configuration.
    progress : bool
        Show a progress bar.
    client : distributed.Client, optional
        An existing client to use.
    on_dashboard : callable, optional
        Called with the dashboard URL once the cluster is up.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _tune_threads(config, scheduler)
    chash = config_hash(config)
    t0 = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    reused: dict[str, dict] = {}
    todo = []
    for entry in entries:
        record = ccd_outputs_complete(out_dir, entry.ccd, chash) if resume else None
        if record is not None:
            reused[entry.ccd] = dict(record, resumed=True)
        else:
            todo.append(entry)

    own_client = cluster = None
    if client is None and todo:
        own_client, cluster = start_client(scheduler)
        client = own_client
    link = dashboard_link(client)
    if link and on_dashboard is not None:
        on_dashboard(link)
    warm_s = _warm_up(client, config) if todo else 0.0
    try:
        states = _execute(todo, config, out_dir, client, scheduler, progress) if todo else {}
    finally:
        if own_client is not None:
            own_client.close()
        if cluster is not None:
            cluster.close()

    records = []
    for entry in entries:
        if entry.ccd in reused:
            records.append(reused[entry.ccd])
        else:
            state = states[entry.ccd]
            rec = status_record(state, chash)
            rec["resumed"] = False
            records.append(rec)
    catalog = collect_catalog(out_dir, [r["ccd"] for r in records if r["status"] == "done"])
    with atomic_path(out_dir / "candidates.fits") as tmp:
        catalog.write(tmp, format="fits", overwrite=True)
    with atomic_path(out_dir / "candidates.parquet") as tmp:
        catalog.write(tmp, format="parquet", overwrite=True)
    wall = time.perf_counter() - t0
    result = RunResult(records=records, catalog=catalog, out_dir=out_dir, wall_s=wall, dashboard=link)
    run_json = {
        "started": started,
        "wall_s": wall,
        "mode": config.mode,
        "device": _device_description(config),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "command": sys.argv,
        "versions": versions(),
        "scheduler": config_to_dict(scheduler),
        "dashboard": link,
        "config": config_to_dict(config),
        "config_hash": chash,
        "n_ccds": len(records),
        "n_failed": result.n_failed,
        "n_candidates": len(catalog),
        "n_above_threshold": int((np.asarray(catalog["score"]) >= config.score_threshold).sum()) if len(catalog) else 0,
        "worker_startup_s": warm_s,
        "stage_wall_s": stage_table(records, "wall_s"),
        "stage_cpu_s": stage_table(records, "cpu_s"),
        "truth_summary": total_summary(records),
        "ccds": records,
    }
    with atomic_path(out_dir / "run.json") as tmp:
        tmp.write_text(json.dumps(run_json, indent=1, default=_json_default))
    return result


def _load_model(model: str, device: str, threads: int, batch_size: int) -> bool:
    from pipeline.steps import get_scorer

    get_scorer(model, device, threads, batch_size)
    return True


def _warm_up(client, config: RunConfig) -> float:
    """Load the CNN once in every worker (or in this process) before the CCDs are timed.

    Model loading (torch import, weights) is a once-per-worker cost; doing it up front keeps it
    out of the per-CCD stage times, and it is reported on its own in run.json.  A failure here
    is not fatal: the score stage reports it per CCD.
    """
    t0 = time.perf_counter()
    args = (config.model, config.device, config.torch_threads, config.batch_size)
    try:
        if client is None:
            _load_model(*args)
        else:
            client.run(_load_model, *args)
    except Exception:
        pass
    return time.perf_counter() - t0


def _execute(entries, config, out_dir, client, scheduler, progress) -> dict[str, CcdState]:
    import dask
    from tqdm.auto import tqdm

    finals = build_graph(entries, config, out_dir)
    ccds = list(finals)
    if client is None:
        n_tasks = len(ccds) * len(STAGES[config.mode])
        from dask.callbacks import Callback

        bar = tqdm(total=n_tasks, desc=f"{config.mode} tasks", unit="task", disable=not progress)

        class _Progress(Callback):
            def _posttask(self, key, result, dsk, state, worker_id):
                bar.update(1)

        with _Progress():
            values = dask.compute(*finals.values(), scheduler="threads", num_workers=scheduler.workers)
        bar.close()
        return dict(zip(ccds, values))
    from distributed import as_completed

    futures = client.compute(list(finals.values()), retries=scheduler.retries)
    by_future = dict(zip(futures, ccds))
    out = {}
    with tqdm(total=len(futures), desc=f"{config.mode} CCDs", unit="ccd", disable=not progress) as bar:
        for fut in as_completed(futures):
            ccd = by_future[fut]
            try:
                out[ccd] = fut.result()
            except Exception as exc:  # a worker died more often than retries allow
                state = CcdState(ccd=ccd, entry=next(e for e in entries if e.ccd == ccd))
                state.status, state.failed_stage, state.error = "failed", "scheduler", f"{type(exc).__name__}: {exc}"
                out[ccd] = state
            bar.update(1)
    return out


def stage_table(records: list[dict], key: str) -> dict[str, dict[str, float]]:
    """Per stage: median, total and count over the CCDs that ran it (not resumed ones)."""
    per_stage: dict[str, list[float]] = {}
    for rec in records:
        if rec.get("resumed"):
            continue
        for stage, seconds in (rec.get(key) or {}).items():
            per_stage.setdefault(stage, []).append(float(seconds))
    return {s: {"median": float(np.median(v)), "total": float(np.sum(v)), "n": len(v)} for s, v in per_stage.items()}


def total_summary(records: list[dict]) -> dict | None:
    """Completeness and false positives summed over CCDs with truth."""
    sums = [r["truth_summary"] for r in records if r.get("truth_summary")]
    if not sums:
        return None
    tot = {k: int(sum(s[k] for s in sums)) for k in ("n_transients", "n_detected", "n_selected", "n_false_positives", "n_candidates")}
    n_pos = tot["n_selected"] + tot["n_false_positives"]
    tot["completeness_detected"] = tot["n_detected"] / tot["n_transients"] if tot["n_transients"] else float("nan")
    tot["completeness"] = tot["n_selected"] / tot["n_transients"] if tot["n_transients"] else float("nan")
    tot["purity"] = tot["n_selected"] / n_pos if n_pos else float("nan")
    tot["false_positives_per_ccd"] = tot["n_false_positives"] / len(sums)
    return tot


def format_summary(result: RunResult, config: RunConfig) -> str:
    """Terminal summary: CCDs done/failed, candidates, completeness and false positives, stage times."""
    lines = []
    n = len(result.records)
    lines.append(f"{config.mode} mode: {n - result.n_failed}/{n} CCDs done, {result.n_failed} failed, "
                 f"{len(result.catalog)} candidates, "
                 f"{int((np.asarray(result.catalog['score']) >= config.score_threshold).sum()) if len(result.catalog) else 0} "
                 f"with score >= {config.score_threshold} ({result.wall_s:.1f} s wall)")
    for rec in result.records:
        tag = " (resumed)" if rec.get("resumed") else ""
        if rec["status"] != "done":
            lines.append(f"  {rec['ccd']}: FAILED at {rec.get('failed_stage')}: {rec.get('error')}")
            continue
        s = rec.get("truth_summary")
        if s:
            lines.append(f"  {rec['ccd']}: {rec['n_candidates']} candidates; completeness {s['n_selected']}/{s['n_transients']}"
                         f" = {s['completeness']:.1%} (detected {s['completeness_detected']:.1%}); "
                         f"false positives {s['n_false_positives']}{tag}")
        else:
            lines.append(f"  {rec['ccd']}: {rec['n_candidates']} candidates{tag}")
    tot = total_summary(result.records)
    if tot:
        lines.append(f"  total: completeness {tot['completeness']:.1%} ({tot['n_selected']}/{tot['n_transients']}), "
                     f"false positives per CCD {tot['false_positives_per_ccd']:.1f}, purity {tot['purity']:.1%}")
    table = stage_table(result.records, "wall_s")
    if table:
        lines.append("  time per stage (median s per CCD): " + ", ".join(f"{s} {v['median']:.2f}" for s, v in table.items()))
    lines.append(f"  outputs: {result.out_dir}/candidates.fits, candidates.parquet, run.json")
    return "\n".join(lines)
