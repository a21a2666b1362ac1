"""Star selection and the PSF model: bright isolated stars, the FWHM field and the aperture correction.

:func:`bright_isolated_stars` picks bright, unmasked, point-like, isolated peaks from the per-pixel
S/N (the registration check of :mod:`pipeline.align` and the PSF fit use it);
:func:`fit_psf_model` measures on them a Gaussian-core :class:`PsfModel` -- the FWHM as a smooth
polynomial of position (:func:`_best_fwhm` per star) and the correction from Gaussian-fit (or
aperture) flux to total flux, the classic aperture correction.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dia.masks import BAD_FOR_FIT
from pipeline.detect.filter import _refine_peaks, _segment_peaks, check_method
from pipeline.detect.photometry import _psf_sky_response, annulus_median, aperture_fluxes, forced_psf_photometry

__all__ = ["bright_isolated_stars", "PsfModel", "fit_psf_model"]


def bright_isolated_stars(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    fwhm: float,
    *,
    min_snr: float = 100.0,
    isolation: float = 12.0,
    max_stars: int = 400,
    neighbour_snr: float = 5.0,
    method: str = "fast",
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of bright, unmasked point-like peaks with no neighbour within ``isolation`` FWHM.

    Works on the per-pixel S/N (no convolution, so it is cheap): a point
    source of PSF S/N ``S`` has a peak pixel S/N of about ``S / (sqrt(pi) sigma)``.
    Neighbours are peaks of regions above ``neighbour_snr`` per pixel.
    ``image`` must be background-subtracted.  ``method="reference"`` finds each region's peak by
    the previous lexicographic sort instead of a per-region maximum (the same stars).
    """
    check_method(method, "bright_isolated_stars method")
    sigma = fwhm / 2.3548
    snr = _pixel_snr(image, variance, method)
    iy, ix = _segment_peaks(snr, snr > neighbour_snr, method)
    if ix.size == 0:
        return np.zeros(0), np.zeros(0)
    peak = snr[iy, ix]
    # sharpness: a cosmic ray or hot pixel towers over its four neighbours, a PSF does not
    ny, nx = snr.shape
    around = 0.25 * (snr[iy, np.clip(ix - 1, 0, nx - 1)] + snr[iy, np.clip(ix + 1, 0, nx - 1)]
                     + snr[np.clip(iy - 1, 0, ny - 1), ix] + snr[np.clip(iy + 1, 0, ny - 1), ix])
    psf_like = peak < 1.5 * np.exp(0.5 / sigma**2) * np.maximum(around, 1e-3)
    bright = np.flatnonzero((peak > min_snr / (np.sqrt(np.pi) * sigma)) & psf_like)
    if bright.size > max_stars:
        bright = bright[np.argsort(-peak[bright])[:max_stars]]
    reach = 0.5 * isolation * fwhm
    x, y = _refine_peaks(snr, ix[bright], iy[bright])
    ok = (x > reach) & (x < nx - reach) & (y > reach) & (y < ny - reach)
    if bright.size and ix.size > 1:
        from scipy.spatial import cKDTree

        d, _ = cKDTree(np.column_stack([ix, iy])).query(np.column_stack([x, y]), k=2)
        ok &= d[:, 1] > isolation * fwhm
    x, y = x[ok], y[ok]
    if x.size:  # nothing flagged within the core (saturated stars, bad pixels)
        from pipeline.stamps import cut_stamps

        core = 2 * int(np.ceil(fwhm)) + 1
        m = cut_stamps({"m": mask}, {"m": mask}, x, y, size=core).mask[:, 0]
        clean = ((m & int(BAD_FOR_FIT)) == 0).all(axis=(1, 2))
        x, y = x[clean], y[clean]
    return x, y



def _pixel_snr(image: np.ndarray, variance: np.ndarray, method: str = "fast", block: int = 64) -> np.ndarray:
    """Per-pixel S/N ``image / sqrt(variance)`` as float32, 0 where not finite or the variance is not positive
    (``"fast"``: block by block, in cache, computed in place (in the inputs' precision) and the bad pixels zeroed
    after: the same values, ~3x faster on float32 frames)."""
    if method == "reference":
        good = np.isfinite(image) & (variance > 0)
        return np.where(good, image / np.sqrt(np.where(good, variance, 1.0)), 0.0).astype(np.float32)
    out = np.empty(image.shape, np.float32)
    dtype = np.result_type(image, variance, np.float32)
    work = None if dtype == np.float32 else np.empty((block, *image.shape[1:]), dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        for y0 in range(0, image.shape[0], block):
            img, var = image[y0 : y0 + block], variance[y0 : y0 + block]
            snr = out[y0 : y0 + block] if work is None else work[: len(img)]
            bad = ~np.isfinite(img)
            bad |= ~(var > 0)
            np.sqrt(var, out=snr)
            np.divide(img, snr, out=snr)
            np.copyto(snr, 0.0, where=bad)
            if work is not None:
                out[y0 : y0 + block] = snr
    return out


def _poly_design(u: np.ndarray, v: np.ndarray, n_terms: int) -> np.ndarray:
    """Columns 1, u, v (, u^2, uv, v^2) of a polynomial surface with 1, 3 or 6 terms."""
    u, v = np.asarray(u, float), np.asarray(v, float)
    cols = [np.ones_like(u), u, v, u * u, u * v, v * v][:n_terms]
    return np.stack(cols, axis=-1)


@dataclasses.dataclass(frozen=True)
class PsfModel:
    """Gaussian-core PSF model with a FWHM varying linearly across the image, and a flux correction.

    ``fwhm_at(x, y)`` is a polynomial in ``u, v`` (the position scaled to [-1, 1]
    over ``shape``) with 1, 3 or 6 coefficients ``fwhm_coeffs`` (1, u, v, u^2, uv, v^2).
    ``correction`` is the ratio of total flux (a 5-FWHM aperture) to the flux
    measure the model was fitted for (the Gaussian fit at the local FWHM, or an
    aperture): real PSFs have wings a Gaussian misses -- the classic aperture
    correction.
    """

    fwhm_coeffs: tuple[float, ...]
    correction: float = 1.0
    shape: tuple[int, int] = (1, 1)
    n_stars: int = 0
    aperture_radius: float | None = None

    def fwhm_at(self, x, y) -> np.ndarray:
        """Local FWHM in pixels."""
        u = 2.0 * np.asarray(x, float) / max(self.shape[1] - 1, 1) - 1.0
        v = 2.0 * np.asarray(y, float) / max(self.shape[0] - 1, 1) - 1.0
        return _poly_design(u, v, len(self.fwhm_coeffs)) @ np.asarray(self.fwhm_coeffs)

    def photometry(self, image, variance, mask, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Total fluxes and errors: Gaussian fits at the local FWHM times the correction."""
        flux, err = forced_psf_photometry(image, variance, mask, x, y, self.fwhm_at(x, y))
        return flux * self.correction, err * self.correction


def _best_fwhm(image, variance, mask, x, y, fwhm, factors=np.arange(0.7, 1.42, 0.02),
               bad_bits: int = int(BAD_FOR_FIT)):
    """Per star, the Gaussian FWHM (on a grid) that fits the core best (least chi^2).

    Each trial width is a weighted Gaussian flux fit inside 1 FWHM, exactly as
    :func:`forced_psf_photometry` does; the stamps are cut once for all widths.
    """
    from pipeline.stamps import cut_stamps

    r = max(2, int(np.ceil(fwhm * factors[-1])))
    cut = cut_stamps({"i": image, "v": variance}, {"i": mask}, x, y, size=2 * r + 1)
    data, var = cut.data[:, 0].astype(np.float64), cut.data[:, 1].astype(np.float64)
    good = np.isfinite(data) & np.isfinite(var) & (var > 0) & ((cut.mask[:, 0] & bad_bits) == 0)
    w_pix = np.where(good, 1.0 / np.where(good, var, 1.0), 0.0)
    data = np.where(good, data, 0.0)
    offs = np.arange(-r, r + 1)
    dx = offs[None, None, :] - (np.asarray(x, float) - cut.x)[:, None, None]
    dy = offs[None, :, None] - (np.asarray(y, float) - cut.y)[:, None, None]
    rr = dx**2 + dy**2
    chi2 = []
    for f in factors:
        w = fwhm * f
        sig = w / 2.3548
        psf = np.exp(-0.5 * rr / sig**2) / (2 * np.pi * sig**2)
        inside = rr <= w**2
        weight = np.where(inside, w_pix, 0.0)
        den = (psf**2 * weight).sum(axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            flux = np.where(den > 0, (psf * data * weight).sum(axis=(1, 2)) / den, np.nan)
        res = np.where(inside, (data - flux[:, None, None] * psf) ** 2 * w_pix, 0.0)
        chi2.append(np.nansum(res, axis=(1, 2)) / np.maximum(inside.sum(axis=(1, 2)), 1))
    return fwhm * factors[np.nanargmin(np.array(chi2), axis=0)]


def fit_psf_model(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    fwhm: float,
    *,
    aperture_radius: float | None = None,
    min_snr: float = 50.0,
    total_fwhm: float = 5.0,
    min_stars: int = 5,
    min_stars_linear: int = 12,
    min_stars_quadratic: int = 60,
    fit_width: bool = True,
    method: str = "fast",
) -> PsfModel:
    """Measure the PSF width field and the flux correction on bright isolated stars.

    Parameters
    ----------
    image : ndarray
        Background-subtracted image whose PSF is wanted.
    variance, mask : ndarray
        Its variance and mask.
    fwhm : float
        Nominal FWHM (pixels), the starting point.
    aperture_radius : float, optional
        Fit the correction for aperture fluxes of this radius instead of PSF fits.
    min_snr : float
        Least matched-filter S/N of a star used.
    total_fwhm : float
        Radius (in FWHM) of the aperture that defines "total" flux.
    fit_width : bool
        Fit the FWHM field (default); False keeps the nominal FWHM (cheaper: only the
        correction is measured, with galaxies rejected by the ratio clipping).
    min_stars, min_stars_linear, min_stars_quadratic : int
        Fewer usable stars than ``min_stars``: the nominal FWHM and no correction;
        at least ``min_stars_linear``: a FWHM plane; at least ``min_stars_quadratic``: a
        quadratic surface (PSFs vary smoothly but not linearly across a CCD); else a constant.
    method : {"fast", "reference"}
        Implementation of the star selection and the photometry (the annulus sky is measured once
        with ``"fast"``, twice with ``"reference"``, the previous code); the same model.
    """
    check_method(method, "fit_psf_model method")
    shape = image.shape
    nominal = PsfModel((float(fwhm), 0.0, 0.0), 1.0, shape, 0, aperture_radius)
    # neighbours inside the total-flux aperture would bias the ratio; fainter ones beyond are harmless
    x, y = bright_isolated_stars(image, variance, mask, fwhm, min_snr=min_snr, isolation=total_fwhm + 1,
                                 method=method)
    if x.size < min_stars:
        return nominal
    local = _best_fwhm(image, variance, mask, x, y, fwhm) if fit_width else np.full(x.size, float(fwhm))
    med = np.median(local)
    keep = np.abs(local - med) < 0.15 * med  # galaxies fit wide
    coeffs = (float(np.median(local[keep])) if keep.any() else float(fwhm), 0.0, 0.0)
    if fit_width and keep.sum() >= min_stars_linear:
        u = 2.0 * x / max(shape[1] - 1, 1) - 1.0
        v = 2.0 * y / max(shape[0] - 1, 1) - 1.0
        n_terms = 6 if keep.sum() >= min_stars_quadratic else 3
        design = _poly_design(u, v, n_terms)
        for _ in range(3):
            coef, *_ = np.linalg.lstsq(design[keep], local[keep], rcond=None)
            resid = local - design @ coef
            scale = 1.4826 * np.median(np.abs(resid[keep])) + 1e-3
            new = keep & (np.abs(resid) < 3 * scale)
            if new.sum() < min_stars_linear or np.array_equal(new, keep):
                break
            keep = new
        coeffs = tuple(float(c) for c in coef)
    x, y = x[keep], y[keep]
    if x.size < min_stars:
        return nominal
    model = PsfModel(coeffs, 1.0, shape, int(x.size), aperture_radius)
    # A coarse background map is biased by the light of crowded fields; both measures are made
    # relative to the local sky of a far annulus (where the PSF wings hold < 0.1% of the flux).
    annulus = ((total_fwhm + 1) * fwhm, (total_fwhm + 3) * fwhm)
    local_sky = annulus_median(image, x, y, annulus, method=method)
    sky = None if method == "reference" else local_sky  # "reference" measured it again in each call
    total, _, _ = aperture_fluxes(image, variance, mask, x, y, total_fwhm * fwhm, annulus=annulus, sky=sky,
                                  method=method)
    if aperture_radius is None:
        small, _ = forced_psf_photometry(image, variance, mask, x, y, model.fwhm_at(x, y))
        small = small - local_sky * _psf_sky_response(model.fwhm_at(x, y))
    else:
        small, _, _ = aperture_fluxes(image, variance, mask, x, y, aperture_radius, annulus=annulus, sky=sky,
                                      method=method)
    ratio = total / small
    ratio = ratio[np.isfinite(ratio) & (ratio > 0.5) & (ratio < 3.0)]
    if ratio.size < min_stars:
        return dataclasses.replace(model, n_stars=int(ratio.size))
    med = np.median(ratio)
    mad = 1.4826 * np.median(np.abs(ratio - med)) + 1e-3
    ratio = ratio[np.abs(ratio - med) < 4 * mad]
    return dataclasses.replace(model, correction=float(np.median(ratio)), n_stars=int(ratio.size))

