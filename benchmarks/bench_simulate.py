"""Benchmark of the survey simulator: time per full DECam CCD pair and injected transient S/N.

Run: ``python -m benchmarks.bench_simulate [--repeats 3] [--png PATH]``.  Prints the
median wall time of ``simulate_pair`` (and of writing the three files) for one
2048 x 4096 DECam CCD pair, the machine, versions, and quantiles of the truth
S/N of the injected transients; optionally saves a search/template cut-out
picture with transients and artifacts marked.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.simulate import SimulationConfig, simulate_pair, write_simulation


def _cutout_png(pair, path: Path, size: int = 400) -> None:
    from classifier.plotting import new_figure, save_figure

    truth = pair.truth
    tr = truth[truth["kind"] == "transient"]
    art = truth[np.isin(truth["kind"], ["cosmic_ray", "hot_pixel", "bad_column", "bleed", "satellite"])]
    ny, nx = pair.search.shape
    # the window holding the most transients + artifacts
    best, best_n = (0, 0), -1
    for y0 in range(0, ny - size, size // 4):
        for x0 in range(0, nx - size, size // 4):
            def inside(t, x0=x0, y0=y0):
                return np.sum((t["x"] >= x0) & (t["x"] < x0 + size) & (t["y"] >= y0) & (t["y"] < y0 + size))

            n = 2 * inside(tr) + inside(art)
            if n > best_n:
                best, best_n = (y0, x0), n
    y0, x0 = best
    from reproject import reproject_interp

    tmpl, _ = reproject_interp((pair.template.image, pair.template.wcs), pair.search.wcs, shape_out=(ny, nx))
    panels = [("search", pair.search.image), ("template (resampled to search grid)", tmpl)]
    fig = new_figure((13, 6.8))  # no pyplot: the caller's backend is untouched
    axes = fig.subplots(1, 2)
    for ax, (title, img) in zip(axes, panels):
        cut = img[y0:y0 + size, x0:x0 + size]
        lo, hi = np.nanpercentile(cut, [5, 99.5])
        ax.imshow(np.arcsinh((cut - lo) / (0.1 * (hi - lo) + 1e-9)), origin="lower", cmap="gray",
                  extent=(x0 - 0.5, x0 + size - 0.5, y0 - 0.5, y0 + size - 0.5))
        ax.set_title(title)
        for t, color, marker in ((tr, "lime", "o"), (art, "red", "s")):
            sel = (t["x"] >= x0) & (t["x"] < x0 + size) & (t["y"] >= y0) & (t["y"] < y0 + size)
            ax.scatter(t["x"][sel], t["y"][sel], s=220, facecolors="none", edgecolors=color, marker=marker, lw=1.2)
            if ax is axes[0]:
                for row in t[sel]:
                    label = f"{row['kind']}" + (f" S/N {row['snr']:.0f}" if row["kind"] == "transient" else "")
                    ax.annotate(label, (row["x"], row["y"]), xytext=(8, 8), textcoords="offset points", color=color,
                                fontsize=7)
    fig.suptitle(f"DECam CCD, seed {pair.truth.meta['seed']}: search seeing {pair.truth.meta['search_seeing']:.2f}\", "
                 f"template {pair.truth.meta['template_seeing']:.2f}\"; green = transients, red = artifacts")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--png", default=None, help="save a search/template cut-out picture here")
    args = parser.parse_args(argv)
    cfg = SimulationConfig()
    times, write_times, snr = [], [], []
    pair = None
    for k in range(args.repeats):
        t0 = time.perf_counter()
        pair = simulate_pair(cfg, args.seed, k)
        times.append(time.perf_counter() - t0)
        tr = pair.truth[pair.truth["kind"] == "transient"]
        snr.extend(tr["snr"])
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            write_simulation(tmp, 1, args.seed + 1000 + k, cfg)
            write_times.append(time.perf_counter() - t0)
    snr = np.asarray(snr)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    print(f"simulate_pair, DECam 2048x4096 pair + truth: median {np.median(times):.2f} s over {args.repeats} "
          f"(all: {', '.join(f'{t:.2f}' for t in times)})")
    print(f"write_simulation (simulate + write 2 FITS + truth + manifest): median {np.median(write_times):.2f} s")
    q = np.percentile(snr, [0, 10, 25, 50, 75, 90, 100])
    print(f"transient S/N over {len(snr)} transients: min {q[0]:.1f}, 10% {q[1]:.1f}, 25% {q[2]:.1f}, "
          f"median {q[3]:.1f}, 75% {q[4]:.1f}, 90% {q[5]:.1f}, max {q[6]:.0f}; "
          f"fraction S/N<5: {np.mean(snr < 5):.2f}, <10: {np.mean(snr < 10):.2f}")
    m = pair.truth.meta
    print(f"last CCD: search m5 {m['search_m5']:.2f}, template m5 {m['template_m5']:.2f}, "
          f"seeing {m['search_seeing']:.2f}\"/{m['template_seeing']:.2f}\", "
          f"offset ({m['template_offset_x']:.1f}, {m['template_offset_y']:.1f}) px, "
          f"rot {m['template_rotation_deg']:.2f} deg")
    kinds, counts = np.unique(pair.truth["kind"], return_counts=True)
    print("last CCD truth rows: " + ", ".join(f"{k} {c}" for k, c in zip(kinds, counts)))
    if args.png:
        _cutout_png(pair, Path(args.png))
        print(f"picture: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
