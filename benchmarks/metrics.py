"""Numbers of a benchmark report, computed from what a run wrote (pure functions).

Everything here takes plain data -- the records of ``run.json``, candidate catalogs and truth
tables -- and returns dicts of numbers, so the report and its test compute them the same way:

* :func:`cost_summary`: per-stage wall and CPU seconds per CCD of one run, the subtract stage
  split into PSF fit (star selection + kernel fit) and convolve/subtract, peak memory per worker;
* :func:`cost_ratio`: dia / direct per CCD;
* :func:`extrapolate`: core-hours and wall time for a full DECam exposure and an LSST visit;
* :func:`completeness_curves`: end-to-end completeness versus magnitude and S/N against truth,
  false positives per CCD and per square degree, purity, the 50% completeness magnitude, each
  with its confidence interval, the false positives by kind and the operating curve;
* :func:`compare_modes`: the difference between two modes on the same transients (completeness
  paired, false positives per CCD, m50), each with its interval and whether it is significant, and the
  completeness difference by the transient's brightest neighbour (:func:`neighbour_contrast`);
* :func:`operating_curve`, :func:`point_at_fp`, :func:`point_at_completeness`: completeness
  versus false positives per CCD as the score threshold sweeps 0..1, and matched operating points.

Uncertainties (all at :data:`CONFIDENCE_LEVEL`, 95%, two-sided): binomial proportions
(completeness, purity) by the Wilson score interval (:func:`astropy.stats.binom_conf_interval`);
counts of false positives by the exact (Garwood) Poisson interval
(:func:`astropy.stats.poisson_conf_interval`, ``frequentist-confidence``); the paired
completeness difference of two modes by Newcombe's (1998) method 10 built on those Wilson
intervals, with McNemar's exact test; the false-positive comparison by the exact conditional
binomial test of two Poisson counts; the m50 difference by a paired bootstrap of the transients.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "CONFIDENCE_LEVEL",
    "UNMATCHED",
    "KIND_ORDER",
    "binomial_interval",
    "poisson_interval",
    "paired_difference",
    "poisson_difference",
    "transient_outcomes",
    "neighbour_contrast",
    "NEIGHBOUR_KINDS",
    "NEIGHBOUR_EDGES",
    "NEIGHBOUR_RADIUS_FWHM",
    "operating_curve",
    "point_at_fp",
    "point_at_completeness",
    "false_positives_by_kind",
    "compare_modes",
    "COST_STAGES",
    "FOCAL_PLANES",
    "FocalPlane",
    "cost_summary",
    "first_on_worker",
    "steady_state",
    "cost_ratio",
    "extrapolate",
    "completeness_curves",
    "magnitude_at_completeness",
    "median_seconds",
]

#: Confidence level of every interval in the report (two-sided).
CONFIDENCE_LEVEL = 0.95

#: Name of a false positive matched to no truth object (empty ``truth_kind``).
UNMATCHED = "unmatched"

#: Cost rows of the report, in pipeline order (``psf_fit`` + ``convolve`` = the subtract stage).
COST_STAGES = ("load", "align", "psf_fit", "convolve", "detect", "stamps", "score", "write")

#: Truth kinds whose light lies under a transient in both exposures: its neighbours (:func:`neighbour_contrast`).
NEIGHBOUR_KINDS = ("star", "galaxy", "variable")

#: A transient's neighbours are those within this many search-image FWHM (the truth's ``search_fwhm``) of it.
NEIGHBOUR_RADIUS_FWHM = 2.0

#: Bins of the neighbour contrast (magnitudes by which the brightest neighbour outshines the transient): none
#: brighter (no neighbour, or only fainter ones), 0-1, 1-2, 2-3 and more than 3 mag brighter.
NEIGHBOUR_EDGES = (-math.inf, 0.0, 1.0, 2.0, 3.0, math.inf)

#: Sub-timings of :func:`dia.subtract` that belong to the PSF fit (the rest is convolve/subtract).
_FIT_TIMINGS = ("transfer", "select", "fit")


@dataclasses.dataclass(frozen=True)
class FocalPlane:
    """A survey exposure to extrapolate to: its CCD count and pixels per CCD."""

    name: str
    n_ccds: int
    ccd_shape: tuple[int, int]

    @property
    def pixels_per_ccd(self) -> int:
        return int(self.ccd_shape[0]) * int(self.ccd_shape[1])


#: DECam: 62 science CCDs of 2048 x 4096; LSSTCam: 189 science CCDs of 4096 x 4096.
FOCAL_PLANES = (
    FocalPlane("DECam exposure", 62, (4096, 2048)),
    FocalPlane("LSST visit", 189, (4096, 4096)),
)


def median_seconds(fn, repeats: int, sync=None) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` after one untimed warm-up call (first-call
    allocations, a GPU library's algorithm choice); ``sync`` (e.g. ``torch.cuda.synchronize``), when
    given, is called before each clock read so that asynchronous device work is counted."""
    wait = sync if sync is not None else (lambda: None)
    fn()
    wait()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        wait()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _split_subtract(rec: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """(psf_fit wall, convolve wall, psf_fit cpu, convolve cpu) of one CCD's subtract stage.

    The subtract stage's wall time is split by the DIA's own sub-timings (star selection and
    kernel fit versus the rest); its CPU time is split in the same proportion.
    """
    wall = float(rec["wall_s"].get("subtract", 0.0))
    cpu = float(rec["cpu_s"].get("subtract", 0.0))
    timings = ((rec.get("dia") or {}).get("timings") or {})
    fit = sum(float(timings.get(k, 0.0)) for k in _FIT_TIMINGS)
    frac = min(max(fit / wall, 0.0), 1.0) if wall > 0 else 0.0
    return wall * frac, wall * (1 - frac), cpu * frac, cpu * (1 - frac)


def _ccd_costs(rec: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    wall = {s: float(v) for s, v in (rec.get("wall_s") or {}).items()}
    cpu = {s: float(v) for s, v in (rec.get("cpu_s") or {}).items()}
    if "subtract" in wall:
        fw, cw, fc, cc = _split_subtract(rec)
        wall.update(psf_fit=fw, convolve=cw)
        cpu.update(psf_fit=fc, convolve=cc)
        del wall["subtract"], cpu["subtract"]
    return {"wall": wall, "cpu": cpu}


def cost_summary(run: Mapping[str, Any], threads_per_worker: int = 1) -> dict[str, Any]:
    """Per-CCD cost of one run from its ``run.json`` content.

    Parameters
    ----------
    run : dict
        The parsed ``run.json`` of one mode.
    threads_per_worker : int
        Cores each worker holds: a CCD costs (sum of its stage wall times) x this many core-seconds.

    Returns
    -------
    dict
        ``stages`` (rows of :data:`COST_STAGES` the mode has: mean wall and CPU s per CCD, and
        the run.json total), ``per_ccd`` (each done CCD's stage seconds and total),
        ``wall_per_ccd`` / ``cpu_per_ccd`` (means of the per-CCD totals), ``core_s_per_ccd``,
        ``ccds_per_core_hour``, ``run_wall_s``, ``peak_rss_mb_per_worker``, ``n_done``, ``n_failed``, and
        ``steady`` (:func:`steady_state`: the same costs without each worker's first run of each stage).
    """
    done = [r for r in run["ccds"] if r.get("status") == "done" and not r.get("resumed")]
    first = first_on_worker(run["ccds"])
    per_ccd = []
    for rec in done:
        c = _ccd_costs(rec)
        per_ccd.append({"ccd": rec["ccd"], "worker": rec.get("worker"), "wall_s": c["wall"], "cpu_s": c["cpu"],
                        "wall_total": float(sum(c["wall"].values())), "cpu_total": float(sum(c["cpu"].values())),
                        "first": sorted(first.get(rec["ccd"], ()))})
    n = len(per_ccd)
    stages = []
    for stage in COST_STAGES:
        walls = [p["wall_s"][stage] for p in per_ccd if stage in p["wall_s"]]
        if not walls:
            continue
        cpus = [p["cpu_s"][stage] for p in per_ccd if stage in p["cpu_s"]]
        stages.append({"stage": stage, "wall_s": float(np.mean(walls)), "cpu_s": float(np.mean(cpus)),
                       "wall_total": float(np.sum(walls)), "cpu_total": float(np.sum(cpus)), "n": len(walls)})
    wall_per_ccd = float(np.mean([p["wall_total"] for p in per_ccd])) if n else float("nan")
    cpu_per_ccd = float(np.mean([p["cpu_total"] for p in per_ccd])) if n else float("nan")
    core_s = wall_per_ccd * threads_per_worker
    peak: dict[str, float] = {}
    for rec in run["ccds"]:
        w = rec.get("worker") or "?"
        for v in (rec.get("peak_rss_mb") or {}).values():
            peak[w] = max(peak.get(w, 0.0), float(v))
    return {
        "mode": run.get("mode"), "n_done": n, "n_failed": int(run.get("n_failed", 0)),
        "stages": stages, "per_ccd": per_ccd,
        "wall_per_ccd": wall_per_ccd, "cpu_per_ccd": cpu_per_ccd, "core_s_per_ccd": core_s,
        "ccds_per_core_hour": 3600.0 / core_s if core_s > 0 else float("nan"),
        "run_wall_s": float(run.get("wall_s", float("nan"))),
        "peak_rss_mb_per_worker": dict(sorted(peak.items())),
        "peak_rss_mb_max": max(peak.values()) if peak else float("nan"),
        "steady": steady_state(per_ccd),
    }


#: Cost rows of a run.json stage (the subtract stage is split in two rows by :func:`_ccd_costs`).
_ROWS_OF_STAGE = {"subtract": ("psf_fit", "convolve")}


def first_on_worker(records: Iterable[Mapping[str, Any]]) -> dict[str, set[str]]:
    """Which stages of which CCD were the first run of that stage on their worker.

    A worker's first run of a stage pays what the worker pays once: the pages its C heap touches for the
    first time (a worker reuses them afterwards: :func:`pipeline.graph.tune_heap`) and caches filled on first
    use.  From the records' ``stage_worker`` and ``stage_start_unix`` (run.json since 2026-12-02); records
    without them give nothing, and CCDs taken from an earlier run (``resumed``) are not this run's.

    Returns
    -------
    dict
        CCD -> the cost rows (:data:`COST_STAGES` names) of its stages that ran first on their worker.
    """
    earliest: dict[tuple[str, str], tuple[float, str]] = {}
    for rec in records:
        if rec.get("resumed"):
            continue
        workers, starts = rec.get("stage_worker") or {}, rec.get("stage_start_unix") or {}
        for stage, t in starts.items():
            key = (str(workers.get(stage)), stage)
            if key not in earliest or float(t) < earliest[key][0]:
                earliest[key] = (float(t), rec["ccd"])
    out: dict[str, set[str]] = {}
    for (_, stage), (_, ccd) in earliest.items():
        out.setdefault(ccd, set()).update(_ROWS_OF_STAGE.get(stage, (stage,)))
    return out


def steady_state(per_ccd: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-stage cost without each worker's first run of each stage, and what those first runs cost more.

    Parameters
    ----------
    per_ccd : list of dict
        :func:`cost_summary`'s ``per_ccd`` rows (with their ``first`` stages).

    Returns
    -------
    dict
        ``stages`` (rows as :func:`cost_summary`'s: mean wall and CPU s of the later runs, ``n`` of them, and
        ``first_wall_s``, the mean of the first runs), ``wall_per_ccd`` and ``cpu_per_ccd`` (sums of the
        stage means; NaN when a stage has no later run: fewer CCDs than workers, or no start times) and
        ``start_up_s`` (sum over stages of first minus later mean: the once-per-worker extra, NaN likewise).
        A long run's cost per CCD tends to ``wall_per_ccd``; a run of N CCDs on W workers costs about
        ``N x wall_per_ccd + W x start_up_s``.
    """
    stages = []
    for stage in COST_STAGES:
        later = [p for p in per_ccd if stage in p["wall_s"] and stage not in p.get("first", ())]
        firsts = [p["wall_s"][stage] for p in per_ccd if stage in p["wall_s"] and stage in p.get("first", ())]
        if not later and not firsts:
            continue
        nan = float("nan")
        stages.append({"stage": stage, "n": len(later),
                       "wall_s": float(np.mean([p["wall_s"][stage] for p in later])) if later else nan,
                       "cpu_s": float(np.mean([p["cpu_s"][stage] for p in later])) if later else nan,
                       "first_wall_s": float(np.mean(firsts)) if firsts else nan, "n_first": len(firsts)})
    known = bool(stages) and any(p.get("first") for p in per_ccd)
    wall = float(sum(s["wall_s"] for s in stages)) if known else float("nan")
    cpu = float(sum(s["cpu_s"] for s in stages)) if known else float("nan")
    extra = float(sum((s["first_wall_s"] if s["n_first"] else s["wall_s"]) - s["wall_s"] for s in stages)) \
        if known else float("nan")
    return {"stages": stages, "wall_per_ccd": wall, "cpu_per_ccd": cpu, "start_up_s": extra}


def cost_ratio(dia: Mapping[str, Any], direct: Mapping[str, Any]) -> dict[str, Any]:
    """dia / direct cost: per CCD (CCDs done in both) and of the per-CCD means, wall and CPU."""
    d_by = {p["ccd"]: p for p in dia["per_ccd"]}
    per_ccd = {}
    for p in direct["per_ccd"]:
        q = d_by.get(p["ccd"])
        if q is not None and p["wall_total"] > 0:
            per_ccd[p["ccd"]] = q["wall_total"] / p["wall_total"]
    vals = list(per_ccd.values())
    return {
        "per_ccd": per_ccd,
        "median_per_ccd": float(np.median(vals)) if vals else float("nan"),
        "wall": dia["wall_per_ccd"] / direct["wall_per_ccd"] if direct["wall_per_ccd"] > 0 else float("nan"),
        "cpu": dia["cpu_per_ccd"] / direct["cpu_per_ccd"] if direct["cpu_per_ccd"] > 0 else float("nan"),
    }


def extrapolate(core_s_per_ccd: float, ccd_pixels: int, efficiency: float | None = None,
                workers: Sequence[int] = (2, 16, 64),
                planes: Iterable[FocalPlane] = FOCAL_PLANES) -> list[dict[str, Any]]:
    """Cost of full exposures, scaling the measured per-CCD cost by pixel count.

    ``core-hours = n_ccds x core_s_per_ccd x (pixels per CCD / measured CCD pixels) / 3600``;
    the wall time on N one-core workers is ``core-hours / (N x efficiency)`` with the measured
    parallel efficiency (1 when not measured), never less than one CCD's time.

    Parameters
    ----------
    core_s_per_ccd : float
        Measured core-seconds per benchmark CCD.
    ccd_pixels : int
        Pixels of a benchmark CCD.
    efficiency : float, optional
        Measured parallel efficiency (capped at 1).
    workers : sequence of int
        Worker counts to tabulate.
    planes : iterable of FocalPlane
    """
    eff = 1.0 if efficiency is None or not np.isfinite(efficiency) else min(float(efficiency), 1.0)
    rows = []
    for plane in planes:
        scale = plane.pixels_per_ccd / float(ccd_pixels)
        per_ccd = core_s_per_ccd * scale
        core_h = plane.n_ccds * per_ccd / 3600.0
        # a worker cannot finish faster than one CCD
        wall = {str(n): max(core_h * 3600.0 / (n * eff), per_ccd) / 60.0 for n in workers}
        rows.append({"target": plane.name, "n_ccds": plane.n_ccds, "ccd_shape": list(plane.ccd_shape),
                     "pixel_scale_factor": scale, "core_s_per_ccd": per_ccd, "core_hours": core_h,
                     "wall_min_on_workers": wall, "efficiency_used": eff})
    return rows


def magnitude_at_completeness(centers: np.ndarray, completeness: np.ndarray, level: float = 0.5) -> float | None:
    """Magnitude where completeness first falls below ``level`` (bright to faint), by linear interpolation.

    Empty bins (NaN) are skipped.  None if the curve never reaches ``level`` or never falls below it.
    """
    c = np.asarray(completeness, float)
    m = np.asarray(centers, float)
    ok = np.isfinite(c)
    c, m = c[ok], m[ok]
    above = np.flatnonzero(c >= level)
    if above.size == 0:
        return None
    for i in range(above[0], c.size - 1):
        if c[i] >= level > c[i + 1]:
            return float(m[i] + (c[i] - level) / (c[i] - c[i + 1]) * (m[i + 1] - m[i]))
    return None


# ----------------------------------------------------------------------------- intervals


def _z(level: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def binomial_interval(k: int, n: int, level: float = CONFIDENCE_LEVEL) -> list[float] | None:
    """Wilson score interval of the proportion ``k / n``.

    Computed by :func:`astropy.stats.binom_conf_interval` (``interval="wilson"``): it stays inside
    [0, 1], is not degenerate at ``k = 0`` or ``k = n`` (0/10 gives [0, 0.278] at 95%), and covers
    close to its nominal level for the sample sizes of a benchmark.

    Parameters
    ----------
    k : int
        Successes (transients selected, true candidates among those selected, ...).
    n : int
        Trials.
    level : float
        Two-sided confidence level (default :data:`CONFIDENCE_LEVEL`).

    Returns
    -------
    list of float or None
        ``[lower, upper]``; None when ``n`` is 0 (no proportion to bound).
    """
    k, n = int(k), int(n)
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"binomial_interval: need 0 <= k <= n, got k={k}, n={n}")
    from astropy.stats import binom_conf_interval

    lo, hi = binom_conf_interval(k, n, confidence_level=level, interval="wilson")
    return [float(lo), float(hi)]


def poisson_interval(k: int, level: float = CONFIDENCE_LEVEL, scale: float = 1.0) -> list[float]:
    """Exact (Garwood) confidence interval of a Poisson mean from ``k`` observed counts, times ``scale``.

    Computed by :func:`astropy.stats.poisson_conf_interval` (``frequentist-confidence``, at the
    normal quantile of ``level``): 0 counts give [0, 3.689] at 95%.  ``scale`` turns counts into
    a rate (1 / number of CCDs for false positives per CCD).
    """
    k = int(k)
    if k < 0:
        raise ValueError(f"poisson_interval: need k >= 0, got {k}")
    from astropy.stats import poisson_conf_interval

    lo, hi = poisson_conf_interval(k, interval="frequentist-confidence", sigma=_z(level))
    return [float(lo) * scale, float(hi) * scale]


def paired_difference(a: np.ndarray, b: np.ndarray, level: float = CONFIDENCE_LEVEL) -> dict[str, Any] | None:
    """Difference of two proportions measured on the same objects: ``mean(a) - mean(b)``.

    The interval is Newcombe's (1998, Stat. Med. 17, 2635) method 10: the Wilson intervals of the
    two marginal proportions (:func:`binomial_interval`) combined with the continuity-corrected
    phi correlation of the paired 2 x 2 table. The p-value is McNemar's exact test (the discordant
    objects, binomial with p = 1/2, :func:`scipy.stats.binomtest`).

    Parameters
    ----------
    a, b : array of bool
        Outcome of each object under the two conditions (same objects, same order).
    level : float
        Two-sided confidence level.

    Returns
    -------
    dict or None
        ``n``, ``k_a``, ``k_b``, ``only_a``, ``only_b`` (discordant counts), ``difference``,
        ``interval`` ``[lower, upper]``, ``p_value`` and ``significant`` (the interval excludes 0);
        None when there are no objects.
    """
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: a and b differ in shape ({a.shape} vs {b.shape})")
    n = int(a.size)
    if n == 0:
        return None
    both, only_a = int((a & b).sum()), int((a & ~b).sum())
    only_b = int((~a & b).sum())
    neither = n - both - only_a - only_b
    ka, kb = both + only_a, both + only_b
    p1, p2 = ka / n, kb / n
    l1, u1 = binomial_interval(ka, n, level)
    l2, u2 = binomial_interval(kb, n, level)
    denom = float(ka) * (n - ka) * kb * (n - kb)
    cross = both * neither - only_a * only_b
    if denom == 0:
        phi = 0.0
    else:
        corrected = cross - n / 2 if cross > n / 2 else (0.0 if cross >= 0 else cross)
        phi = corrected / math.sqrt(denom)
    lower = (p1 - p2) - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    upper = (p1 - p2) + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    from scipy.stats import binomtest

    p_value = float(binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
    return {"n": n, "k_a": ka, "k_b": kb, "only_a": only_a, "only_b": only_b, "difference": p1 - p2,
            "interval": [lower, upper], "p_value": p_value, "significant": bool(lower > 0 or upper < 0),
            "level": level, "method": "Newcombe (1998) method 10 on Wilson intervals; McNemar exact test"}


def poisson_difference(k_a: int, k_b: int, exposure: float = 1.0, level: float = CONFIDENCE_LEVEL) -> dict[str, Any]:
    """Compare two Poisson counts observed over the same exposure (e.g. false positives on the same CCDs).

    The rates are ``k / exposure``.  Given the total ``k_a + k_b``, ``k_a`` is binomial with
    ``p = r / (1 + r)`` (``r`` the rate ratio a / b): the exact (Clopper-Pearson) interval of
    that proportion gives the ratio's interval, and the exact binomial test of ``p = 1/2`` the
    p-value; ``significant`` when the ratio's interval excludes 1.  The difference of the rates
    gets the normal interval ``+- z sqrt(k_a + k_b) / exposure``.

    Returns
    -------
    dict
        ``k_a``, ``k_b``, ``rate_a``, ``rate_b``, ``difference`` (a - b), ``difference_interval``,
        ``ratio`` (a / b; None when ``k_b`` is 0), ``ratio_interval``, ``p_value``, ``significant``.
    """
    k_a, k_b = int(k_a), int(k_b)
    total = k_a + k_b
    half = _z(level) * math.sqrt(total) / exposure
    diff = (k_a - k_b) / exposure
    out: dict[str, Any] = {"k_a": k_a, "k_b": k_b, "rate_a": k_a / exposure, "rate_b": k_b / exposure,
                           "difference": diff, "difference_interval": [diff - half, diff + half],
                           "ratio": k_a / k_b if k_b else None, "ratio_interval": None, "p_value": 1.0,
                           "significant": False, "level": level,
                           "method": "exact conditional binomial test of two Poisson counts; "
                                     "normal interval of the difference"}
    if total:
        from scipy.stats import binomtest

        test = binomtest(k_a, total, 0.5)
        ci = test.proportion_ci(confidence_level=level, method="exact")
        lo = ci.low / (1 - ci.low) if ci.low < 1 else math.inf
        hi = ci.high / (1 - ci.high) if ci.high < 1 else math.inf
        out.update(ratio_interval=[lo, hi], p_value=float(test.pvalue), significant=bool(lo > 1 or hi < 1))
    return out


# ----------------------------------------------------------------------------- outcomes against truth


def neighbour_contrast(truth: Any, radius_fwhm: float = NEIGHBOUR_RADIUS_FWHM) -> np.ndarray:
    """How much its brightest neighbour outshines each transient of a truth table, in magnitudes.

    A neighbour is a star, galaxy or variable (:data:`NEIGHBOUR_KINDS`) whose truth position lies within
    ``radius_fwhm`` times the search image's PSF FWHM (the table's ``search_fwhm`` meta, pixels) of the
    transient: the host and any other source whose light the transient sits on in both exposures.  Without
    a difference image that light stays under the transient, and the seeing changes it between the two
    exposures; this is the number that says how much.  A galaxy counts at its centre: the outskirts of a
    large one farther away are not seen.

    Parameters
    ----------
    truth : astropy.table.Table
        Truth table (columns ``kind``, ``x``, ``y``, ``mag``; meta ``search_fwhm``).
    radius_fwhm : float
        Radius of the neighbourhood in search FWHM (default :data:`NEIGHBOUR_RADIUS_FWHM`).

    Returns
    -------
    ndarray
        One value per row of ``truth``: for a transient, its magnitude minus the brightest neighbour's
        (positive: the neighbour is brighter; ``-inf``: no neighbour with a magnitude within the radius);
        NaN for the other rows, and for every row when the table has no valid ``search_fwhm``.
    """
    kinds = np.char.strip(np.asarray(truth["kind"]).astype(str))
    out = np.full(kinds.size, np.nan)
    fwhm = float(truth.meta.get("search_fwhm", np.nan) or np.nan)
    if not (math.isfinite(fwhm) and fwhm > 0):
        return out
    x, y = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    mag = np.asarray(truth["mag"], float)
    tr = np.flatnonzero(kinds == "transient")
    nb = np.flatnonzero(np.isin(kinds, NEIGHBOUR_KINDS) & np.isfinite(mag))
    out[tr] = -np.inf
    radius2 = (radius_fwhm * fwhm) ** 2
    for start in range(0, tr.size, 256):  # bounded memory: 256 transients x the neighbours at a time
        t = tr[start:start + 256]
        near = (x[nb][None, :] - x[t][:, None]) ** 2 + (y[nb][None, :] - y[t][:, None]) ** 2 <= radius2
        brightest = np.where(near, mag[nb][None, :], np.inf).min(axis=1, initial=np.inf)
        out[t] = np.where(np.isfinite(brightest), mag[t] - brightest, -np.inf)
    return out


def transient_outcomes(catalogs: Mapping[str, Any], truths: Mapping[str, Any], edge: int = 0,
                       pixel_scale: float | None = None) -> dict[str, Any]:
    """Per-transient and per-candidate outcomes of one run against truth (arrays, any threshold).

    Counts as :func:`pipeline.truth.summarize_against_truth` does: transients within ``edge`` px
    of the border are not counted; a transient is *detected* when a candidate is matched to it
    (``truth_kind == "transient"``, ``truth_id`` its id); a candidate not matched to a transient
    is a false positive once its score passes the threshold.

    Returns
    -------
    dict
        Per counted transient (truth-table order, CCD by CCD): ``ccd``, ``id``, ``mag``, ``snr``,
        ``neighbour_dmag`` (:func:`neighbour_contrast`), ``detected`` and ``score`` (highest score of
        its matched candidates; -inf when not detected).  Per candidate: ``cand_score`` and
        ``cand_real`` (matched to a transient, counted or not), and for the others ``fp_score`` and
        ``fp_kind`` (the truth kind they were matched to, :data:`UNMATCHED` for none).  ``n_ccds``
        and ``area_deg2``.
    """
    keys_ccd, keys_id, mags, snrs, contrast, det, best = [], [], [], [], [], [], []
    cand_score, cand_real, fp_score, fp_kind = [], [], [], []
    area_deg2 = 0.0
    for ccd, truth in truths.items():
        cat = catalogs.get(ccd)
        kinds = np.asarray(truth["kind"]).astype(str)
        real = kinds == "transient"
        shape = tuple(truth.meta.get("shape", (0, 0)))
        if edge and shape[0]:
            x, y = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
            real &= (x >= edge) & (x < shape[1] - edge) & (y >= edge) & (y < shape[0] - edge)
        ids = np.asarray(truth["id"])[real]
        scale = pixel_scale if pixel_scale is not None else float(truth.meta.get("pixel_scale", np.nan))
        area_deg2 += shape[0] * shape[1] * (scale / 3600.0) ** 2
        top: dict[Any, float] = {}
        if cat is not None and len(cat):
            kind = np.char.strip(np.asarray(cat["truth_kind"]).astype(str))
            is_real = kind == "transient"
            score = np.asarray(cat["score"], float)
            cid = np.asarray(cat["truth_id"])
            for i, s in zip(cid[is_real].tolist(), score[is_real].tolist()):
                s = s if math.isfinite(s) else -math.inf
                top[i] = max(top.get(i, -math.inf), s)
            cand_score.append(score)
            cand_real.append(is_real)
            fp_score.append(score[~is_real])
            fp_kind.append(np.where(kind[~is_real] == "", UNMATCHED, kind[~is_real]))
        keys_ccd.append(np.full(ids.size, str(ccd), dtype=object))
        keys_id.append(ids)
        det.append(np.array([i in top for i in ids.tolist()], bool))
        best.append(np.array([top.get(i, -math.inf) for i in ids.tolist()], float))
        mags.append(np.asarray(truth["mag"], float)[real])
        snrs.append(np.asarray(truth["snr"], float)[real] if "snr" in truth.colnames else np.full(ids.size, np.nan))
        contrast.append(neighbour_contrast(truth)[real])

    def cat_(parts, dtype):
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    return {"ccd": cat_(keys_ccd, object), "id": cat_(keys_id, int), "mag": cat_(mags, float),
            "snr": cat_(snrs, float), "neighbour_dmag": cat_(contrast, float),
            "detected": cat_(det, bool), "score": cat_(best, float),
            "cand_score": cat_(cand_score, float), "cand_real": cat_(cand_real, bool),
            "fp_score": cat_(fp_score, float), "fp_kind": cat_(fp_kind, object).astype(str),
            "n_ccds": len(truths), "area_deg2": area_deg2}


def operating_curve(transient_scores: np.ndarray, fp_scores: np.ndarray, n_ccds: int,
                    threshold: float | None = None) -> dict[str, Any]:
    """Completeness and false positives per CCD as the score threshold sweeps 0..1.

    A transient is selected at threshold ``t`` when its score is ``>= t``; a false positive
    counts when its score is ``>= t``.  Both are step functions that change only at the
    scores, so the curve is exact at its vertices: 0, every score in [0, 1], 1 (and
    ``threshold`` when given).

    Parameters
    ----------
    transient_scores : array
        One score per counted transient (-inf or NaN: never detected).
    fp_scores : array
        Scores of the candidates that are not transients.
    n_ccds : int
        CCDs the counts come from (false positives per CCD = count / ``n_ccds``).
    threshold : float, optional
        The operating threshold, added as a vertex (``operating_index`` points at it).

    Returns
    -------
    dict
        Lists ``threshold`` (ascending), ``completeness``, ``false_positives_per_ccd``,
        ``n_selected``, ``n_false_positives``; ``n_transients``, ``n_ccds``, ``operating_index``.
    """
    ts = np.asarray(transient_scores, float)
    ts = np.sort(np.where(np.isfinite(ts), ts, -np.inf))
    fs = np.asarray(fp_scores, float)
    fs = np.sort(fs[np.isfinite(fs)])
    extra = [0.0, 1.0] + ([float(threshold)] if threshold is not None else [])
    finite = np.concatenate([ts[np.isfinite(ts)], fs])
    grid = np.unique(np.concatenate([finite[(finite >= 0) & (finite <= 1)], extra]))
    n_sel = ts.size - np.searchsorted(ts, grid, side="left")
    n_fp = fs.size - np.searchsorted(fs, grid, side="left")
    n_tr = int(ts.size)
    return {"threshold": grid.tolist(), "n_selected": n_sel.tolist(), "n_false_positives": n_fp.tolist(),
            "completeness": (n_sel / n_tr).tolist() if n_tr else [None] * grid.size,
            "false_positives_per_ccd": (n_fp / n_ccds).tolist() if n_ccds else [None] * grid.size,
            "n_transients": n_tr, "n_ccds": int(n_ccds),
            "operating_index": int(np.searchsorted(grid, threshold)) if threshold is not None else None}


def _curve_point(curve: Mapping[str, Any], i: int, level: float) -> dict[str, Any]:
    n_tr, n_ccds = curve["n_transients"], curve["n_ccds"]
    k, f = curve["n_selected"][i], curve["n_false_positives"][i]
    return {"threshold": curve["threshold"][i], "n_selected": k, "n_false_positives": f,
            "completeness": curve["completeness"][i], "completeness_ci": binomial_interval(k, n_tr, level),
            "false_positives_per_ccd": curve["false_positives_per_ccd"][i],
            "false_positives_per_ccd_ci": poisson_interval(f, level, 1.0 / n_ccds) if n_ccds else None}


def point_at_fp(curve: Mapping[str, Any], fp_per_ccd: float, level: float = CONFIDENCE_LEVEL) -> dict | None:
    """The lowest threshold of ``curve`` whose false positives per CCD are at most ``fp_per_ccd``.

    The most complete operating point that is no worse in false positives; None when even the
    highest threshold has more.
    """
    fp = np.asarray(curve["false_positives_per_ccd"], float)
    ok = np.flatnonzero(fp <= fp_per_ccd + 1e-12)
    return _curve_point(curve, int(ok[0]), level) if ok.size else None


def point_at_completeness(curve: Mapping[str, Any], completeness: float,
                          level: float = CONFIDENCE_LEVEL) -> dict | None:
    """The highest threshold of ``curve`` whose completeness is at least ``completeness``.

    The purest operating point that is no less complete; None when even threshold 0 is less
    complete (the mode does not detect that many transients at all).
    """
    c = np.asarray([np.nan if v is None else v for v in curve["completeness"]], float)
    ok = np.flatnonzero(c >= completeness - 1e-12)
    return _curve_point(curve, int(ok[-1]), level) if ok.size else None


#: Order of the false-positive kinds in the report (any other kind follows, sorted).
KIND_ORDER = ("star", "galaxy", "variable", "cosmic_ray", "hot_pixel", "bad_column", "satellite", "bleed", UNMATCHED)


def false_positives_by_kind(kinds: np.ndarray, scores: np.ndarray, threshold: float, n_ccds: int,
                            level: float = CONFIDENCE_LEVEL) -> list[dict[str, Any]]:
    """False positives at ``threshold`` by the truth kind they were matched to.

    Parameters
    ----------
    kinds, scores : arrays
        Kind (``fp_kind`` of :func:`transient_outcomes`) and score of each non-transient candidate.
    threshold : float
    n_ccds : int

    Returns
    -------
    list of dict
        One row per kind present among the candidates (order :data:`KIND_ORDER`): ``kind``,
        ``n_candidates`` (all scores), ``n`` (score >= threshold), ``per_ccd`` and its exact
        Poisson interval ``per_ccd_ci``.
    """
    kinds = np.asarray(kinds).astype(str)
    sel = np.asarray(scores, float) >= threshold
    present = set(kinds.tolist())
    order = [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))
    rows = []
    for kind in order:
        m = kinds == kind
        n = int((m & sel).sum())
        rows.append({"kind": kind, "n_candidates": int(m.sum()), "n": n,
                     "per_ccd": n / n_ccds if n_ccds else None,
                     "per_ccd_ci": poisson_interval(n, level, 1.0 / n_ccds) if n_ccds else None})
    return rows


# ----------------------------------------------------------------------------- completeness


def _bin_counts(values: np.ndarray, flags: dict[str, np.ndarray], edges: np.ndarray,
                level: float = CONFIDENCE_LEVEL) -> list[dict[str, Any]]:
    idx = np.digitize(values, edges) - 1
    rows = []
    for b in range(len(edges) - 1):
        m = idx == b
        n = int(m.sum())
        row: dict[str, Any] = {"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n}
        for name, f in flags.items():
            k = int((f & m).sum())
            row[f"n_{name}"] = k
            row[name] = k / n if n else None
            row[f"{name}_ci"] = binomial_interval(k, n, level)
        rows.append(row)
    return rows


def _mag_edges(mag: np.ndarray, step: float) -> np.ndarray:
    if mag.size and np.isfinite(mag).any():
        lo = math.floor(np.nanmin(mag) / step) * step
        hi = math.ceil(np.nanmax(mag) / step + 1e-9) * step
        edges = np.arange(lo, hi + step / 2, step)
        return edges if edges.size >= 2 else np.array([lo, lo + step])
    return np.array([0.0, step])


def completeness_curves(catalogs: Mapping[str, Any], truths: Mapping[str, Any], threshold: float,
                        edge: int = 0, pixel_scale: float | None = None,
                        mag_step: float = 0.5, snr_edges: Sequence[float] = (0, 5, 7, 10, 15, 20, 30, 50, 100, np.inf),
                        level: float = CONFIDENCE_LEVEL) -> dict[str, Any]:
    """End-to-end completeness versus magnitude and S/N, false positives and purity of one run.

    Counts as :func:`pipeline.truth.summarize_against_truth` does (see :func:`transient_outcomes`):
    a transient is *selected* when its matched candidate scores >= ``threshold``; a false
    positive is a candidate at or above the threshold not matched to a transient.  Every
    proportion carries its Wilson interval (``*_ci``) and every false-positive rate its exact
    Poisson interval, at ``level``.

    Parameters
    ----------
    catalogs : dict
        ``{ccd: candidate table}`` with ``score``, ``truth_kind``, ``truth_id`` columns.
    truths : dict
        ``{ccd: truth table}`` (columns ``id``, ``kind``, ``x``, ``y``, ``mag``, ``snr``; meta
        ``shape`` and ``pixel_scale``).
    threshold : float
        The run's operating threshold.
    edge : int
        Border (px) of the detection (``DetectConfig.edge``).
    pixel_scale : float, optional
        arcsec/px (default: the truth tables' meta).
    mag_step : float
        Width of the magnitude bins.
    snr_edges : sequence of float
        Edges of the S/N bins (truth S/N of the transient in the search image).
    level : float
        Confidence level of the intervals (default :data:`CONFIDENCE_LEVEL`).

    Returns
    -------
    dict
        Counts, ``completeness``, ``purity``, ``false_positives_per_ccd`` / ``_per_deg2`` with
        their ``*_ci``, ``m50``, ``by_mag`` and ``by_snr`` bins, ``by_neighbour`` bins (of
        :func:`neighbour_contrast`, edges :data:`NEIGHBOUR_EDGES`; none when the truth has no
        ``search_fwhm``) with ``neighbour_radius_fwhm``, ``false_positives_by_kind``
        (:func:`false_positives_by_kind`) and ``operating_curve`` (:func:`operating_curve`).
    """
    o = transient_outcomes(catalogs, truths, edge=edge, pixel_scale=pixel_scale)
    mag, snr, d = o["mag"], o["snr"], o["detected"]
    s = o["score"] >= threshold
    n_ccds, area_deg2 = o["n_ccds"], o["area_deg2"]
    n_fp = int((o["fp_score"] >= threshold).sum())
    n_pos = int((o["cand_score"] >= threshold).sum())
    flags = {"completeness": s, "detected": d}
    mag_edges = _mag_edges(mag, mag_step)
    by_mag = _bin_counts(mag, flags, mag_edges, level)
    by_snr = _bin_counts(snr, flags, np.asarray(snr_edges, float), level)
    by_neighbour = _bin_counts(o["neighbour_dmag"], flags, np.asarray(NEIGHBOUR_EDGES, float), level)
    centers = np.array([(r["lo"] + r["hi"]) / 2 for r in by_mag])
    comp = np.array([np.nan if r["completeness"] is None else r["completeness"] for r in by_mag])
    compd = np.array([np.nan if r["detected"] is None else r["detected"] for r in by_mag])
    n_tr = int(mag.size)
    return {
        "threshold": threshold, "level": level, "n_ccds": n_ccds, "n_transients": n_tr,
        "n_detected": int(d.sum()), "n_selected": int(s.sum()), "n_false_positives": n_fp,
        "n_candidates": int(o["cand_score"].size), "n_positives": n_pos,
        "completeness": s.sum() / n_tr if n_tr else None,
        "completeness_ci": binomial_interval(int(s.sum()), n_tr, level),
        "completeness_detected": d.sum() / n_tr if n_tr else None,
        "completeness_detected_ci": binomial_interval(int(d.sum()), n_tr, level),
        "purity": (n_pos - n_fp) / n_pos if n_pos else None,
        "purity_ci": binomial_interval(n_pos - n_fp, n_pos, level),
        "false_positives_per_ccd": n_fp / n_ccds if n_ccds else None,
        "false_positives_per_ccd_ci": poisson_interval(n_fp, level, 1.0 / n_ccds) if n_ccds else None,
        "area_deg2": area_deg2,
        "false_positives_per_deg2": n_fp / area_deg2 if area_deg2 > 0 else None,
        "false_positives_per_deg2_ci": poisson_interval(n_fp, level, 1.0 / area_deg2) if area_deg2 > 0 else None,
        "m50": magnitude_at_completeness(centers, comp),
        "m50_detected": magnitude_at_completeness(centers, compd),
        "by_mag": by_mag, "by_snr": by_snr,
        "by_neighbour": by_neighbour if sum(r["n"] for r in by_neighbour) else [],
        "neighbour_radius_fwhm": NEIGHBOUR_RADIUS_FWHM,
        "false_positives_by_kind": false_positives_by_kind(o["fp_kind"], o["fp_score"], threshold, n_ccds, level),
        "operating_curve": operating_curve(o["score"], o["fp_score"], n_ccds, threshold),
    }


# ----------------------------------------------------------------------------- two modes


def _m50_of(mag_idx: np.ndarray, selected: np.ndarray, n_bins: int, centers: np.ndarray) -> float | None:
    n = np.bincount(mag_idx, minlength=n_bins)[:n_bins]
    k = np.bincount(mag_idx, weights=selected, minlength=n_bins)[:n_bins]
    with np.errstate(invalid="ignore", divide="ignore"):
        comp = np.where(n > 0, k / np.maximum(n, 1), np.nan)
    return magnitude_at_completeness(centers, comp)


def compare_modes(reference: Mapping[str, Any], other: Mapping[str, Any], threshold_reference: float,
                  threshold_other: float, mag_step: float = 0.5, n_boot: int = 1000, seed: int = 0,
                  level: float = CONFIDENCE_LEVEL) -> dict[str, Any]:
    """How ``other`` differs from ``reference`` on the same transients and CCDs (other - reference).

    Parameters
    ----------
    reference, other : dict
        :func:`transient_outcomes` of the two runs, on the same CCDs and truth.
    threshold_reference, threshold_other : float
        Their operating thresholds.
    mag_step : float
        Magnitude bin width of the m50 (as in :func:`completeness_curves`).
    n_boot : int
        Paired bootstrap resamples of the transients for the m50 difference (default 1000).
    seed : int
        Seed of the bootstrap (fixed: the report is reproducible).
    level : float
        Confidence level.

    Returns
    -------
    dict
        ``completeness``: :func:`paired_difference` (other - reference, per transient);
        ``false_positives_per_ccd``: :func:`poisson_difference` (other vs reference);
        ``m50``: ``reference``, ``other``, ``difference`` (other - reference, mag), its bootstrap
        percentile ``interval`` (None when either m50 is undefined) and ``significant``;
        ``matched``: rows ``{mode, matched_to, of, target, point}``, the operating point of one
        run (``mode``: ``"reference"`` or ``"other"``) at the other's false positives per CCD
        (:func:`point_at_fp`) or completeness (:func:`point_at_completeness`) at its threshold;
        ``by_neighbour``: the paired completeness difference (:func:`paired_difference`, None for an
        empty bin) in each bin of :data:`NEIGHBOUR_EDGES` (``lo``, ``hi``, ``difference``), and
        ``neighbour_groups``: the same for the transients with no brighter neighbour (``"isolated"``) and
        with one at least 1 mag brighter (``"outshone"``); both empty when the truth has no FWHM.
    """
    ka = list(zip(reference["ccd"].tolist(), reference["id"].tolist()))
    kb = list(zip(other["ccd"].tolist(), other["id"].tolist()))
    if ka != kb:
        raise ValueError("compare_modes: the two runs were not counted against the same transients")
    sel_ref = reference["score"] >= threshold_reference
    sel_oth = other["score"] >= threshold_other
    n_ccds = reference["n_ccds"]
    fp_ref = int((reference["fp_score"] >= threshold_reference).sum())
    fp_oth = int((other["fp_score"] >= threshold_other).sum())
    mag = reference["mag"]
    edges = _mag_edges(mag, mag_step)
    nb = edges.size - 1
    idx = np.clip(np.digitize(mag, edges) - 1, 0, nb)  # NaN magnitudes fall in the overflow bin nb
    centers = (edges[:-1] + edges[1:]) / 2
    m_ref = _m50_of(idx, sel_ref.astype(float), nb, centers)
    m_oth = _m50_of(idx, sel_oth.astype(float), nb, centers)
    m50: dict[str, Any] = {"reference": m_ref, "other": m_oth, "difference": None, "interval": None,
                           "significant": False, "n_boot": n_boot, "n_boot_defined": 0, "seed": seed,
                           "level": level, "method": "paired bootstrap of the transients, percentile interval"}
    if m_ref is not None and m_oth is not None:
        rng = np.random.default_rng(seed)
        diffs = []
        n = mag.size
        for _ in range(n_boot):
            pick = rng.integers(0, n, n)
            a = _m50_of(idx[pick], sel_ref[pick].astype(float), nb, centers)
            b = _m50_of(idx[pick], sel_oth[pick].astype(float), nb, centers)
            if a is not None and b is not None:
                diffs.append(b - a)
        m50.update(difference=m_oth - m_ref, n_boot_defined=len(diffs))
        if len(diffs) >= 0.9 * n_boot:
            lo, hi = np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)])
            m50.update(interval=[float(lo), float(hi)], significant=bool(lo > 0 or hi < 0))
    # matched operating points: each mode's threshold at the other's false-positive rate or completeness
    curves = {"reference": operating_curve(reference["score"], reference["fp_score"], n_ccds),
              "other": operating_curve(other["score"], other["fp_score"], n_ccds)}
    n_tr = int(mag.size)
    at_op = {"reference": (fp_ref / n_ccds if n_ccds else None, sel_ref.sum() / n_tr if n_tr else None),
             "other": (fp_oth / n_ccds if n_ccds else None, sel_oth.sum() / n_tr if n_tr else None)}
    matched = []
    for role, against in (("other", "reference"), ("reference", "other")):
        fp_target, comp_target = at_op[against]
        if fp_target is not None:
            matched.append({"mode": role, "matched_to": "false_positives_per_ccd", "of": against,
                            "target": fp_target, "point": point_at_fp(curves[role], fp_target, level)})
        if comp_target is not None:
            matched.append({"mode": role, "matched_to": "completeness", "of": against, "target": float(comp_target),
                            "point": point_at_completeness(curves[role], comp_target, level)})
    # where the difference comes from: the transients by how much their brightest neighbour outshines them
    dmag = reference["neighbour_dmag"]
    by_neighbour, groups = [], {}
    if (~np.isnan(dmag)).any():
        idx = np.digitize(dmag, NEIGHBOUR_EDGES) - 1  # NaN (no FWHM in that truth) falls in no bin
        for b, (lo, hi) in enumerate(zip(NEIGHBOUR_EDGES[:-1], NEIGHBOUR_EDGES[1:])):
            m = idx == b
            by_neighbour.append({"lo": lo, "hi": hi, "difference": paired_difference(sel_oth[m], sel_ref[m], level)})
        with np.errstate(invalid="ignore"):
            for name, m in (("isolated", dmag < 0), ("outshone", dmag >= 1)):
                groups[name] = paired_difference(sel_oth[m], sel_ref[m], level)
    return {"level": level, "n_transients": n_tr, "n_ccds": n_ccds, "matched": matched,
            "by_neighbour": by_neighbour, "neighbour_groups": groups,
            "neighbour_radius_fwhm": NEIGHBOUR_RADIUS_FWHM,
            "completeness": paired_difference(sel_oth, sel_ref, level),
            "false_positives_per_ccd": poisson_difference(fp_oth, fp_ref, n_ccds, level),
            "m50": m50}
