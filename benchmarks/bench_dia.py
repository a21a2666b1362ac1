#!/usr/bin/env python
"""Benchmark dia.subtract: per-step timings (median of repeats) and difference quality.

Usage (from the repository root)::

    python benchmarks/bench_dia.py [--shape 4096x2048] [--device cpu|gpu] [--repeat 3] [--json OUT]
    python benchmarks/bench_dia.py --search S.fits --template T.fits   # two Exposure FITS files

With no files, a synthetic DECam-like pair is built (``gpu_dia_check.make_pair``:
seeing 1.2" vs 0.9" at 0.263"/px, ~2500 stars per 2048x4096 CCD, 20 transients,
saturated stars, a bad column, a no-data corner).  The template must already be
on the search grid when FITS files are given (run ``pipeline`` alignment first).
Besides the timings, the quality of the last difference is printed: the std and
mean of D/sqrt(var) on unmasked blank sky and, for the synthetic pair, the
recovered / true aperture flux of the transients.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_dia_check import PLANES, make_pair  # noqa: E402
from dia import PsfMatchConfig, estimate_fwhm, subtract  # noqa: E402

STEPS = ("transfer", "select", "fit", "convolve", "variance", "mask", "decorrelate", "total")


def _load(search: str, template: str, align: bool = False, repeat: int = 1) -> dict:
    from pipeline.io import read_exposure

    s, t = read_exposure(search), read_exposure(template)
    align_s = None
    if align:  # resample the template onto the search grid, timed on its own
        from pipeline.align import align_pair

        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            aligned = align_pair(s, t)
            times.append(time.perf_counter() - t0)
        align_s = float(np.median(times))
        t = aligned.template
    pair = {
        "search": s.image, "search_variance": s.variance, "search_mask": s.mask,
        "template": t.image, "template_variance": t.variance, "template_mask": t.mask,
    }
    pair["search_fwhm"] = s.fwhm or estimate_fwhm(s.image, s.mask, saturation=s.saturation or math.inf)
    pair["template_fwhm"] = t.fwhm or estimate_fwhm(t.image, t.mask, saturation=t.saturation or math.inf)
    pair["align_s"] = align_s
    return pair


def quality(pair: dict, diff) -> dict:
    """Blank-sky normalised noise; transient flux recovery when the truth is known."""
    d = diff.to_numpy()
    ny, nx = d.image.shape
    good = d.mask == 0
    out: dict = {}
    z = d.image / np.sqrt(d.variance)
    if "stars" in pair:
        from scipy.spatial import cKDTree

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
        zb = z[good]
        zb = zb[np.abs(zb) < 5]  # crude: without truth, drop sources
    out["blank_z_std"] = float(np.std(zb))
    out["blank_z_mean"] = float(np.mean(zb))
    out["masked_fraction"] = float(1 - good.mean())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark dia.subtract (PSF matching + subtraction).")
    ap.add_argument("--shape", default="4096x2048", help="NYxNX of the synthetic pair")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--search", default=None, help="search Exposure FITS (with --template)")
    ap.add_argument("--template", default=None, help="template Exposure FITS, already on the search grid")
    ap.add_argument("--convolve", choices=("auto", "template", "search"), default="auto")
    ap.add_argument("--decorrelate", action="store_true")
    ap.add_argument("--align", action="store_true",
                    help="the FITS template is on its own grid: resample it first (timed separately)")
    args = ap.parse_args(argv)

    t = time.perf_counter()
    if args.search or args.template:
        if not (args.search and args.template):
            ap.error("--search and --template go together")
        pair = _load(args.search, args.template, align=args.align, repeat=args.repeat)
    else:
        ny, nx = (int(v) for v in args.shape.lower().split("x"))
        pair = make_pair((ny, nx))
    build_s = time.perf_counter() - t
    cfg = PsfMatchConfig(convolve=args.convolve, decorrelate=args.decorrelate)
    planes = [pair[k] for k in PLANES]
    if args.device == "gpu":
        import cupy as cp

        planes = [cp.asarray(a) for a in planes]
        subtract(*planes, search_fwhm=pair["search_fwhm"], template_fwhm=pair["template_fwhm"], config=cfg,
                 device="gpu")  # warm-up
    runs = []
    for _ in range(args.repeat):
        d = subtract(*planes, search_fwhm=pair["search_fwhm"], template_fwhm=pair["template_fwhm"], config=cfg,
                     device=args.device)
        runs.append(d.timings)
    med = {k: float(np.median([r[k] for r in runs])) for k in STEPS if k in runs[0]}
    q = quality(pair, d)
    result = {
        "shape": list(pair["search"].shape), "device": args.device, "repeat": args.repeat,
        "machine": (f"{platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, "
                    f"numpy {np.__version__}"),
        "input_build_s": build_s, "median_step_s": med, "align_median_s": pair.get("align_s"),
        "convolved": d.convolved, "stars": {"found": d.stats.found, "used": d.stats.used, "rejected": d.stats.rejected},
        "kernel": {"sigmas": list(d.solution.basis.sigmas), "size": d.solution.basis.size,
                   "n_basis": d.solution.basis.n_basis, "kernel_sum_centre": d.solution.kernel_sum_centre},
        "fit_chi2_median": d.stats.chi2_median, "quality": q,
    }
    print(f"dia.subtract on {result['shape'][0]}x{result['shape'][1]} "
          f"({args.device}, median of {args.repeat}; {result['machine']})")
    print(f"{'step':<12}{'seconds':>10}")
    for k, v in med.items():
        print(f"{k:<12}{v:>10.3f}")
    print(f"stars: found {d.stats.found}, used {d.stats.used}, rejected {d.stats.rejected}")
    print(f"kernel: {d.solution.basis.n_basis} basis functions, "
          f"sigmas {tuple(round(s, 2) for s in d.solution.basis.sigmas)}, "
          f"size {d.solution.basis.size}, sum at centre {d.solution.kernel_sum_centre:.4f}; convolved: {d.convolved}")
    print("quality: " + json.dumps(q))
    if pair.get("align_s") is not None:
        print(f"alignment (template onto the search grid, reported separately): {pair['align_s']:.3f} s (median)")
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
