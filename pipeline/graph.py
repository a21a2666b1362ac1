"""The Dask graph of a run: one chain of named tasks per CCD pair, failure isolation, resume.

Each CCD becomes a chain of tasks named ``<stage>-<ccd>`` (``load-ccd07``,
``align-ccd07``, ...), so the dashboard's task stream reads as the pipeline:

* dia:    load -> align -> subtract -> detect -> stamps -> score -> write
* direct: load -> detect -> stamps -> score -> write

The tasks only call :mod:`pipeline.steps`; the graph holds no science.  A task
receives the CCD's :class:`CcdState` and returns a new one; an exception in a
stage is caught and recorded (stage, error), the CCD's remaining stages pass it
through, and the run goes on with the other CCDs.  Every CCD's outputs are
written under temporary names and renamed, its status file last, so
``resume`` can trust what it finds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
from astropy.table import Table, vstack

from pipeline import steps
from pipeline.config import RunConfig, config_to_dict
from pipeline.io import PairEntry, atomic_path

__all__ = ["CcdState", "STAGES", "build_graph", "config_hash", "ccd_outputs_complete", "collect_catalog"]

STAGES = {
    "dia": ("load", "align", "subtract", "detect", "stamps", "score", "write"),
    "direct": ("load", "detect", "stamps", "score", "write"),
}
#: Stages that use the accelerator when device="gpu" (they carry the Dask resource {"GPU": 1}).
GPU_STAGES = ("subtract", "score")


@dataclasses.dataclass
class CcdState:
    """What flows along one CCD's chain: results so far, timings, and failure if any."""

    ccd: str
    entry: PairEntry
    status: str = "running"
    failed_stage: str | None = None
    error: str | None = None
    traceback: str | None = None
    wall: dict = dataclasses.field(default_factory=dict)
    cpu: dict = dataclasses.field(default_factory=dict)
    peak_rss_mb: dict = dataclasses.field(default_factory=dict)
    worker: str | None = None
    pair: Any = None
    aligned: Any = None
    diff: Any = None
    candidates: Any = None
    stamps: Any = None
    scores: Any = None
    diff_stats: dict | None = None
    n_candidates: int = 0
    summary: dict | None = None


def config_hash(config: RunConfig) -> str:
    """Stable hash of the run configuration (what a resumed CCD must have been made with)."""
    blob = json.dumps(config_to_dict(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ccd_paths(out_dir: Path, ccd: str) -> dict[str, Path]:
    """Per-CCD output files."""
    base = Path(out_dir) / "ccds"
    return {"catalog": base / f"{ccd}.fits", "status": base / f"{ccd}.json", "diff": Path(out_dir) / "diff" / f"{ccd}.fits"}


def ccd_outputs_complete(out_dir: Path, ccd: str, chash: str) -> dict | None:
    """The CCD's status record if its outputs are complete and made with this configuration."""
    paths = ccd_paths(out_dir, ccd)
    if not paths["status"].exists() or not paths["catalog"].exists():
        return None
    try:
        record = json.loads(paths["status"].read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("status") != "done" or record.get("config_hash") != chash:
        return None
    return record


# ----------------------------------------------------------------------------- stages


def _stage_load(state: CcdState, config: RunConfig, out_dir: Path) -> None:
    state.pair = steps.load_pair(state.entry)


def _stage_align(state: CcdState, config: RunConfig, out_dir: Path) -> None:
    state.aligned = steps.align(state.pair, config)


def _stage_subtract(state: CcdState, config: RunConfig, out_dir: Path) -> None:
    diff = steps.psf_match_subtract(state.aligned, config)
    state.diff = diff
    stats = getattr(diff, "stats", None)
    state.diff_stats = {
        "convolved": diff.convolved,
        "stats": dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else None,
        "timings": dict(getattr(diff, "timings", {}) or {}),
    }
    if config.save_diff:
        from pipeline.io import write_difference

        write_difference(diff, state.aligned.search, ccd_paths(out_dir, state.ccd)["diff"])


def _stage_detect(state: CcdState, config: RunConfig, out_dir: Path) -> None:
    if config.mode == "dia":
        state.candidates = steps.detect_on_difference(state.diff, state.aligned, config, ccd=state.ccd)
    else:
        state.candidates = steps.detect_without_difference(state.pair, config)
    state.n_candidates = len(state.candidates)


def _stage_stamps(state: CcdState, config: RunConfig, out_dir: Path) -> None:
    if config.mode == "dia":
        state.stamps = steps.cut_triplets(state.candidates, state.aligned, state.diff)
        state.aligned = state.diff = None  # free the full frames
    else:
        state.stamps = steps.cut_pairs(state.candidates, state.pair, config)


def _stage_score(state: CcdState, config: RunConfig, out_dir: Path) -> None:
    state.scores = steps.score_stamps(state.stamps, config)
    state.stamps = None


def _stage_write(state: CcdState, config: RunConfig, out_dir: Path) -> None:
    from pipeline.truth import summarize_against_truth

    truth = state.pair.truth
    table = steps.finalize_candidates(state.candidates, state.scores, config, truth)
    if truth is not None:
        state.summary = summarize_against_truth(
            table, truth, config.score_threshold, edge=config.detect.edge, shape=state.pair.search.shape
        ).as_dict()
    paths = ccd_paths(out_dir, state.ccd)
    with atomic_path(paths["catalog"]) as tmp:
        table.write(tmp, format="fits", overwrite=True)
    state.candidates = table
    state.pair = None


_STAGE_FUNCS: dict[str, Callable[[CcdState, RunConfig, Path], None]] = {
    "load": _stage_load,
    "align": _stage_align,
    "subtract": _stage_subtract,
    "detect": _stage_detect,
    "stamps": _stage_stamps,
    "score": _stage_score,
    "write": _stage_write,
}


def status_record(state: CcdState, chash: str) -> dict:
    """JSON-able per-CCD record for run.json and the CCD's status file."""
    return {
        "ccd": state.ccd,
        "status": state.status,
        "failed_stage": state.failed_stage,
        "error": state.error,
        "traceback": state.traceback,
        "wall_s": state.wall,
        "cpu_s": state.cpu,
        "peak_rss_mb": state.peak_rss_mb,
        "worker": state.worker,
        "n_candidates": state.n_candidates,
        "dia": state.diff_stats,
        "truth_summary": state.summary,
        "config_hash": chash,
    }


def run_stage(stage: str, state: CcdState, config: RunConfig, out_dir: str, chash: str) -> CcdState:
    """Run one stage on a copy of the state, timing it and catching its failure."""
    state = dataclasses.replace(state, wall=dict(state.wall), cpu=dict(state.cpu), peak_rss_mb=dict(state.peak_rss_mb))
    if state.status == "failed":
        return state
    try:
        from distributed import get_worker

        state.worker = get_worker().address
    except (ImportError, ValueError):
        state.worker = f"pid{os.getpid()}"
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        _STAGE_FUNCS[stage](state, config, Path(out_dir))
    except Exception as exc:  # isolate the CCD: record and let the others go on
        state.status = "failed"
        state.failed_stage = stage
        state.error = f"{type(exc).__name__}: {exc}"
        state.pair = state.aligned = state.diff = state.stamps = None
        state.traceback = traceback.format_exc(limit=4)
    state.wall[stage] = time.perf_counter() - t0
    state.cpu[stage] = time.process_time() - c0
    state.peak_rss_mb[stage] = _peak_rss_mb()
    if stage == "write" or state.status == "failed":
        if state.status != "failed":
            state.status = "done"
        record = status_record(state, chash)
        path = ccd_paths(Path(out_dir), state.ccd)["status"]
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, indent=1, default=_json_default))
        if stage != "write":
            state.candidates = None
    return state


def _peak_rss_mb() -> float:
    """Peak resident memory of this (worker) process so far, in MB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def build_graph(entries: list[PairEntry], config: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Dask delayed chains, one per CCD; returns ``{ccd: delayed final state}``.

    Task keys are ``<stage>-<ccd>``; on ``device="gpu"`` the subtract and score
    tasks carry the resource annotation ``{"GPU": 1}``.
    """
    import dask

    chash = config_hash(config)
    finals = {}
    for entry in entries:
        state: Any = CcdState(ccd=entry.ccd, entry=entry)
        for stage in STAGES[config.mode]:
            annotations = {"resources": {"GPU": 1}} if config.device == "gpu" and stage in GPU_STAGES else {}
            with dask.annotate(**annotations):
                state = dask.delayed(run_stage, pure=False)(
                    stage, state, config, str(out_dir), chash, dask_key_name=f"{stage}-{entry.ccd}"
                )
        finals[entry.ccd] = state
    return finals


def collect_catalog(out_dir: Path, ccds: list[str]) -> Table:
    """Stack the per-CCD catalogs of the given CCDs (those that exist) in manifest order."""
    tables = []
    for ccd in ccds:
        path = ccd_paths(out_dir, ccd)["catalog"]
        if path.exists():
            tables.append(Table.read(path, format="fits"))
    if not tables:
        from pipeline.detect import CandidateTable

        return CandidateTable.empty(("ccd", "id", "x", "y", "ra", "dec", "flux", "flux_err", "snr", "flags",
                                     "score", "mode", "model"))
    table = vstack(tables, metadata_conflicts="silent")
    for name in table.colnames:
        col = table[name]
        if hasattr(col, "mask"):  # FITS reads NaN / empty cells back as masked: keep plain columns
            fill = {"f": np.nan, "U": "", "S": b""}.get(col.dtype.kind, -1)
            table[name] = col.filled(fill)
        if table[name].dtype.kind == "S":  # FITS round trip turns str columns into bytes
            table[name] = table[name].astype(str)
    return Table(table, masked=False)
