"""Per-stage speed of both modes through the real pipeline, against a baseline revision in the same run.

Usage (from the repository root)::

    python -m benchmarks.bench_stages [--ccds 4] [--shape 4096x2048] [--seed 9000] [--workers 2]
                                      [--repeats 3] [--baseline REV | --baseline-json REPORT.json]
                                      [--out DIR] [--input MANIFEST]

What it does:

1. simulates a held-out DECam field (``--ccds`` CCD pairs, seed 9000; the shipped weights were
   trained on seeds 1000+) once, or takes ``--input``;
2. runs the dia and the direct mode on it through :func:`pipeline.runner.run_pipeline` (the graph of
   ``pipeline run``) on a LocalCluster of ``--workers`` one-thread workers, a fresh cluster per mode
   so that each worker's peak resident memory belongs to that mode; while a mode runs, each worker's
   resident memory is sampled (psutil, through ``client.run``) besides the peak the runner records
   (the worker's high-water mark, ``VmHWM``, in ``run.json``);
3. with ``--baseline REV``, extracts ``REV`` (``git archive``, no change to the repository) into a
   temporary folder and runs the very same measurement with that tree first on ``PYTHONPATH``;
   the baseline and the working tree run alternately, ``--repeats`` times each, every run in a
   subprocess of its own (the workers report where they imported ``pipeline`` from, and the
   script stops if that is not the tree it meant to measure);
4. writes ``report.md`` and ``report.json`` (atomically) in ``--out``: per-stage wall and CPU
   seconds per CCD of both modes (median over the repeats of the per-CCD means), before and after
   with the speed-up ``before / after``, the dia budget of issue #12 stage by stage, the peak
   memory per worker, the extrapolation to a DECam exposure and an LSST visit
   (:func:`benchmarks.metrics.extrapolate`) and the cores each mode needs to keep up with an LSST
   visit every 40 s, and the machine's load average at the start and the end.

Speeds are compared as ratios measured minutes apart on the same machine; absolute seconds on a
shared machine move with its load (reported).  No timed assertion is made anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "MODES",
    "TARGETS",
    "TOTAL_TARGET_S",
    "RSS_TARGET_MB",
    "LSST_VISIT_S",
    "StageBenchConfig",
    "measure",
    "summarize_run",
    "aggregate",
    "compare",
    "check_targets",
    "cadence_cores",
    "extrapolation",
    "build_report",
    "render_markdown",
    "write_report",
    "baseline_tree",
    "main",
]

REPO = Path(__file__).resolve().parents[1]

#: Modes measured, in report order.
MODES = ("dia", "direct")

#: Issue #12's dia budget: (row name, cost stages summed, seconds per DECam CCD).
TARGETS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("load", ("load",), 0.3),
    ("align", ("align",), 0.5),
    ("PSF fit + subtract", ("psf_fit", "convolve"), 1.0),
    ("detect", ("detect",), 0.5),
    ("stamps + CNN", ("stamps", "score"), 0.4),
    ("write", ("write",), 0.1),
)
#: Issue #12's dia total per DECam CCD (wall s, one-thread workers).
TOTAL_TARGET_S = 3.0
#: Issue #12's peak resident memory per worker (1 GB, taken as 1024 MiB: the runner and psutil report MiB).
RSS_TARGET_MB = 1024.0
#: An LSST visit every 40 s (189 science CCDs of 4096 x 4096).
LSST_VISIT_S = 40.0

_STAGE_NAMES = {"load": "load", "align": "align", "psf_fit": "PSF fit", "convolve": "convolve/subtract",
                "detect": "detect", "stamps": "stamps", "score": "CNN", "write": "write"}


@dataclasses.dataclass(frozen=True)
class StageBenchConfig:
    """What the per-stage benchmark measures.

    Attributes
    ----------
    n_ccds : int
        Simulated CCD pairs (default 4).
    shape : (int, int), optional
        CCD shape ``(ny, nx)`` (default None: the DECam preset, 4096 x 2048).
    seed : int
        Simulation seed (default 9000: held out from the training seeds 1000+).
    workers : int
        Dask workers, one thread each (default 2).
    repeats : int
        Runs of each revision (default 3; the table holds medians).
    scheduler : str
        ``local`` (default: a LocalCluster of worker processes, as ``pipeline benchmark``) or
        ``threads`` (Dask's threaded scheduler in one process: for quick tests; memory is then the
        process's).
    modes : tuple of str
        Modes measured (default both).
    rss_interval_s : float
        Seconds between samples of the workers' resident memory (default 0.25).
    score_threshold : float
        Operating threshold of both modes (default 0.5).
    extrapolate_workers : tuple of int
        Worker counts of the extrapolated wall times (default 2, 16, 64).
    """

    n_ccds: int = 4
    shape: tuple[int, int] | None = None
    seed: int = 9000
    workers: int = 2
    repeats: int = 3
    scheduler: str = "local"
    modes: tuple[str, ...] = MODES
    rss_interval_s: float = 0.25
    score_threshold: float = 0.5
    extrapolate_workers: tuple[int, ...] = (2, 16, 64)

    def __post_init__(self) -> None:
        if self.n_ccds < 1:
            raise ValueError(f"StageBenchConfig.n_ccds must be >= 1, got {self.n_ccds}")
        if self.workers < 1:
            raise ValueError(f"StageBenchConfig.workers must be >= 1, got {self.workers}")
        if self.repeats < 1:
            raise ValueError(f"StageBenchConfig.repeats must be >= 1, got {self.repeats}")
        if self.scheduler not in ("local", "threads"):
            raise ValueError(f"StageBenchConfig.scheduler must be 'local' or 'threads', got {self.scheduler!r}")
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ValueError(f"StageBenchConfig.modes must be a non-empty subset of {MODES}, got {self.modes}")
        if self.rss_interval_s <= 0:
            raise ValueError(f"StageBenchConfig.rss_interval_s must be > 0, got {self.rss_interval_s}")


# ----------------------------------------------------------------------------- worker functions


def _rss_mb() -> float:
    """Resident memory of this process now (MiB)."""
    import psutil

    return psutil.Process().memory_info().rss / 1024.0**2


def _code_origin() -> str:
    """Folder this process imported the pipeline from."""
    import pipeline

    return str(Path(pipeline.__file__).resolve().parents[1])


class _RssSampler:
    """Samples every worker's resident memory (or this process's, without a client) in a thread."""

    def __init__(self, client, interval: float) -> None:
        self.client, self.interval = client, interval
        self.peak: dict[str, float] = {}
        self.n = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        try:
            # without a client the stages run in this process: key it as the runner names its threads
            now = self.client.run(_rss_mb) if self.client is not None else {f"pid{os.getpid()}": _rss_mb()}
        except Exception:  # noqa: BLE001 - a worker busy restarting: skip this sample
            return
        self.n += 1
        for w, v in now.items():
            self.peak[str(w)] = max(self.peak.get(str(w), 0.0), float(v))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "_RssSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# ----------------------------------------------------------------------------- one measurement (any revision)


def measure(manifest: str | Path, out_dir: str | Path, config: StageBenchConfig, label: str = "") -> dict[str, Any]:
    """Run each mode once on the manifest's CCDs; what each run recorded.

    Uses only names that every revision of the pipeline has (``run_pipeline``, ``RunConfig``,
    ``SchedulerConfig``, ``start_client``), so the same body measures a baseline tree.

    Parameters
    ----------
    manifest : path
        Manifest of the CCD pairs.
    out_dir : path
        Folder of the runs (``<mode>/`` each, with its catalogs and ``run.json``).
    config : StageBenchConfig
    label : str
        Name of this measurement in the report (e.g. ``after-r0``).

    Returns
    -------
    dict
        ``label``, ``code_origin`` (where this process and its workers imported ``pipeline``),
        ``modes``: per mode the run's wall seconds, the parsed ``run.json`` and the sampled
        peak resident memory per worker (MiB).
    """
    from pipeline.cluster import SchedulerConfig, start_client
    from pipeline.config import RunConfig
    from pipeline.io import read_manifest
    from pipeline.runner import run_pipeline

    out = Path(out_dir)
    entries = read_manifest(manifest)
    result: dict[str, Any] = {"label": label, "code_origin": {"main": _code_origin()}, "modes": {},
                              "load_average_start": _loadavg()}
    for mode in config.modes:
        sched = SchedulerConfig(kind=config.scheduler, workers=config.workers, threads_per_worker=1,
                                dashboard_address="localhost:0")
        client, cluster = start_client(sched)
        try:
            if client is not None:
                result["code_origin"].update({str(k): v for k, v in client.run(_code_origin).items()})
            run_config = RunConfig(mode=mode, device="cpu", score_threshold=config.score_threshold)
            run_dir = out / mode
            with _RssSampler(client, config.rss_interval_s) as sampler:
                res = run_pipeline(entries, run_config, run_dir, sched, progress=False, client=client)
            run_json = json.loads((run_dir / "run.json").read_text())
            result["modes"][mode] = {"wall_s": float(res.wall_s), "n_failed": int(res.n_failed),
                                     "run_json": run_json, "rss_sampled_mb": sampler.peak,
                                     "rss_samples": sampler.n}
        finally:
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()
    result["load_average_end"] = _loadavg()
    return result


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# ----------------------------------------------------------------------------- numbers (pure)


def summarize_run(mode_result: Mapping[str, Any]) -> dict[str, Any]:
    """Per-stage cost of one mode's run (:func:`benchmarks.metrics.cost_summary`) and its peak memory.

    Parameters
    ----------
    mode_result : dict
        One entry of :func:`measure`'s ``modes``.

    Returns
    -------
    dict
        ``stages`` (stage -> {``wall_s``, ``cpu_s``} per CCD), ``wall_per_ccd``, ``cpu_per_ccd``,
        ``core_s_per_ccd``, ``run_wall_s``, ``n_done``, ``n_failed``, ``peak_rss_mb`` (worker ->
        the larger of the sampled peak and the runner's high-water mark) and ``peak_rss_mb_max``.
    """
    from benchmarks.metrics import cost_summary

    run = mode_result["run_json"]
    threads = int((run.get("scheduler") or {}).get("threads_per_worker") or 1)
    cost = cost_summary(run, threads)
    peak = {str(k): float(v) for k, v in cost["peak_rss_mb_per_worker"].items()}
    sampled = {str(k): float(v) for k, v in (mode_result.get("rss_sampled_mb") or {}).items()}
    # the runner names workers by address or name; sampled peaks are keyed by address
    if sampled:
        merged = dict(sampled)
        for k, v in peak.items():
            match = [s for s in sampled if k in s or s in k]
            if match:
                merged[match[0]] = max(merged[match[0]], v)
            else:
                merged[k] = max(merged.get(k, 0.0), v)
        peak = merged
    return {
        "stages": {s["stage"]: {"wall_s": s["wall_s"], "cpu_s": s["cpu_s"]} for s in cost["stages"]},
        "wall_per_ccd": cost["wall_per_ccd"], "cpu_per_ccd": cost["cpu_per_ccd"],
        "core_s_per_ccd": cost["core_s_per_ccd"], "run_wall_s": float(mode_result.get("wall_s", cost["run_wall_s"])),
        "n_done": cost["n_done"], "n_failed": cost["n_failed"],
        "failures": {r["ccd"]: f"{r.get('failed_stage')}: {str(r.get('error'))[:300]}"
                     for r in run["ccds"] if r.get("status") == "failed"},
        "peak_rss_mb": dict(sorted(peak.items())), "peak_rss_mb_max": max(peak.values()) if peak else float("nan"),
        "steady": {"stages": {s["stage"]: {"wall_s": s["wall_s"], "cpu_s": s["cpu_s"],
                                           "first_wall_s": s["first_wall_s"], "n": s["n"]}
                              for s in cost["steady"]["stages"]},
                   "wall_per_ccd": cost["steady"]["wall_per_ccd"], "cpu_per_ccd": cost["steady"]["cpu_per_ccd"],
                   "start_up_s": cost["steady"]["start_up_s"]},
    }


def _stage_order(names: Iterable[str]) -> list[str]:
    from benchmarks.metrics import COST_STAGES

    names = set(names)
    return [s for s in COST_STAGES if s in names] + sorted(names - set(COST_STAGES))


def aggregate(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median over repeats of one mode's :func:`summarize_run` results.

    Per stage the median of the per-CCD mean wall and CPU seconds (and their min and max), the
    median per-CCD totals and run wall time, and the largest peak memory of any worker in any repeat.
    """
    if not summaries:
        raise ValueError("aggregate: no runs to aggregate")
    stages = _stage_order(k for s in summaries for k in s["stages"])
    out_stages = {}
    for st in stages:
        walls = [s["stages"][st]["wall_s"] for s in summaries if st in s["stages"]]
        cpus = [s["stages"][st]["cpu_s"] for s in summaries if st in s["stages"]]
        out_stages[st] = {"wall_s": float(np.median(walls)), "cpu_s": float(np.median(cpus)),
                          "wall_min": float(np.min(walls)), "wall_max": float(np.max(walls)), "n": len(walls)}
    peaks = [s["peak_rss_mb_max"] for s in summaries if np.isfinite(s["peak_rss_mb_max"])]
    return {
        "stages": out_stages,
        "steady": _aggregate_steady([s["steady"] for s in summaries if s.get("steady")], stages),
        "wall_per_ccd": float(np.median([s["wall_per_ccd"] for s in summaries])),
        "cpu_per_ccd": float(np.median([s["cpu_per_ccd"] for s in summaries])),
        "core_s_per_ccd": float(np.median([s["core_s_per_ccd"] for s in summaries])),
        "wall_per_ccd_all": [float(s["wall_per_ccd"]) for s in summaries],
        "run_wall_s": float(np.median([s["run_wall_s"] for s in summaries])),
        "n_repeats": len(summaries),
        "n_failed": int(sum(s["n_failed"] for s in summaries)),
        "failures": {k: v for s in summaries for k, v in (s.get("failures") or {}).items()},
        "peak_rss_mb_max": float(max(peaks)) if peaks else float("nan"),
        "peak_rss_mb_per_repeat": [dict(s["peak_rss_mb"]) for s in summaries],
    }


def _nanmedian(values: Sequence[float]) -> float:
    values = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.median(values)) if values else float("nan")


def _aggregate_steady(steady: Sequence[Mapping[str, Any]], stages: Sequence[str]) -> dict[str, Any] | None:
    """Median over repeats of the steady-state costs (:func:`benchmarks.metrics.steady_state`); None without them
    (runs recorded before the stages' start times were)."""
    if not any(np.isfinite(_nanmedian([s.get("wall_per_ccd")])) for s in steady):
        return None
    out = {}
    for st in stages:
        rows = [s["stages"][st] for s in steady if st in s["stages"]]
        out[st] = {k: _nanmedian([r[k] for r in rows]) for k in ("wall_s", "cpu_s", "first_wall_s")}
        out[st]["n"] = int(sum(r["n"] for r in rows))
    return {"stages": out, "wall_per_ccd": _nanmedian([s["wall_per_ccd"] for s in steady]),
            "cpu_per_ccd": _nanmedian([s["cpu_per_ccd"] for s in steady]),
            "start_up_s": _nanmedian([s["start_up_s"] for s in steady])}


def _ratio(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or not (np.isfinite(before) and np.isfinite(after)) or after <= 0:
        return None
    return float(before / after)


def compare(after: Mapping[str, Any], before: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Per-stage rows of one mode: after, before and the speed-up ``before / after`` (wall and CPU).

    Both arguments are :func:`aggregate` results (``before`` None: no baseline).  The last row is
    the total per CCD.  A stage one side lacks has None on that side and no ratio.
    """
    names = _stage_order(list(after["stages"]) + (list(before["stages"]) if before else []))
    rows = []
    for st in names:
        a = after["stages"].get(st)
        b = before["stages"].get(st) if before else None
        row = {"stage": st, "name": _STAGE_NAMES.get(st, st),
               "after_wall_s": a["wall_s"] if a else None, "after_cpu_s": a["cpu_s"] if a else None,
               "before_wall_s": b["wall_s"] if b else None, "before_cpu_s": b["cpu_s"] if b else None}
        row["speedup_wall"] = _ratio(row["before_wall_s"], row["after_wall_s"])
        row["speedup_cpu"] = _ratio(row["before_cpu_s"], row["after_cpu_s"])
        rows.append(row)
    total = {"stage": "total", "name": "total", "after_wall_s": after["wall_per_ccd"],
             "after_cpu_s": after["cpu_per_ccd"],
             "before_wall_s": before["wall_per_ccd"] if before else None,
             "before_cpu_s": before["cpu_per_ccd"] if before else None}
    total["speedup_wall"] = _ratio(total["before_wall_s"], total["after_wall_s"])
    total["speedup_cpu"] = _ratio(total["before_cpu_s"], total["after_cpu_s"])
    rows.append(total)
    return rows


def _steady_as_aggregate(agg: Mapping[str, Any]) -> dict[str, Any]:
    """An :func:`aggregate` result whose stage costs and total are its steady-state ones (peak memory unchanged)."""
    steady = agg["steady"]
    return {"stages": steady["stages"], "wall_per_ccd": steady["wall_per_ccd"], "cpu_per_ccd": steady["cpu_per_ccd"],
            "peak_rss_mb_max": agg["peak_rss_mb_max"]}


def check_targets(agg: Mapping[str, Any], scale: float = 1.0) -> dict[str, Any]:
    """The dia mode's costs against issue #12's budget (:data:`TARGETS`, :data:`TOTAL_TARGET_S`, :data:`RSS_TARGET_MB`).

    Parameters
    ----------
    agg : dict
        :func:`aggregate` of the dia runs.
    scale : float
        DECam CCD pixels / measured CCD pixels (the budget is per 2048 x 4096 CCD; costs are
        scaled by pixel count when another shape was measured).

    Returns
    -------
    dict
        ``rows`` (name, stages, target, measured wall s scaled, met), ``total`` and ``rss`` rows
        the same way, and ``all_met``.
    """
    rows = []
    for name, stages, target in TARGETS:
        have = [agg["stages"][s]["wall_s"] for s in stages if s in agg["stages"]]
        value = float(sum(have)) * scale if have else None
        rows.append({"name": name, "stages": list(stages), "target_s": target, "wall_s": value,
                     "met": None if value is None else bool(value <= target)})
    total = agg["wall_per_ccd"] * scale
    total_row = {"name": "total", "target_s": TOTAL_TARGET_S, "wall_s": total, "met": bool(total <= TOTAL_TARGET_S)}
    rss = agg["peak_rss_mb_max"]
    rss_row = {"name": "peak RSS per worker (MiB)", "target_mb": RSS_TARGET_MB, "mb": rss,
               "met": None if not np.isfinite(rss) else bool(rss <= RSS_TARGET_MB)}
    met = [r["met"] for r in rows] + [total_row["met"], rss_row["met"]]
    return {"rows": rows, "total": total_row, "rss": rss_row, "scale": scale,
            "all_met": all(m is True for m in met)}


def cadence_cores(core_s_per_ccd: float, n_ccds: int, cadence_s: float) -> float:
    """Cores needed to process ``n_ccds`` CCDs of ``core_s_per_ccd`` each every ``cadence_s`` seconds.

    Perfect parallelism over CCDs is assumed (no scheduling loss): ``n_ccds x core_s_per_ccd / cadence_s``.
    """
    if cadence_s <= 0:
        raise ValueError(f"cadence_cores: cadence_s must be > 0, got {cadence_s}")
    return float(n_ccds * core_s_per_ccd / cadence_s)


def extrapolation(core_s_per_ccd: float, ccd_pixels: int, workers: Sequence[int] = (2, 16, 64),
                  cpu_s_per_ccd: float | None = None) -> list[dict]:
    """:func:`benchmarks.metrics.extrapolate` rows plus, for the LSST visit, the cores needed every 40 s.

    ``cores_for_cadence`` uses the wall core-seconds; ``cores_for_cadence_cpu`` the CPU seconds
    (the figure for an unloaded machine: on a shared machine wall time also counts waiting for a core).
    """
    from benchmarks.metrics import extrapolate

    rows = extrapolate(core_s_per_ccd, ccd_pixels, None, workers)
    for row in rows:
        if row["target"].startswith("LSST"):
            row["cadence_s"] = LSST_VISIT_S
            row["cores_for_cadence"] = cadence_cores(row["core_s_per_ccd"], row["n_ccds"], LSST_VISIT_S)
            if cpu_s_per_ccd is not None and np.isfinite(cpu_s_per_ccd):
                row["cores_for_cadence_cpu"] = cadence_cores(cpu_s_per_ccd * row["pixel_scale_factor"],
                                                             row["n_ccds"], LSST_VISIT_S)
    return rows


# ----------------------------------------------------------------------------- report


def build_report(after: Mapping[str, Sequence[Mapping[str, Any]]], before: Mapping[str, Sequence[Mapping]] | None,
                 ccd_shape: Sequence[int], meta: Mapping[str, Any],
                 workers: Sequence[int] = (2, 16, 64)) -> dict[str, Any]:
    """The report data from the :func:`summarize_run` results of each mode (lists over repeats).

    Parameters
    ----------
    after, before : dict mode -> list of summaries
        The code measured and its baseline (None: no baseline).
    ccd_shape : (ny, nx)
        Measured CCD shape (for the pixel scaling of targets and extrapolations).
    meta : dict
        Copied into the report (machine, load averages, revisions, configuration, ...).
    """
    from benchmarks.metrics import FOCAL_PLANES

    pixels = int(ccd_shape[0]) * int(ccd_shape[1])
    decam_scale = FOCAL_PLANES[0].pixels_per_ccd / pixels
    data: dict[str, Any] = dict(meta)
    data.update(ccd_shape=list(ccd_shape), modes={}, has_baseline=before is not None)
    for mode in MODES:
        if mode not in after:
            continue
        agg_a = aggregate(after[mode])
        agg_b = aggregate(before[mode]) if before and before.get(mode) else None
        entry = {"after": agg_a, "before": agg_b, "rows": compare(agg_a, agg_b),
                 "extrapolation": {"after": extrapolation(agg_a["core_s_per_ccd"], pixels, workers,
                                                          agg_a["cpu_per_ccd"])}}
        if agg_b is not None:
            entry["extrapolation"]["before"] = extrapolation(agg_b["core_s_per_ccd"], pixels, workers,
                                                             agg_b["cpu_per_ccd"])
        if mode == "dia":
            entry["targets"] = {"after": check_targets(agg_a, decam_scale)}
            if agg_a.get("steady"):
                entry["targets"]["steady"] = check_targets(_steady_as_aggregate(agg_a), decam_scale)
            if agg_b is not None:
                entry["targets"]["before"] = check_targets(agg_b, decam_scale)
        data["modes"][mode] = entry
    if "dia" in data["modes"] and "direct" in data["modes"]:
        data["dia_over_direct"] = {
            k: _ratio(data["modes"]["dia"][k]["wall_per_ccd"], data["modes"]["direct"][k]["wall_per_ccd"])
            for k in ("after", "before") if data["modes"]["dia"].get(k) and data["modes"]["direct"].get(k)}
        steady = [(data["modes"][m].get("after") or {}).get("steady") for m in ("dia", "direct")]
        if all(steady):
            data["dia_over_direct"]["after, steady state"] = _ratio(steady[0]["wall_per_ccd"],
                                                                    steady[1]["wall_per_ccd"])
    return data


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def render_markdown(data: Mapping[str, Any]) -> str:
    """``report.md`` text of :func:`build_report` data."""
    base = data.get("has_baseline")
    rev = data.get("revisions", {})
    lines = ["# Per-stage speed of both modes", ""]
    lines.append(f"Made {data.get('created', '?')} on {data.get('machine', {}).get('cpu_model', '?')}, "
                 f"{data.get('machine', {}).get('cores', '?')} cores; {data.get('n_ccds', '?')} CCD pair(s) "
                 f"of {data['ccd_shape'][0]} x {data['ccd_shape'][1]} px ("
                 + (f"simulated, seed {data.get('seed', '?')}" if data.get("simulated", True)
                    else f"from {data.get('manifest', '?')}") + "), "
                 f"{data.get('workers', '?')} one-thread worker(s) ({data.get('scheduler', 'local')}), "
                 f"median of {data.get('repeats', '?')} run(s) of each revision"
                 + (", the two revisions alternating." if base else "."))
    lines.append(f"After: {rev.get('after', {}).get('label', 'working tree')}."
                 + (f" Before: {rev.get('before', {}).get('label', '?')}." if base else " No baseline."))
    la0, la1 = data.get("load_average_start"), data.get("load_average_end")
    if la0 or la1:
        lines.append(f"Load average at start {_la(la0)}, at end {_la(la1)} (other processes slow every figure alike; "
                     "compare the ratios).")
    lines.append("")
    for mode, entry in data["modes"].items():
        lines.append(f"## {mode}: wall and CPU seconds per CCD")
        lines.append("")
        if base:
            lines.append("| stage | before wall | after wall | speed-up wall | before CPU | after CPU | speed-up CPU |")
            lines.append("|---|---|---|---|---|---|---|")
            for r in entry["rows"]:
                name = f"**{r['name']}**" if r["stage"] == "total" else r["name"]
                lines.append(f"| {name} | {_f(r['before_wall_s'])} | {_f(r['after_wall_s'])} | "
                             f"{_f(r['speedup_wall'], 'x{:.2f}')} | {_f(r['before_cpu_s'])} | {_f(r['after_cpu_s'])} | "
                             f"{_f(r['speedup_cpu'], 'x{:.2f}')} |")
        else:
            lines.append("| stage | wall s | CPU s |")
            lines.append("|---|---|---|")
            for r in entry["rows"]:
                name = f"**{r['name']}**" if r["stage"] == "total" else r["name"]
                lines.append(f"| {name} | {_f(r['after_wall_s'])} | {_f(r['after_cpu_s'])} |")
        lines.append("")
        for side in ("before", "after"):
            agg = entry.get(side)
            if agg is None:
                continue
            per = "; ".join(", ".join(f"{w} {v:.0f}" for w, v in p.items()) for p in agg["peak_rss_mb_per_repeat"])
            lines.append(f"- {side}: run wall {agg['run_wall_s']:.1f} s (median), total s/CCD per repeat "
                         f"{', '.join(f'{v:.2f}' for v in agg['wall_per_ccd_all'])}; failed CCDs {agg['n_failed']}; "
                         f"peak RSS per worker (MiB) {per}")
            for ccd, err in (agg.get("failures") or {}).items():
                lines.append(f"  - {side} failed CCD {ccd}: {err}")
        steady = (entry.get("after") or {}).get("steady")
        if steady:
            lines.append(f"Steady state ({mode}, after): each worker's first run of each stage left out. It pays what "
                         "a worker pays once (the pages its heap touches first, caches filled on first use); a long "
                         "run's cost per CCD tends to the later runs' figure.")
            lines.append("")
            lines.append("| stage | all runs | later runs | first run on a worker | later runs measured |")
            lines.append("|---|---|---|---|---|")
            for r in entry["rows"]:
                if r["stage"] == "total":
                    continue
                st = steady["stages"].get(r["stage"], {})
                lines.append(f"| {r['name']} | {_f(r['after_wall_s'])} | {_f(st.get('wall_s'))} | "
                             f"{_f(st.get('first_wall_s'))} | {st.get('n', 0)} |")
            lines.append(f"| **total** | {_f(entry['after']['wall_per_ccd'])} | {_f(steady['wall_per_ccd'])} | - | - |")
            lines.append("")
            lines.append(f"Once per worker (first runs minus later runs, summed over the stages): "
                         f"{_f(steady['start_up_s'], '{:.2f}')} s.")
            lines.append("")
    if "dia_over_direct" in data:
        lines.append("dia / direct wall cost per CCD: " + ", ".join(
            f"{k} {_f(v, '{:.2f}')}" for k, v in data["dia_over_direct"].items()))
        lines.append("")
    dia = data["modes"].get("dia")
    if dia and "targets" in dia:
        t_after = dia["targets"]["after"]
        t_before = dia["targets"].get("before")
        lines.append(f"## dia against issue #12's budget (s per DECam CCD; measured costs x {t_after['scale']:.3g} "
                     "for the pixel count)")
        lines.append("")
        head = "| budget row | target | " + ("before | " if t_before else "") + "after | met (after) |"
        lines.append(head)
        lines.append("|---|---|" + ("---|" if t_before else "") + "---|---|")
        rows_b = {r["name"]: r for r in t_before["rows"]} if t_before else {}
        for r in t_after["rows"] + [t_after["total"]]:
            b = rows_b.get(r["name"]) if r["name"] != "total" else (t_before["total"] if t_before else None)
            lines.append(f"| {r['name']} | <= {r['target_s']:g} | " + (f"{_f(b['wall_s'] if b else None)} | "
                                                                          if t_before else "")
                         + f"{_f(r['wall_s'])} | {_yes(r['met'])} |")
        rs = t_after["rss"]
        rb = t_before["rss"] if t_before else None
        lines.append(f"| peak RSS per worker | <= {rs['target_mb']:.0f} MiB | " + (f"{_f(rb['mb'], '{:.0f}')} | "
                                                                                  if t_before else "")
                     + f"{_f(rs['mb'], '{:.0f}')} | {_yes(rs['met'])} |")
        lines.append("")
        lines.append(f"All of issue #12's dia targets met: {_yes(t_after['all_met'])}.")
        lines.append("")
        t_steady = dia["targets"].get("steady")
        if t_steady:
            lines.append("The same budget in steady state (each worker's first run of each stage left out):")
            lines.append("")
            lines.append("| budget row | target | after, steady state | met |")
            lines.append("|---|---|---|---|")
            for r in t_steady["rows"] + [t_steady["total"]]:
                lines.append(f"| {r['name']} | <= {r['target_s']:g} | {_f(r['wall_s'])} | {_yes(r['met'])} |")
            lines.append("")
    lines.append("## Extrapolation (per-CCD core-seconds scaled by pixel count; perfect parallelism)")
    lines.append("")
    ws = data.get("extrapolate_workers", [2, 16, 64])
    lines.append("| mode | code | target | CCDs | core-s / CCD | core-hours | "
                 + " | ".join(f"min on {w} workers" for w in ws)
                 + " | cores for one visit / 40 s (wall) | (CPU) |")
    lines.append("|---|---|---|---|---|---|" + "---|" * len(ws) + "---|---|")
    for mode, entry in data["modes"].items():
        for side, rows in entry["extrapolation"].items():
            for r in rows:
                shape = f"{r['ccd_shape'][0]}x{r['ccd_shape'][1]}"
                lines.append(f"| {mode} | {side} | {r['target']} | {r['n_ccds']} x {shape} "
                             f"| {r['core_s_per_ccd']:.2f} | {r['core_hours']:.3f} | "
                             + " | ".join(_f(r["wall_min_on_workers"].get(str(w)), "{:.1f}") for w in ws)
                             + f" | {_f(r.get('cores_for_cadence'), '{:.0f}')} "
                             f"| {_f(r.get('cores_for_cadence_cpu'), '{:.0f}')} |")
    lines.append("")
    return "\n".join(lines)


def _la(v) -> str:
    return ", ".join(f"{x:.1f}" for x in v) if v else "?"


def _yes(v) -> str:
    return "-" if v is None else ("yes" if v else "no")


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj):
    """NaN and infinities as None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_text(path: Path, text: str) -> None:
    from pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_report(data: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` in ``out_dir`` (each atomically); their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "report.json", out / "report.md"
    _write_text(js, json.dumps(_finite(data), indent=1, default=_json_default, allow_nan=False))
    _write_text(md, render_markdown(data))
    return js, md


# ----------------------------------------------------------------------------- revisions and driver


def baseline_tree(rev: str, dest: str | Path, repo: str | Path = REPO) -> tuple[Path, str]:
    """Extract revision ``rev`` of ``repo`` into ``dest`` (``git archive``; the repository is not changed).

    This script is copied into the tree (it may not exist at ``rev``) so the same measurement
    body runs there.  Returns the tree and the full commit id.
    """
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         capture_output=True, text=True)
    if sha.returncode != 0:
        raise ValueError(f"--baseline {rev}: not a revision of {repo}: {sha.stderr.strip()}")
    commit = sha.stdout.strip()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "-C", str(repo), "archive", commit], stdout=subprocess.PIPE)
    untar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout)
    archive.stdout.close()
    if archive.wait() != 0 or untar.returncode != 0:
        raise RuntimeError(f"could not extract {commit} into {dest}")
    (dest / "benchmarks").mkdir(exist_ok=True)
    if not (dest / "benchmarks" / "__init__.py").exists():
        (dest / "benchmarks" / "__init__.py").write_text("")
    shutil.copy2(Path(__file__), dest / "benchmarks" / "bench_stages.py")
    return dest, commit


def _run_body(tree: Path, manifest: Path, out_dir: Path, config: StageBenchConfig, label: str, log: Path) -> dict:
    """One :func:`measure` in a subprocess importing the pipeline from ``tree``; its result."""
    body_json = out_dir / "measure.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree)] + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, "-m", "benchmarks.bench_stages", "--body", "--input", str(manifest),
           "--out", str(out_dir), "--label", label, "--config-json", json.dumps(dataclasses.asdict(config))]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {label} in {tree} failed (exit {proc.returncode}); see {log}")
    result = json.loads(body_json.read_text())
    want = str(Path(tree).resolve())
    wrong = {k: v for k, v in result["code_origin"].items() if v != want}
    if wrong:
        raise RuntimeError(f"measurement {label} imported the pipeline from {wrong}, not {want}")
    return result


def _simulate(out: Path, config: StageBenchConfig) -> Path:
    from pipeline.simulate import SimulationConfig, write_simulation

    sim = dataclasses.replace(SimulationConfig(), instrument="decam", shape=config.shape)
    return write_simulation(out / "input", config.n_ccds, config.seed, sim)


def _manifest_shape_and_count(manifest: Path) -> tuple[tuple[int, int], int]:
    """The CCD shape and the number of CCD pairs of a manifest (``--input``'s, not ``--ccds``), read once."""
    from benchmarks.suite import _ccd_shape as shape_of
    from pipeline.io import read_manifest

    entries = read_manifest(manifest)
    return shape_of(entries), len(entries)


def _summaries(results: Sequence[Mapping[str, Any]]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for res in results:
        for mode, m in res["modes"].items():
            out.setdefault(mode, []).append(summarize_run(m))
    return out


def run(config: StageBenchConfig, out_dir: str | Path, manifest: str | Path | None = None,
        baseline: str | None = None, baseline_json: str | Path | None = None,
        in_process: bool = False, log=print) -> dict[str, Any]:
    """The benchmark: measure this tree (and a baseline), write the report; the report data.

    Parameters
    ----------
    config : StageBenchConfig
    out_dir : path
        ``input/`` (simulated field), ``runs/<label>/<mode>/`` (each run), ``logs/``, the reports.
    manifest : path, optional
        Use these CCD pairs instead of simulating.
    baseline : str, optional
        Git revision measured alternately with this tree (extracted to a temporary folder).
    baseline_json : path, optional
        A previous ``report.json`` of this script whose "after" runs are the baseline (no new
        baseline runs); exclusive with ``baseline``.
    in_process : bool
        Measure this tree in this process (no subprocess; tests); not with ``baseline``.
    log : callable
        Progress lines.
    """
    from benchmarks.suite import machine_info

    if baseline and baseline_json:
        raise ValueError("give --baseline or --baseline-json, not both")
    if baseline and in_process:
        raise ValueError("a baseline revision runs in subprocesses; in_process is for the working tree alone")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    machine = machine_info()
    load_start = _loadavg()
    simulated = manifest is None
    if manifest is None:
        t0 = time.perf_counter()
        manifest = _simulate(out, config)
        log(f"simulated {config.n_ccds} DECam CCD pair(s), seed {config.seed} ({time.perf_counter() - t0:.0f} s)")
    manifest = Path(manifest).resolve()
    shape, n_ccds = _manifest_shape_and_count(manifest)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    revisions: dict[str, Any] = {"after": {"label": f"working tree of {REPO} (HEAD {head[:10]}"
                                           + (", with uncommitted changes)" if dirty else ")"),
                                           "head": head, "dirty": bool(dirty)}}
    tmp = None
    after_results: list[dict] = []
    before_results: list[dict] = []
    try:
        if baseline:
            tmp = Path(tempfile.mkdtemp(prefix="bench_stages_base_"))
            tree, commit = baseline_tree(baseline, tmp / "src")
            revisions["before"] = {"label": f"{baseline} ({commit[:10]}, extracted to a temporary folder)",
                                   "commit": commit}
            log(f"baseline {baseline} = {commit[:10]} extracted to {tree}")
        for r in range(config.repeats):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for side in order:
                if side == "before" and not baseline:
                    continue
                label = f"{side}-r{r}"
                run_dir = out / "runs" / label
                t0 = time.perf_counter()
                if side == "after" and in_process:
                    res = measure(manifest, run_dir, config, label)
                else:
                    res = _run_body(tree if side == "before" else REPO, manifest, run_dir, config, label,
                                    out / "logs" / f"{label}.log")
                (after_results if side == "after" else before_results).append(res)
                walls = ", ".join(f"{m} {v['wall_s']:.1f} s" for m, v in res["modes"].items())
                log(f"{label}: {walls} (load {_la(res.get('load_average_start'))}; {time.perf_counter() - t0:.0f} s)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    after = _summaries(after_results)
    before = _summaries(before_results) if before_results else None
    if baseline_json:
        prev = json.loads(Path(baseline_json).read_text())
        before = prev_summaries(prev)
        revisions["before"] = {"label": f"the 'after' runs of {baseline_json} ({prev.get('created', '?')})"}
    meta = {
        "title": "Per-stage speed of both modes (issue #12)",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine, "load_average_start": load_start, "revisions": revisions,
        "config": dataclasses.asdict(config), "n_ccds": n_ccds, "seed": config.seed,
        "workers": config.workers, "scheduler": config.scheduler, "repeats": config.repeats,
        "extrapolate_workers": list(config.extrapolate_workers), "manifest": str(manifest), "simulated": simulated,
        "runs": {"after": [_slim(r) for r in after_results], "before": [_slim(r) for r in before_results]},
        "summaries": {"after": after, "before": before},
    }
    data = build_report(after, before, shape, meta, config.extrapolate_workers)
    data["load_average_end"] = _loadavg()
    data["wall_s"] = time.perf_counter() - t_start
    js, md = write_report(data, out)
    log(f"report: {md}, {js} ({data['wall_s']:.0f} s)")
    return data


def prev_summaries(report: Mapping[str, Any]) -> dict[str, list[dict]]:
    """The per-repeat summaries of the code measured in an earlier ``report.json`` (its "after" side)."""
    summ = (report.get("summaries") or {}).get("after")
    if not summ:
        raise ValueError("baseline report has no 'summaries.after' (not a report of benchmarks.bench_stages?)")
    for runs in summ.values():
        for s in runs:
            s["peak_rss_mb_max"] = float("nan") if s.get("peak_rss_mb_max") is None else s["peak_rss_mb_max"]
    return summ


def _slim(result: Mapping[str, Any]) -> dict:
    """A measurement without the bulky run.json records (their folders keep them)."""
    return {"label": result.get("label"), "code_origin": result.get("code_origin"),
            "load_average_start": result.get("load_average_start"), "load_average_end": result.get("load_average_end"),
            "modes": {m: {k: v for k, v in r.items() if k != "run_json"} for m, r in result["modes"].items()}}


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        ny, nx = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be NYxNX, got {text!r}") from None
    return ny, nx


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_stages",
                                 description="Per-stage wall/CPU seconds per CCD of both modes, against a baseline.")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bench_stages"),
                    help="output folder (default: <tmp>/bench_stages)")
    ap.add_argument("--ccds", type=int, default=4, help="simulated DECam CCD pairs (default 4)")
    ap.add_argument("--shape", type=_parse_shape, default=None, help="CCD shape NYxNX (default 4096x2048)")
    ap.add_argument("--seed", type=int, default=9000, help="simulation seed (default 9000, held out)")
    ap.add_argument("--workers", type=int, default=2, help="one-thread Dask workers (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each revision (default 3)")
    ap.add_argument("--modes", default="dia,direct", help="modes, comma-separated (default dia,direct)")
    ap.add_argument("--scheduler", choices=("local", "threads"), default="local",
                    help="local: LocalCluster of worker processes (default); threads: one process (tests)")
    ap.add_argument("--input", default=None, help="manifest of CCD pairs instead of simulating")
    ap.add_argument("--baseline", default=None, help="git revision to measure alternately with the working tree")
    ap.add_argument("--baseline-json", default=None, help="earlier report.json of this script as the baseline")
    ap.add_argument("--in-process", action="store_true", help="measure the working tree in this process")
    # internal: one measurement of the tree this process imports, for the driver
    ap.add_argument("--body", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--label", default="", help=argparse.SUPPRESS)
    ap.add_argument("--config-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.body:
        cfg = json.loads(args.config_json)
        cfg = StageBenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
        res = measure(args.input, args.out, cfg, args.label)
        _write_text(Path(args.out) / "measure.json", json.dumps(_finite(res), default=_json_default))
        return 0
    try:
        config = StageBenchConfig(n_ccds=args.ccds, shape=args.shape, seed=args.seed, workers=args.workers,
                                  repeats=args.repeats, scheduler=args.scheduler,
                                  modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()))
        if args.baseline and args.baseline_json:
            raise ValueError("give --baseline or --baseline-json, not both")
    except ValueError as exc:
        print(f"bench_stages: {exc}", file=sys.stderr)
        return 2
    if args.input and not Path(args.input).is_file():
        print(f"bench_stages: --input {args.input}: no such manifest", file=sys.stderr)
        return 2
    if args.baseline_json and not Path(args.baseline_json).is_file():
        print(f"bench_stages: --baseline-json {args.baseline_json}: no such file", file=sys.stderr)
        return 2
    try:
        data = run(config, args.out, manifest=args.input, baseline=args.baseline, baseline_json=args.baseline_json,
                   in_process=args.in_process, log=lambda line: print(line, flush=True))
    except (ValueError, RuntimeError) as exc:
        print(f"bench_stages: {exc}", file=sys.stderr)
        return 2
    print(render_markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
