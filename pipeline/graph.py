"""The Dask graph of a run: one chain of named tasks per CCD pair, failure isolation, resume.

Each CCD becomes a chain of tasks named ``<stage>-<ccd>`` (``load-ccd07``,
``align-ccd07``, ...), so the dashboard's task stream reads as the pipeline:

* dia:    load -> align -> subtract -> detect -> stamps -> score -> write
* direct: load -> detect -> stamps -> score -> write

``load`` reads the pair and masks its cosmic rays (:func:`pipeline.steps.mask_cosmics`: the search,
and the template when it is a single exposure); what that found and its seconds are the CCD's
``cosmics`` decisions.

The tasks only call :mod:`pipeline.steps`; the graph holds no science.  A task
receives the CCD's :class:`CcdState` and returns a new one; an exception in a
stage is caught and recorded (stage, error), the CCD's remaining stages pass it
through, and the run goes on with the other CCDs.  Every CCD's outputs are
written under temporary names and renamed, its status file last, so
``resume`` can trust what it finds.  Nothing that goes wrong inside a task --
a stage error, a full disk, an unwritable status file -- escapes it: the CCD
is marked failed with the full traceback and the others go on.

Memory: a stage's output state keeps only the full frames a later stage reads, so a worker
holds about one CCD's frames at a time.  In dia mode the template on its own grid goes after
``align`` (the resampled one is used from then on), the variance of the convolved image after
``subtract``, and after ``stamps`` every plane (the search exposure keeps its metadata,
:func:`without_planes`).  A worker reuses the memory its stages free for the next stage and CCD
(``RunConfig.reuse_memory``, :func:`tune_heap`); with that off, each stage starts by handing freed
heap pages back to the system (:func:`release_free_memory`).

Resume keys on what decides a CCD's result: its input files (resolved path,
size and modification time of every file of its manifest row, and the HDUs),
the science part of the configuration (:func:`pipeline.config.science_dict`)
and the SHA-256 of the weights file.  Execution settings (workers, threads,
batch size, device, saving stamps) and the score threshold are not part of it.

A finished CCD leaves ``ccds/<ccd>.fits`` (its catalog, :func:`pipeline.io.write_catalog`),
``ccds/<ccd>_stamps.fits`` (the stamps its candidates were scored on, row for row,
:func:`pipeline.io.write_stamps`; unless ``save_stamps`` is off, when a stale one is removed)
and, last, ``ccds/<ccd>.json`` (its status).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
from astropy.table import Table, vstack

from pipeline import steps
from pipeline.config import RunConfig, science_dict
from pipeline.io import (
    STAMPS_SUFFIX,
    InputError,
    PairEntry,
    atomic_path,
    inputs_table,
    read_catalog,
    read_stamps,
    validate_ccd_id,
    write_catalog,
    write_stamps,
)
from pipeline.truth import read_truth

__all__ = ["CcdState", "STAGES", "build_graph", "config_hash", "resume_key", "input_fingerprint",
           "ccd_outputs_complete", "collect_catalog", "run_stage", "status_record", "ccd_paths", "tune_heap",
           "STAMPS_SUFFIX", "without_planes", "release_free_memory"]

logger = logging.getLogger(__name__)

STAGES = {
    "dia": ("load", "align", "subtract", "detect", "stamps", "score", "write"),
    "direct": ("load", "detect", "stamps", "score", "write"),
}
#: Stages that use the accelerator when device="gpu" (they carry the Dask resource {"GPU": 1}).
GPU_STAGES = ("subtract", "score")


@dataclasses.dataclass
class CcdState:
    """What flows along one CCD's chain: results so far, timings, decisions, and failure if any."""

    ccd: str
    entry: PairEntry
    inputs: dict = dataclasses.field(default_factory=dict)
    resume_key: str = ""
    status: str = "running"
    failed_stage: str | None = None
    error: str | None = None
    traceback: str | None = None
    wall: dict = dataclasses.field(default_factory=dict)
    cpu: dict = dataclasses.field(default_factory=dict)
    peak_rss_mb: dict = dataclasses.field(default_factory=dict)
    evaluation_s: dict = dataclasses.field(default_factory=dict)
    """Seconds (``{"wall": ..., "cpu": ...}`` per stage) spent on the evaluation against truth -- reading the
    simulator's truth table -- which a survey's pipeline does not do: left out of ``wall`` and ``cpu``."""
    cpu_clock: str = "process"
    worker: str | None = None
    stage_start_unix: dict = dataclasses.field(default_factory=dict)
    """When each stage started (Unix seconds, comparable between the workers of one machine)."""
    stage_worker: dict = dataclasses.field(default_factory=dict)
    """Where each stage ran: a CCD's stages may run on different workers.  With ``stage_start_unix`` this tells
    which stage ran first on its worker, whose cost includes the worker's one-time start-up (the pages its C heap
    first touches, caches filled on first use; :func:`benchmarks.metrics.cost_summary`)."""
    shape: tuple | None = None
    decisions: dict = dataclasses.field(default_factory=dict)
    pair: Any = None
    aligned: Any = None
    diff: Any = None
    candidates: Any = None
    stamps: Any = None
    scores: Any = None
    diff_stats: dict | None = None
    n_candidates: int = 0
    summary: dict | None = None
    provenance: dict = dataclasses.field(default_factory=dict)
    """What the catalog's primary header records (:data:`pipeline.io.PROVENANCE_CARDS`)."""

    @classmethod
    def start(cls, entry: PairEntry, chash: str, provenance: dict | None = None) -> "CcdState":
        """A CCD's state before its first stage: its inputs fingerprinted once, and its resume key."""
        inputs = input_fingerprint(entry)
        return cls(ccd=entry.ccd, entry=entry, inputs=inputs, resume_key=resume_key(inputs, chash),
                   provenance=dict(provenance or {}))


def config_hash(config: RunConfig, weights_sha256: str = "") -> str:
    """Stable hash of what in a run configuration can change a CCD's result.

    The science fields of the configuration (:func:`pipeline.config.science_dict`), with the
    two per-mode model names replaced by this mode's model and the SHA-256 of its weights.
    """
    science = science_dict(config)
    science.pop("model_dia", None)
    science.pop("model_direct", None)
    science["model"] = config.model
    science["weights_sha256"] = weights_sha256
    blob = json.dumps(science, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def input_fingerprint(entry: PairEntry) -> dict[str, Any]:
    """Identity of a manifest row's inputs: every file's resolved path, size and mtime, and the HDUs.

    The manifest itself is not an input of the CCD (adding a row must not redo the others).
    """
    out: dict[str, Any] = {}
    for field in dataclasses.fields(entry):
        if field.name == "manifest":
            continue
        value = getattr(entry, field.name)
        if isinstance(value, Path):
            try:
                st = value.stat()
                out[field.name] = [str(value.resolve()), st.st_size, st.st_mtime_ns]
            except OSError:
                out[field.name] = [str(value), None, None]
        elif field.name != "ccd":
            out[field.name] = value
    return out


def resume_key(inputs: dict[str, Any], chash: str) -> str:
    """The key a finished CCD must carry to be reused by ``--resume``: its :func:`input_fingerprint`
    and the run's :func:`config_hash` (science configuration and weights)."""
    blob = json.dumps({"config": chash, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ccd_paths(out_dir: Path, ccd: str) -> dict[str, Path]:
    """Per-CCD output files (``ccd`` must be a valid identifier: it never leaves the output folder)."""
    validate_ccd_id(ccd)
    base = Path(out_dir) / "ccds"
    return {"catalog": base / f"{ccd}.fits", "status": base / f"{ccd}.json",
            "stamps": base / f"{ccd}{STAMPS_SUFFIX}", "diff": Path(out_dir) / "diff" / f"{ccd}.fits"}


def ccd_outputs_complete(out_dir: Path, entry: PairEntry, chash: str, *,
                         need_diff: bool = False, need_stamps: bool = False) -> tuple[dict | None, str]:
    """The CCD's status record if its outputs are complete and were made from the same inputs
    with the same :func:`config_hash` ``chash``.

    Returns ``(record, "")`` when the CCD can be reused, else ``(None, reason)`` -- the reason
    (no outputs, failed before, inputs or configuration changed, catalog unreadable, stamps
    file missing or not matching the catalog when ``need_stamps``) is reported to the user.
    """
    paths = ccd_paths(out_dir, entry.ccd)
    if not paths["status"].exists():
        return None, "no earlier outputs"
    try:
        record = json.loads(paths["status"].read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return None, f"status file unreadable ({type(exc).__name__})"
    if record.get("status") != "done":
        return None, "it failed before"
    inputs = input_fingerprint(entry)
    if record.get("resume_key") != resume_key(inputs, chash):
        return None, _changed(record.get("inputs") or {}, inputs)
    if need_diff and not paths["diff"].exists():
        return None, "its difference image is missing (--save-diff)"
    try:
        n = len(read_catalog(paths["catalog"]))
    except InputError as exc:  # a truncated, damaged or foreign file: redo the CCD rather than crash the run
        return None, f"its catalog is missing, unreadable or damaged ({exc})"
    if n != record.get("n_candidates"):
        return None, f"its catalog has {n} rows, its status says {record.get('n_candidates')}"
    if need_stamps:
        if not paths["stamps"].exists():
            return None, "its stamps file is missing"
        try:
            data, _, _, _ = read_stamps(paths["stamps"])
        except InputError as exc:
            return None, f"its stamps file is unreadable or damaged ({exc})"
        if data.shape[0] != n:
            return None, f"its stamps file has {data.shape[0]} stamps, its catalog {n} rows"
    return record, ""


def _changed(before: dict, now: dict) -> str:
    """Why a finished CCD's key no longer matches: its inputs, or the configuration / weights."""
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        return f"its input changed ({', '.join(changed)})"
    return "the configuration or the weights changed"


# ----------------------------------------------------------------------------- stages


def _decide(state: CcdState, stage: str, **items: Any) -> None:
    """Record decisions of a stage in the CCD's status and log them (INFO, logger ``pipeline.graph``)."""
    state.decisions.setdefault(stage, {}).update(items)
    for key, value in items.items():
        logger.info("%s: %s: %s = %s", state.ccd, stage, key, value)
    check = items.get("registration")
    if isinstance(check, dict) and not check.get("checked"):
        logger.warning("%s: the template's registration was not checked: only %d bright isolated template "
                       "star(s) over the template's data (align.registration_min_stars)", state.ccd,
                       check.get("n_stars", 0))


def without_planes(exposure, planes: tuple[str, ...] = ("image", "variance", "mask")):
    """The exposure with some of its pixel planes dropped (default: all three), its metadata,
    WCS and shape kept.

    A dropped plane becomes a read-only zero-stride view of one NaN (image, variance) or
    ``NO_DATA`` (mask) value, which takes no memory and cannot be mistaken for data: what
    the later stages need of an exposure whose pixels they no longer read (zero point,
    epoch, band, shape) stays.
    """
    from dia.masks import MaskBits

    if exposure is None:
        return None
    shape = exposure.shape
    fill = {"image": np.float32(np.nan), "variance": np.float32(np.nan), "mask": np.int32(MaskBits.NO_DATA)}
    return dataclasses.replace(exposure, **{name: np.broadcast_to(fill[name], shape) for name in planes})


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the operating system (glibc ``malloc_trim``).

    Frames up to 32 MB that NumPy freed can stay in the heap of a long-lived worker and
    count in its resident memory; a stage that freed full frames trims them, so the next
    CCD's peak does not stack on the last one's leftovers.  Returns False where nothing is
    done: no glibc (macOS, musl), or a process whose heap :func:`tune_heap` set to be reused
    (its free pages are kept on purpose).
    """
    trim = _malloc_trim()
    if trim is None or _HEAP_POLICY["reuse"]:
        return False
    trim(0)
    return True


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _malloc_trim():
    try:
        trim = _libc().malloc_trim
    except AttributeError:  # no libc, or not glibc
        return None
    import ctypes

    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


#: glibc ``mallopt`` parameters and the values :func:`tune_heap` sets.  Trimming (``reuse=False``): what glibc's
#: own dynamic thresholds reach once a process has freed a large block (arrays below 32 MiB come from the heap and are
#: reused; the top of the heap is returned above 64 MiB free, and at every stage boundary by
#: :func:`release_free_memory`).  Reusing (``reuse=True``): no array is a separate ``mmap`` (``M_MMAP_MAX = 0``; glibc
#: cannot raise the mmap threshold past 32 MiB, and a 4096 x 2048 float32 frame is just above it) and nothing is
#: returned, so every frame comes out of pages the process already holds.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
HEAP_MMAP_THRESHOLD = 32 * 1024 * 1024
HEAP_TRIM_THRESHOLD = 64 * 1024 * 1024
_GLIBC_MMAP_MAX = 65536  # glibc's default M_MMAP_MAX: what reuse=False restores
_NEVER_TRIM = 2**31 - 1  # mallopt takes a C int: the largest, 2 GiB, is never reached by one worker's free pages
#: This process's heap policy, as :func:`tune_heap` last set it (the C heap is per process).
_HEAP_POLICY = {"reuse": False}


def tune_heap(reuse: bool = False) -> bool:
    """Set how this process's C heap (glibc ``malloc``) serves and returns NumPy's arrays.

    Dask's nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which (any such setting does) turns off
    glibc's dynamic mmap threshold: every array above 128 KiB is then a fresh ``mmap`` whose pages are faulted in and
    zeroed by the kernel on first touch, and returned on ``free``.  Measured on one DECam CCD: the direct mode's
    detect stage 0.9 -> 1.6 s, L.A.Cosmic's tiles 0.92 -> 1.1 s.  ``reuse=False`` sets the thresholds glibc would
    reach by itself (arrays below 32 MiB reused from the heap; full frames still fresh mappings, and
    :func:`release_free_memory` trims the heap at every stage boundary).  ``reuse=True``
    (:attr:`pipeline.config.RunConfig.reuse_memory`, the default of a run) serves every array, full frames included,
    from the heap and never gives its pages back, so a worker's next stage and next CCD reuse pages already faulted
    in: on 4 simulated DECam CCDs (2 workers, 3 alternating runs) a CCD took 16% less time through dia and 13%
    through direct, every stage but the write faster (the kernel's page zeroing was ~11% of ``pipeline subtract``'s
    CPU samples), and a worker stays at its high-water mark (peak 0.91 GB against 0.84).  Called once per worker
    (:func:`pipeline.runner.prepare_worker`) and by ``pipeline subtract``.
    Returns False where there is no glibc (nothing done).
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    if reuse:
        ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    else:
        ok = (bool(mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)) and bool(mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD))
              and bool(mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)))
    _HEAP_POLICY["reuse"] = bool(reuse and ok)
    return ok


def _stage_load(state: CcdState, config: RunConfig, out_dir: Path) -> None:
    state.pair = steps.load_pair(state.entry, truth=False)
    if state.entry.truth is not None:
        clock = _cpu_clock(state.cpu_clock)
        t0, c0 = time.perf_counter(), clock()
        state.pair.truth = read_truth(state.entry.truth)
        state.evaluation_s["load"] = {"wall": time.perf_counter() - t0, "cpu": clock() - c0}
    state.shape = tuple(state.pair.search.shape)
    # cosmic rays masked as soon as the pixels are read, so that every later stage of both modes sees them
    state.pair, cosmics = steps.mask_cosmics(state.pair, config)
    _decide(state, "load", search=state.pair.search.provenance, template=state.pair.template.provenance)
    for role, exposure in (("search", state.pair.search), ("template", state.pair.template)):
        source = str(exposure.provenance.get("variance", ""))
        if source.startswith("sky only"):  # no usable GAIN: sources' own Poisson noise is not in the variance
            logger.warning("%s: %s variance is %s", state.ccd, role, source)
    _decide(state, "cosmics", **cosmics)


def _stage_align(state: CcdState, config: RunConfig, out_dir: Path) -> None:
    state.aligned = steps.align(state.pair, config)
    # the template on its own grid is done with: later dia stages use the resampled one
    state.pair = dataclasses.replace(state.pair, template=None)
    a = state.aligned
    _decide(state, "align", method=a.method, overlap=round(a.overlap, 4), variance_factor=round(a.variance_factor, 4),
            template_fwhm_search_px=round(float(a.template.fwhm), 3), pixel_scale_ratio=round(a.scale_ratio, 4),
            registration=a.registration.as_dict() if a.registration is not None else None)


def _stage_subtract(state: CcdState, config: RunConfig, out_dir: Path) -> None:
    diff = steps.psf_match_subtract(state.aligned, config)
    state.diff = diff
    stats = getattr(diff, "stats", None)
    state.diff_stats = {
        "convolved": diff.convolved,
        "stats": dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else None,
        "timings": dict(getattr(diff, "timings", {}) or {}),
    }
    _decide(state, "subtract", convolved=diff.convolved, search_fwhm=round(float(state.aligned.search.fwhm), 3),
            template_fwhm=round(float(state.aligned.template.fwhm), 3),
            kernel_stars_used=int(stats.used) if stats is not None else None,
            spatial_order=stats.spatial_order if stats is not None else None,
            background_order=stats.background_order if stats is not None else None,
            kernel_fallback=(stats.fallback or None) if stats is not None else None,
            peak_snr_cut=stats.peak_snr_cut if stats is not None else None,
            differential_background=stats.background if stats is not None else None,
            noise_correlation_factor=round(stats.noise_correlation_factor, 4) if stats is not None else None)
    if stats is not None and stats.fallback:
        logger.info("%s: kernel fit fallback: %s", state.ccd, stats.fallback)
    if stats is not None and stats.noise_correlation_factor != 1.0:
        logger.info("%s: the convolved image's noise is correlated: its variance term x%.3f "
                    "(psf_match.noise_correlation)", state.ccd, stats.noise_correlation_factor)
    if config.save_diff:
        from pipeline.io import write_difference

        write_difference(diff, state.aligned.search, ccd_paths(out_dir, state.ccd)["diff"],
                         template_fwhm=state.aligned.template.fwhm,
                         template_fwhm_source=state.aligned.template.provenance.get("fwhm"))
    _drop_convolved_variance(state, diff.convolved)


def _drop_convolved_variance(state: CcdState, convolved: str) -> None:
    """Free the variance plane of the image that was convolved: detection reads the difference's
    variance and the unconvolved image's (its PSF model), the stamps no variance at all."""
    a = state.aligned
    if convolved == "template":
        state.aligned = dataclasses.replace(a, template=without_planes(a.template, ("variance",)))
    elif convolved == "search":
        search = without_planes(a.search, ("variance",))
        state.aligned = dataclasses.replace(a, search=search)
        state.pair = dataclasses.replace(state.pair, search=search)


def _stage_detect(state: CcdState, config: RunConfig, out_dir: Path) -> None:
    if config.mode == "dia":
        state.candidates = steps.detect_on_difference(state.diff, state.aligned, config, ccd=state.ccd)
        _decide(state, "detect", noise_scale=round(float(state.candidates.meta.get("NOISESCL", 1.0)), 4))
    else:
        check = steps.check_direct_pair(state.pair, config)
        state.pair = dataclasses.replace(state.pair, template=check.template)  # its WCS refined when measured off
        _decide(state, "detect", template_coverage=round(check.coverage, 4),
                registration=check.registration.as_dict() if check.registration is not None else None)
        state.candidates, dropped = steps.drop_without_template(
            steps.detect_without_difference(state.pair, config), state.pair)
        _decide(state, "detect", dropped_without_template=dropped)
    state.n_candidates = len(state.candidates)


def _stage_stamps(state: CcdState, config: RunConfig, out_dir: Path) -> None:
    if config.mode == "dia":
        state.stamps = steps.cut_triplets(state.candidates, state.aligned, state.diff,
                                           sky=steps.model_reads_sky(config))
        state.aligned = state.diff = None  # free the full frames
    else:
        state.stamps = steps.cut_pairs(state.candidates, state.pair, config)
    # no later stage reads pixels: keep the search exposure's metadata only, and no template
    state.pair = dataclasses.replace(state.pair, search=without_planes(state.pair.search), template=None)


def _stage_score(state: CcdState, config: RunConfig, out_dir: Path) -> None:
    state.scores = steps.score_stamps(state.stamps, config)
    if not config.save_stamps:
        state.stamps = None


def _stage_write(state: CcdState, config: RunConfig, out_dir: Path) -> None:
    from pipeline.truth import summarize_against_truth

    truth = state.pair.truth
    search = state.pair.search
    table = steps.finalize_candidates(state.candidates, state.scores, config, truth, search=search)
    if truth is not None:
        state.summary = summarize_against_truth(
            table, truth, config.score_threshold, edge=config.detect.edge, shape=search.shape
        ).as_dict()
    paths = ccd_paths(out_dir, state.ccd)
    if config.save_stamps:
        _write_ccd_stamps(state, table, config, paths["stamps"])
    elif paths["stamps"].exists():  # an earlier run's stamps no longer match this catalog
        paths["stamps"].unlink()
    write_catalog(table, paths["catalog"], provenance=state.provenance, inputs=inputs_table([state.entry]))
    state.candidates = table
    state.pair = state.stamps = None


def _write_ccd_stamps(state: CcdState, table, config: RunConfig, path: Path) -> None:
    """The stamps the CCD's candidates were scored on, in catalog row order, with their ids."""
    from pipeline.stamps import STAMP_SIZE, Stamps

    stamps = state.stamps
    if stamps is None:  # no candidates reached the stamp cutter: an empty cube with this mode's channels
        channels = ("template", "search", "difference") if config.mode == "dia" else ("template", "search")
        empty = np.zeros((0, len(channels), STAMP_SIZE, STAMP_SIZE), np.float32)
        stamps = Stamps(data=empty, mask=empty.astype(np.int32), channels=channels, x=np.zeros(0, np.int64),
                        y=np.zeros(0, np.int64))
    if len(stamps) != len(table):
        raise RuntimeError(f"{state.ccd}: {len(stamps)} stamps for {len(table)} catalog rows")
    cards = {"CCD": (state.ccd, "CCD pair identifier"),
             "SKYSUB": ("template,search", "channels less their stamp's ring median sky"),
             "TSCALED": (True, "template on the search zero point (MAGZERO)")}
    write_stamps(stamps, np.asarray(table["id"]) if len(table) else np.zeros(0, np.int64), path, cards=cards)


_STAGE_FUNCS: dict[str, Callable[[CcdState, RunConfig, Path], None]] = {
    "load": _stage_load,
    "align": _stage_align,
    "subtract": _stage_subtract,
    "detect": _stage_detect,
    "stamps": _stage_stamps,
    "score": _stage_score,
    "write": _stage_write,
}


def status_record(state: CcdState, chash: str, score_threshold: float | None = None) -> dict:
    """JSON-able per-CCD record for run.json and the CCD's status file."""
    return {
        "ccd": state.ccd,
        "status": state.status,
        "failed_stage": state.failed_stage,
        "error": state.error,
        "traceback": state.traceback,
        "wall_s": state.wall,
        "cpu_s": state.cpu,
        "cpu_clock": state.cpu_clock,
        "peak_rss_mb": state.peak_rss_mb,
        "evaluation_s": state.evaluation_s,
        "worker": state.worker,
        "stage_worker": state.stage_worker,
        "stage_start_unix": state.stage_start_unix,
        "shape": list(state.shape) if state.shape else None,
        "n_candidates": state.n_candidates,
        "decisions": state.decisions,
        "dia": state.diff_stats,
        "truth_summary": state.summary,
        "score_threshold": score_threshold,
        "config_hash": chash,
        "resume_key": state.resume_key,
        "inputs": state.inputs,
    }


def _fail(state: CcdState, stage: str, exc: BaseException) -> None:
    state.status = "failed"
    state.failed_stage = stage
    state.error = f"{type(exc).__name__}: {exc}"
    state.traceback = "".join(traceback.format_exception(exc))  # the whole chain, failing line included
    state.pair = state.aligned = state.diff = state.stamps = state.candidates = None


def _cpu_clock(name: str):
    """The CPU clock of ``cpu_clock``: the task's own thread's (``"thread"``) or the process's."""
    return time.thread_time if name == "thread" else time.process_time


def run_stage(stage: str, state: CcdState, config: RunConfig, out_dir: str, chash: str,
              cpu_clock: str = "process") -> CcdState:
    """Run one stage on a copy of the state, timing it and catching its failure.

    Nothing escapes: an exception in the stage, in the bookkeeping around it or in writing
    the CCD's status file marks this CCD failed (stage, error, full traceback) and the other
    CCDs go on.  ``cpu_clock`` says how CPU time is measured: ``"thread"`` (the task's own
    thread, for schedulers that run several tasks in one process) or ``"process"``.
    """
    state = dataclasses.replace(state, wall=dict(state.wall), cpu=dict(state.cpu),
                                peak_rss_mb=dict(state.peak_rss_mb), decisions=dict(state.decisions),
                                evaluation_s=dict(state.evaluation_s),
                                stage_start_unix=dict(state.stage_start_unix),
                                stage_worker=dict(state.stage_worker), cpu_clock=cpu_clock)
    if state.status == "failed":
        return state
    # the frames the previous stage dropped were freed when its input state was released:
    # give the heap pages back before this stage allocates its own
    release_free_memory()
    clock = _cpu_clock(cpu_clock)
    try:  # before the clock starts: the first call in a process may import distributed (~0.7 s)
        state.worker = _worker_name()
    except Exception:  # a name is bookkeeping: never a reason to fail the CCD
        state.worker = f"pid{os.getpid()}"
    state.stage_worker[stage] = state.worker
    state.stage_start_unix[stage] = time.time()
    t0, c0 = time.perf_counter(), clock()
    try:
        _STAGE_FUNCS[stage](state, config, Path(out_dir))
    except Exception as exc:  # isolate the CCD: record and let the others go on
        _fail(state, stage, exc)
    evaluation = state.evaluation_s.get(stage, {})  # time spent on truth is not the pipeline's cost
    state.wall[stage] = time.perf_counter() - t0 - evaluation.get("wall", 0.0)
    state.cpu[stage] = clock() - c0 - evaluation.get("cpu", 0.0)
    state.peak_rss_mb[stage] = _peak_rss_mb()
    if stage == "write" or state.status == "failed":
        if state.status != "failed":
            state.status = "done"
        try:
            record = status_record(state, chash, config.score_threshold)
            path = ccd_paths(Path(out_dir), state.ccd)["status"]
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(record, indent=1, default=_json_default))
        except Exception as exc:  # a full disk or an unwritable folder fails this CCD, not the run
            if state.status == "done":
                _fail(state, "write", exc)
                state.error = f"cannot write the CCD's status file: {state.error}"
            else:
                state.error += f"; and its status file could not be written ({type(exc).__name__}: {exc})"
        if stage != "write" or state.status == "failed":
            state.candidates = None
    return state


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"pid{os.getpid()}/{threading.current_thread().name}"


def _peak_rss_mb() -> float:
    """Peak resident memory of this (worker) process so far, in MiB.

    Linux: the address space's high-water mark (``VmHWM`` of ``/proc/self/status``).  ``ru_maxrss`` is not used
    there because Linux carries it over ``exec``: a Dask worker spawned by a process that had reached 1 GB
    reported 1 GB whatever it used itself.  Elsewhere ``ru_maxrss`` (bytes on macOS, KiB on other systems).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def build_graph(entries: list[PairEntry], config: RunConfig, out_dir: Path, chash: str | None = None,
                cpu_clock: str = "process", provenance: dict | None = None) -> dict[str, Any]:
    """Dask delayed chains, one per CCD; returns ``{ccd: delayed final state}``.

    Task keys are ``<stage>-<ccd>``; on ``device="gpu"`` the subtract and score
    tasks carry the resource annotation ``{"GPU": 1}``.  ``chash`` is the run's
    :func:`config_hash` (default: without a weights hash).  ``provenance`` is what each
    catalog's primary header records (:data:`pipeline.io.PROVENANCE_CARDS`; default: mode,
    model and ``chash``).
    """
    import dask

    chash = config_hash(config) if chash is None else chash
    if provenance is None:
        provenance = {"mode": config.mode, "model": config.model, "config_hash": chash}
    finals = {}
    for entry in entries:
        state: Any = CcdState.start(entry, chash, provenance)
        for stage in STAGES[config.mode]:
            annotations = {"resources": {"GPU": 1}} if config.device == "gpu" and stage in GPU_STAGES else {}
            with dask.annotate(**annotations):
                state = dask.delayed(run_stage, pure=False)(
                    stage, state, config, str(out_dir), chash, cpu_clock, dask_key_name=f"{stage}-{entry.ccd}"
                )
        finals[entry.ccd] = state
    return finals


def collect_catalog(out_dir: Path, ccds: list[str], errors: dict[str, str] | None = None) -> Table:
    """Stack the per-CCD catalogs of the given CCDs in manifest order.

    A catalog that is missing or cannot be read is left out and its error put in ``errors``
    (``{ccd: message}``) when given, so one bad file never stops the merge.
    """
    from pipeline.detect import CandidateTable, describe_columns, schema_order

    tables = []
    for ccd in ccds:
        path = ccd_paths(out_dir, ccd)["catalog"]
        try:
            tables.append(_plain_columns(read_catalog(path)))
        except Exception as exc:  # missing, truncated, damaged or foreign: reported, not fatal
            if errors is not None:
                errors[ccd] = f"cannot use its catalog: {exc}"
    if not tables:
        return CandidateTable.empty(("ccd", "id", "x", "y", "ra", "dec", "flux", "flux_err", "mag", "mag_err",
                                     "snr", "flags", "score", "mode", "model", "mjd", "band", "noise_scale"))
    systems = sorted({str(t.meta.get("MAGSYS", "UNKNOWN")) for t in tables})
    # catalogs of an older version lack some columns: vstack masks them, _plain_columns fills them
    merged = _plain_columns(Table(vstack(tables, metadata_conflicts="silent")))
    merged = describe_columns(merged[schema_order(merged.colnames)])
    # per-CCD header values (NOISESCL, flag cards, checksums) say nothing true of the merged table:
    # the noise scale is the per-row column noise_scale, the rest write_catalog writes afresh
    merged.meta.clear()
    merged.meta["MAGSYS"] = systems[0] if len(systems) == 1 else "MIXED"
    return merged


def _plain_columns(table: Table) -> Table:
    """A catalog read back from FITS with plain columns: NaN for masked floats, str for bytes."""
    for name in table.colnames:
        col = table[name]
        if hasattr(col, "mask"):  # FITS reads NaN / empty cells back as masked: keep plain columns
            fill = {"f": np.nan, "U": "", "S": b""}.get(col.dtype.kind, -1)
            table[name] = col.filled(fill)
        if table[name].dtype.kind == "S":  # FITS round trip turns str columns into bytes
            table[name] = table[name].astype(str)
    return Table(table, masked=False)
