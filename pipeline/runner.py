"""Execute a run: build the graph, schedule it, gather per-CCD results, write the catalog and run.json."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
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
    ccd_paths,
    collect_catalog,
    config_hash,
    status_record,
)
from pipeline.io import (
    PairEntry,
    atomic_path,
    check_ccd_ids,
    inputs_table,
    package_version,
    read_catalog,
    write_catalog,
)
from pipeline.outdir import OutputError, open_output_folder

__all__ = ["RunResult", "RunSetupError", "run_pipeline", "format_summary", "versions", "check_model",
           "catalog_provenance", "manifest_path", "preset_of_instrume", "resolve_instrument",
           "EXIT_SOME_FAILED", "EXIT_ALL_FAILED", "EXIT_SETUP", "EXIT_OUTPUT", "STAGE_MODULES", "prepare_worker",
           "compute_in_waves"]

logger = logging.getLogger(__name__)

#: exit status of a run in which some (not all) CCDs failed
EXIT_SOME_FAILED = 3
#: exit status of a run in which every CCD failed
EXIT_ALL_FAILED = 4
#: exit status when nothing ran: bad arguments, configuration, manifest, model or output folder
EXIT_SETUP = 2
#: exit status when the CCDs ran but the merged catalog or run.json could not be written
EXIT_OUTPUT = 5


#: The package loggers whose records a run's log file collects.
LOGGERS = ("pipeline", "dia", "classifier")


class RunSetupError(RuntimeError):
    """The run cannot start (model, workers); raised before any CCD is computed."""


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
    else:  # a worker runs threads_per_worker tasks at once, one core each
        per_task = 1
    return dataclasses.replace(config, psf_match=dataclasses.replace(config.psf_match, fft_workers=per_task))


#: ``INSTRUME`` value prefixes (upper case) of each instrument preset's data.
INSTRUME_PREFIXES = (("DECAM", "decam"), ("ZTF", "ztf"), ("LSST", "lsst"))


def preset_of_instrume(value: str) -> str | None:
    """The instrument preset of an ``INSTRUME`` header value, or None for any other instrument.

    ``DECam`` -> ``"decam"``, ``ZTF`` (also ``ZTF/MOSAIC``) -> ``"ztf"``, ``LSSTCam`` /
    ``LSSTComCam`` / ``LSST`` -> ``"lsst"``; case and surrounding blanks are ignored.
    """
    text = str(value or "").strip().upper()
    for prefix, preset in INSTRUME_PREFIXES:
        if text.startswith(prefix):
            return preset
    return None


def _search_instrume(entry: PairEntry) -> str:
    """``INSTRUME`` of a CCD's search image (its HDU, else the primary header), read from the headers only."""
    from astropy.io import fits

    from pipeline.io import _header_value, _select

    hdu = entry.search_hdu
    if hdu is not None and str(hdu).isdigit():
        hdu = int(hdu)
    with fits.open(entry.search, memmap=True, lazy_load_hdus=True) as hdul:
        idx = _select(hdul, hdu, Path(entry.search), "search image")
        return str(_header_value([hdul[idx].header, hdul[0].header], ("INSTRUME",), "") or "").strip()


def resolve_instrument(entries: list[PairEntry], config: RunConfig) -> tuple[RunConfig, dict]:
    """The instrument preset whose shipped weights score this run, and how it was chosen.

    ``config.instrument`` set (``pipeline run --instrument``, or the configuration file) is
    used as asked.  Otherwise, when the model is a shipped name, the preset comes from the
    search exposures' ``INSTRUME`` (:func:`preset_of_instrume`); an instrument that names no
    preset, or no ``INSTRUME`` at all, counts as DECam (the default weights) with a logged
    warning.  A search file that cannot be read is skipped here (its CCD fails later with
    the reader's message).  The weights are chosen once per run.

    Returns
    -------
    config, choice : RunConfig, dict
        ``config`` with ``instrument`` set to the preset (unchanged when the weights are a
        path); ``choice``: ``instrument``, ``source`` (``"asked"``, ``"INSTRUME"`` or
        ``"not used"``), ``explicit`` and, from the headers, ``instrume`` (value -> CCD count).

    Raises
    ------
    RunSetupError
        The search exposures come from instruments of different presets (split the manifest,
        or force one preset with ``--instrument``).
    """
    from classifier.infer import is_shipped_name

    if config.instrument:
        return config, {"instrument": config.instrument, "source": "asked", "explicit": True}
    if not is_shipped_name(config.model):
        return config, {"instrument": "", "source": "not used", "explicit": False}
    found: dict[str, int] = {}
    by_preset: dict[str, list[str]] = {}
    unknown: dict[str, list[str]] = {}
    for entry in entries:
        try:
            value = _search_instrume(entry)
        except Exception:  # noqa: BLE001 - the CCD's own load reports an unreadable file
            continue
        found[value] = found.get(value, 0) + 1
        preset = preset_of_instrume(value)
        if preset is None:
            unknown.setdefault(value, []).append(entry.ccd)
            preset = "decam"
        by_preset.setdefault(preset, []).append(entry.ccd)
    if unknown:
        what = "; ".join(f"{len(c)} CCD(s) with INSTRUME {v!r} (no preset)" if v
                         else f"{len(c)} CCD(s) without INSTRUME" for v, c in sorted(unknown.items()))
        logger.warning("%s (e.g. CCD %s): scored with the DECam-trained weights; force a preset with --instrument "
                       "decam|ztf|lsst", what, next(iter(unknown.values()))[0])
    if len(by_preset) > 1:
        parts = "; ".join(f"{p}: {len(c)} CCD(s), e.g. {c[0]}" for p, c in sorted(by_preset.items()))
        raise RunSetupError(f"the search exposures come from several instruments ({parts}); the CNN weights are "
                            "chosen once per run: split the manifest by instrument, or force one preset with "
                            "--instrument")
    preset = next(iter(by_preset), "decam")
    return dataclasses.replace(config, instrument=preset), {
        "instrument": preset, "source": "INSTRUME", "explicit": False, "instrume": found}


def check_model(config: RunConfig, strict: bool | None = None) -> tuple[str, str]:
    """Load this mode's weights once in this process; return ``(path, sha256)``.

    Runs before any CCD so that an unknown model, a corrupt or mislabelled weights file, or
    non-finite weights stop the run at once with the loader's message instead of failing every
    CCD after the compute.  A shipped model name is read from the weights of
    ``config.instrument`` when they exist (:func:`classifier.infer.preset_weights`), as the
    workers will (:func:`pipeline.steps.get_scorer`).

    Parameters
    ----------
    config : RunConfig
    strict : bool, optional
        Refuse a shipped name without weights of ``config.instrument`` (default: when
        ``config.instrument`` is set, i.e. asked for) instead of using the DECam weights.

    Raises
    ------
    classifier.infer.WeightsError
    """
    from classifier.infer import load_weights, preset_weights

    weights, how = preset_weights(config.model, config.instrument, bool(config.instrument) if strict is None
                                  else strict)
    if how == "fallback":
        logger.warning("no %s weights are shipped for model %r: scoring with the DECam-trained ones",
                       config.instrument, config.model)
    _, _, _, path = load_weights(weights)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return str(path), digest


def _cpu_clock(scheduler: SchedulerConfig, client) -> str:
    """``thread`` when several tasks share a process (their CPU times must not mix), else ``process``."""
    if client is not None:
        try:
            return "thread" if max(client.nthreads().values(), default=1) > 1 else "process"
        except Exception:
            return "thread"
    if scheduler.kind == "threads":
        return "thread"
    return "thread" if scheduler.threads_per_worker > 1 else "process"


def _resummarize(record: dict, entry: PairEntry, out_dir: Path, config: RunConfig) -> dict:
    """A reused CCD's truth summary at this run's score threshold (the catalog does not change)."""
    if entry.truth is None or record.get("score_threshold") == config.score_threshold:
        return record
    from pipeline.truth import read_truth, summarize_against_truth

    table = read_catalog(ccd_paths(out_dir, entry.ccd)["catalog"])
    shape = tuple(record["shape"]) if record.get("shape") else None
    summary = summarize_against_truth(table, read_truth(entry.truth), config.score_threshold,
                                      edge=config.detect.edge, shape=shape).as_dict()
    return dict(record, truth_summary=summary, score_threshold=config.score_threshold)


def manifest_path(entries: list[PairEntry]) -> str:
    """The manifest(s) the entries were read from (``''`` for entries made in memory)."""
    paths = sorted({str(e.manifest) for e in entries if getattr(e, "manifest", None) is not None})
    return ", ".join(paths)


def catalog_provenance(config: RunConfig, chash: str, weights_sha: str, entries: list[PairEntry],
                       model: str | None = None) -> dict:
    """What every catalog of the run records in its primary header (:data:`pipeline.io.PROVENANCE_CARDS`).

    ``model``: the model as it was resolved (``triplet-ztf`` for ``triplet`` on ZTF data;
    default ``config.model``).
    """
    return {"software": "transient-pipeline", "version": package_version(), "mode": config.mode,
            "model": model or config.model, "weights_sha256": weights_sha, "config_hash": chash,
            "manifest": manifest_path(entries)}


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
    folder=None,
    log_file: str | None = None,
) -> RunResult:
    """Run the pipeline on CCD pairs and write ``candidates.fits``, ``candidates.parquet`` and ``run.json``.

    Before any CCD is computed the CCD identifiers are checked, the instrument preset of the
    weights is chosen (:func:`resolve_instrument`: ``config.instrument``, else the search
    exposures' ``INSTRUME``), the model is loaded once (:func:`check_model`; a shipped name
    becomes the preset's weights file when there is one) and the output folder is created, checked writable and locked
    (:func:`pipeline.outdir.open_output_folder`); each of these raises with one clear message.
    Afterwards no CCD's failure stops the others.

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
        Reuse CCDs whose outputs are complete and were made from the same input files, the
        same science configuration and the same weights (see :mod:`pipeline.graph`).
    progress : bool
        Show a progress bar.
    client : distributed.Client, optional
        An existing client to use.
    on_dashboard : callable, optional
        Called with the dashboard URL once the cluster is up.
    folder : pipeline.outdir.OutputFolder, optional
        ``out_dir`` already opened and locked by the caller (kept open); default: opened here.
    log_file : str, optional
        Also write the log records of the ``pipeline``, ``dia`` and ``classifier`` loggers that
        their levels let through to this file in ``out_dir`` (the CLI uses ``run.log`` at INFO).

    Raises
    ------
    pipeline.io.InputError
        Empty list of entries, unsafe or repeated CCD identifiers.
    classifier.infer.WeightsError
        The model cannot be loaded.
    pipeline.outdir.OutputError
        The output folder cannot be used, or (after the CCDs ran) the merged outputs cannot be
        written; per-CCD outputs already written are kept for ``--resume``.
    RunSetupError
        The workers cannot load the model, or the exposures come from several instruments.
    """
    from classifier.infer import preset_model_name, preset_weights

    out_dir = Path(out_dir)
    check_ccd_ids(e.ccd for e in entries)
    config, choice = resolve_instrument(entries, config)
    weights_path, weights_sha = check_model(config, strict=choice["explicit"])
    choice["weights"] = preset_weights(config.model, config.instrument, choice["explicit"])[1]
    resolved_model = preset_model_name(config.model, config.instrument)
    config = _tune_threads(config, scheduler)
    chash = config_hash(config, weights_sha)
    t0 = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    own_folder = folder is None
    if own_folder:
        folder = open_output_folder(out_dir, subfolders=("ccds", "diff") if config.save_diff else ("ccds",))
    handler = None
    try:
        if log_file:
            handler = logging.FileHandler(out_dir / log_file, mode="a", encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            for name in LOGGERS:
                logging.getLogger(name).addHandler(handler)
        logger.info("run started: mode %s, %d CCD(s), model %s (sha256 %s; instrument %s from %s), config hash %s",
                    config.mode, len(entries), weights_path, weights_sha[:12], config.instrument or "-",
                    choice["source"], chash)
        provenance = catalog_provenance(config, chash, weights_sha, entries, model=resolved_model)
        return _run_locked(entries, config, out_dir, scheduler, chash, weights_path, weights_sha, started, t0,
                           folder, resume=resume, progress=progress, client=client, on_dashboard=on_dashboard,
                           provenance=provenance, choice=choice)
    finally:
        if handler is not None:
            for name in LOGGERS:
                logging.getLogger(name).removeHandler(handler)
            handler.close()
        if own_folder:
            folder.close()


def _run_locked(entries, config, out_dir, scheduler, chash, weights_path, weights_sha, started, t0, folder, *,
                resume, progress, client, on_dashboard, provenance, choice) -> RunResult:
    reused: dict[str, dict] = {}
    redone: dict[str, str] = {}
    todo = []
    for entry in entries:
        record, why = (None, "") if not resume else ccd_outputs_complete(
            out_dir, entry, chash, need_diff=config.save_diff, need_stamps=config.save_stamps)
        if record is not None:
            try:
                reused[entry.ccd] = dict(_resummarize(record, entry, out_dir, config), resumed=True)
                continue
            except Exception as exc:  # truth or catalog unreadable now: compute the CCD again
                why = f"its truth summary could not be recomputed ({type(exc).__name__}: {exc})"
        if resume:
            redone[entry.ccd] = why
            logger.info("resume: %s is computed again: %s", entry.ccd, why)
        todo.append(entry)

    own_client = cluster = None
    warm_s = 0.0
    try:
        if client is None and todo:
            own_client, cluster = start_client(scheduler)
            client = own_client
        link = dashboard_link(client)
        if link and on_dashboard is not None:
            on_dashboard(link)
        clock = _cpu_clock(scheduler, client)
        if todo:
            warm_s = _warm_up(client, config)
        states = _execute(todo, config, out_dir, client, scheduler, progress, chash, clock,
                          provenance) if todo else {}
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
            rec = status_record(states[entry.ccd], chash, config.score_threshold)
            rec["resumed"] = False
            records.append(rec)
    unreadable: dict[str, str] = {}
    catalog = collect_catalog(out_dir, [r["ccd"] for r in records if r["status"] == "done"], unreadable)
    for rec in records:
        if rec["ccd"] in unreadable:
            rec.update(status="failed", failed_stage="collect", error=unreadable[rec["ccd"]])
    regions_error = None
    try:  # ds9 overlays of each CCD's candidates: a convenience, never a reason to fail the run
        from pipeline.regions import write_run_regions

        write_run_regions(out_dir, config.score_threshold, catalog=catalog,
                          ccds=[r["ccd"] for r in records if r["status"] == "done"])
    except Exception as exc:  # noqa: BLE001 - reported in run.json and the log
        regions_error = f"{type(exc).__name__}: {exc}"
        logger.warning("ds9 region files not written: %s", regions_error)
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
        "weights": {"path": weights_path, "sha256": weights_sha, "model": config.model,
                    "resolved_model": provenance["model"], "instrument": config.instrument,
                    "instrument_source": choice["source"], "choice": choice["weights"],
                    **({"instrume": choice["instrume"]} if "instrume" in choice else {})},
        "manifest": provenance["manifest"],
        "measurement": {
            "cpu_s": {"thread": "CPU time of the thread that ran the task (threads it started, e.g. FFT "
                                "workers, are not counted)",
                      "process": "CPU time of the worker process while it ran the task (one task at a time)"}[clock],
            "peak_rss_mb": "peak resident memory of the process that ran the stage, so far; shared by every "
                           "task of that process, not a per-task figure",
        },
        "resume": {"requested": resume, "reused": sorted(reused), "computed_again": redone},
        "n_ccds": len(records),
        "n_failed": result.n_failed,
        "n_candidates": len(catalog),
        "n_above_threshold": int((np.asarray(catalog["score"]) >= config.score_threshold).sum()) if len(catalog) else 0,
        "worker_startup_s": warm_s,
        "stage_wall_s": stage_table(records, "wall_s"),
        "stage_cpu_s": stage_table(records, "cpu_s"),
        "truth_summary": total_summary(records),
        "removed_temporaries": [str(p) for p in folder.removed_temporaries],
        "regions": {"folder": "regions", "error": regions_error},
        "ccds": records,
    }
    in_catalog = {r["ccd"] for r in records if r["status"] == "done"}
    try:
        write_catalog(catalog, out_dir / "candidates.fits", provenance=provenance,
                      inputs=inputs_table([e for e in entries if e.ccd in in_catalog]))
        parquet = catalog.copy(copy_data=False)  # the same provenance in the Parquet file's metadata
        parquet.meta.update({k: v for k, v in provenance.items() if v})
        with atomic_path(out_dir / "candidates.parquet") as tmp:
            parquet.write(tmp, format="parquet", overwrite=True)
        with atomic_path(out_dir / "run.json") as tmp:
            tmp.write_text(json.dumps(run_json, indent=1, default=_json_default))
    except OSError as exc:
        raise OutputError(f"cannot write the run's outputs in {out_dir}: {exc.strerror or exc}; the per-CCD "
                          f"results in {out_dir / 'ccds'} are kept: free space and rerun with --resume") from None
    return result


#: Modules the stages import lazily, imported by :func:`prepare_worker` when a worker starts: importing photutils alone
#: takes ~0.7 s (its optional-dependency scan), which would otherwise land in the first CCD's detect stage.
STAGE_MODULES = ("astroscrappy", "photutils.aperture", "photutils.geometry", "photutils.segmentation",
                 "pipeline.cosmics", "pipeline.align", "pipeline.detect", "pipeline.stamps", "dia")


def prepare_worker(model: str, device: str, threads: int, batch_size: int, instrument: str = "",
                   reuse_memory: bool = True) -> bool:
    """A worker's start-up: the C heap tuned (:func:`pipeline.graph.tune_heap`, reusing freed memory unless
    ``reuse_memory`` is False), the stages' libraries imported and ``model``'s scorer loaded into this process's
    cache."""
    import importlib

    from pipeline.graph import tune_heap
    from pipeline.steps import get_scorer

    tune_heap(reuse=reuse_memory)

    for name in STAGE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional library: the stage that needs it says so when it runs
            pass
    get_scorer(model, device, threads, batch_size, instrument)
    return True


def _warm_up(client, config: RunConfig) -> float:
    """Load the CNN and import the stages' libraries (:data:`STAGE_MODULES`) once in every worker (or in this
    process) before the CCDs are timed.

    Model loading (torch import, weights) and imports are a once-per-worker cost; doing them up front keeps
    them out of the per-CCD stage times, and they are reported on their own in run.json.  The weights were
    already checked in this process (:func:`check_model`), so a failure here is a worker's
    (no CUDA device, say) and stops the run before any CCD is computed.
    """
    t0 = time.perf_counter()
    args = (config.model, config.device, config.torch_threads, config.batch_size, config.instrument,
            config.reuse_memory)
    try:
        if client is None:
            prepare_worker(*args)
        else:
            client.run(prepare_worker, *args)
    except Exception as exc:
        raise RunSetupError(f"the workers cannot load model {config.model!r} on {config.device}: "
                            f"{type(exc).__name__}: {exc}") from None
    return time.perf_counter() - t0


def _execute(entries, config, out_dir, client, scheduler, progress, chash, clock,
             provenance=None) -> dict[str, CcdState]:
    import dask
    from tqdm.auto import tqdm

    finals = build_graph(entries, config, out_dir, chash, clock, provenance=provenance)
    ccds = list(finals)
    if client is None:
        n_tasks = len(ccds) * len(STAGES[config.mode])
        from dask.callbacks import Callback

        bar = tqdm(total=n_tasks, desc=f"{config.mode} tasks", unit="task", disable=not progress)

        class _Progress(Callback):
            def _posttask(self, key, result, dsk, state, worker_id):
                bar.update(1)

        # one CCD chain per thread, each run through in turn (dask's synchronous scheduler): at most
        # ``workers`` CCDs' frames in memory at once, as compute_in_waves gives a cluster
        from concurrent.futures import ThreadPoolExecutor

        with _Progress(), ThreadPoolExecutor(max_workers=max(1, scheduler.workers)) as pool:
            jobs = [pool.submit(dask.compute, chain, scheduler="sync") for chain in finals.values()]
            values = [job.result()[0] for job in jobs]
        bar.close()
        return dict(zip(ccds, values))
    out = {}
    slots = scheduler.workers * scheduler.threads_per_worker
    with tqdm(total=len(finals), desc=f"{config.mode} CCDs", unit="ccd", disable=not progress) as bar:
        for ccd, fut in compute_in_waves(client, finals, slots, scheduler.retries):
            try:
                out[ccd] = fut.result()
            except Exception as exc:  # a worker died more often than retries allow
                entry = next(e for e in entries if e.ccd == ccd)
                state = CcdState.start(entry, chash)
                state.status, state.failed_stage, state.error = "failed", "scheduler", f"{type(exc).__name__}: {exc}"
                out[ccd] = state
            bar.update(1)
    return out


def compute_in_waves(client, chains: dict[str, Any], slots: int, retries: int = 0):
    """Compute one Dask chain per CCD, never more of them at once than the cluster has threads.

    Yields ``(ccd, future)`` as each chain finishes; the next chain is submitted then.  All chains
    submitted at once let a one-thread worker load its next CCD while the previous one waited for its
    align task (the worker starts the ready load before the scheduler hands it the align), so it held
    two CCDs' frames: ~190 MiB more at its peak on a DECam CCD.  ``slots`` is the configured number of
    threads; the cluster's current count is used when larger (workers that joined), so a growing cluster
    is kept busy.  Chains stay independent: a failed CCD fails no other.
    """
    from distributed import as_completed

    pending = list(chains.items())
    by_future: dict[Any, str] = {}
    running = as_completed()

    def capacity() -> int:
        try:
            current = sum(client.nthreads().values())
        except Exception:  # noqa: BLE001 - the scheduler busy or gone: the configured count
            current = 0
        return max(int(slots), current, 1)

    def submit() -> None:
        ccd, chain = pending.pop(0)
        fut = client.compute(chain, retries=retries)
        by_future[fut] = ccd
        running.add(fut)

    for _ in range(min(capacity(), len(pending))):
        submit()
    for fut in running:
        ccd = by_future.pop(fut)
        if pending:  # top up to the cluster's threads (at least one per finished chain)
            for _ in range(max(1, min(capacity() - len(by_future), len(pending)))):
                submit()
        yield ccd, fut


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
    tot = {k: int(sum(s[k] for s in sums))
           for k in ("n_transients", "n_detected", "n_selected", "n_false_positives", "n_candidates")}
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
    n_above = int((np.asarray(result.catalog["score"]) >= config.score_threshold).sum()) if len(result.catalog) else 0
    lines.append(f"{config.mode} mode: {n - result.n_failed}/{n} CCDs done, {result.n_failed} failed, "
                 f"{len(result.catalog)} candidates, "
                 f"{n_above} with score >= {config.score_threshold} ({result.wall_s:.1f} s wall)")
    for rec in result.records:
        tag = " (resumed)" if rec.get("resumed") else ""
        if rec["status"] != "done":
            lines.append(f"  {rec['ccd']}: FAILED at {rec.get('failed_stage')}: {rec.get('error')}")
            continue
        s = rec.get("truth_summary")
        if s:
            lines.append(f"  {rec['ccd']}: {rec['n_candidates']} candidates; "
                         f"completeness {s['n_selected']}/{s['n_transients']}"
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
        lines.append("  time per stage (median s per CCD): "
                     + ", ".join(f"{s} {v['median']:.2f}" for s, v in table.items()))
    lines.append(f"  outputs: {result.out_dir}/candidates.fits, candidates.parquet, run.json; ds9 regions in regions/")
    lines.append(f"  look at the candidates: pipeline vet {result.out_dir}")
    return "\n".join(lines)
