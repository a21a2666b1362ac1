"""``pipeline subtract`` against HOTPANTS on simulated DECam pairs: time and difference quality.

Usage (from the repository root)::

    python -m benchmarks.hotpants --hotpants /path/to/hotpants [--ccds 1] [--shape 4096x2048]
                                  [--seed 9000] [--repeats 3] [--threads 1] [--out DIR]

HOTPANTS (Becker's implementation of Alard & Lupton) is not built, shipped or downloaded by this
project: give the path of a binary you built.  Without ``--hotpants`` the script says so and exits 2.

For each simulated CCD pair (seed 9000, held out) it

1. runs ``pipeline subtract SEARCH TEMPLATE`` once untimed (warm file cache; its header gives the
   kernel basis our fit chose: Gaussian sigmas and degrees, half-width, spatial and background
   orders, which image was convolved);
2. aligns the template onto the search grid with our align stage (:func:`pipeline.align.align_pair`,
   timed on its own) and writes the plain FITS files HOTPANTS reads: image, noise (sigma) and mask
   of both, the masks flagging our BAD|SAT|NO_DATA|CR|SUSPECT|EDGE pixels;
3. builds HOTPANTS options matched to ours (:func:`hotpants_options`: ``-r`` kernel half-width,
   ``-ng`` the same Gaussians and degrees, ``-ko``/``-bgo`` the spatial orders, ``-c t|i`` the
   same convolution direction, ``-n i`` our normalisation -- the difference on the search image's
   scale --, ``-tni``/``-ini`` noise images, ``-tmi``/``-imi`` masks, thresholds from the saturation
   level) and runs it once untimed;
4. times, alternately, ``--repeats`` times each: the whole ``pipeline subtract`` command (a
   subprocess: start-up, reading, cosmic-ray masking, alignment, PSF matching, subtraction, writing),
   the same with ``--no-cosmics`` (like for like: HOTPANTS masks no cosmic rays) and HOTPANTS on
   the pre-aligned pair (a subprocess: reading, fit, convolution, writing); the medians and the
   ratios ours / HOTPANTS (issue #12's target: <= 1/3);
5. measures the quality of both differences on the same pixels (the union of both bad masks):
   blank-sky std and mean of D / sigma away from every truth object, and the residuals at the
   injected stars (aperture sum of D over the star's flux, and over its noise).

Both run with ``--threads`` threads (default 1: HOTPANTS is single-threaded; ours gets
``psf_match.fft_workers`` and the BLAS/OpenMP thread variables set to it).  Writes ``report.json``
and ``report.md`` in ``--out`` (atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "NO_BINARY_MESSAGE",
    "TARGET_RATIO",
    "HOTPANTS_BAD",
    "KernelChoice",
    "hotpants_options",
    "kernel_choice_from_header",
    "blank_sky_stats",
    "star_residuals",
    "render_markdown",
    "main",
]

#: What the script says when no HOTPANTS binary is given.
NO_BINARY_MESSAGE = (
    "benchmarks.hotpants: no HOTPANTS binary given. This comparison needs --hotpants PATH, a HOTPANTS "
    "executable you built yourself (e.g. from github.com/acbecker/hotpants; it needs cfitsio). "
    "This project neither ships nor builds it.")

#: Issue #12's target: our whole command in at most a third of HOTPANTS' time.
TARGET_RATIO = 1.0 / 3.0

#: Value written in HOTPANTS' input masks for a bad pixel: FLAG_INPUT_ISBAD (0x80) | FLAG_INPUT_MASK (0x20)
#: of its defaults.h -- HOTPANTS ORs the mask value into its own flags and skips pixels with 0x80.
HOTPANTS_BAD = 0x80 | 0x20

#: Output-mask bits of HOTPANTS that make a difference pixel unusable (FLAG_OUTPUT_ISBAD, FLAG_INPUT_ISBAD).
_HOTPANTS_OUT_BAD = 0x8000 | 0x80


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """The PSF-matching choices of one of our differences, to give HOTPANTS the same ones.

    Attributes
    ----------
    half_width : int
        Kernel half-width [px] (kernel side = 2 x half_width + 1).
    sigmas : tuple of float
        Widths of the basis Gaussians [px].
    degrees : tuple of int
        Polynomial degree of each Gaussian.
    spatial_order : int
        Order of the kernel's spatial variation.
    background_order : int
        Order of the differential background.
    convolved : str
        ``template`` or ``search``: the image convolved with the kernel.
    """

    half_width: int
    sigmas: tuple[float, ...]
    degrees: tuple[int, ...]
    spatial_order: int = 2
    background_order: int = 1
    convolved: str = "template"

    def __post_init__(self) -> None:
        if self.half_width < 1:
            raise ValueError(f"KernelChoice.half_width must be >= 1, got {self.half_width}")
        if len(self.sigmas) != len(self.degrees) or not self.sigmas:
            raise ValueError(f"KernelChoice needs one degree per sigma, got {self.sigmas} and {self.degrees}")
        if self.convolved not in ("template", "search"):
            raise ValueError(f"KernelChoice.convolved must be 'template' or 'search', got {self.convolved!r}")


def kernel_choice_from_header(header) -> KernelChoice:
    """The :class:`KernelChoice` recorded in a ``pipeline subtract`` difference's IMAGE header."""
    def seq(key: str, cast):
        out, i = [], 1
        while f"DIA KERNEL BASIS {key} {i}" in header:
            out.append(cast(header[f"DIA KERNEL BASIS {key} {i}"]))
            i += 1
        return tuple(out)

    try:
        return KernelChoice(half_width=int(header["DIA KERNEL BASIS HALF_WIDTH"]), sigmas=seq("SIGMAS", float),
                            degrees=seq("DEGREES", int), spatial_order=int(header["DIA KERNEL SPATIAL_ORDER"]),
                            background_order=int(header["DIA KERNEL BACKGROUND_ORDER"]),
                            convolved=str(header["CONVOLV"]).strip())
    except KeyError as exc:
        raise ValueError(f"difference header lacks {exc}: not written by `pipeline subtract`?") from None


def hotpants_options(choice: KernelChoice, files: Mapping[str, str], *, saturation: float = math.inf,
                     lower: float = -1e30, stamp_half_width: int | None = None) -> list[str]:
    """HOTPANTS command-line options that match our PSF matching (a pure function).

    Parameters
    ----------
    choice : KernelChoice
        Our kernel: ``-r`` half-width, ``-ng`` Gaussians (count, then degree and sigma of each),
        ``-ko`` spatial order, ``-bgo`` background order, ``-c t`` when we convolve the template
        (``i`` the search image); ``-n i``: our difference is on the search image's photometric
        scale whichever image is convolved.
    files : dict
        Paths: ``search``, ``template``, ``out`` (required); ``search_noise``, ``template_noise``
        (``-ini``/``-tni``, sigma images), ``search_mask``, ``template_mask`` (``-imi``/``-tmi``),
        ``out_noise`` (``-oni``), ``out_mask`` (``-omi``) when given.
    saturation : float
        Upper valid count of both images (``-iu``/``-tu``; HOTPANTS' default 25000 would cut bright
        stars of a 45000 ADU CCD); infinite: a large finite value.
    lower : float
        Lower valid count of both images (``-il``/``-tl``).
    stamp_half_width : int, optional
        Half-width of the fit's substamps (``-rss``; default: the kernel half-width + 5 px; HOTPANTS
        needs it above the kernel half-width).

    Returns
    -------
    list of str
        The arguments after the program name.
    """
    for key in ("search", "template", "out"):
        if key not in files:
            raise ValueError(f"hotpants_options: files needs {key!r}")
    upper = 1e30 if not math.isfinite(saturation) else float(saturation)
    rss = stamp_half_width if stamp_half_width is not None else choice.half_width + 5
    if rss <= choice.half_width:
        raise ValueError(f"hotpants_options: stamp_half_width {rss} must exceed the kernel half-width "
                         f"{choice.half_width}")
    opts = ["-inim", str(files["search"]), "-tmplim", str(files["template"]), "-outim", str(files["out"]),
            "-r", str(int(choice.half_width)), "-rss", str(int(rss)),
            "-ko", str(int(choice.spatial_order)), "-bgo", str(int(choice.background_order)),
            "-c", "t" if choice.convolved == "template" else "i", "-n", "i",
            "-iu", f"{upper:g}", "-tu", f"{upper:g}", "-il", f"{lower:g}", "-tl", f"{lower:g}",
            "-ng", str(len(choice.sigmas))]
    for degree, sigma in zip(choice.degrees, choice.sigmas):
        opts += [str(int(degree)), f"{float(sigma):.4f}"]
    for key, flag in (("search_noise", "-ini"), ("template_noise", "-tni"), ("search_mask", "-imi"),
                      ("template_mask", "-tmi"), ("out_noise", "-oni"), ("out_mask", "-omi")):
        if files.get(key):
            opts += [flag, str(files[key])]
    return opts


# ----------------------------------------------------------------------------- quality (pure)


def _near_objects(shape: tuple[int, int], xy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean image: within ``radius`` px of any of the points ``xy`` (N x 2: x, y)."""
    near = np.zeros(shape, bool)
    r = int(math.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = xx**2 + yy**2 <= radius**2
    ny, nx = shape
    for x, y in np.asarray(xy, float).reshape(-1, 2):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        cx, cy = int(round(x)), int(round(y))
        y0, y1, x0, x1 = cy - r, cy + r + 1, cx - r, cx + r + 1
        if y1 <= 0 or x1 <= 0 or y0 >= ny or x0 >= nx:
            continue
        dy0, dx0 = max(0, -y0), max(0, -x0)
        dy1, dx1 = disk.shape[0] - max(0, y1 - ny), disk.shape[1] - max(0, x1 - nx)
        near[max(y0, 0):min(y1, ny), max(x0, 0):min(x1, nx)] |= disk[dy0:dy1, dx0:dx1]
    return near


def blank_sky_stats(diff: np.ndarray, sigma: np.ndarray, bad: np.ndarray, objects_xy: np.ndarray,
                    radius: float) -> dict[str, float]:
    """std and mean of ``diff / sigma`` over good pixels farther than ``radius`` from every object.

    ``bad`` pixels, non-finite values and ``sigma <= 0`` are left out.  For a difference of two
    images of pure noise with a correct noise model the std is 1.
    """
    ok = ~np.asarray(bad, bool) & np.isfinite(diff) & np.isfinite(sigma) & (sigma > 0)
    ok &= ~_near_objects(diff.shape, objects_xy, radius)
    z = diff[ok] / sigma[ok]
    if z.size == 0:
        return {"std": float("nan"), "mean": float("nan"), "n_pixels": 0}
    return {"std": float(np.std(z)), "mean": float(np.mean(z)), "n_pixels": int(z.size)}


def star_residuals(diff: np.ndarray, sigma: np.ndarray, bad: np.ndarray, stars_xy: np.ndarray,
                   fluxes: np.ndarray, radius: float) -> dict[str, Any]:
    """Residuals of a difference at non-varying stars, in apertures of ``radius`` px.

    A star counts only if its whole aperture is inside the image and good.  Per star: ``frac`` =
    aperture sum of ``diff`` / the star's flux, and ``chi`` = that sum / sqrt(sum of sigma^2).

    Returns
    -------
    dict
        ``n``, ``median_abs_frac``, ``p90_abs_frac``, ``chi_std``, ``chi_median`` (None when no star counts).
    """
    ny, nx = diff.shape
    r = int(math.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    ap = xx**2 + yy**2 <= radius**2
    fracs, chis = [], []
    for (x, y), f in zip(np.asarray(stars_xy, float).reshape(-1, 2), np.asarray(fluxes, float)):
        cx, cy = int(round(x)), int(round(y))
        if cx - r < 0 or cy - r < 0 or cx + r >= nx or cy + r >= ny or not (f > 0):
            continue
        sl = (slice(cy - r, cy + r + 1), slice(cx - r, cx + r + 1))
        d, s, b = diff[sl][ap], sigma[sl][ap], bad[sl][ap]
        if b.any() or not (np.isfinite(d).all() and np.isfinite(s).all() and (s > 0).all()):
            continue
        total = float(d.sum())
        fracs.append(total / float(f))
        chis.append(total / math.sqrt(float((s.astype(float) ** 2).sum())))
    if not fracs:
        return {"n": 0, "median_abs_frac": None, "p90_abs_frac": None, "chi_std": None, "chi_median": None}
    fr, ch = np.abs(np.asarray(fracs)), np.asarray(chis)
    return {"n": len(fracs), "median_abs_frac": float(np.median(fr)), "p90_abs_frac": float(np.percentile(fr, 90)),
            "chi_std": float(np.std(ch)), "chi_median": float(np.median(ch))}


# ----------------------------------------------------------------------------- I/O and runs


def _write_plain(path: Path, data: np.ndarray) -> None:
    from astropy.io import fits

    from pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        fits.PrimaryHDU(data).writeto(tmp, overwrite=True)


def _prepare_hotpants_inputs(search_path: Path, template_path: Path, work: Path) -> dict[str, Any]:
    """Align the template with our align stage and write HOTPANTS' plain FITS inputs."""
    from dia.masks import BAD_FOR_FIT
    from pipeline.align import AlignConfig, align_pair
    from pipeline.io import read_exposure

    search = read_exposure(search_path)
    template = read_exposure(template_path)
    t0 = time.perf_counter()
    aligned = align_pair(search, template, AlignConfig())
    align_s = time.perf_counter() - t0
    files: dict[str, str] = {}
    low = []
    for name, exp in (("search", search), ("template", aligned.template)):
        bad = ((exp.mask & int(BAD_FOR_FIT)) != 0) | ~np.isfinite(exp.image) | ~(exp.variance > 0)
        image = np.where(bad, 0.0, exp.image).astype(np.float32)
        good_var = exp.variance[~bad]
        fill = float(np.median(good_var)) if good_var.size else 1.0
        noise = np.sqrt(np.where(bad, fill, exp.variance)).astype(np.float32)
        for key, data in ((name, image), (f"{name}_noise", noise),
                          (f"{name}_mask", np.where(bad, HOTPANTS_BAD, 0).astype(np.int16))):
            path = work / f"hp_{key}.fits"
            _write_plain(path, data)
            files[key] = str(path)
        low.append(float(image[~bad].min()) if (~bad).any() else 0.0)
    files.update(out=str(work / "hp_diff.fits"), out_noise=str(work / "hp_noise.fits"),
                 out_mask=str(work / "hp_mask.fits"))
    return {"files": files, "align_s": align_s, "lower": min(low) - 1.0,
            "saturation": float(min(search.saturation or math.inf, template.saturation or math.inf)),
            "search_fwhm": float(search.fwhm or 0.0)}


def _timed(cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=dict(env) if env else None, cwd=cwd)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return dt, proc.stdout + proc.stderr


def _pipeline_exe() -> list[str]:
    exe = Path(sys.executable).with_name("pipeline")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("pipeline")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]


def _quality(search_path: Path, truth_path: Path, ours_path: Path, hp: Mapping[str, Any]) -> dict[str, Any]:
    """Quality of both differences on the same pixels (the union of both bad masks)."""
    from astropy.io import fits
    from astropy.table import Table

    from dia.masks import BAD_FOR_FIT, MaskBits

    with fits.open(ours_path) as h:
        d_ours = h["IMAGE"].data.astype(np.float64)
        s_ours = np.sqrt(h["VARIANCE"].data.astype(np.float64))
        bad_ours = (h["MASK"].data & int(BAD_FOR_FIT | MaskBits.CONVOLVED)) != 0
    d_hp = fits.getdata(hp["files"]["out"]).astype(np.float64)
    s_hp = fits.getdata(hp["files"]["out_noise"]).astype(np.float64)
    bad_hp = (fits.getdata(hp["files"]["out_mask"]).astype(np.int64) & _HOTPANTS_OUT_BAD) != 0
    bad = bad_ours | bad_hp | ~np.isfinite(d_hp) | ~np.isfinite(d_ours)
    truth = Table.read(truth_path, format="ascii.ecsv")
    xy = np.column_stack([np.asarray(truth["x"], float), np.asarray(truth["y"], float)])
    fwhm = hp["search_fwhm"] or 4.0
    excl = max(20.0, 4.0 * fwhm)
    kind = np.asarray(truth["kind"]).astype(str)
    where = np.asarray(truth["image"]).astype(str) if "image" in truth.colnames else np.full(len(truth), "both")
    snr = np.asarray(truth["snr"], float) if "snr" in truth.colnames else np.full(len(truth), np.inf)
    stars = (kind == "star") & (where == "both") & (snr >= 20)
    r_ap = 2.0 * fwhm
    out = {"bad_fraction_union": float(bad.mean()), "blank_exclusion_px": excl, "aperture_px": r_ap,
           "stars_snr_min": 20}
    for name, d, s in (("ours", d_ours, s_ours), ("hotpants", d_hp, s_hp)):
        out[name] = {"blank_sky_z": blank_sky_stats(d, s, bad, xy, excl),
                     "stars": star_residuals(d, s, bad, xy[stars], np.asarray(truth["flux"], float)[stars], r_ap)}
    return out


def _simulate(out: Path, n: int, seed: int, shape) -> Path:
    from pipeline.simulate import SimulationConfig, write_simulation

    sim = dataclasses.replace(SimulationConfig(), instrument="decam", shape=shape)
    return write_simulation(out, n, seed, sim)


def compare_ccd(search: Path, template: Path, truth: Path, hotpants: str, work: Path, repeats: int = 3,
                threads: int = 1, log=print) -> dict[str, Any]:
    """Time and compare both subtractions of one CCD pair (see the module docstring)."""
    from astropy.io import fits

    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "ours.toml"
    cfg.write_text(f"[psf_match]\nfft_workers = {int(threads)}\n")
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(int(threads))
    def subtract_cmd(out: Path, *extra: str) -> list[str]:
        return _pipeline_exe() + ["subtract", str(search), str(template), "--out", str(out), "--config", str(cfg),
                                  *extra]

    ours_out = work / "ours_diff.fits"
    ours_cmd = subtract_cmd(ours_out)
    _, ours_line = _timed(ours_cmd, env)  # warm-up, and the kernel it chose
    with fits.open(ours_out) as h:
        choice = kernel_choice_from_header(h["IMAGE"].header)
    hp = _prepare_hotpants_inputs(search, template, work)
    hp_cmd = [hotpants] + hotpants_options(choice, hp["files"], saturation=hp["saturation"], lower=hp["lower"]) + \
        ["-v", "0"]
    _timed(hp_cmd, env, cwd=work)  # warm-up
    # like for like: HOTPANTS has no cosmic-ray stage, ours masks them by default (pipeline/cosmics.py)
    bare_cmd = subtract_cmd(work / "ours_diff_no_cr.fits", "--no-cosmics")
    t_ours, t_hp, t_bare = [], [], []
    for r in range(repeats):
        for side in (("ours", "bare", "hotpants") if r % 2 == 0 else ("hotpants", "bare", "ours")):
            if side == "ours":
                t_ours.append(_timed(ours_cmd, env)[0])
            elif side == "bare":
                t_bare.append(_timed(bare_cmd, env)[0])
            else:
                t_hp.append(_timed(hp_cmd, env, cwd=work)[0])
        log(f"  repeat {r}: ours {t_ours[-1]:.2f} s (without cosmic-ray masking {t_bare[-1]:.2f} s), "
            f"HOTPANTS {t_hp[-1]:.2f} s")
    med_o, med_h, med_b = float(np.median(t_ours)), float(np.median(t_hp)), float(np.median(t_bare))
    return {"search": str(search), "ours_seconds": t_ours, "hotpants_seconds": t_hp,
            "ours_no_cosmics_seconds": t_bare, "ours_no_cosmics_median_s": med_b,
            "ratio_no_cosmics": med_b / med_h if med_h > 0 else None,
            "ours_median_s": med_o, "hotpants_median_s": med_h, "ratio": med_o / med_h if med_h > 0 else None,
            "align_s_for_hotpants_inputs": hp["align_s"], "kernel": dataclasses.asdict(choice),
            "ours_command": " ".join(ours_cmd), "hotpants_command": " ".join(hp_cmd), "ours_summary": ours_line.strip(),
            "quality": _quality(search, truth, ours_out, hp)}


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def _la(v) -> str:
    return ", ".join(f"{x:.1f}" for x in v) if v else "?"


def render_markdown(data: Mapping[str, Any]) -> str:
    """``report.md`` of the comparison."""
    lines = ["# `pipeline subtract` against HOTPANTS", "",
             f"Made {data['created']} on {data['machine'].get('cpu_model', '?')}; {len(data['ccds'])} simulated DECam "
             f"CCD pair(s) of {data['ccd_shape'][0]} x {data['ccd_shape'][1]} px (seed {data['seed']}); "
             f"{data['threads']} thread(s) each; median of {data['repeats']} alternating runs. "
             f"Load average at start {_la(data.get('load_average_start'))}, "
             f"at end {_la(data.get('load_average_end'))}.",
             f"HOTPANTS: {data['hotpants']}. Ours: the whole `pipeline subtract` command (start-up, read, align, "
             "match, subtract, write); HOTPANTS: on the pair pre-aligned by our align stage (alignment not counted).",
             "",
             "| CCD | ours s | HOTPANTS s | ours / HOTPANTS | target <= 0.333 | blank-sky std(D/sigma) ours | "
             "HOTPANTS | star |D|/flux median ours | HOTPANTS | star chi std ours | HOTPANTS | stars |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in data["ccds"]:
        q = c["quality"]
        o, h = q["ours"], q["hotpants"]
        lines.append(
            f"| {Path(c['search']).stem} | {c['ours_median_s']:.2f} | {c['hotpants_median_s']:.2f} | "
            f"{_f(c['ratio'])} | {'yes' if c['ratio'] is not None and c['ratio'] <= TARGET_RATIO else 'no'} | "
            f"{_f(o['blank_sky_z']['std'])} | {_f(h['blank_sky_z']['std'])} | "
            f"{_f(o['stars']['median_abs_frac'], '{:.4f}')} | {_f(h['stars']['median_abs_frac'], '{:.4f}')} | "
            f"{_f(o['stars']['chi_std'], '{:.2f}')} | {_f(h['stars']['chi_std'], '{:.2f}')} | {o['stars']['n']} |")
    lines += ["", f"Overall ratio of the medians (ours / HOTPANTS): {_f(data.get('ratio'))} "
              f"(target <= {TARGET_RATIO:.3f}: {'met' if data.get('target_met') else 'not met'}).", ""]
    bare = [c for c in data["ccds"] if c.get("ours_no_cosmics_median_s") is not None]
    if bare:
        lines += ["Like for like (HOTPANTS has no cosmic-ray stage): `pipeline subtract --no-cosmics` "
                  + ", ".join(f"{Path(c['search']).stem} {c['ours_no_cosmics_median_s']:.2f} s "
                              f"(ratio {_f(c['ratio_no_cosmics'])})" for c in bare) + ".", ""]
    for c in data["ccds"]:
        lines.append(f"- {Path(c['search']).stem}: kernel {c['kernel']}; HOTPANTS options: `{c['hotpants_command']}`")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hotpants",
                                 description="Time and quality of `pipeline subtract` against HOTPANTS.")
    ap.add_argument("--hotpants", default=None, help="path of a HOTPANTS executable (required; not shipped)")
    ap.add_argument("--ccds", type=int, default=1, help="simulated DECam CCD pairs (default 1)")
    ap.add_argument("--shape", default=None, help="CCD shape NYxNX (default 4096x2048)")
    ap.add_argument("--seed", type=int, default=9000, help="simulation seed (default 9000, held out)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3; medians)")
    ap.add_argument("--threads", type=int, default=1, help="threads of ours (HOTPANTS has one; default 1)")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bench_hotpants"),
                    help="output folder (default <tmp>/bench_hotpants)")
    args = ap.parse_args(argv)

    if not args.hotpants:
        print(NO_BINARY_MESSAGE, file=sys.stderr)
        return 2
    exe = shutil.which(args.hotpants) or args.hotpants
    if not (Path(exe).is_file() and os.access(exe, os.X_OK)):
        print(f"benchmarks.hotpants: --hotpants {args.hotpants}: not an executable file", file=sys.stderr)
        return 2
    if args.ccds < 1 or args.repeats < 1 or args.threads < 1:
        print("benchmarks.hotpants: --ccds, --repeats and --threads must be >= 1", file=sys.stderr)
        return 2
    shape = None
    if args.shape:
        try:
            shape = tuple(int(v) for v in args.shape.lower().split("x"))
            if len(shape) != 2:
                raise ValueError
        except ValueError:
            print(f"benchmarks.hotpants: --shape must be NYxNX, got {args.shape!r}", file=sys.stderr)
            return 2

    from benchmarks.bench_stages import _finite, _json_default, _write_text
    from benchmarks.suite import machine_info
    from pipeline.io import read_manifest

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                            "machine": machine_info(), "hotpants": str(Path(exe).resolve()), "seed": args.seed,
                            "repeats": args.repeats, "threads": args.threads, "target_ratio": TARGET_RATIO,
                            "load_average_start": list(os.getloadavg())}
    manifest = _simulate(out / "input", args.ccds, args.seed, shape)
    entries = read_manifest(manifest)
    data["ccds"] = []
    try:
        for e in entries:
            print(f"{e.ccd}: ...", flush=True)
            data["ccds"].append(compare_ccd(Path(e.search), Path(e.template), Path(e.truth), exe,
                                            out / "work" / e.ccd, args.repeats, args.threads,
                                            log=lambda line: print(line, flush=True)))
    except RuntimeError as exc:
        print(f"benchmarks.hotpants: {exc}", file=sys.stderr)
        return 3
    from astropy.io import fits

    hdr = fits.getheader(entries[0].search, "IMAGE")
    data["ccd_shape"] = [int(hdr["NAXIS2"]), int(hdr["NAXIS1"])]
    o = float(np.median([c["ours_median_s"] for c in data["ccds"]]))
    h = float(np.median([c["hotpants_median_s"] for c in data["ccds"]]))
    data["ratio"] = o / h if h > 0 else None
    data["target_met"] = data["ratio"] is not None and data["ratio"] <= TARGET_RATIO
    data["load_average_end"] = list(os.getloadavg())
    _write_text(out / "report.json", json.dumps(_finite(data), indent=1, default=_json_default))
    text = render_markdown(data)
    _write_text(out / "report.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
