"""``pipeline subtract`` with default settings on real pairs and on synthetic real-like frames.

Usage (from the repository root)::

    python -m benchmarks.real_frames [SEARCH:TEMPLATE ...] [--hotpants PATH] [--decorrelate] [--out DIR]
                                     [--no-synthetic]

Real pairs are given as ``SEARCH:TEMPLATE`` FITS paths (nothing is downloaded; e.g. the DECam stacks
``Stack-DEC-OBS18.fits:Stack-DEC-OBS04.fits`` of the SFFT test data, or a JWST NIRCam i2d pair).
The synthetic frames are made here, with known truth (:func:`make_frames`), one per case of
issue #11's target -- small (256 x 256), tiny (128 x 128), sparse (8 stars), sky-subtracted with
residual pedestals and a gradient, correlated noise (white noise smoothed by a known Gaussian, as
stacking and resampling do), MJy/sr without GAIN among galaxies.

For every pair it runs ``pipeline subtract`` through its Python entry (:func:`pipeline.cli.main`)
with default settings and prints: success, the kernel-order fallback used, the blank-sky median and
robust (MAD) std of D / sigma, and the star residuals (:func:`benchmarks.hotpants.star_residuals`).
Blank sky is, for the synthetic frames, every unflagged pixel farther than ``max(15, 4 FWHM)`` px
from each object of the truth; for real pairs, the unflagged pixels outside the sources detected
in either image (:func:`source_mask`).  With ``--hotpants PATH`` the same figures are given for
HOTPANTS run with our kernel choices on the same aligned inputs (the functions of
:mod:`benchmarks.hotpants`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dia.stats import robust_std

__all__ = ["SYNTHETIC_CASES", "FrameCase", "Frames", "make_frames", "write_frames", "run_subtract", "source_mask",
           "difference_figures", "main"]

_SIG = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))  # Gaussian sigma per unit FWHM


@dataclasses.dataclass(frozen=True)
class FrameCase:
    """Parameters of a synthetic real-like pair (search and template).

    ``gain=None`` writes the images in MJy/sr (``BUNIT``, pixel values x ``unit_scale``) without a
    GAIN card; ``correlation`` [px] is the sigma of the Gaussian that smooths the white noise (0:
    white); ``sky`` are the sky levels left in the images (sky-subtracted images: small pedestals),
    ``gradient`` a differential background slope [ADU/px] added to the template.
    """

    name: str
    shape: tuple[int, int] = (256, 256)
    n_stars: int = 25
    n_galaxies: int = 0
    search_fwhm: float = 3.9
    template_fwhm: float = 5.2
    noise: tuple[float, float] = (18.0, 8.0)
    sky: tuple[float, float] = (200.0, 400.0)
    gradient: float = 0.0
    gain: float | None = 4.0
    correlation: float = 0.0
    unit_scale: float = 1.0
    transient_flux: float = 2.0e4
    write_fwhm: bool = True


#: The synthetic cases of issue #11's target.
SYNTHETIC_CASES: dict[str, FrameCase] = {case.name: case for case in (
    FrameCase("small"),
    FrameCase("tiny", shape=(128, 128), n_stars=10),
    FrameCase("sparse", n_stars=8),
    FrameCase("sky_subtracted", n_stars=10, sky=(3.0, -2.5), gradient=0.02),
    FrameCase("correlated", n_stars=10, sky=(1.0, -1.0), correlation=0.9),
    FrameCase("mjysr", shape=(256, 256), n_stars=8, n_galaxies=30, search_fwhm=2.4, template_fwhm=2.9,
              noise=(6.0, 5.0), sky=(5.0, 4.0), gain=None, unit_scale=1e-4, transient_flux=4.0e3, write_fwhm=False),
)}


@dataclasses.dataclass
class Frames:
    """A synthetic pair and its truth (pixel positions x, y; fluxes in search ADU before ``unit_scale``)."""

    case: FrameCase
    search: np.ndarray
    template: np.ndarray
    stars_xy: np.ndarray
    stars_flux: np.ndarray
    galaxies_xy: np.ndarray
    transient_xy: np.ndarray
    headers: tuple[dict, dict]

    @property
    def objects_xy(self) -> np.ndarray:
        """Every source (stars, galaxies, the transient), for the blank-sky mask."""
        return np.vstack([self.stars_xy, self.galaxies_xy.reshape(-1, 2), self.transient_xy.reshape(-1, 2)])


def _render(shape, xs, ys, fluxes, sigmas, hw: int = 25) -> np.ndarray:
    """Pixel-integrated elliptical-free Gaussians of per-source ``sigmas`` [px]."""
    from scipy.special import erf

    img = np.zeros(shape)
    ny, nx = shape
    for x0, y0, f, s in zip(xs, ys, fluxes, sigmas):
        h = int(max(hw, 5 * s))
        ix, iy = int(round(x0)), int(round(y0))
        x1, x2 = max(ix - h, 0), min(ix + h + 1, nx)
        y1, y2 = max(iy - h, 0), min(iy + h + 1, ny)
        if x1 >= x2 or y1 >= y2:
            continue
        px = np.diff(erf((np.arange(x1, x2 + 1) - 0.5 - x0) / (math.sqrt(2) * s))) / 2
        py = np.diff(erf((np.arange(y1, y2 + 1) - 0.5 - y0) / (math.sqrt(2) * s))) / 2
        img[y1:y2, x1:x2] += f * np.outer(py, px)
    return img


def _noise(rng, shape, sigma: float, correlation: float) -> np.ndarray:
    """White noise, smoothed by a Gaussian of ``correlation`` px when > 0, scaled to per-pixel std ``sigma``."""
    from scipy import ndimage

    white = rng.normal(size=shape)
    if correlation > 0:
        white = ndimage.gaussian_filter(white, correlation, mode="wrap")
        white /= white.std()
    return white * sigma


def make_frames(case: FrameCase | str, seed: int = 11) -> Frames:
    """A synthetic search/template pair of ``case`` (a :class:`FrameCase` or a key of :data:`SYNTHETIC_CASES`).

    Stars (same flux in both), a transient in the search, galaxies (Gaussians of intrinsic sigma 2-4x
    the search PSF's, convolved with each PSF) when asked; sky noise per pixel ``case.noise``
    (correlated when ``case.correlation``), source Poisson noise through the gain (ADU) or an
    equivalent of 4 counts per unit (MJy/sr case).
    """
    case = SYNTHETIC_CASES[case] if isinstance(case, str) else case
    rng = np.random.default_rng(seed)
    ny, nx = case.shape
    margin = 6
    sx = rng.uniform(margin, nx - margin, case.n_stars)
    sy = rng.uniform(margin, ny - margin, case.n_stars)
    # peak S/N in the noisier image from ~20 to ~400
    peak_sig = max(case.noise) * 2 * math.pi * (max(case.search_fwhm, case.template_fwhm) * _SIG) ** 2
    sflux = peak_sig * np.exp(rng.uniform(math.log(20), math.log(400), case.n_stars))
    gx = rng.uniform(margin, nx - margin, case.n_galaxies)
    gy = rng.uniform(margin, ny - margin, case.n_galaxies)
    gsize = rng.uniform(2.0, 4.0, case.n_galaxies) * case.search_fwhm * _SIG  # intrinsic sigma [px]
    gflux = peak_sig * (1 + (gsize / (case.search_fwhm * _SIG)) ** 2) * \
        np.exp(rng.uniform(math.log(30), math.log(600), case.n_galaxies))
    tx, ty = nx * 0.5 + 0.3, ny * 0.5 - 0.2
    yy, xx = np.mgrid[:ny, :nx]
    images = []
    for k, fwhm in enumerate((case.search_fwhm, case.template_fwhm)):
        s = fwhm * _SIG
        model = _render(case.shape, sx, sy, sflux, np.full(case.n_stars, s))
        model += _render(case.shape, gx, gy, gflux, np.sqrt(s**2 + gsize**2))
        if k == 0:
            model += _render(case.shape, [tx], [ty], [case.transient_flux], [s])
        else:
            model += case.gradient * (xx - nx / 2)
        gain = case.gain or 4.0
        source = rng.normal(size=case.shape) * np.sqrt(np.clip(model, 0, None) / gain)
        noisy = model + case.sky[k] + _noise(rng, case.shape, case.noise[k], case.correlation)
        noisy += source if case.correlation <= 0 else _noise(rng, case.shape, 1.0, case.correlation) * \
            np.sqrt(np.clip(model, 0, None) / gain)
        images.append((noisy * case.unit_scale).astype(np.float32))
    headers = []
    for k, fwhm in enumerate((case.search_fwhm, case.template_fwhm)):
        h = {"EXPTIME": 300.0, "MJD-OBS": 59000.0 + 10 * k}
        if case.gain is not None:
            h.update(GAIN=case.gain, RDNOISE=5.0, BUNIT="adu")
        else:
            h.update(BUNIT="MJy/sr")
        if case.write_fwhm:
            h["FWHM"] = fwhm
        headers.append(h)
    return Frames(case, images[0], images[1], np.column_stack([sx, sy]), sflux * case.unit_scale,
                  np.column_stack([gx, gy]), np.array([tx, ty]), (headers[0], headers[1]))


def _wcs_header(shape) -> dict:
    ny, nx = shape
    return {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 150.0, "CRVAL2": 2.0, "CRPIX1": nx / 2 + 0.5,
            "CRPIX2": ny / 2 + 0.5, "CD1_1": -0.263 / 3600, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": 0.263 / 3600}


def write_frames(frames: Frames, folder: str | Path) -> tuple[Path, Path]:
    """Write the pair as bare single-HDU FITS files (as survey stacks come) in ``folder``."""
    from astropy.io import fits

    from pipeline.io import atomic_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for role, data, cards in (("search", frames.search, frames.headers[0]),
                              ("template", frames.template, frames.headers[1])):
        hdr = fits.Header()
        for key, value in {**_wcs_header(data.shape), **cards}.items():
            hdr[key] = value
        path = folder / f"{frames.case.name}_{role}.fits"
        with atomic_path(path) as tmp:
            fits.PrimaryHDU(data, header=hdr).writeto(tmp, overwrite=True)
        paths.append(path)
    return paths[0], paths[1]


def run_subtract(search: str | Path, template: str | Path, out: str | Path, extra: Sequence[str] = ()) -> dict:
    """``pipeline subtract SEARCH TEMPLATE --out OUT [extra]`` through :func:`pipeline.cli.main`.

    Returns ``{"rc", "stdout", "stderr"}``.
    """
    from pipeline.cli import main as cli

    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = cli(["subtract", str(search), str(template), "--out", str(out), *extra])
    return {"rc": int(rc), "stdout": so.getvalue(), "stderr": se.getvalue()}


def source_mask(images: Sequence[np.ndarray], nsigma: float = 3.0, grow: int = 6, smooth: float = 1.5) -> np.ndarray:
    """Pixels of the sources of any of ``images`` (smoothed by ``smooth`` px, above ``nsigma`` x their
    robust noise), grown by ``grow`` px: the complement is the blank sky of a real pair."""
    from scipy import ndimage

    out = None
    for img in images:
        sm = ndimage.gaussian_filter(np.nan_to_num(np.asarray(img, np.float64)), smooth)
        med = float(np.median(sm))
        mad = 1.4826 * float(np.median(np.abs(sm - med)))
        m = ndimage.binary_dilation(sm - med > nsigma * mad, iterations=grow)
        out = m if out is None else out | m
    return out


def _z_figures(d: np.ndarray, sigma: np.ndarray, ok: np.ndarray) -> dict[str, Any]:
    z = d[ok] / sigma[ok]
    if z.size == 0:
        return {"n_pixels": 0, "median": None, "robust_std": None, "std": None}
    med = float(np.median(z))
    return {"n_pixels": int(z.size), "median": med, "robust_std": robust_std(z),
            "std": float(np.std(z))}


def difference_figures(d: np.ndarray, sigma: np.ndarray, bad: np.ndarray, blank: np.ndarray,
                       stars_xy: np.ndarray, stars_flux: np.ndarray, radius: float) -> dict[str, Any]:
    """Blank-sky D / sigma figures and the star residuals (:func:`benchmarks.hotpants.star_residuals`)."""
    from benchmarks.hotpants import star_residuals

    ok = blank & ~bad & np.isfinite(d) & np.isfinite(sigma) & (sigma > 0)
    return {"blank": _z_figures(d, sigma, ok),
            "stars": star_residuals(d, sigma, bad, stars_xy, stars_flux, radius)}


def _read_ours(path: Path):
    from astropy.io import fits

    from dia.masks import BAD_FOR_FIT, MaskBits

    with fits.open(path) as h:
        d = h["IMAGE"].data.astype(np.float64)
        sigma = np.sqrt(h["VARIANCE"].data.astype(np.float64))
        bad = (h["MASK"].data & int(BAD_FOR_FIT | MaskBits.CONVOLVED)) != 0
        header = h["IMAGE"].header
    return d, sigma, bad, header


def _hotpants(search: Path, template: Path, ours: Path, hotpants: str, work: Path):
    """HOTPANTS with our kernel choices on our aligned inputs; ``(D, sigma, bad)`` or an error string."""
    from astropy.io import fits

    from benchmarks.hotpants import (
        _HOTPANTS_OUT_BAD,
        _prepare_hotpants_inputs,
        _timed,
        hotpants_options,
        kernel_choice_from_header,
    )

    work.mkdir(parents=True, exist_ok=True)
    with fits.open(ours) as h:
        choice = kernel_choice_from_header(h["IMAGE"].header)
    hp = _prepare_hotpants_inputs(search, template, work)
    cmd = [hotpants] + hotpants_options(choice, hp["files"], saturation=hp["saturation"], lower=hp["lower"]) + \
        ["-v", "0"]
    try:
        _timed(cmd, cwd=work)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    d = fits.getdata(hp["files"]["out"]).astype(np.float64)
    sigma = fits.getdata(hp["files"]["out_noise"]).astype(np.float64)
    bad = (fits.getdata(hp["files"]["out_mask"]).astype(np.int64) & _HOTPANTS_OUT_BAD) != 0
    return d, sigma, bad | ~np.isfinite(d)


def evaluate_pair(name: str, search: Path, template: Path, work: Path, *, truth: Frames | None = None,
                  hotpants: str | None = None, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``pipeline subtract`` on one pair and measure it (and HOTPANTS when given)."""
    from astropy.io import fits

    out = work / f"{name}_diff.fits"
    res = run_subtract(search, template, out, extra)
    row: dict[str, Any] = {"name": name, "ok": res["rc"] == 0, "message": (res["stderr"] or "").strip()}
    if res["rc"] != 0:
        return row
    d, sigma, bad, header = _read_ours(out)
    row["fallback"] = str(header.get("DIA FIT FALLBACK", "") or "")
    row["orders"] = (header.get("DIA FIT SPATIAL_ORDER"), header.get("DIA FIT BACKGROUND_ORDER"))
    row["background"] = str(header.get("DIA FIT BACKGROUND", ""))
    row["fwhm"] = (header.get("SFWHM"), header.get("TFWHM"))
    if truth is not None:
        fwhm = max(truth.case.search_fwhm, truth.case.template_fwhm)
        from benchmarks.hotpants import _near_objects

        blank = ~_near_objects(d.shape, truth.objects_xy, max(15.0, 4.0 * fwhm))
        stars_xy, flux = truth.stars_xy, truth.stars_flux
    else:
        s_img = np.asarray([x.data for x in fits.open(search) if x.data is not None][0], np.float64)
        blank = ~source_mask([s_img, d])
        fwhm = float(header.get("SFWHM", 4.0) or 4.0)
        stars_xy, flux = _bright_compact(s_img, fwhm)
    radius = 2.0 * fwhm
    row["ours"] = difference_figures(d, sigma, bad, blank, stars_xy, flux, radius)
    if hotpants:
        hp = _hotpants(search, template, out, hotpants, work / f"{name}_hotpants")
        if isinstance(hp, str):
            row["hotpants"] = {"error": hp}
        else:
            hd, hs, hb = hp
            row["hotpants"] = difference_figures(hd, hs, hb | bad, blank, stars_xy, flux, radius)
            row["ours_same_pixels"] = difference_figures(d, sigma, hb | bad, blank, stars_xy, flux, radius)
    return row


def _bright_compact(img: np.ndarray, fwhm: float, max_stars: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Positions and aperture fluxes (radius 2 FWHM, local median subtracted) of the bright, star-like
    sources of a real image (its stellar locus, :func:`dia.fwhm.stellar_locus`), for the star residuals."""
    import scipy.ndimage

    med = float(np.nanmedian(img))
    noise = 1.4826 * float(np.nanmedian(np.abs(img - med)))
    work = np.nan_to_num(img, nan=-np.inf)
    peaks = (work == scipy.ndimage.maximum_filter(work, size=5)) & (work > med + 30 * noise)
    py, px = np.nonzero(peaks)
    order = np.argsort(-work[py, px])[:max_stars]
    r = int(math.ceil(2 * fwhm))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    ap = xx**2 + yy**2 <= (2 * fwhm) ** 2
    xy, flux = [], []
    ny, nx = img.shape
    for i in order:
        y, x = py[i], px[i]
        if y - r < 0 or x - r < 0 or y + r >= ny or x + r >= nx:
            continue
        xy.append((x, y))
        flux.append(float((img[y - r:y + r + 1, x - r:x + r + 1][ap] - med).sum()))
    return np.asarray(xy, float).reshape(-1, 2), np.asarray(flux, float)


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def format_row(row: dict[str, Any]) -> str:
    """One pair's figures as a few text lines."""
    if not row["ok"]:
        return f"{row['name']}: FAILED: {row['message']}"
    lines = [f"{row['name']}: ok; orders {row['orders'][0]}/{row['orders'][1]}; fallback: {row['fallback'] or 'none'}; "
             f"FWHM search/template {_fmt(row['fwhm'][0], '.2f')}/{_fmt(row['fwhm'][1], '.2f')} px"]
    for who in ("ours", "ours_same_pixels", "hotpants"):
        fig = row.get(who)
        if fig is None:
            continue
        if "error" in fig:
            lines.append(f"  {who}: {fig['error']}")
            continue
        b, s = fig["blank"], fig["stars"]
        lines.append(f"  {who:17s} blank sky D/sigma: median {_fmt(b['median'])}, robust std {_fmt(b['robust_std'])}, "
                     f"std {_fmt(b['std'])} ({b['n_pixels']} px); stars (n={s['n']}): median |D|/flux "
                     f"{_fmt(s['median_abs_frac'], '.4f')}, chi median {_fmt(s['chi_median'], '.2f')}, "
                     f"chi std {_fmt(s['chi_std'], '.2f')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_frames", description=__doc__.split("\n")[0])
    parser.add_argument("pairs", nargs="*", metavar="SEARCH:TEMPLATE", help="real FITS pairs")
    parser.add_argument("--hotpants", metavar="PATH", default=None, help="HOTPANTS binary to compare with")
    parser.add_argument("--decorrelate", action="store_true", help="pass --decorrelate to pipeline subtract")
    parser.add_argument("--no-synthetic", action="store_true", help="only the real pairs")
    parser.add_argument("--seed", type=int, default=11, help="seed of the synthetic frames (default 11)")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    extra = ["--decorrelate"] if args.decorrelate else []
    with contextlib.ExitStack() as stack:
        work = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        failed = 0
        for k, pair in enumerate(args.pairs):
            if pair.count(":") != 1:
                parser.error(f"pair {pair!r}: expected SEARCH:TEMPLATE")
            search, template = (Path(p) for p in pair.split(":"))
            row = evaluate_pair(f"real{k}_{search.stem}", search, template, work, hotpants=args.hotpants, extra=extra)
            failed += not row["ok"]
            print(format_row(row), flush=True)
        if not args.no_synthetic:
            for name in SYNTHETIC_CASES:
                frames = make_frames(name, args.seed)
                search, template = write_frames(frames, work / "synthetic")
                row = evaluate_pair(name, search, template, work, truth=frames, hotpants=args.hotpants, extra=extra)
                failed += not row["ok"]
                print(format_row(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
