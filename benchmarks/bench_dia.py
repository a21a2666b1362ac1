#!/usr/bin/env python
"""Benchmark dia.subtract: the two implementations side by side, per-step timings and difference quality.

Usage (from the repository root)::

    python benchmarks/bench_dia.py [--input simulated|synthetic] [--repeat 3] [--threads 1] [--json OUT]
    python benchmarks/bench_dia.py --search S.fits --template T.fits [--align]   # two Exposure FITS files

Inputs:

* ``simulated`` (default): one DECam CCD pair of ``pipeline.simulate`` (2048 x 4096, its default
  seeing, sky, stars, galaxies, transients and artifacts), the template resampled onto the search
  grid by ``pipeline.steps.align`` (timed once, reported separately), exactly what ``pipeline run``
  hands to the subtraction.  Quality uses the simulator's truth and noiseless model.
* ``synthetic``: ``gpu_dia_check.make_pair`` (seeing 1.2" vs 0.9" at 0.263"/px, ~2500 stars, 20
  transients, saturated stars, a bad column, a no-data corner), no alignment needed.
* FITS files: the template must be on the search grid unless ``--align`` is given.

Both values of ``PsfMatchConfig.path`` (``reference``: the previous implementation; ``fused``:
the default) run alternately in one process, ``--repeat`` times each, on ``--threads`` threads
(FFT workers and BLAS/OpenMP pools limited with threadpoolctl).  Printed and written to ``--json``:
the median seconds per step of each path and their ratio (reference / fused) for "PSF fit"
(star selection + kernel fit), "subtract" (convolution, variance, mask) and the total; the
agreement of the two differences (max |D_fused - D_reference| / sigma on unmasked pixels, masks
equal); and the quality of each: std and mean of D/sigma on blank sky and, with truth, star
residuals (aperture flux of the difference / true flux) and transient flux recovery.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_dia_check import PLANES, compare, make_pair  # noqa: E402
from dia import PsfMatchConfig, estimate_fwhm, subtract  # noqa: E402
from dia.subtract import choose_convolved  # noqa: E402

STEPS = ("transfer", "select", "fit", "convolve", "variance", "mask", "decorrelate", "total")
FIT_STEPS = ("select", "fit")
SUBTRACT_STEPS = ("convolve", "variance", "mask", "decorrelate")
PATHS = ("reference", "fused")


def _load(search: str, template: str, align: bool = False) -> dict:
    from pipeline.io import read_exposure

    s, t = read_exposure(search), read_exposure(template)
    align_s = None
    if align:  # resample the template onto the search grid, timed on its own
        from pipeline.align import align_pair

        t0 = time.perf_counter()
        t = align_pair(s, t).template
        align_s = time.perf_counter() - t0
    pair = {
        "search": s.image, "search_variance": s.variance, "search_mask": s.mask,
        "template": t.image, "template_variance": t.variance, "template_mask": t.mask,
    }
    pair["search_fwhm"] = s.fwhm or estimate_fwhm(s.image, s.mask, saturation=s.saturation or math.inf)
    pair["template_fwhm"] = t.fwhm or estimate_fwhm(t.image, t.mask, saturation=t.saturation or math.inf)
    pair["align_s"] = align_s
    return pair


def simulated_pair(seed: int = 1) -> dict:
    """A simulated DECam CCD pair, the template aligned onto the search grid as ``pipeline run`` does."""
    from pipeline import steps
    from pipeline.config import RunConfig
    from pipeline.simulate import SimulationConfig, simulate_pair

    sim = simulate_pair(SimulationConfig(), seed=seed, ccd_index=0)
    t0 = time.perf_counter()
    aligned = steps.align(steps.LoadedPair("bench", sim.search, sim.template, sim.truth), RunConfig())
    align_s = time.perf_counter() - t0
    s, t = aligned.search, aligned.template
    t_var = t.variance
    if choose_convolved(s.fwhm, t.fwhm, "auto") == "search":  # the rule of pipeline.steps.difference_image
        t_var = t.variance * np.float32(aligned.variance_factor)
    return {
        "search": s.image, "search_variance": s.variance, "search_mask": s.mask,
        "template": t.image, "template_variance": t_var, "template_mask": t.mask,
        "search_fwhm": float(s.fwhm), "template_fwhm": float(t.fwhm), "align_s": align_s, "sim": sim,
    }


def _blank_simulated(sim, mask) -> np.ndarray:
    """Blank sky: far from sources in the noiseless model, away from unflagged artifacts, unmasked."""
    from scipy import ndimage

    sigma = np.sqrt(sim.search.variance)
    signal = sim.search_model - np.median(sim.search_model)
    quiet = ndimage.binary_erosion(signal < 0.05 * np.median(sigma), iterations=8)
    artifact = ndimage.binary_dilation(np.abs(sim.search.image - sim.search_model) > 6 * sigma, iterations=3)
    return quiet & ~artifact & (mask == 0)


def quality(pair: dict, diff) -> dict:
    """Blank-sky normalised noise; with truth, star residuals and transient flux recovery."""
    d = diff.to_numpy()
    ny, nx = d.image.shape
    good = d.mask == 0
    out: dict = {}
    if "sim" in pair:
        from pipeline.detect import aperture_fluxes

        sim = pair["sim"]
        blank = _blank_simulated(sim, d.mask)
        zb = d.image[blank] / np.sqrt(d.variance[blank])
        zb = zb[np.abs(zb) < 6]  # template-only artifacts (satellite trails)
        t = sim.truth
        inside = (t["x"] > 40) & (t["x"] < nx - 40) & (t["y"] > 40) & (t["y"] < ny - 40)
        radius = 1.5 * max(pair["search_fwhm"], pair["template_fwhm"])
        stars = t[(t["kind"] == "star") & inside]
        stars = stars[np.argsort(-np.asarray(stars["flux"]))][:300]
        resid, err, bad = aperture_fluxes(d.image, d.variance, d.mask, stars["x"], stars["y"], radius)
        frac = np.abs(np.asarray(resid)[~bad]) / np.asarray(stars["flux"])[~bad]
        brightest = frac[:20]
        out["star_residual"] = {"n": int(brightest.size),
                                "median_abs_frac": float(np.median(brightest)) if brightest.size else None,
                                "max_abs_frac": float(np.max(brightest)) if brightest.size else None,
                                "median_abs_over_err": float(np.median(np.abs(resid[~bad] / err[~bad])[:20]))
                                if brightest.size else None}
        tr = t[(t["kind"] == "transient") & inside & (t["snr"] > 8)]
        flux, _, tbad = aperture_fluxes(d.image, d.variance, d.mask, tr["x"], tr["y"], 3 * radius)
        ratio = np.asarray(flux)[~tbad] / np.asarray(tr["flux"])[~tbad]
        out["transient_flux_ratio_median"] = float(np.median(ratio)) if ratio.size else None
    elif "stars" in pair:
        from scipy.spatial import cKDTree

        z = d.image / np.sqrt(d.variance)
        pts = np.vstack([pair["stars"][:, :2], pair["transients"][:, :2]])
        yy, xx = np.mgrid[0:ny:2, 0:nx:2]
        dist, _ = cKDTree(pts).query(np.column_stack([xx.ravel(), yy.ravel()]))
        blank = good[::2, ::2] & (dist.reshape(yy.shape) > 20)
        zb = z[::2, ::2][blank]
        fw = pair["search_fwhm"] if d.convolved == "template" else pair["template_fwhm"]
        r = 2.0 * fw
        s = fw / (2 * math.sqrt(2 * math.log(2)))
        frac = 1 - math.exp(-0.5 * (r / s) ** 2)
        ratios = []
        for x, y, f in pair["transients"]:
            yy2, xx2 = np.ogrid[0:ny, 0:nx]
            ap = (xx2 - x) ** 2 + (yy2 - y) ** 2 <= r * r
            if (d.mask[ap] == 0).all():
                ratios.append(float(d.image[ap].sum() / (f * frac)))
        out["transient_flux_ratio_median"] = float(np.median(ratios)) if ratios else None
        out["transient_flux_ratio_min_max"] = [float(min(ratios)), float(max(ratios))] if ratios else None
    else:
        z = d.image / np.sqrt(d.variance)
        zb = z[good]
        zb = zb[np.abs(zb) < 5]  # crude: without truth, drop sources
    out["blank_z_std"] = float(np.std(zb))
    out["blank_z_mean"] = float(np.mean(zb))
    out["masked_fraction"] = float(1 - good.mean())
    return out


def _median_steps(runs: list[dict]) -> dict[str, float]:
    med = {k: float(np.median([r.get(k, 0.0) for r in runs])) for k in STEPS if k in runs[0]}
    med["psf_fit"] = float(np.median([sum(r.get(k, 0.0) for k in FIT_STEPS) for r in runs]))
    med["subtract"] = float(np.median([sum(r.get(k, 0.0) for k in SUBTRACT_STEPS) for r in runs]))
    return med


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark dia.subtract: reference vs fused implementation.")
    ap.add_argument("--input", choices=("simulated", "synthetic"), default="simulated")
    ap.add_argument("--seed", type=int, default=1, help="simulation seed (--input simulated)")
    ap.add_argument("--shape", default="4096x2048", help="NYxNX of the synthetic pair")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (FFT workers, BLAS); the pipeline uses 1")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated PsfMatchConfig.path values")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--search", default=None, help="search Exposure FITS (with --template)")
    ap.add_argument("--template", default=None, help="template Exposure FITS, already on the search grid")
    ap.add_argument("--convolve", choices=("auto", "template", "search"), default="auto")
    ap.add_argument("--decorrelate", action="store_true")
    ap.add_argument("--align", action="store_true",
                    help="the FITS template is on its own grid: resample it first (timed separately)")
    args = ap.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]

    t = time.perf_counter()
    if args.search or args.template:
        if not (args.search and args.template):
            ap.error("--search and --template go together")
        pair = _load(args.search, args.template, align=args.align)
        source = f"FITS {args.search} - {args.template}"
    elif args.input == "simulated":
        pair = simulated_pair(args.seed)
        source = f"pipeline.simulate DECam seed {args.seed}, aligned by pipeline.steps.align"
    else:
        ny, nx = (int(v) for v in args.shape.lower().split("x"))
        pair = make_pair((ny, nx))
        source = "gpu_dia_check.make_pair (synthetic)"
    build_s = time.perf_counter() - t
    base = PsfMatchConfig(convolve=args.convolve, decorrelate=args.decorrelate, fft_workers=args.threads)
    configs = {p: dataclasses.replace(base, path=p) for p in paths}
    planes = [pair[k] for k in PLANES]
    kw = dict(search_fwhm=pair["search_fwhm"], template_fwhm=pair["template_fwhm"], device=args.device)

    from threadpoolctl import threadpool_limits

    runs: dict[str, list[dict]] = {p: [] for p in paths}
    last = {}
    with threadpool_limits(limits=args.threads):
        if args.device == "gpu":
            import cupy as cp

            planes = [cp.asarray(a) for a in planes]
            for p in paths:  # warm-up: kernels compiled, FFT plans cached
                subtract(*planes, config=configs[p], **kw)
        for _ in range(args.repeat):
            for p in paths:  # alternate, so both see the same machine load
                c0 = time.thread_time()
                d = subtract(*planes, config=configs[p], **kw)
                timings = dict(d.timings)
                timings["thread_cpu"] = time.thread_time() - c0
                runs[p].append(timings)
                last[p] = d
    result = {
        "input": source, "shape": list(pair["search"].shape), "device": args.device, "repeat": args.repeat,
        "threads": args.threads,
        "machine": (f"{platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, python "
                    f"{platform.python_version()}, numpy {np.__version__}"),
        "input_build_s": build_s, "align_s": pair.get("align_s"), "paths": {},
    }
    for p in paths:
        d = last[p]
        med = _median_steps(runs[p])
        med["thread_cpu"] = float(np.median([r["thread_cpu"] for r in runs[p]]))
        result["paths"][p] = {
            "median_step_s": med, "convolved": d.convolved,
            "stars": {"found": d.stats.found, "used": d.stats.used, "rejected": d.stats.rejected},
            "kernel": {"sigmas": list(d.solution.basis.sigmas), "size": d.solution.basis.size,
                       "n_basis": d.solution.basis.n_basis, "kernel_sum_centre": d.solution.kernel_sum_centre},
            "fit_chi2_median": d.stats.chi2_median, "quality": quality(pair, d),
        }
    if "reference" in last and "fused" in last:
        ref, new = last["reference"].to_numpy(), last["fused"].to_numpy()
        result["agreement"] = compare(ref, new, np.asarray(pair["search"]))
        rm, fm = result["paths"]["reference"]["median_step_s"], result["paths"]["fused"]["median_step_s"]
        result["ratio_reference_over_fused"] = {k: rm[k] / fm[k] for k in ("psf_fit", "subtract", "total",
                                                                            "thread_cpu") if fm.get(k)}

    print(f"dia.subtract on {result['shape'][0]}x{result['shape'][1]}: {source}")
    print(f"({args.device}, {args.threads} thread(s), median of {args.repeat}; {result['machine']})")
    rows = [k for k in (*STEPS[:-1], "psf_fit", "subtract", "total", "thread_cpu")
            if any(k in result["paths"][p]["median_step_s"] for p in paths)]
    print(f"{'step (s)':<12}" + "".join(f"{p:>12}" for p in paths) + ("       ratio" if len(paths) == 2 else ""))
    for k in rows:
        vals = [result["paths"][p]["median_step_s"].get(k) for p in paths]
        line = f"{k:<12}" + "".join(f"{v:>12.3f}" if v is not None else f"{'-':>12}" for v in vals)
        if len(paths) == 2 and vals[0] and vals[1]:
            line += f"{vals[0] / vals[1]:>12.2f}"
        print(line)
    for p in paths:
        info = result["paths"][p]
        print(f"{p}: stars found {info['stars']['found']}, used {info['stars']['used']}; kernel "
              f"{info['kernel']['n_basis']} functions, size {info['kernel']['size']}, sum at centre "
              f"{info['kernel']['kernel_sum_centre']:.4f}; convolved: {info['convolved']}")
        print(f"{p} quality: " + json.dumps(info["quality"]))
    if "agreement" in result:
        print("fused vs reference: " + json.dumps(result["agreement"]))
    if pair.get("align_s") is not None:
        print(f"alignment (template onto the search grid, reported separately): {pair['align_s']:.3f} s")
    if args.json:
        from pipeline.io import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
