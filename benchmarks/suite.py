"""The cost-versus-accuracy benchmark: one held-out field, both modes, every number measured here.

:func:`run_benchmark` does, in order:

1. makes a held-out simulated field with truth (seed far from the training seeds 1000+), or
   takes a manifest;
2. on a LocalCluster of ``workers`` one-thread workers (the same Dask pipeline as
   ``pipeline run``: :func:`pipeline.runner.run_pipeline`), runs the dia and the direct mode, each on a
   fresh cluster (neither finds the memory the other's stages faulted in, nor reports its peak), after
   loading the mode's CNN once per worker (timed separately: a real run pays it once);
3. cuts the labelled dia-stream (and direct-stream) stamps of the same CCDs with the pipeline's
   own stages (:func:`pipeline.datasets.pair_stamp_sets`) and scores them with every shipped
   model: the paper's experiment, triplet versus pair models on the same candidates;
4. runs the same workload on the other worker count (1 if ``workers`` > 1, else 2) for the
   parallel efficiency, and on the GPU when asked and present;
5. computes costs, ratios, extrapolations and end-to-end completeness from the runs' own
   ``run.json`` and catalogs (:mod:`benchmarks.metrics`): every completeness and purity with its
   Wilson interval, false positives with exact Poisson intervals and by kind, each mode's
   operating curve, and the comparison of direct against dia on the same transients
   (:func:`benchmarks.metrics.compare_modes`), and writes the report (:mod:`benchmarks.report`),
   whose first paragraph states the answer (:func:`benchmarks.report.answer`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks import metrics

__all__ = ["BenchmarkConfig", "run_benchmark", "run_config_of", "machine_info", "gpu_available", "ALL_MODELS",
           "DIRECT_MODELS"]

#: Models compared at stamp level (the four of the paper's experiment, then the direct-stream pair).
ALL_MODELS = ("triplet-paper", "pair-paper", "triplet", "pair", "pair-direct")
#: Models trained on the direct stream, scored on the direct mode's own candidates: ours (the direct mode's model), ours
#: trained for the dense map too (``selection = "dense"``) and the paper's two-image CNN trained by the paper's recipe
#: on the same stream (issue #13: the paper's comparison repeated on direct-mode candidates).
DIRECT_MODELS = ("pair-direct", "pair-dense", "pair-paper-direct")

#: Seeds the shipped weights were trained on start here (classifier/weights/make_weights.sh).
TRAINING_SEED = 1000


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """What the benchmark measures.

    Attributes
    ----------
    n_ccds : int
        Simulated CCD pairs (default 4).
    instrument : str
        Simulator preset: ``decam`` (default), ``ztf`` or ``lsst``.
    shape : (int, int), optional
        CCD shape override ``(ny, nx)`` (default: the instrument's; DECam 4096 x 2048).
    seed : int
        Simulation seed (default 9000, far from the training seeds 1000+).
    density_factor : float
        Multiplier of the simulator's natural transient density (default 1: a survey-like field).
    device : str
        ``cpu`` (default) or ``gpu`` (the GPU runs beside the CPU runs, when a GPU is present).
    workers : int
        Dask workers (one thread each) of the main runs (default 2).
    scaling : bool
        Also run the same workload on 1 worker (2 if ``workers`` is 1) for the parallel efficiency.
    score_threshold : float
        Operating threshold of both modes (default 0.5).
    models : tuple of str
        Shipped models compared at stamp level (missing weights are reported, not invented).
    fpr_points : tuple of float
        False-positive rates of the missed-detection rates (default 1%, 3%).
    mag_step : float
        Width of the completeness magnitude bins (default 0.5 mag).
    saliency_n : int
        Objects in each saliency gallery (default 8: two each of TP, FP, TN, FN when present).
    n_boot : int
        Paired bootstrap resamples of the transients for the interval of the m50 difference
        between the modes (default 1000; seeded with ``seed``).
    extrapolate_workers : tuple of int
        Worker counts of the extrapolated wall times (default 2, 16, 64).
    stamp_threads : int
        torch threads for the stamp-level scoring in the main process (default 0: the core count).
    run : dict, optional
        :class:`pipeline.config.RunConfig` fields given to the runs of both modes (a ``[run]`` table,
        ``pipeline benchmark --config FILE``), e.g. ``{"direct": {"selection": "dense"}}`` to measure the
        direct mode with the CNN's dense map as its detector; ``mode``, ``device`` and ``score_threshold``
        are the benchmark's own.  Default None: the runs' defaults.
    """

    n_ccds: int = 4
    instrument: str = "decam"
    shape: tuple[int, int] | None = None
    seed: int = 9000
    density_factor: float = 1.0
    device: str = "cpu"
    workers: int = 2
    scaling: bool = True
    score_threshold: float = 0.5
    models: tuple[str, ...] = ALL_MODELS
    fpr_points: tuple[float, ...] = (0.01, 0.03)
    mag_step: float = 0.5
    saliency_n: int = 8
    n_boot: int = 1000
    extrapolate_workers: tuple[int, ...] = (2, 16, 64)
    stamp_threads: int = 0
    run: dict | None = None

    def __post_init__(self) -> None:
        if self.n_ccds < 1:
            raise ValueError(f"BenchmarkConfig.n_ccds must be >= 1, got {self.n_ccds}")
        if self.workers < 1:
            raise ValueError(f"BenchmarkConfig.workers must be >= 1, got {self.workers}")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"BenchmarkConfig.device must be 'cpu' or 'gpu', got {self.device!r}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"BenchmarkConfig.score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.run is not None:
            from pipeline.config import RunConfig, config_from_dict

            own = sorted({"mode", "device", "score_threshold"} & set(self.run))
            if own:
                raise ValueError(f"BenchmarkConfig.run: {', '.join(own)} are the benchmark's own settings "
                                 "(--threshold, --device; both modes are run)")
            config_from_dict(RunConfig, self.run, where="BenchmarkConfig.run")  # a bad field is named now
        if abs(self.seed - TRAINING_SEED) < 100:
            warnings.warn(f"benchmark seed {self.seed} is close to the training seeds ({TRAINING_SEED}+): "
                          "the field may not be held out", stacklevel=2)


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """CPU model, cores available, memory, platform, host and load average."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return {"cpu_model": model, "cores": cores, "memory_gb": mem_gb, "platform": platform.platform(),
            "host": socket.gethostname(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def gpu_available() -> tuple[bool, str]:
    """Whether both CuPy (DIA) and torch CUDA (CNN) see a GPU, and a sentence saying so
    (:func:`pipeline.config.gpu_usable`, the one probe ``--device auto`` uses too)."""
    from pipeline.config import gpu_usable

    return gpu_usable(torch_too=True)


# ----------------------------------------------------------------------------- worker functions


def _warm_worker(models: tuple[str, ...], device: str, threads: int, batch: int) -> float:
    """Import the stages' libraries and load the given CNNs into this worker's scorer cache; seconds taken."""
    from pipeline.runner import prepare_worker

    t0 = time.perf_counter()
    for model in models:
        prepare_worker(model, device, threads, batch)
    return time.perf_counter() - t0


def _labelled_stamps(entry, run_config) -> dict:
    """Worker task: the labelled dia- and direct-stream stamps of one manifest CCD."""
    from pipeline import steps
    from pipeline.datasets import pair_stamp_sets

    t0 = time.perf_counter()
    pair = steps.load_pair(entry)
    sets, errors = pair_stamp_sets(pair, run_config, ("dia", "direct"), drop_edge=True)
    return {"ccd": entry.ccd, "sets": sets, "errors": errors, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- the benchmark


def _ccd_shape(entries) -> tuple[int, int]:
    from astropy.table import Table

    e = entries[0]
    if e.truth is not None:
        meta = Table.read(e.truth, format="ascii.ecsv").meta
        if "shape" in meta:
            return tuple(int(v) for v in meta["shape"])
    search, _ = e.load()
    return tuple(search.image.shape)


def _read_truths(entries) -> dict | None:
    from astropy.table import Table

    if any(e.truth is None for e in entries):
        return None
    return {e.ccd: Table.read(e.truth, format="ascii.ecsv") for e in entries}


def _catalogs_by_ccd(run_dir: Path, ccds) -> dict:
    from astropy.table import Table

    from pipeline.graph import ccd_paths

    out = {}
    for ccd in ccds:
        path = ccd_paths(run_dir, ccd)["catalog"]
        if path.exists():
            t = Table.read(path, format="fits")
            for name in t.colnames:
                if t[name].dtype.kind == "S":
                    t[name] = t[name].astype(str)
            out[ccd] = t
    return out


def run_config_of(config: BenchmarkConfig, mode: str, device: str):
    """The :class:`pipeline.config.RunConfig` of one of the benchmark's runs: ``config.run`` with the mode, the
    device and the benchmark's threshold."""
    from pipeline.config import RunConfig, config_from_dict

    return config_from_dict(RunConfig, {**(config.run or {}), "mode": mode, "device": device,
                                        "score_threshold": config.score_threshold}, where="benchmark [run]")


def run_benchmark(config: BenchmarkConfig, out_dir: str | Path, manifest: str | Path | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark and write ``report.md``, ``report.html`` and ``report.json`` in ``out_dir``.

    Parameters
    ----------
    config : BenchmarkConfig
    out_dir : path
        Output folder: ``input/`` (the simulated field), ``runs/<device>-<mode>-w<K>/`` (each
        run's catalogs and ``run.json``), ``plots/``, and the reports.
    manifest : path, optional
        Take this manifest instead of simulating (stamp-level and end-to-end accuracy need its
        truth tables; without them the report has the costs only).
    log : callable, optional
        Called with one line per step (default: silent).

    Returns
    -------
    dict
        The report data (what ``report.json`` holds).
    """
    from pipeline.cluster import SchedulerConfig, start_client
    from pipeline.config import config_to_dict
    from pipeline.io import read_manifest
    from pipeline.runner import run_pipeline, versions

    say = log or (lambda line: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data: dict[str, Any] = {
        "title": "Cost versus accuracy: dia (difference imaging) and direct (no difference image)",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "versions": versions(), "config": config_to_dict(config),
    }

    # 1. the field
    if manifest is None:
        from pipeline.simulate import SimulationConfig, write_simulation

        base = SimulationConfig()
        sim = dataclasses.replace(base, instrument=config.instrument, shape=config.shape,
                                  transient_density=base.transient_density * config.density_factor)
        t0 = time.perf_counter()
        manifest = write_simulation(out / "input", config.n_ccds, config.seed, sim)
        sim_s = time.perf_counter() - t0
        say(f"simulated {config.n_ccds} {config.instrument} CCD pair(s), seed {config.seed} ({sim_s:.1f} s)")
        data["input"] = {"manifest": str(manifest), "simulated": True, "simulate_s": sim_s,
                         "simulation_config": config_to_dict(sim)}
    else:
        data["input"] = {"manifest": str(manifest), "simulated": False}
    entries = read_manifest(manifest)
    truths = _read_truths(entries)
    shape = _ccd_shape(entries)
    data["input"].update(n_ccds=len(entries), ccd_shape=list(shape), has_truth=truths is not None,
                         ccds=[e.ccd for e in entries])
    data["seeds"] = {"simulation": config.seed if data["input"]["simulated"] else None,
                     "training_sets_from": TRAINING_SEED, "torch_scoring": "deterministic inference (no seed)"}

    # 2. devices
    devices = ["cpu"]
    ok, why = gpu_available()
    if config.device == "gpu":
        if ok:
            devices.append("gpu")
            data["device_note"] = f"GPU runs beside the CPU runs ({why})."
        else:
            data["device_note"] = (f"--device gpu was asked for but no GPU is usable here ({why}): "
                                   "only CPU runs were made; no GPU figure appears in this report.")
    else:
        data["device_note"] = f"CPU only (--device cpu; GPU check: {why})."
    say(data["device_note"])

    threshold = config.score_threshold
    run_configs = {(dev, mode): run_config_of(config, mode, dev) for dev in devices for mode in ("dia", "direct")}
    data["run_config"] = {mode: config_to_dict(run_configs[("cpu", mode)]) for mode in ("dia", "direct")}
    other = 1 if config.workers > 1 else 2
    plan = [(dev, config.workers) for dev in devices]
    if config.scaling:
        plan.append(("cpu", other))

    runs: list[dict] = []
    warm: dict[str, Any] = {}
    stamp_results: list[dict] | None = None
    for dev, k in plan:
        sched = SchedulerConfig(kind="local", workers=k, threads_per_worker=1, dashboard_address="localhost:0",
                                gpus_per_worker=1 if dev == "gpu" else 0)
        for mode in ("dia", "direct"):
            # a fresh cluster per mode: workers keep the memory their stages free (RunConfig.reuse_memory), so a
            # mode run on the workers of the other would find its pages already faulted in (0.4-0.5 s per CCD
            # cheaper on its load stage) and report the other's peak memory as its own
            client, cluster = start_client(sched)
            try:
                rc = run_configs[(dev, mode)]
                t0 = time.perf_counter()
                per_worker = client.run(_warm_worker, (rc.model,), dev, rc.torch_threads, rc.batch_size)
                warm[f"{dev}-{mode}-w{k}"] = {"wall_s": time.perf_counter() - t0,
                                              "per_worker_s": {w: float(s) for w, s in per_worker.items()}}
                run_dir = out / "runs" / f"{dev}-{mode}-w{k}"
                say(f"{mode} mode on {k} {dev} worker(s) ...")
                res = run_pipeline(entries, rc, run_dir, sched, progress=False, client=client)
                run_json = json.loads((run_dir / "run.json").read_text())
                runs.append({"key": f"{dev}-{mode}-w{k}", "device": dev, "mode": mode, "workers": k,
                             "dir": str(run_dir.relative_to(out)),
                             "run_json": str((run_dir / "run.json").relative_to(out)),
                             "wall_s": res.wall_s, "n_failed": res.n_failed,
                             "failures": {r["ccd"]: r["error"] for r in res.records if r["status"] != "done"},
                             "device_description": run_json.get("device"),
                             "cost": metrics.cost_summary(run_json, sched.threads_per_worker)})
                say(f"  {res.wall_s:.1f} s wall, {res.n_failed} failed CCD(s)")
                if (mode == "direct" and stamp_results is None and dev == "cpu" and k == config.workers
                        and truths is not None):
                    say("cutting the labelled stamps of the benchmark CCDs ...")
                    t0 = time.perf_counter()
                    # the FFT threads run_pipeline gives each task (one per worker thread)
                    rc = run_configs[("cpu", "dia")]
                    rc = dataclasses.replace(rc, psf_match=dataclasses.replace(
                        rc.psf_match, fft_workers=rc.psf_match.fft_workers or sched.threads_per_worker))
                    futures = client.map(_labelled_stamps, entries, run_config=rc, pure=False)
                    stamp_results = client.gather(futures)
                    data["stamp_pass_wall_s"] = time.perf_counter() - t0
            finally:
                client.close()
                cluster.close()
    data["warm_up"] = warm
    data["runs"] = runs
    by_key = {r["key"]: r for r in runs}

    # 3. cost: ratio, scaling, extrapolation
    data["ratio"] = {}
    data["extrapolation"] = {}
    pixels = shape[0] * shape[1]
    if config.scaling:
        data["scaling"] = {}
        for mode in ("dia", "direct"):
            a = by_key[f"cpu-{mode}-w{min(config.workers, other)}"]
            b = by_key[f"cpu-{mode}-w{max(config.workers, other)}"]
            factor = b["workers"] / a["workers"]
            speedup = a["wall_s"] / b["wall_s"] if b["wall_s"] > 0 else float("nan")
            data["scaling"][mode] = {
                "workers": [a["workers"], b["workers"]], "run_wall_s": [a["wall_s"], b["wall_s"]],
                "core_s_per_ccd": [a["cost"]["core_s_per_ccd"], b["cost"]["core_s_per_ccd"]],
                "speedup": speedup, "efficiency": speedup / factor}
    for dev in devices:
        dia = by_key[f"{dev}-dia-w{config.workers}"]["cost"]
        direct = by_key[f"{dev}-direct-w{config.workers}"]["cost"]
        data["ratio"][dev] = metrics.cost_ratio(dia, direct)
        # the per-CCD cost measured with `workers` workers at once already includes their
        # contention for cores and memory: no further parallel-efficiency factor is applied
        data["extrapolation"][dev] = {
            mode: metrics.extrapolate(by_key[f"{dev}-{mode}-w{config.workers}"]["cost"]["core_s_per_ccd"], pixels,
                                      None, config.extrapolate_workers)
            for mode in ("dia", "direct")}

    # 4. end to end against truth
    if truths is not None:
        edge = run_configs[("cpu", "dia")].detect.edge
        # compare the modes on the same CCDs: those every run processed (a failed CCD is reported
        # with its error above, not counted as missed transients of one mode only)
        common = [e.ccd for e in entries if all(e.ccd not in r["failures"] for r in runs)]
        data["end_to_end_ccds"] = common
        outcomes = {}
        for r in runs:
            cats = _catalogs_by_ccd(out / r["dir"], common)
            sub = {c: truths[c] for c in common}
            r["end_to_end"] = (metrics.completeness_curves(cats, sub, threshold, edge=edge, mag_step=config.mag_step)
                               if common else None)
            if common and r["workers"] == config.workers:
                outcomes[(r["device"], r["mode"])] = metrics.transient_outcomes(cats, sub, edge=edge)
        # what skipping the difference image changes: direct against dia, on the same transients
        data["comparison"] = {
            dev: {"reference": "dia", "other": "direct", "threshold": threshold,
                  **metrics.compare_modes(outcomes[(dev, "dia")], outcomes[(dev, "direct")], threshold, threshold,
                                          mag_step=config.mag_step, n_boot=config.n_boot, seed=config.seed)}
            for dev in devices if (dev, "dia") in outcomes and (dev, "direct") in outcomes}

    # 5. stamp level
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    figures: dict[str, str] = {}
    if stamp_results is not None:
        data["stamp_level"], extra = _stamp_level(stamp_results, by_key, config, out, plots)
        figures.update(extra)
    else:
        data["stamp_level"] = None

    from benchmarks import report

    figures.update(report.make_plots(data, plots))
    data["figures"] = {name: str(Path(p).relative_to(out)) for name, p in figures.items()}
    data["headline"] = report.headline(data)
    data["answer"] = report.answer(data)
    data["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    data["wall_s"] = time.perf_counter() - t_start
    try:
        report.write_reports(data, out)
    except Exception:
        # keep the measurements even if rendering fails
        (out / "report_data.json").write_text(json.dumps(report._finite(data), default=report._json_default))
        raise
    say(f"benchmark done in {data['wall_s']:.0f} s: {out / 'report.html'}")
    return data


def _stamp_level(stamp_results: list[dict], by_key: dict, config: BenchmarkConfig, out_dir: Path, plots: Path):
    """Score the labelled stamps with every shipped model; ROC plot and saliency galleries."""
    from classifier.infer import torch_threads

    threads = config.stamp_threads or machine_info()["cores"]
    # torch's thread count is process-wide: set for the stamp-level pass only, then restored
    with torch_threads(threads):
        return _score_stamp_sets(stamp_results, by_key, config, out_dir, plots, threads)


def _score_stamp_sets(stamp_results: list[dict], by_key: dict, config: BenchmarkConfig, out_dir: Path, plots: Path,
                      threads: int):
    """The body of :func:`_stamp_level`, run with its thread setting."""
    from benchmarks.report import plot_roc_curves
    from classifier.data import StampSet
    from classifier.evaluate import EvaluationConfig, evaluate_scores
    from classifier.infer import Scorer, WeightsError
    from classifier.saliency import plot_saliency_gallery, saliency_maps, saliency_table

    eval_cfg = EvaluationConfig(threshold=config.score_threshold, fpr_points=tuple(config.fpr_points))
    streams = {}
    errors = {r["ccd"]: r["errors"] for r in stamp_results if r["errors"]}
    for stream in ("dia", "direct"):
        sets = [r["sets"][stream] for r in stamp_results if stream in r["sets"] and len(r["sets"][stream])]
        streams[stream] = StampSet.concatenate(sets) if sets else None

    # the stamp pass must reproduce the run's dia candidates (same stages, same configuration)
    consistency: dict[str, Any] = {}
    run = by_key.get(f"cpu-dia-w{config.workers}")
    if run is not None and streams["dia"] is not None:
        from pipeline.detect import CandidateFlags

        cats = _catalogs_by_ccd(out_dir / run["dir"], sorted(set(streams["dia"].meta["ccd"].tolist())))
        meta = streams["dia"].meta
        for ccd, cat in cats.items():
            keep = (np.asarray(cat["flags"]) & int(CandidateFlags.EDGE)) == 0
            a = np.column_stack([np.asarray(cat["x"], float)[keep], np.asarray(cat["y"], float)[keep]])
            sel = meta["ccd"] == ccd
            b = np.column_stack([meta["x"][sel], meta["y"][sel]])
            consistency[ccd] = bool(a.shape == b.shape and np.allclose(np.sort(a, axis=0), np.sort(b, axis=0)))
    out: dict[str, Any] = {"errors": errors, "models": [], "streams": {},
                           "same_candidates_as_run": consistency}
    for stream, s in streams.items():
        if s is not None:
            out["streams"][stream] = {"n": len(s), "n_real": int((s.labels == 1).sum()),
                                      "n_bogus": int((s.labels == 0).sum())}
    figures: dict[str, str] = {}
    results = {}
    scorers = {}
    jobs = [(m, "dia") for m in config.models] + [(m, "direct") for m in DIRECT_MODELS]
    for model, stream in jobs:
        s = streams.get(stream)
        row: dict[str, Any] = {"model": model, "stream": stream}
        if s is None:
            row.update(status="no stamps", note=f"no {stream}-stream stamps")
            out["models"].append(row)
            continue
        try:
            scorer = scorers.get(model) or Scorer(model, device="cpu", batch_size=1024, threads=threads)
        except WeightsError as exc:
            row.update(status="missing", note=str(exc))
            out["models"].append(row)
            continue
        scorers[model] = scorer
        t0 = time.perf_counter()
        scores = scorer.score(s.stamps_for(scorer.spec.scheme), channels=s.channels)
        dt = time.perf_counter() - t0
        res = evaluate_scores(s.labels, scores, s.meta, eval_cfg)
        results[(model, stream)] = (res, scores)
        row.update(status="ok", architecture=scorer.name, weights=str(scorer.path),
                   channels=list(scorer.channels), score_s=dt, stamps_per_s=len(s) / dt if dt > 0 else None,
                   trained_on=_trained_on(scorer.metadata), result=res.to_dict(with_roc=False))
        out["models"].append(row)
    dia_res = {m: r for (m, st), (r, _) in results.items() if st == "dia"}
    if dia_res:
        figures["roc"] = str(plot_roc_curves(dia_res, plots / "roc_dia_stream.png",
                                             title="ROC on the same dia-stream candidates",
                                             fpr_points=config.fpr_points))
    direct_res = {f"{m} (direct stream)": r for (m, st), (r, _) in results.items() if st == "direct"}
    if direct_res:
        figures["roc_direct"] = str(plot_roc_curves(direct_res, plots / "roc_direct_stream.png",
                                                    title="ROC on the direct mode's own candidates",
                                                    fpr_points=config.fpr_points))
    # saliency: the dia mode's model and a pair model on the same dia-stream stamps
    out["saliency"] = {}
    for model in ("triplet", "triplet-paper", "pair", "pair-paper", "pair-direct"):
        if (model, "dia") not in results or model not in scorers:
            continue
        s = streams["dia"]
        _, scores = results[(model, "dia")]
        pick = _gallery_pick(s.labels, scores, config.score_threshold, config.saliency_n)
        scorer = scorers[model]
        sal_all = saliency_maps(scorer.net.float(), scorer.spec, s.stamps, channels=s.channels)
        out["saliency"][model] = saliency_table(sal_all, s.labels, config.score_threshold)
        sub = dataclasses.replace(sal_all, maps=sal_all.maps[pick], fractions=sal_all.fractions[pick],
                                  scores=sal_all.scores[pick])
        figures[f"saliency_{model}"] = str(plot_saliency_gallery(
            s.stamps[pick], sub, s.labels[pick], plots / f"saliency_{model}.png", channels=s.channels,
            n_max=len(pick), threshold=config.score_threshold,
            title=f"{model}: stamps and saliency |dP/dx| of true/false positives/negatives "
                  f"(threshold {config.score_threshold:g})"))
        if len(out["saliency"]) >= 2:
            break
    return out, figures


def _trained_on(metadata: dict) -> str:
    """What the weights were trained on, from the provenance that training stores with them."""
    train = (metadata.get("provenance") or {}).get("train") or {}
    if not train:
        return "unrecorded"
    attrs = train.get("attrs") or {}
    instrument = str(attrs.get("instrument", "decam")).upper().replace("DECAM", "DECam")  # older weights: DECam
    parts = []
    for part in attrs.get("concatenated") or [attrs]:  # a set made of several (pair-dense: + off-peak stamps)
        ds, off = part.get("dataset_config") or {}, part.get("offpeak") or {}
        if "n_ccds" in ds and "seed" in ds:
            parts.append(f"{ds['n_ccds']} {instrument} {part.get('source', attrs.get('source', ''))} CCDs, "
                         f"seed {ds['seed']}")
        elif off:
            seeds = ", ".join(str(v) for v in part.get("simulation_seeds", [])) or "?"
            parts.append(f"{off.get('ccds', '')} simulated CCDs off the search peaks, seed {seeds}")
        else:
            parts.append(part.get("source", "unrecorded data"))
    return f"{train.get('n', '?')} {attrs.get('stream', '')}-stream stamps from {' + '.join(parts)}".replace("  ", " ")


def _gallery_pick(labels: np.ndarray, scores: np.ndarray, threshold: float, n: int) -> np.ndarray:
    """Up to ``n`` objects: in turn a TP, FP, TN, FN (the most confident of each), repeated."""
    pred = scores >= threshold
    groups = [np.flatnonzero(pred & (labels == 1)), np.flatnonzero(pred & (labels == 0)),
              np.flatnonzero(~pred & (labels == 0)), np.flatnonzero(~pred & (labels == 1))]
    # most confident first for TP/TN, worst first for FP/FN (the interesting mistakes)
    order = [g[np.argsort(-scores[g])] if i in (0, 1) else g[np.argsort(scores[g])] for i, g in enumerate(groups)]
    pick: list[int] = []
    for j in range(n):
        for g in order:
            if len(pick) < n and j < len(g):
                pick.append(int(g[j]))
    return np.asarray(pick, int)
