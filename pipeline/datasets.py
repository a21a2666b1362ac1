"""Labelled stamp sets cut from simulated CCDs through the pipeline's own candidate stages.

For every simulated CCD pair the builder runs exactly what ``pipeline run``
runs -- :mod:`pipeline.steps` -- and keeps the stamps of every candidate:

* the **dia stream**: candidates detected on the difference image, with
  (template, search, difference) stamps;
* the **direct stream**: candidates found without a difference image, with
  (template, search) stamps, the template resampled at the same pixels.

A candidate is real when it lies within 2 px of an injected transient
(:mod:`pipeline.truth`), bogus otherwise -- candidates on a variable star are bogus by default
and real with ``variables="real"`` (:func:`pipeline.truth.candidate_labels` explains both
policies); its metadata record the CCD, the position, the matched truth kind and magnitude,
and the S/N.  The CCDs are simulated with one of the simulator's instrument presets
(:data:`pipeline.simulate.INSTRUMENTS`; DECam by default), recorded with the labelling
policy in every stamp set's ``attrs``.  Whole CCDs are
assigned to train / val / test (so no test CCD is seen in training) and the
classes are balanced within each split by downsampling the majority.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from pipeline.config import RunConfig, config_to_dict
from pipeline.detect import CandidateFlags

if TYPE_CHECKING:
    from pipeline.simulate import SimulationConfig

__all__ = ["DatasetConfig", "DatasetError", "build_ccd_stamps", "pair_stamp_sets", "build_datasets", "STREAMS",
           "sky_columns", "failed_ccds", "DECAM_DATASET_SHAPE", "dataset_shape"]

STREAMS = ("dia", "direct")

#: Default CCD shape of DECam data sets: half a DECam CCD (4096 x 2048), to spread the cost over more CCDs.
DECAM_DATASET_SHAPE = (2048, 2048)


def dataset_shape(instrument: str) -> tuple[int, int]:
    """Default CCD shape of a data set simulated with preset ``instrument``.

    DECam: :data:`DECAM_DATASET_SHAPE` (half a CCD, what the shipped DECam weights were trained
    on); any other preset: its own CCD shape (:data:`pipeline.simulate.INSTRUMENTS`).

    Raises
    ------
    ValueError
        An unknown preset.
    """
    from pipeline.simulate import INSTRUMENTS

    key = str(instrument).lower()
    if key not in INSTRUMENTS:
        raise ValueError(f"unknown instrument preset {instrument!r}; known: {sorted(INSTRUMENTS)}")
    return DECAM_DATASET_SHAPE if key == "decam" else tuple(INSTRUMENTS[key].shape)


class DatasetError(RuntimeError):
    """A requested stream yielded no usable stamps.

    ``report`` holds every CCD with its errors; ``sets`` the streams that did yield a set
    (``{stream: StampSet}``), so that their work is not lost.
    """

    def __init__(self, message: str, report: dict, sets: dict | None = None) -> None:
        super().__init__(message)
        self.report = report
        self.sets = dict(sets or {})


def failed_ccds(report: dict) -> list[str]:
    """One line per failed (CCD, stream) of a build report: ``"s3000-ccd07 dia: StarSelectionError: ..."``."""
    return [f"{row['ccd']} {stream}: {message}" for row in report["ccds"]
            for stream, message in sorted(row["errors"].items())]


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """How a labelled data set is made from simulated CCDs.

    Attributes
    ----------
    n_ccds : int
        Simulated CCD pairs (default 40).
    seed : int
        Simulation seed; CCD ``k`` depends only on ``(seed, k)``.  Default 3000, held out: the
        shipped weights were trained on seed 1000 (CCDs 0-149), and a set of seed 1000 shares
        CCDs with their training data (``pipeline evaluate`` warns; see :data:`pipeline.cli.SEEDS`).
    shape : (int, int), optional
        CCD shape (default None: :func:`dataset_shape` of the instrument, i.e. 2048 x 2048, half a
        DECam CCD, for DECam, and the preset's CCD shape for the others); resolved when the
        configuration is made, so the recorded configuration holds the shape used.
    transient_density_factor : float
        Multiplier of the simulator's transient density (default 8): training sets need many
        transients; the stamps of each look the same as at the natural rate.
    fractions : (float, float, float)
        Train / val / test fractions of CCDs (default 0.7 / 0.1 / 0.2).
    split_seed : int
        Seed of the CCD-to-split assignment and of the class balancing.
    drop_edge : bool
        Leave out candidates flagged EDGE (incomplete stamps; default True).
    max_bogus_per_ccd : int
        At most this many bogus candidates kept per CCD and stream (default 600).
    hard_bogus_fraction : float
        Of the ``max_bogus_per_ccd`` kept when a CCD has more, this fraction are the hardest: the
        largest brightenings in the candidates' forced measurement (``flux / flux_err``: variable
        stars, seeing changes of stars and galaxies, peaks beside a transient); the rest are drawn
        at random (default 0: all at random).  A detector that scores every search peak
        (direct mode, ``selection = "cnn"``) meets ~2,000 bogus peaks per DECam CCD and must
        reject the few that changed, which random sampling shows it too rarely.
    workers : int
        Processes simulating and processing CCDs in parallel (default: cores).
    instrument : str
        Simulator preset (a key of :data:`pipeline.simulate.INSTRUMENTS`: ``"decam"``, default,
        ``"ztf"`` or ``"lsst"``): pixel scale, PSF, depth, gain and noise of the CCDs.
    variables : {"bogus", "real"}
        Label of candidates on variable stars (default ``"bogus"``, as the DES training set; ZTF's
        real-bogus labels call them real): see :func:`pipeline.truth.candidate_labels`.
    simulation : SimulationConfig, optional
        Every other simulation parameter (default None: :class:`pipeline.simulate.SimulationConfig`'s
        defaults); its ``instrument``, ``shape`` and ``transient_density`` are replaced by the fields
        above (the density as the preset default times ``transient_density_factor``).  E.g.
        ``star_shift_rms`` for misregistration dipoles of stars (``pipeline dataset --sim-config``).
    """

    n_ccds: int = 40
    seed: int = 3000
    shape: tuple[int, int] | None = None
    transient_density_factor: float = 8.0
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    split_seed: int = 0
    drop_edge: bool = True
    max_bogus_per_ccd: int = 600
    hard_bogus_fraction: float = 0.0
    workers: int = 0
    instrument: str = "decam"
    variables: str = "bogus"
    simulation: SimulationConfig | None = None

    def __post_init__(self) -> None:
        from pipeline.truth import VARIABLE_POLICIES

        object.__setattr__(self, "instrument", str(self.instrument).lower())
        shape = dataset_shape(self.instrument) if self.shape is None else tuple(int(v) for v in self.shape)
        object.__setattr__(self, "shape", shape)
        if not 0.0 <= self.hard_bogus_fraction <= 1.0:
            raise ValueError(f"DatasetConfig.hard_bogus_fraction must be in [0, 1], got {self.hard_bogus_fraction}")
        if self.variables not in VARIABLE_POLICIES:
            raise ValueError(f"DatasetConfig.variables must be one of {VARIABLE_POLICIES}, got {self.variables!r}")


def sky_columns(stamps, idx=slice(None)) -> dict[str, np.ndarray]:
    """The stamp-set columns a ``sky``-scheme model reads (:meth:`classifier.data.StampSet.stamps_for`):
    ``sky_template``, ``sky_search`` and ``sky_noise`` of :class:`pipeline.stamps.Stamps` cut with ``sky=True``
    (rows ``idx``); none when the stamps were cut without."""
    if stamps.sky is None:
        return {}
    cols = {f"sky_{name}": stamps.sky[idx, k].astype(float) for k, name in enumerate(stamps.channels)
            if name != "difference"}
    cols["sky_noise"] = stamps.noise[idx].astype(float)
    return cols


def _stampset(stamps, idx, table, labels, stream: str):
    from classifier.data import StampSet

    kind = np.asarray(table["truth_kind"]).astype("U16")
    kind = np.where(kind == "", "unmatched", kind)
    meta = {
        "ccd": np.asarray(table["ccd"]).astype(str), "x": np.asarray(table["x"], float),
        "y": np.asarray(table["y"], float), "mag": np.asarray(table["truth_mag"], float),
        "snr": np.asarray(table["snr"], float), "kind": kind,
        "truth_id": np.asarray(table["truth_id"], np.int64),
        "flags": np.asarray(table["flags"], np.int32), "flux": np.asarray(table["flux"], float),
    }
    meta.update(sky_columns(stamps, idx))
    return StampSet(stamps.data[idx].astype(np.float32), labels, meta, stamps.channels, {"stream": stream})


def _sample_bogus(bogus: np.ndarray, table, n: int, hard_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` of the (sorted) bogus rows ``bogus``: the ``hard_fraction`` with the largest forced brightening
    ``flux / flux_err`` (non-finite ranks last), the others at random.

    The random part draws the rows to leave out, as the sampling did before hard negatives existed, so
    that ``hard_fraction = 0`` keeps exactly the rows it kept (and the shipped weights' sets rebuild equal).
    """
    n_hard = int(round(hard_fraction * n))
    hard = np.zeros(0, np.intp)
    if n_hard:
        with np.errstate(divide="ignore", invalid="ignore"):
            change = np.asarray(table["flux"], float)[bogus] / np.asarray(table["flux_err"], float)[bogus]
        change = np.where(np.isfinite(change), change, -np.inf)
        hard = bogus[np.argsort(-change, kind="stable")[:n_hard]]
    rest = np.setdiff1d(bogus, hard)
    drop = rng.choice(rest, rest.size - (n - hard.size), replace=False)
    return np.concatenate([hard, np.setdiff1d(rest, drop)])


def pair_stamp_sets(pair, run_config: RunConfig = RunConfig(), streams: tuple[str, ...] = STREAMS, *,
                    drop_edge: bool = True, max_bogus: int | None = None,
                    rng: np.random.Generator | None = None, variables: str = "bogus",
                    hard_bogus_fraction: float = 0.0) -> tuple[dict, dict]:
    """Labelled per-stream StampSets of one already loaded CCD pair with truth.

    Runs the pipeline's own candidate stages (:mod:`pipeline.steps`) on the pair -- cosmic-ray
    masking (``run_config.cosmics``) included, as a run's load stage does -- and labels every
    candidate against its truth table.

    Parameters
    ----------
    pair : pipeline.steps.LoadedPair
        Search, template and truth (``pair.truth`` must not be None).
    run_config : RunConfig
        Stage parameters (the same as a run's).
    streams : tuple of str
        ``"dia"`` and/or ``"direct"``.
    drop_edge : bool
        Leave out candidates flagged EDGE (incomplete stamps).
    max_bogus : int, optional
        Keep at most this many bogus candidates per stream (default: all): the
        ``hard_bogus_fraction`` of them with the largest ``flux / flux_err``, the rest drawn
        with ``rng``.
    rng : numpy.random.Generator, optional
        Needed when ``max_bogus`` is set.
    variables : {"bogus", "real"}
        Label of candidates on variable stars (:func:`pipeline.truth.candidate_labels`).
    hard_bogus_fraction : float
        See :class:`DatasetConfig`.

    Returns
    -------
    sets, errors : dict
        ``{stream: StampSet}`` and ``{stream: "Error: message"}`` for streams that failed.
    """
    from pipeline import steps
    from pipeline.truth import candidate_labels, match_truth

    if pair.truth is None:
        raise ValueError(f"pair_stamp_sets: CCD {pair.ccd} has no truth table to label candidates")
    pair, _ = steps.mask_cosmics(pair, run_config)  # as the run's load stage: stamps of the stream a run scores
    sets: dict = {}
    errors: dict = {}

    def finish(stream, cands, stamps):
        table = match_truth(cands, pair.truth, run_config.match)
        keep = np.ones(len(table), bool)
        if drop_edge:
            keep &= (np.asarray(table["flags"]) & int(CandidateFlags.EDGE)) == 0
        labels = candidate_labels(table["truth_kind"], variables)
        bogus = np.flatnonzero(keep & (labels == 0))
        if max_bogus is not None and bogus.size > max_bogus:
            keep[bogus] = False
            keep[_sample_bogus(bogus, table, max_bogus, hard_bogus_fraction, rng)] = True
        idx = np.flatnonzero(keep)
        sets[stream] = _stampset(stamps, idx, table[idx], labels[idx], stream)

    if "dia" in streams:
        try:
            aligned = steps.align(pair, run_config)
            diff = steps.psf_match_subtract(aligned, run_config)
            cands = steps.detect_on_difference(diff, aligned, run_config, ccd=pair.ccd)
            finish("dia", cands, steps.cut_triplets(cands, aligned, diff, sky=True))
        except Exception as exc:  # a CCD the DIA cannot handle is left out, and said so
            errors["dia"] = f"{type(exc).__name__}: {exc}"
    if "direct" in streams:
        try:  # the direct mode's candidates ("dense" slides the direct model, whatever mode run_config is for)
            cands = steps.detect_without_difference(pair, dataclasses.replace(run_config, mode="direct"))
            finish("direct", cands, steps.cut_pairs(cands, pair, run_config, sky=True))
        except Exception as exc:
            errors["direct"] = f"{type(exc).__name__}: {exc}"
    return sets, errors


def build_ccd_stamps(ccd_index: int, config: DatasetConfig, run_config: RunConfig = RunConfig(),
                     streams: tuple[str, ...] = STREAMS) -> dict:
    """Simulate one CCD pair and return ``{stream: StampSet}`` plus timing and truth counts.

    A CCD whose simulation fails is returned with that error for every stream (``"sets"``
    empty) rather than raised, so one bad CCD does not lose the others.
    """
    from pipeline import steps
    from pipeline.simulate import SimulationConfig, ccd_name, simulate_pair

    base = config.simulation if config.simulation is not None else SimulationConfig()
    default_density = SimulationConfig().transient_density
    t0 = time.perf_counter()
    name = f"s{config.seed}-{ccd_name(ccd_index)}"
    out: dict = {"ccd": name, "n_transients": 0, "sets": {}, "errors": {}}
    try:
        sim_cfg = dataclasses.replace(base, instrument=config.instrument, shape=tuple(config.shape),
                                      transient_density=default_density * config.transient_density_factor)
        sim = simulate_pair(sim_cfg, config.seed, ccd_index)
    except Exception as exc:  # reported per CCD, like a failed stream
        out["errors"] = {s: f"simulation failed: {type(exc).__name__}: {exc}" for s in streams}
        out["seconds"] = time.perf_counter() - t0
        return out
    pair = steps.LoadedPair(name, sim.search, sim.template, sim.truth)
    rng = np.random.default_rng([config.seed, ccd_index, 7])
    out["n_transients"] = int((sim.truth["kind"] == "transient").sum())
    out["sets"], out["errors"] = pair_stamp_sets(pair, run_config, streams, drop_edge=config.drop_edge,
                                                 max_bogus=config.max_bogus_per_ccd, rng=rng,
                                                 variables=config.variables,
                                                 hard_bogus_fraction=config.hard_bogus_fraction)
    out["seconds"] = time.perf_counter() - t0
    return out


def _worker(args):
    """One CCD in a worker process, its BLAS / OpenMP pools held to one thread (one process per core).

    The limit is scoped (threadpoolctl) rather than set through ``OMP_NUM_THREADS``: the
    environment variable is read when a library loads, so setting it here would not reach
    the pools already loaded, and in the serial path it would leak into the caller's process.
    """
    from threadpoolctl import threadpool_limits

    k, config, run_config, streams = args
    with threadpool_limits(limits=1):
        return build_ccd_stamps(k, config, run_config, streams)


def build_datasets(config: DatasetConfig, run_config: RunConfig = RunConfig(),
                   streams: tuple[str, ...] = STREAMS, progress: Callable | None = None) -> dict:
    """Build balanced, CCD-split stamp sets for the requested streams.

    Every stamp set records the simulation seed it was cut from (``attrs["simulation_seeds"]``;
    the ``ccd`` column names each CCD ``s<seed>-ccd<index>``), which ``pipeline evaluate``
    compares with the data a model was trained on, the instrument preset
    (``attrs["instrument"]``) and the label policy of variable stars (``attrs["variables"]``).

    Returns
    -------
    dict
        ``{stream: StampSet}`` and ``"report"``: per-CCD timing, failures and counts.

    Raises
    ------
    DatasetError
        When a requested stream yields no usable stamps (every CCD failed for it, or no split
        has both classes), after every stream was tried; its ``report`` lists every CCD with
        its errors and its ``sets`` holds the streams that did succeed.
    """
    from classifier.data import StampSet, ccd_split_assignment

    workers = config.workers or len(os.sched_getaffinity(0))
    run_config = dataclasses.replace(run_config, psf_match=dataclasses.replace(run_config.psf_match, fft_workers=1))
    jobs = [(k, config, run_config, streams) for k in range(config.n_ccds)]
    results = []
    if workers > 1:
        with cf.ProcessPoolExecutor(max_workers=workers) as pool:
            for res in pool.map(_worker, jobs):
                results.append(res)
                if progress:
                    progress(res)
    else:
        for job in jobs:
            results.append(_worker(job))
            if progress:
                progress(results[-1])
    # whole CCDs to splits, the same assignment for every stream
    fr = np.asarray(config.fractions, float) / np.sum(config.fractions)
    assignment = ccd_split_assignment(config.n_ccds, config.fractions, config.split_seed)
    split_of = {r["ccd"]: str(assignment[i]) for i, r in enumerate(results)}
    out: dict = {}
    report = {
        "instrument": config.instrument, "variables": config.variables, "shape": list(config.shape),
        "dataset_config": config_to_dict(config), "run_config": config_to_dict(run_config),
        "ccds": [{"ccd": r["ccd"], "seconds": r["seconds"], "n_transients": r["n_transients"],
                  "errors": r["errors"], **{f"n_{s}": len(r["sets"].get(s, [])) for s in streams}} for r in results],
    }
    problems = []
    for stream in streams:
        sets = [r["sets"][stream] for r in results if stream in r["sets"] and len(r["sets"][stream])]
        if not sets:
            n_failed = sum(stream in r["errors"] for r in results)
            others = "" if n_failed == len(results) else "; the others had no candidates"
            problems.append(f"no {stream} stamps were produced ({n_failed} of {len(results)} CCDs failed "
                            f"for this stream{others})")
            continue
        full = StampSet.concatenate(sets)
        full.meta["split"] = np.array([split_of[c] for c in full.meta["ccd"]], dtype=str)
        parts = []
        for split in ("train", "val", "test"):
            sel = full.meta["split"] == split
            if sel.any() and (full.labels[sel] == 1).any() and (full.labels[sel] == 0).any():
                parts.append(full.subset(sel).balance(config.split_seed))
        if not parts:
            problems.append(f"no split of the {stream} stream has both real and bogus stamps "
                            f"({int((full.labels == 1).sum())} real, {int((full.labels == 0).sum())} bogus)")
            continue
        result = StampSet.concatenate(parts)
        result.attrs = {
            "stream": stream, "source": "simulated", "simulation_seeds": [int(config.seed)],
            "instrument": config.instrument, "variables": config.variables,
            "dataset_config": config_to_dict(config),
            "run_config": config_to_dict(run_config), "split": {"method": "ccd", "fractions": fr.tolist()},
            "unbalanced_counts": {"real": int((full.labels == 1).sum()), "bogus": int((full.labels == 0).sum())},
        }
        out[stream] = result
    if problems:
        raise DatasetError("; ".join(problems), report, out)
    out["report"] = report
    return out
