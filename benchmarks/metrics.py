"""Numbers of a benchmark report, computed from what a run wrote (pure functions).

Everything here takes plain data -- the records of ``run.json``, candidate catalogs and truth
tables -- and returns dicts of numbers, so the report and its test compute them the same way:

* :func:`cost_summary`: per-stage wall and CPU seconds per CCD of one run, the subtract stage
  split into PSF fit (star selection + kernel fit) and convolve/subtract, peak memory per worker;
* :func:`cost_ratio`: dia / direct per CCD;
* :func:`extrapolate`: core-hours and wall time for a full DECam exposure and an LSST visit;
* :func:`completeness_curves`: end-to-end completeness versus magnitude and S/N against truth,
  false positives per CCD and per square degree, purity, the 50% completeness magnitude.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "COST_STAGES",
    "FOCAL_PLANES",
    "FocalPlane",
    "cost_summary",
    "cost_ratio",
    "extrapolate",
    "completeness_curves",
    "magnitude_at_completeness",
]

#: Cost rows of the report, in pipeline order (``psf_fit`` + ``convolve`` = the subtract stage).
COST_STAGES = ("load", "align", "psf_fit", "convolve", "detect", "stamps", "score", "write")

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
        ``ccds_per_core_hour``, ``run_wall_s``, ``peak_rss_mb_per_worker``, ``n_done``, ``n_failed``.
    """
    done = [r for r in run["ccds"] if r.get("status") == "done" and not r.get("resumed")]
    per_ccd = []
    for rec in done:
        c = _ccd_costs(rec)
        per_ccd.append({"ccd": rec["ccd"], "worker": rec.get("worker"), "wall_s": c["wall"], "cpu_s": c["cpu"],
                        "wall_total": float(sum(c["wall"].values())), "cpu_total": float(sum(c["cpu"].values()))})
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
    }


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


def _bin_counts(values: np.ndarray, flags: dict[str, np.ndarray], edges: np.ndarray) -> list[dict[str, Any]]:
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
        rows.append(row)
    return rows


def completeness_curves(catalogs: Mapping[str, Any], truths: Mapping[str, Any], threshold: float,
                        edge: int = 0, pixel_scale: float | None = None,
                        mag_step: float = 0.5, snr_edges: Sequence[float] = (0, 5, 7, 10, 15, 20, 30, 50, 100, np.inf),
                        ) -> dict[str, Any]:
    """End-to-end completeness versus magnitude and S/N, false positives and purity of one run.

    Counts as :func:`pipeline.truth.summarize_against_truth` does: transients within ``edge`` px
    of the border are not counted; a transient is *detected* when a candidate is matched to it
    and *selected* when that candidate scores >= ``threshold``; a false positive is a candidate
    at or above the threshold not matched to a transient.

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
    """
    mags, snrs, det, sel = [], [], [], []
    n_fp = n_pos = n_cand = 0
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
        if cat is not None and len(cat):
            is_real = np.asarray(cat["truth_kind"]).astype(str) == "transient"
            score = np.asarray(cat["score"], float)
            cid = np.asarray(cat["truth_id"])
            found = set(cid[is_real].tolist())
            chosen = set(cid[is_real & (score >= threshold)].tolist())
            n_fp += int(((score >= threshold) & ~is_real).sum())
            n_pos += int((score >= threshold).sum())
            n_cand += len(cat)
        else:
            found, chosen = set(), set()
        det.append(np.array([i in found for i in ids], bool))
        sel.append(np.array([i in chosen for i in ids], bool))
        mags.append(np.asarray(truth["mag"], float)[real])
        snrs.append(np.asarray(truth["snr"], float)[real])
    mag = np.concatenate(mags) if mags else np.zeros(0)
    snr = np.concatenate(snrs) if snrs else np.zeros(0)
    d = np.concatenate(det) if det else np.zeros(0, bool)
    s = np.concatenate(sel) if sel else np.zeros(0, bool)
    n_ccds = len(truths)
    flags = {"completeness": s, "detected": d}
    if mag.size and np.isfinite(mag).any():
        lo = math.floor(np.nanmin(mag) / mag_step) * mag_step
        hi = math.ceil(np.nanmax(mag) / mag_step + 1e-9) * mag_step
        mag_edges = np.arange(lo, hi + mag_step / 2, mag_step)
        if mag_edges.size < 2:
            mag_edges = np.array([lo, lo + mag_step])
    else:
        mag_edges = np.array([0.0, mag_step])
    by_mag = _bin_counts(mag, flags, mag_edges)
    by_snr = _bin_counts(snr, flags, np.asarray(snr_edges, float))
    centers = np.array([(r["lo"] + r["hi"]) / 2 for r in by_mag])
    comp = np.array([np.nan if r["completeness"] is None else r["completeness"] for r in by_mag])
    compd = np.array([np.nan if r["detected"] is None else r["detected"] for r in by_mag])
    n_tr = int(mag.size)
    return {
        "threshold": threshold, "n_ccds": n_ccds, "n_transients": n_tr,
        "n_detected": int(d.sum()), "n_selected": int(s.sum()), "n_false_positives": n_fp,
        "n_candidates": n_cand,
        "completeness": s.sum() / n_tr if n_tr else None,
        "completeness_detected": d.sum() / n_tr if n_tr else None,
        "purity": (n_pos - n_fp) / n_pos if n_pos else None,
        "false_positives_per_ccd": n_fp / n_ccds if n_ccds else None,
        "area_deg2": area_deg2,
        "false_positives_per_deg2": n_fp / area_deg2 if area_deg2 > 0 else None,
        "m50": magnitude_at_completeness(centers, comp),
        "m50_detected": magnitude_at_completeness(centers, compd),
        "by_mag": by_mag, "by_snr": by_snr,
    }
