"""Photometry at given positions: Gaussian-PSF forced fits and circular apertures.

:func:`forced_psf_photometry` (inverse-variance-weighted fit of a Gaussian of known FWHM centred
on each position), :func:`aperture_fluxes` (aperture sums and errors, optionally less a local sky
from an annulus), :func:`annulus_median` (that sigma-clipped annulus sky) and
:func:`_psf_sky_response` (what a forced fit returns for a unit sky).  All vectorised over
positions on stamps cut around them (no full-frame pass); ``method="reference"`` selects the
previous implementations (photutils on the full frame, NaN-median passes), kept for comparison.
"""

from __future__ import annotations

import warnings

import numpy as np

from dia.masks import BAD_FOR_FIT
from pipeline.detect.filter import check_method

__all__ = ["forced_psf_photometry", "aperture_fluxes", "annulus_median"]


def forced_psf_photometry(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    x: np.ndarray,
    y: np.ndarray,
    fwhm: "float | np.ndarray",
    radius_fwhm: float = 1.5,
    bad_bits: int = int(BAD_FOR_FIT),
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-PSF-fit fluxes at fixed sub-pixel positions.

    The model is a circular Gaussian of the given FWHM (scalar or one per position) centred exactly on
    ``(x, y)`` and normalised to unit integral, fitted with inverse-variance
    weights inside ``radius_fwhm`` FWHM; masked pixels get zero weight.

    Returns
    -------
    flux, flux_err : ndarray
        Fluxes (ADU) and 1-sigma errors; NaN where no pixel was usable.
    """
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    if x.size == 0:
        return np.zeros(0), np.zeros(0)
    from pipeline.stamps import cut_stamps

    fwhm = np.broadcast_to(np.asarray(fwhm, float), x.shape)
    r = max(2, int(np.ceil(radius_fwhm * fwhm.max())))
    size = 2 * r + 1
    planes = {"image": image, "variance": variance}
    cut = cut_stamps(planes, {"image": mask} if mask is not None else None, x, y, size=size)
    data, var = cut.data[:, 0].astype(np.float64), cut.data[:, 1].astype(np.float64)
    good = np.isfinite(data) & np.isfinite(var) & (var > 0) & ((cut.mask[:, 0] & bad_bits) == 0)
    sigma = (fwhm / 2.3548)[:, None, None]
    offs = np.arange(-r, r + 1)
    dx = offs[None, None, :] - (x - cut.x)[:, None, None]
    dy = offs[None, :, None] - (y - cut.y)[:, None, None]
    rr = dx**2 + dy**2
    psf = np.exp(-0.5 * rr / sigma**2) / (2 * np.pi * sigma**2)
    good &= rr <= (radius_fwhm * fwhm[:, None, None]) ** 2
    w = np.where(good, 1.0 / np.where(good, var, 1.0), 0.0)
    num = (psf * np.where(good, data, 0.0) * w).sum(axis=(1, 2))
    den = (psf**2 * w).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        flux = np.where(den > 0, num / den, np.nan)
        err = np.where(den > 0, 1.0 / np.sqrt(den), np.nan)
    return flux, err



def aperture_fluxes(image, variance, mask, x, y, radius, *, annulus: tuple[float, float] | None = None,
                    sky: np.ndarray | None = None, method: str = "fast"):
    """Aperture sums (and errors) at positions; optional local background from an annulus.

    Parameters
    ----------
    image, variance, mask : ndarray
        Image (ADU), its variance and bit mask.
    x, y : array_like
        Aperture centres (0-based pixels).
    radius : float
        Aperture radius (pixels).
    annulus : (float, float), optional
        Inner and outer radius of the annulus whose sigma-clipped median is subtracted.
    sky : ndarray, optional
        That median, when already measured (:func:`annulus_median`); used instead of ``annulus``.
    method : {"fast", "reference"}
        ``"fast"``: exact-overlap weights (photutils geometry) applied to stamps cut around the
        positions; ``"reference"``: :func:`photutils.aperture.aperture_photometry` on the full
        frame, the previous code.  The same sums to rounding.

    Returns
    -------
    flux, flux_err, bad : ndarray
        Background-subtracted aperture flux, its error, and whether a flagged pixel is in the aperture.
    """
    check_method(method, "aperture_fluxes method")
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    if x.size == 0:
        e = np.zeros(0)
        return e, e, e.astype(bool)
    if method == "reference":
        flux, err, bad = _aperture_sums_reference(image, variance, mask, x, y, radius)
    else:
        flux, err, bad = _aperture_sums(image, variance, mask, x, y, radius)
    if sky is None and annulus is not None:  # sigma-clipped median of the annulus: neighbours do not bias it
        sky = annulus_median(image, x, y, annulus, method=method)
    if sky is not None:
        flux = flux - sky * (np.pi * radius**2)
    return flux, err, bad


def _aperture_sums_reference(image, variance, mask, x, y, radius):
    """Aperture sums, errors and flagged-pixel test with photutils on the full frame (the previous code)."""
    from photutils.aperture import CircularAperture, aperture_photometry

    ap = CircularAperture(np.column_stack([x, y]), r=radius)
    flagged = ((mask & int(BAD_FOR_FIT)) != 0).astype(np.float32)
    tab = aperture_photometry(np.nan_to_num(image), ap, error=np.sqrt(np.clip(variance, 0, None)))
    bad = np.asarray(aperture_photometry(flagged, ap, method="center")["aperture_sum"]) > 0
    return np.asarray(tab["aperture_sum"], float), np.asarray(tab["aperture_sum_err"], float), bad


def _aperture_sums(image, variance, mask, x, y, radius):
    """Aperture sums, errors and flagged-pixel test on stamps: photutils' exact-overlap (and pixel-centre)
    weights per position, pixels off the image left out, as :func:`aperture_photometry` does."""
    from photutils.geometry import circular_overlap_grid

    from pipeline.stamps import cut_stamps

    r = int(np.ceil(radius)) + 1
    size = 2 * r + 1
    cut = cut_stamps({"i": image, "v": variance}, None, x, y, size=size)
    flagged = (cut_stamps({"m": mask}, {"m": mask}, x, y, size=size).mask[:, 0] & int(BAD_FOR_FIT)) != 0
    ny, nx = image.shape
    offs = np.arange(-r, r + 1)
    rows, cols = cut.y[:, None] + offs, cut.x[:, None] + offs
    on_image = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    exact = np.empty((x.size, size, size))
    centre = np.empty((x.size, size, size))
    for i, (dx, dy) in enumerate(zip(x - cut.x, y - cut.y)):
        extent = (-r - 0.5 - dx, r + 0.5 - dx, -r - 0.5 - dy, r + 0.5 - dy)
        exact[i] = circular_overlap_grid(*extent, size, size, radius, 1, 1)
        centre[i] = circular_overlap_grid(*extent, size, size, radius, 0, 1)
    exact = np.where(on_image, exact, 0.0)
    data = np.nan_to_num(cut.data[:, 0].astype(np.float64))
    error2 = np.sqrt(np.clip(cut.data[:, 1], 0, None)).astype(np.float64) ** 2
    with np.errstate(invalid="ignore"):
        flux = (data * exact).sum(axis=(1, 2))
        err = np.sqrt((np.where(exact > 0, error2, 0.0) * exact).sum(axis=(1, 2)))
    bad = ((centre > 0) & on_image & flagged).any(axis=(1, 2))
    return flux, err, bad


def annulus_median(image, x, y, annulus, method: str = "fast") -> np.ndarray:
    """Sigma-clipped (3 sigma, 3 passes) median of an annulus around each position (vectorised).

    Parameters
    ----------
    image : ndarray
        Image (NaN pixels are left out).
    x, y : array_like
        Centres (0-based pixels).
    annulus : (float, float)
        Inner (included) and outer (excluded) radius in pixels.
    method : {"fast", "reference"}
        ``"fast"``: each annulus sorted once, the clipped set a window of the sorted values;
        ``"reference"``: :func:`numpy.nanmedian` per pass, the previous code.  Same result.

    Returns
    -------
    ndarray
        One median per position (0 where no pixel survives).
    """
    from pipeline.stamps import cut_stamps

    check_method(method, "annulus_median method")
    if method == "fast":
        return _annulus_median_sorted(image, x, y, annulus)
    r_out = int(np.ceil(annulus[1]))
    cut = cut_stamps({"i": image}, None, x, y, size=2 * r_out + 1)
    offs = np.arange(-r_out, r_out + 1)
    dx = offs[None, None, :] - (np.asarray(x, float) - cut.x)[:, None, None]
    dy = offs[None, :, None] - (np.asarray(y, float) - cut.y)[:, None, None]
    rr = np.hypot(dx, dy)
    vals = np.where((rr >= annulus[0]) & (rr < annulus[1]), cut.data[:, 0], np.nan)
    vals = vals.reshape(len(vals), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(3):
            med = np.nanmedian(vals, axis=1)
            sig = 1.4826 * np.nanmedian(np.abs(vals - med[:, None]), axis=1)
            vals = np.where(np.abs(vals - med[:, None]) <= 3 * sig[:, None] + 1e-12, vals, np.nan)
        return np.nan_to_num(np.nanmedian(vals, axis=1))


def _annulus_median_sorted(image, x, y, annulus) -> np.ndarray:
    """:func:`annulus_median` reading only the pixels that can lie in the annulus, each annulus sorted once
    (NaN last): every clipped set is then a window ``[lo, lo + n)`` of the sorted values."""
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    ny, nx = image.shape
    ix, iy = np.rint(x).astype(np.intp), np.rint(y).astype(np.intp)  # the stamp centres of cut_stamps
    r_out = int(np.ceil(annulus[1]))
    oy, ox = np.mgrid[-r_out : r_out + 1, -r_out : r_out + 1]
    dist = np.hypot(oy, ox)  # a centre within half a pixel (each axis) moves a pixel by < 0.71
    ring = (dist >= annulus[0] - 0.75) & (dist < annulus[1] + 0.75)
    oy, ox = oy[ring], ox[ring]
    rows, cols = iy[:, None] + oy, ix[:, None] + ox
    on = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    vals = image[np.clip(rows, 0, ny - 1), np.clip(cols, 0, nx - 1)].astype(np.float32)
    rr = np.hypot(ox - (x - ix)[:, None], oy - (y - iy)[:, None])
    vals = np.where(on & (rr >= annulus[0]) & (rr < annulus[1]), vals, np.float32(np.nan))
    srt = np.sort(vals, axis=1)
    n = np.isfinite(srt).sum(axis=1)
    srt = srt[:, : max(int(n.max(initial=0)), 1)]
    rows = np.arange(srt.shape[0])
    lo = np.zeros(srt.shape[0], np.intp)
    cols = np.arange(srt.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(3):
            med = _window_median(srt, rows, lo, n)
            inside = (cols >= lo[:, None]) & (cols < (lo + n)[:, None])
            dev = np.abs(srt - med[:, None])
            sig = 1.4826 * _window_median(np.sort(np.where(inside, dev, np.inf), axis=1), rows, 0 * lo, n)
            keep = inside & (dev <= 3 * sig[:, None] + 1e-12)
            n = keep.sum(axis=1)
            lo = np.where(n > 0, np.argmax(keep, axis=1), 0)
        return np.nan_to_num(_window_median(srt, rows, lo, n))


def _window_median(srt: np.ndarray, rows: np.ndarray, lo: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Median of ``srt[i, lo[i] : lo[i] + n[i]]`` (rows sorted ascending); NaN where ``n`` is 0."""
    last = srt.shape[1] - 1
    a = srt[rows, np.clip(lo + (n - 1) // 2, 0, last)]
    b = srt[rows, np.clip(lo + n // 2, 0, last)]
    return np.where(n > 0, 0.5 * (a + b), np.nan).astype(srt.dtype)


def _psf_sky_response(fwhm, radius_fwhm: float = 1.5) -> np.ndarray:
    """Flux a Gaussian fit (:func:`forced_psf_photometry`) returns for a constant sky of 1 per pixel."""
    fwhm = np.atleast_1d(np.asarray(fwhm, float))
    out = np.empty(fwhm.size)
    for i, f in enumerate(fwhm):
        r = max(2, int(np.ceil(radius_fwhm * f)))
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        rr = xx**2 + yy**2
        sig = f / 2.3548
        p = np.exp(-0.5 * rr / sig**2) / (2 * np.pi * sig**2) * (rr <= (radius_fwhm * f) ** 2)
        out[i] = p.sum() / (p**2).sum()
    return out
