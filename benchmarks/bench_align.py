"""Benchmark of the align stage: the fast (affine, two-pass) path against the exact grid path.

Run: ``python -m benchmarks.bench_align [--repeats 3] [--seed 9000] [--ccd 0] [--shape NYxNX]
[--rotation DEG] [--no-memory]``.

Simulates one DECam CCD pair (2048 x 4096; the template has its own pointing and rotation), then
in one process times :func:`pipeline.align.align_pair` with ``method="fast"`` and with
``method="grid"`` (the exact path: the mapping through both WCSs every 32 pixels, 2-D scipy
interpolation), alternating the two, and prints the median wall time of each (``--repeats``
runs, after one warm-up each) and their ratio, the path the fast method took, and the
agreement of the two results: max and rms of |fast - exact| / sigma over pixels with data on
both (all of them, and the unmasked ones), the fast/exact variance ratio (median, min, max),
the number of pixels whose mask differs, and the pixels whose NO_DATA flag differs.  With
``--rotation`` the template WCS is rotated by that many more degrees (registration check off,
as the pixels no longer follow the WCS).  Unless ``--no-memory``, each path is run once more
under ``tracemalloc`` and the peak memory it allocates is reported.  Timings on a
shared machine vary: compare the two paths within one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import numpy as np


def _pair(seed: int, ccd: int, shape, rotation: float):
    from pipeline.simulate import SimulationConfig, simulate_pair

    cfg = SimulationConfig() if shape is None else SimulationConfig(shape=shape)
    pair = simulate_pair(cfg, seed=seed, ccd_index=ccd)
    template = pair.template
    if rotation:
        w = template.wcs.deepcopy()
        th = np.deg2rad(rotation)
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        w.wcs.cd = (w.wcs.cd if w.wcs.has_cd() else w.wcs.get_pc() * w.wcs.cdelt[:, None]) @ rot
        template = dataclasses.replace(template, wcs=w)
    return pair.search, template


def agreement(fast, exact) -> dict:
    """Agreement numbers of two aligned templates (``Exposure``) on the same search grid."""
    from dia.masks import MaskBits

    nf = (fast.mask & MaskBits.NO_DATA) != 0
    ne = (exact.mask & MaskBits.NO_DATA) != 0
    both = ~nf & ~ne
    z = np.abs(fast.image[both].astype(float) - exact.image[both]) / np.sqrt(exact.variance[both])
    clean = ((fast.mask | exact.mask)[both] == 0)
    ratio = fast.variance[both] / exact.variance[both]
    return {
        "max_abs_diff_over_sigma": float(z.max()), "rms_diff_over_sigma": float(np.sqrt(np.mean(z**2))),
        "unmasked_max_abs_diff_over_sigma": float(z[clean].max()),
        "unmasked_rms_diff_over_sigma": float(np.sqrt(np.mean(z[clean] ** 2))),
        "pixels_over_1_sigma": int((z > 1).sum()), "pixels_compared": int(both.sum()),
        "variance_ratio_median": float(np.median(ratio)), "variance_ratio_min": float(ratio.min()),
        "variance_ratio_max": float(ratio.max()),
        "mask_pixels_differing": int(((fast.mask ^ exact.mask)[both] != 0).sum()),
        "mask_pixels_flagged_exact": int((exact.mask[both] != 0).sum()),
        "nodata_pixels_differing": int((nf != ne).sum()), "nodata_pixels_exact": int(ne.sum()),
    }


def _peak_memory(search, template, config) -> float:
    """Peak of the memory Python allocates (numpy included) during one ``align_pair`` call, MiB (tracemalloc)."""
    import tracemalloc

    from pipeline.align import align_pair

    tracemalloc.start()
    try:
        align_pair(search, template, config)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def _shape(text: str):
    return tuple(int(v) for v in text.lower().split("x")) if text else None


def main(argv=None) -> int:
    from pipeline.align import AlignConfig, align_pair

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=9000)
    parser.add_argument("--ccd", type=int, default=0)
    parser.add_argument("--shape", default=None, help="NYxNX override of the DECam CCD shape")
    parser.add_argument("--rotation", type=float, default=0.0, help="extra template rotation (degrees)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    search, template = _pair(args.seed, args.ccd, _shape(args.shape or ""), args.rotation)
    print(f"pair: {search.shape[0]} x {search.shape[1]} px, simulated in {time.perf_counter() - t0:.1f} s; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    reg = 0 if args.rotation else AlignConfig().registration_stars
    configs = {"fast": AlignConfig(method="fast", registration_stars=reg),
               "exact": AlignConfig(method="grid", registration_stars=reg)}
    results = {name: align_pair(search, template, cfg) for name, cfg in configs.items()}  # warm-up
    times = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, cfg in configs.items():
            t = time.perf_counter()
            results[name] = align_pair(search, template, cfg)
            times[name].append(time.perf_counter() - t)
    med = {name: float(np.median(v)) for name, v in times.items()}
    for name in configs:
        print(f"{name:6s} path taken: {results[name].method:9s} median {med[name]:.3f} s  "
              f"(runs: {', '.join(f'{v:.3f}' for v in times[name])})")
    print(f"exact / fast: {med['exact'] / med['fast']:.1f}x")
    if not args.no_memory:
        for name, cfg in configs.items():
            print(f"{name:6s} peak memory allocated during align (tracemalloc): "
                  f"{_peak_memory(search, template, cfg):.0f} MiB")
    print("agreement (fast vs exact):")
    for key, value in agreement(results["fast"].template, results["exact"].template).items():
        print(f"  {key:36s} {value:.4g}" if isinstance(value, float) else f"  {key:36s} {value}")
    print(f"  overlap fast {results['fast'].overlap:.5f} exact {results['exact'].overlap:.5f}; variance_factor "
          f"{results['fast'].variance_factor:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
