#!/usr/bin/env python
"""GPU check of dia.subtract: CuPy vs NumPy agreement, GPU time per CCD, transfer times.

Self-contained: needs only numpy, scipy, cupy and this repository's ``dia``
package (no astropy/photutils).  Run from the repository root::

    python benchmarks/gpu_dia_check.py                # on a CUDA machine
    python benchmarks/gpu_dia_check.py --device cpu   # dry run of the same code on NumPy

It builds a synthetic DECam-like 4096 x 2048 pair, runs the NumPy path once
as the reference and the device path ``--repeat`` times after warm-up, and
reports:
  * ``max_abs_diff_over_sigma``: max |D_dev - D_cpu| / sqrt(var_cpu) over unmasked pixels
    (difference relative to the noise of the difference image);
  * ``max_rel_diff``: max |D_dev - D_cpu| / max(|D_cpu|, sqrt(var_cpu)) (relative to the
    pixel's value, floored at its noise so empty sky does not divide by ~0);
  * ``max_diff_over_image_scale``: max |D_dev - D_cpu| / max |search| (relative to the image scale);
  * the median device time per CCD with the data already on the device (cupy-synchronised),
    and the host->device and device->host transfer times separately.
A JSON with these numbers is written to ``--json`` or to ``$OUT/gpu_dia_check.json`` when ``$OUT`` is set.
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
from scipy.special import erf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dia import MaskBits, PsfMatchConfig, subtract  # noqa: E402

SIG = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def render(shape, xs, ys, fluxes, fwhm_at, hw=15):
    """Pixel-integrated Gaussian stars (vectorised), FWHM varying as ``fwhm_at(x, y)``."""
    ny, nx = shape
    off = np.arange(-hw, hw + 2) - 0.5
    ix, iy = np.round(xs).astype(int), np.round(ys).astype(int)
    s = fwhm_at(xs, ys) * SIG * math.sqrt(2)
    px = np.diff(erf((ix[:, None] + off[None] - xs[:, None]) / s[:, None]), axis=1) / 2
    py = np.diff(erf((iy[:, None] + off[None] - ys[:, None]) / s[:, None]), axis=1) / 2
    stamps = fluxes[:, None, None] * py[:, :, None] * px[:, None, :]
    gy = iy[:, None, None] + np.arange(-hw, hw + 1)[None, :, None]
    gx = ix[:, None, None] + np.arange(-hw, hw + 1)[None, None, :]
    gy, gx = np.broadcast_to(gy, stamps.shape), np.broadcast_to(gx, stamps.shape)
    ok = (gy >= 0) & (gy < ny) & (gx >= 0) & (gx < nx)
    return np.bincount((gy[ok] * nx + gx[ok]), weights=stamps[ok], minlength=ny * nx).reshape(shape)


def make_pair(shape=(4096, 2048), seed=0, search_fwhm=4.6, template_fwhm=3.4, n_stars=None, n_transients=20,
              saturation=60000.0):
    """A DECam-like synthetic pair (0.263"/px: seeing 1.2" search, 0.9" template).

    Returns a dict with the six planes, the FWHMs and the truth (stars, transients).
    The template has 1.25x the search flux scale, a sky gradient, 4x lower
    noise variance (deeper); noise is Gaussian with the variance plane's variance.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    n_stars = n_stars or int(2500 * ny * nx / (4096 * 2048))
    xs, ys = rng.uniform(0, nx, n_stars), rng.uniform(0, ny, n_stars)
    flux = np.exp(rng.uniform(np.log(500), np.log(1e6), n_stars))
    tx, ty = rng.uniform(50, nx - 50, n_transients), rng.uniform(50, ny - 50, n_transients)
    tflux = rng.uniform(3000, 20000, n_transients)

    def s_fwhm(x, y):
        return search_fwhm * (1 + 0.06 * (2 * x / nx - 1) - 0.04 * (2 * y / ny - 1))

    def t_fwhm(x, y):
        return template_fwhm * (1 - 0.03 * (2 * x / nx - 1) + 0.06 * (2 * y / ny - 1))

    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    s_model = render(shape, xs, ys, flux, s_fwhm) + render(shape, tx, ty, tflux, s_fwhm) + 1000.0
    t_model = 1.25 * render(shape, xs, ys, flux, t_fwhm) + 1500.0 + 0.05 * xx - 0.02 * yy
    s_var = (s_model / 4.0 + 3.0).astype(np.float32)
    t_var = (t_model / 16.0 + 1.0).astype(np.float32)
    s_img = (s_model + rng.standard_normal(shape, dtype=np.float32) * np.sqrt(s_var)).astype(np.float32)
    t_img = (t_model + rng.standard_normal(shape, dtype=np.float32) * np.sqrt(t_var)).astype(np.float32)
    masks = []
    for img in (s_img, t_img):
        m = np.zeros(shape, np.int32)
        sat = img >= saturation
        m[sat] = MaskBits.SAT
        img[sat] = saturation
        masks.append(m)
    # a bad column in the search, a no-data corner in the template
    masks[0][:, nx // 3] |= MaskBits.BAD
    masks[1][: ny // 20, : nx // 10] |= MaskBits.NO_DATA
    t_img[: ny // 20, : nx // 10] = np.nan
    return {
        "search": s_img, "search_variance": s_var, "search_mask": masks[0],
        "template": t_img, "template_variance": t_var, "template_mask": masks[1],
        "search_fwhm": search_fwhm, "template_fwhm": template_fwhm,
        "transients": np.column_stack([tx, ty, tflux]), "stars": np.column_stack([xs, ys, flux]),
    }


PLANES = ("search", "search_variance", "search_mask", "template", "template_variance", "template_mask")


def compare(ref, other, search) -> dict:
    ok = (ref.mask == 0) & np.isfinite(ref.image) & np.isfinite(other.image)
    sigma = np.sqrt(ref.variance[ok].astype(np.float64))
    delta = np.abs(other.image[ok].astype(np.float64) - ref.image[ok])
    return {
        "max_abs_diff_over_sigma": float(np.max(delta / sigma)),
        "max_rel_diff": float(np.max(delta / np.maximum(np.abs(ref.image[ok]), sigma))),
        "median_rel_diff": float(np.median(delta / np.maximum(np.abs(ref.image[ok]), sigma))),
        "max_diff_over_image_scale": float(np.max(delta) / np.nanmax(np.abs(search))),
        "max_variance_rel_diff": float(np.max(np.abs(other.variance[ok] - ref.variance[ok]) / ref.variance[ok])),
        "masks_equal": bool(np.array_equal(ref.mask, other.mask)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="cpu: dry run of the same steps on NumPy")
    ap.add_argument("--shape", default="4096x2048", help="NYxNX")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="print a host-side cProfile of one device run")
    ap.add_argument("--float64", action="store_true", help="also time and compare the float64 configuration")
    args = ap.parse_args(argv)
    ny, nx = (int(v) for v in args.shape.lower().split("x"))
    out_json = args.json or (os.path.join(os.environ["OUT"], "gpu_dia_check.json") if os.environ.get("OUT") else None)
    report: dict = {"shape": [ny, nx], "device_requested": args.device, "python": platform.python_version(),
                    "numpy": np.__version__}

    t = time.perf_counter()
    pair = make_pair((ny, nx))
    report["make_pair_s"] = time.perf_counter() - t
    kw = dict(search_fwhm=pair["search_fwhm"], template_fwhm=pair["template_fwhm"], config=PsfMatchConfig())
    host = [pair[k] for k in PLANES]

    t = time.perf_counter()
    ref = subtract(*host, device="cpu", **kw)
    report["cpu_total_s"] = time.perf_counter() - t
    report["cpu_timings_s"] = ref.timings
    report["stars_used"] = ref.stats.used
    report["convolved"] = ref.convolved

    try:
        if args.device == "gpu":
            import cupy as cp

            report["cupy"] = cp.__version__
            report["gpu_name"] = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
            sync = cp.cuda.Stream.null.synchronize
            h2d, d2h = [], []
            for _ in range(3):
                sync()
                t = time.perf_counter()
                dev = [cp.asarray(a) for a in host]
                sync()
                h2d.append(time.perf_counter() - t)
        else:
            dev, sync, h2d = host, (lambda: None), [0.0]
        for _ in range(2):  # warm-up: CUDA context, FFT plans, kernels compiled
            subtract(*dev, device=args.device, **kw)
        times, steps = [], []
        for _ in range(args.repeat):
            sync()
            t = time.perf_counter()
            d = subtract(*dev, device=args.device, **kw)
            sync()
            times.append(time.perf_counter() - t)
            steps.append(d.timings)
        if args.device == "gpu":
            for _ in range(3):
                sync()
                t = time.perf_counter()
                res = d.to_numpy()
                d2h.append(time.perf_counter() - t)
        else:
            res, d2h = d, [0.0]
        report["device_time_per_ccd_s_median"] = float(np.median(times))
        report["device_time_per_ccd_s_all"] = times
        report["device_step_medians_s"] = {k: float(np.median([s[k] for s in steps])) for k in steps[0]}
        report["h2d_s_median"] = float(np.median(h2d))
        report["d2h_s_median"] = float(np.median(d2h))
        report.update(compare(ref, res, pair["search"]))
        if args.float64:
            cfg64 = PsfMatchConfig(float32=False)
            ref64 = subtract(*host, device="cpu", search_fwhm=kw["search_fwhm"], template_fwhm=kw["template_fwhm"],
                             config=cfg64)
            subtract(*dev, device=args.device, search_fwhm=kw["search_fwhm"], template_fwhm=kw["template_fwhm"],
                     config=cfg64)
            t64 = []
            for _ in range(max(3, args.repeat // 2)):
                sync()
                t = time.perf_counter()
                d64 = subtract(*dev, device=args.device, search_fwhm=kw["search_fwhm"],
                               template_fwhm=kw["template_fwhm"], config=cfg64)
                sync()
                t64.append(time.perf_counter() - t)
            report["float64_device_time_per_ccd_s_median"] = float(np.median(t64))
            report["float64_compare"] = compare(ref64, d64.to_numpy(), pair["search"])
        if args.profile:
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            subtract(*dev, device=args.device, **kw)
            sync()
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            print(buf.getvalue())
        report["ok"] = True
    except Exception as exc:  # report, don't crash: the JSON says what went wrong
        report["ok"] = False
        report["error"] = f"{type(exc).__name__}: {exc}"

    print(json.dumps(report, indent=1, default=float))
    if out_json:
        Path(out_json).write_text(json.dumps(report, indent=1, default=float))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
