"""Our detection and background against SEP (SExtractor's core as a C library), side by side.

Usage (from the repository root)::

    python -m benchmarks.bench_sep [--ccds 2] [--shape 4096x2048] [--seed 9000] [--input MANIFEST]
                                   [--repeats 3] [--out DIR]

Issue #12 asks for detection and background "with a C library made for it where it beats ours at
equal quality, measured side by side".  For each simulated DECam CCD pair (seed 9000, held out;
or ``--input``) this script makes the dia difference with the pipeline's own stages (load, cosmic
rays, alignment, PSF matching) and then, on one thread, alternately ``--repeats`` times each:

* **detection on the difference** -- ours: :func:`pipeline.detect.detect_difference` without the
  PSF-model photometry (matched filter with the Gaussian PSF of the difference's FWHM, the noise
  renormalisation for correlated noise, peaks above 5 sigma in >= 3 pixels, the dipole test, flags
  and forced photometry); SEP: ``sep.extract`` with the same Gaussian as matched filter
  (``filter_type="matched"``), the per-pixel noise ``sqrt(variance)`` times the renormalisation
  factor ours measured (so that both thresholds mean the same S/N), ``thresh=5``, ``minarea=3``,
  our bad pixels masked, deblending and cleaning at SEP's defaults (no photometry);
* **background of the search image** -- ours: :func:`pipeline.detect.estimate_background` (clipped
  medians in 128-px cells of a subsample, bilinear); SEP: ``sep.Background`` with 128-px cells
  and its 3x3 median filter of the cell grid, the same bad pixels masked.

Quality against truth: a detection matches an injected transient (or a variable star) within
1.5 px; completeness over the transients inside the ``detect.edge`` border, overall and with truth
S/N >= 10; the detections matching no transient or variable are counted (the rest: residuals of
stars and galaxies, noise, artefacts).  The two backgrounds are compared with each other (rms and
largest difference over the noise), since the simulator's sky is smooth and both should find it.
Writes ``report.json`` and ``report.md`` in ``--out`` (atomically).  Without SEP (``pip install
sep``) it says so and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["MATCH_RADIUS_PX", "score_detections", "ours_difference_detection", "sep_difference_detection",
           "ours_background", "sep_background", "compare_ccd", "render_markdown", "main"]

#: A detection within this many pixels of a truth position matches it.
MATCH_RADIUS_PX = 1.5


def score_detections(x: np.ndarray, y: np.ndarray, truth, shape: tuple[int, int], edge: int,
                     radius: float = MATCH_RADIUS_PX) -> dict[str, Any]:
    """Completeness of the injected transients and the detections that match no real change.

    Transients inside ``edge`` pixels of the border are left out.  Returns ``n_transients``,
    ``found``, ``completeness``, the same for truth S/N >= 10 (``*_snr10``), ``n_detections``,
    ``on_variables`` and ``unmatched`` (detections within ``radius`` of neither a transient nor a variable).
    """
    from scipy.spatial import cKDTree

    ny, nx = shape
    kind = np.asarray(truth["kind"]).astype(str)
    tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    inside = (tx >= edge) & (tx < nx - edge) & (ty >= edge) & (ty < ny - edge)
    trans = (kind == "transient") & inside
    snr = np.asarray(truth["snr"], float) if "snr" in truth.colnames else np.full(len(truth), np.nan)
    det = np.column_stack([x, y]) if len(x) else np.zeros((0, 2))
    out: dict[str, Any] = {"n_detections": int(len(x))}
    if len(x):
        tree = cKDTree(det)
        d, _ = tree.query(np.column_stack([tx, ty]), k=1)
        found = d <= radius
    else:
        found = np.zeros(len(truth), bool)
    bright = trans & (np.nan_to_num(snr) >= 10)
    for suffix, sel in (("", trans), ("_snr10", bright)):
        n = int(sel.sum())
        out[f"n_transients{suffix}"] = n
        out[f"found{suffix}"] = int((found & sel).sum())
        out[f"completeness{suffix}"] = float((found & sel).sum() / n) if n else float("nan")
    def near(select: np.ndarray) -> np.ndarray:  # detections within ``radius`` of a selected truth object
        if not (len(x) and select.any()):
            return np.zeros(len(x), bool)
        return cKDTree(np.column_stack([tx[select], ty[select]])).query(det, k=1)[0] <= radius

    out["on_variables"] = int(near(kind == "variable").sum())
    out["unmatched"] = int((~near((kind == "transient") | (kind == "variable"))).sum())
    return out


def ours_difference_detection(diff, fwhm: float, config) -> tuple[np.ndarray, np.ndarray, float]:
    """Our detection on the difference (no PSF model): positions and the noise renormalisation factor."""
    from pipeline.detect import detect_difference

    table = detect_difference(diff.image, diff.variance, diff.mask, fwhm, None, config)
    return np.asarray(table["x"]), np.asarray(table["y"]), float(table.meta.get("NOISESCL", 1.0))


def _bad(mask: np.ndarray) -> np.ndarray:
    from dia.masks import BAD_FOR_FIT

    return (mask & int(BAD_FOR_FIT)) != 0


def sep_difference_detection(diff, fwhm: float, config, noise_scale: float = 1.0,
                             filter_type: str = "matched") -> tuple[np.ndarray, np.ndarray]:
    """SEP's extraction on the difference with our filter, threshold and noise (see the module notes).

    ``filter_type="matched"``: SEP's matched filter with the per-pixel noise (the same statistic as ours, a
    direct 2-D convolution of data and noise); ``"conv"``: the data convolved with the PSF and compared with
    ``thresh x sqrt(sum k^2)`` times the unfiltered per-pixel noise (SExtractor's classic, cheaper: the same S/N
    threshold where the noise is locally flat).
    """
    import sep

    from pipeline.detect import gaussian_psf

    data = np.ascontiguousarray(np.nan_to_num(diff.image), dtype=np.float32)
    err = np.sqrt(np.clip(np.nan_to_num(diff.variance), 0, None)).astype(np.float32) * np.float32(noise_scale)
    bad = _bad(diff.mask) | ~np.isfinite(diff.image) | ~(diff.variance > 0)
    err[bad] = np.float32(1e30)
    kernel = gaussian_psf(fwhm, config.psf_radius).astype(np.float64)
    # "conv" compares the convolved data with thresh x the unfiltered noise: the convolved noise is
    # sqrt(sum k^2) of it (unit-sum kernel), so this threshold is the same S/N where the noise is locally flat
    thresh = config.threshold * (float(np.sqrt(np.sum(kernel**2))) if filter_type == "conv" else 1.0)
    sep.set_extract_pixstack(5_000_000)
    sep.set_sub_object_limit(4096)
    objects = sep.extract(data, thresh, err=err, mask=bad, minarea=config.n_pixels, filter_kernel=kernel,
                          filter_type=filter_type)
    return np.asarray(objects["x"], float), np.asarray(objects["y"], float)


def ours_background(image: np.ndarray, mask: np.ndarray, cell: int = 128) -> np.ndarray:
    """Our background (:func:`pipeline.detect.estimate_background`)."""
    from pipeline.detect import estimate_background

    return estimate_background(image, mask, cell=cell)


def sep_background(image: np.ndarray, mask: np.ndarray, cell: int = 128) -> np.ndarray:
    """SEP's background (``sep.Background``: clipped mode estimate per cell, 3x3 median filter, bicubic spline)."""
    import sep

    data = np.ascontiguousarray(np.nan_to_num(image), dtype=np.float32)
    return sep.Background(data, mask=_bad(mask) | ~np.isfinite(image), bw=cell, bh=cell, fw=3, fh=3).back()


def _median_time(fn, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls of ``fn`` and its last result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), result


def compare_ccd(entry, repeats: int = 3) -> dict[str, Any]:
    """Both detections and both backgrounds on one CCD pair (see the module notes)."""
    from pipeline import steps
    from pipeline.config import RunConfig

    config = RunConfig(mode="dia")
    pair = steps.load_pair(entry)
    pair, _ = steps.mask_cosmics(pair, config)
    aligned = steps.align(pair, config)
    diff = steps.psf_match_subtract(aligned, config)
    fwhm = aligned.search.fwhm if diff.convolved == "template" else aligned.template.fwhm
    det = config.detect
    shape = diff.image.shape
    row: dict[str, Any] = {"ccd": entry.ccd, "shape": list(shape), "fwhm_px": round(float(fwhm), 3)}
    times: dict[str, list[float]] = {"ours": [], "sep": [], "sep_conv": []}
    found: dict[str, Any] = {}
    for _ in range(repeats):  # alternately, so that a busy moment weighs on all
        t0 = time.perf_counter()
        ours = ours_difference_detection(diff, fwhm, det)
        t1 = time.perf_counter()
        found["ours"] = ours[:2]
        found["sep"] = sep_difference_detection(diff, fwhm, det, ours[2])
        t2 = time.perf_counter()
        found["sep_conv"] = sep_difference_detection(diff, fwhm, det, ours[2], filter_type="conv")
        for name, seconds in (("ours", t1 - t0), ("sep", t2 - t1), ("sep_conv", time.perf_counter() - t2)):
            times[name].append(seconds)
    row["detect"] = {name: {"seconds": float(np.median(times[name])),
                            **score_detections(x, y, pair.truth, shape, det.edge)} for name, (x, y) in found.items()}
    row["detect"]["noise_scale"] = ours[2]
    s = pair.search
    t_ours, bg_ours = _median_time(lambda: ours_background(s.image, s.mask), repeats)
    t_sep, bg_sep = _median_time(lambda: sep_background(s.image, s.mask), repeats)
    good = ~_bad(s.mask) & np.isfinite(s.image) & (s.variance > 0)
    z = ((bg_ours - bg_sep) / np.sqrt(np.where(good, s.variance, 1.0)))[good]
    row["background"] = {"ours_seconds": t_ours, "sep_seconds": t_sep,
                         "rms_difference_over_noise": float(np.sqrt(np.mean(z**2))),
                         "max_difference_over_noise": float(np.max(np.abs(z)))}
    return row


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else fmt.format(v)


def render_markdown(data: Mapping[str, Any]) -> str:
    """The report: per CCD, time and quality of both detections and both backgrounds, and the totals."""
    lines = ["# Detection and background: ours against SEP", "",
             f"Made {data['made']} on {data['machine']}; SEP {data['sep_version']}; one thread; median of "
             f"{data['repeats']} alternating runs. Input: {data['input']}.", "",
             "## Detection on the dia difference (5 sigma matched filter, >= 3 pixels)", "",
             "| CCD | ours s | SEP s | SEP / ours | transients | found ours | found SEP | S/N>=10 ours | S/N>=10 SEP "
             "| detections ours | detections SEP | unmatched ours | unmatched SEP |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant in ("sep", "sep_conv"):
        if variant == "sep_conv":
            lines += ["", "SEP with `filter_type=\"conv\"` (PSF-convolved data against 5 sqrt(sum k^2) x the "
                      "unfiltered noise):",
                      "", lines[6].replace("SEP", "SEP conv"), lines[7]]
        for r in data["ccds"]:
            o, s = r["detect"]["ours"], r["detect"][variant]
            ratio = _f(s["seconds"] / o["seconds"], "{:.2f}")
            lines.append(f"| {r['ccd']} | {_f(o['seconds'])} | {_f(s['seconds'])} | {ratio} | {o['n_transients']} "
                         f"| {o['found']} | {s['found']} | {o['found_snr10']}/{o['n_transients_snr10']} "
                         f"| {s['found_snr10']}/{s['n_transients_snr10']} | {o['n_detections']} | {s['n_detections']} "
                         f"| {o['unmatched']} | {s['unmatched']} |")
    t = data["totals"]
    lines += ["", f"Totals: ours {_f(t['ours_seconds'])} s, SEP matched {_f(t['sep_seconds'])} s, SEP conv "
              f"{_f(t['sep_conv_seconds'])} s (SEP / ours {_f(t['sep_over_ours'], '{:.2f}')} and "
              f"{_f(t['sep_conv_over_ours'], '{:.2f}')}); transients found {t['ours_found']} / {t['sep_found']} / "
              f"{t['sep_conv_found']} of {t['n_transients']}; detections matching no transient or variable "
              f"{t['ours_unmatched']} / {t['sep_unmatched']} / {t['sep_conv_unmatched']}.", "",
              "## Background of the search image (128-px cells)", "",
              "| CCD | ours s | SEP s | SEP / ours | rms (ours - SEP) / sigma | max abs / sigma |",
              "|---|---|---|---|---|---|"]
    for r in data["ccds"]:
        b = r["background"]
        lines.append(f"| {r['ccd']} | {_f(b['ours_seconds'])} | {_f(b['sep_seconds'])} | "
                     f"{_f(b['sep_seconds'] / b['ours_seconds'], '{:.2f}')} | {_f(b['rms_difference_over_noise'])} | "
                     f"{_f(b['max_difference_over_noise'])} |")
    lines += ["", f"**Verdict.** {data['verdict']}", ""]
    return "\n".join(lines)


def _verdict(t: Mapping[str, Any]) -> str:
    parts, better = [], False
    for who, label in (("sep", "SEP's matched filter"), ("sep_conv", "SEP's convolution filter")):
        faster = t[f"{who}_over_ours"] < 1
        complete = t[f"{who}_found"] >= t["ours_found"]
        cleaner = t[f"{who}_unmatched"] <= t["ours_unmatched"]
        better |= faster and complete and cleaner
        parts.append(f"{label} is {'faster' if faster else 'slower'} ({_f(t[f'{who}_over_ours'], '{:.2f}')}x our "
                     f"time), finds {'as many or more' if complete else 'fewer'} transients ({t[f'{who}_found']} "
                     f"against {t['ours_found']}) and has {'as few or fewer' if cleaner else 'more'} detections "
                     f"matching no real change ({t[f'{who}_unmatched']} against {t['ours_unmatched']})")
    return "; ".join(parts) + (": SEP should replace ours." if better else ": ours is kept.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_sep", description=__doc__.splitlines()[0])
    parser.add_argument("--ccds", type=int, default=2)
    parser.add_argument("--shape", default="4096x2048")
    parser.add_argument("--seed", type=int, default=9000)
    parser.add_argument("--input", default=None, help="manifest of CCD pairs with truth instead of simulating")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        import sep
    except ImportError:
        print("SEP is not installed (pip install sep): nothing to compare with")
        return 2
    from threadpoolctl import threadpool_limits

    from pipeline.io import atomic_path, read_manifest

    out = Path(args.out or Path(tempfile.gettempdir()) / "bench_sep")
    out.mkdir(parents=True, exist_ok=True)
    if args.input:
        manifest = Path(args.input)
    else:
        from pipeline.simulate import SimulationConfig, write_simulation

        ny, nx = (int(v) for v in args.shape.lower().split("x"))
        manifest = write_simulation(out / "input", n_ccds=args.ccds, seed=args.seed,
                                    config=dataclasses.replace(SimulationConfig(), shape=(ny, nx)))
    entries = [e for e in read_manifest(manifest) if e.truth is not None]
    if not entries:
        raise SystemExit(f"{manifest}: no CCD pair with a truth table")
    with threadpool_limits(1):
        rows = [compare_ccd(e, args.repeats) for e in entries]
    tot = {"n_transients": sum(r["detect"]["ours"]["n_transients"] for r in rows)}
    for who in ("ours", "sep", "sep_conv"):
        for key, name in (("seconds", "seconds"), ("found", "found"), ("unmatched", "unmatched")):
            tot[f"{who}_{name}"] = sum(r["detect"][who][key] for r in rows)
    for who in ("sep", "sep_conv"):
        tot[f"{who}_over_ours"] = tot[f"{who}_seconds"] / tot["ours_seconds"] if tot["ours_seconds"] else float("nan")
    data = {"made": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "sep_version": sep.__version__, "repeats": args.repeats, "input": str(manifest), "ccds": rows,
            "totals": tot, "verdict": _verdict(tot)}
    for name, text in (("report.json", json.dumps(data, indent=1)), ("report.md", render_markdown(data))):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    print(render_markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
