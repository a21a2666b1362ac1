"""PSF FWHM measurement from the bright, isolated, star-like sources (adaptive Gaussian moments, stellar locus)."""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage
from scipy.spatial import cKDTree

from .masks import BAD_FOR_FIT

__all__ = ["estimate_fwhm", "stellar_locus"]


def _adaptive_sigma(stamp: np.ndarray, yy: np.ndarray, xx: np.ndarray, cap: float) -> float | None:
    """Adaptive Gaussian-moment sigma [px] of a background-subtracted stamp (None: no convergence).

    The weight width is iterated until it matches the source, at which point a Gaussian's sigma
    is recovered exactly.
    """
    sw = 2.0
    cy = cx = 0.0
    for _ in range(30):
        w = np.exp(-0.5 * ((xx - cx) ** 2 + (yy - cy) ** 2) / sw**2)
        f = (w * stamp).sum()
        if f <= 0:
            return None
        cx, cy = (w * stamp * xx).sum() / f, (w * stamp * yy).sum() / f
        m2 = (w * stamp * ((xx - cx) ** 2 + (yy - cy) ** 2)).sum() / (2 * f)
        if not 0 < m2 < sw**2:
            return None
        new = math.sqrt(1.0 / (1.0 / m2 - 1.0 / sw**2))
        if abs(new - sw) < 1e-4:
            return new
        sw = min(new, cap)
    return None


def stellar_locus(fwhms, *, width: float = 0.1, min_members: int = 3, min_fraction: float = 0.1,
                  min_fwhm: float = 1.0) -> np.ndarray:
    """Which of the measured sizes belong to the stellar locus (the star-like sources).

    Point sources all have the PSF's size whatever their flux, and no real source is smaller;
    galaxies are larger and spread in size.  The locus is the *smallest* size around which the
    sizes cluster: going up from the smallest size (at least ``min_fwhm``: below, hot pixels and
    cosmic-ray hits), the first size ``s`` whose window ``[s, s e^(2 width)]`` holds at least
    ``max(min_members, min_fraction x N)`` of the N sizes; its centre is then moved to the median of
    the sizes within ``e^(+-width)`` of it until it settles (the mode).  With stars only, the members
    are all sizes within ``+-width`` (about 10%) of their median.

    Parameters
    ----------
    fwhms : array
        Measured sizes [px] (any positive width measure).
    width : float
        Half-width of the window in ln(size).
    min_members, min_fraction : int, float
        Fewest sizes in the window for a locus.
    min_fwhm : float
        Sizes below this [px] are not considered.

    Returns
    -------
    numpy.ndarray of bool
        Members of the locus (all False when none is found).
    """
    s = np.asarray(fwhms, dtype=np.float64)
    member = np.zeros(s.shape, bool)
    ok = np.isfinite(s) & (s >= min_fwhm)
    if not ok.any():
        return member
    logs = np.log(s)
    srt = np.sort(logs[ok])
    need = max(int(min_members), int(math.ceil(min_fraction * srt.size)))
    if srt.size < need:
        need = srt.size
    counts = np.searchsorted(srt, srt + 2 * width, side="right") - np.arange(srt.size)
    start = int(np.argmax(counts >= need))
    centre = float(np.median(srt[start : start + int(counts[start])]))
    for _ in range(10):
        inside = ok & (np.abs(logs - centre) <= width)
        new = float(np.median(logs[inside]))
        if abs(new - centre) < 1e-6:
            break
        centre = new
    return ok & (np.abs(logs - centre) <= width)


def estimate_fwhm(image, mask=None, *, saturation: float = math.inf, max_stars: int = 200,
                  half_width: int = 12, min_snr: float = 30.0, max_candidates: int = 2000,
                  locus_width: float = 0.15, min_fwhm: float = 1.0) -> float:
    """PSF FWHM [px]: the median size of the star-like sources among the bright, isolated ones.

    Each source's width comes from adaptive Gaussian-weighted second moments (the weight
    width is iterated until it matches the source, at which point a Gaussian PSF's sigma is
    recovered exactly); 1/12 px^2 of pixelisation is removed before converting sigma to FWHM.
    Sizes are measured for up to ``max_candidates`` bright (peak S/N >= ``min_snr``), isolated,
    unsaturated, unmasked sources; the star-like ones are those of the stellar locus
    (:func:`stellar_locus`: the smallest size around which sizes cluster), so that galaxies, which
    dominate the bright sources of a deep field or a galaxy cluster, do not inflate the estimate.
    The result is the median size of the ``max_stars`` brightest locus members.  On a field of
    stars this is the median of the brightest stars (the previous estimate).

    Parameters
    ----------
    image : 2-D array
        Image (NumPy or CuPy; measured on the host).
    mask : 2-D int array, optional
        Bit mask; sources touching ``BAD_FOR_FIT`` pixels are skipped.
    saturation : float
        Sources with any pixel at or above this value are skipped.
    max_stars : int
        Locus members (brightest first) whose median is returned.
    half_width : int
        Stamp half-width [px] of the measurement (sizes up to ``half_width / 2`` sigma).
    min_snr : float
        Least peak S/N (per pixel, above the median) of a measured source.
    max_candidates : int
        Most sources measured (brightest first).
    locus_width, min_fwhm : float
        The stellar locus' half-width in ln(size) and the smallest size considered [px]
        (:func:`stellar_locus`).

    Raises
    ------
    ValueError
        If the image is not 2-D, or no bright, isolated, star-like source is found.
    """
    if hasattr(image, "get"):
        image = image.get()
        mask = None if mask is None else mask.get()
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    if mask is not None and np.shape(mask) != img.shape:
        raise ValueError(f"mask shape {np.shape(mask)} does not match image shape {img.shape}")
    bad = ~np.isfinite(img)
    if mask is not None:
        bad |= (np.asarray(mask) & BAD_FOR_FIT) != 0
    good = img[~bad]
    if good.size == 0:
        raise ValueError("image: every pixel is masked or non-finite")
    bg = float(np.median(good[:: max(1, good.size // 200000)]))
    noise = 1.4826 * float(np.median(np.abs(good[:: max(1, good.size // 200000)] - bg)))
    work = np.where(bad, -np.inf, img)
    peaks = (work == scipy.ndimage.maximum_filter(work, size=5)) & (work > bg + 5 * noise)
    py, px = np.nonzero(peaks)
    amp = work[py, px] - bg
    ny, nx = img.shape
    h = half_width
    inside = (py >= h) & (px >= h) & (py < ny - h) & (px < nx - h) & (amp > min_snr * noise)
    tree = cKDTree(np.column_stack([py, px])) if py.size else None
    sigmas = []
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1].astype(np.float64)
    for i in np.argsort(-amp):
        if len(sigmas) >= max_candidates:
            break
        if not inside[i]:
            continue
        neigh = [j for j in tree.query_ball_point([py[i], px[i]], r=h) if j != i]
        if neigh and np.any(amp[neigh] > 0.05 * amp[i]):
            continue
        sl = (slice(py[i] - h, py[i] + h + 1), slice(px[i] - h, px[i] + h + 1))
        if bad[sl].any() or np.any(img[sl] >= saturation):
            continue
        sw = _adaptive_sigma(img[sl] - bg, yy, xx, h / 2)
        if sw is not None and sw**2 > 1 / 12:
            sigmas.append(math.sqrt(sw**2 - 1.0 / 12.0))  # brightest first
    if not sigmas:
        raise ValueError("estimate_fwhm: no bright, isolated, unsaturated, unmasked star found")
    fwhms = np.asarray(sigmas) * 2.0 * math.sqrt(2.0 * math.log(2.0))
    locus = stellar_locus(fwhms, width=locus_width, min_fwhm=min_fwhm)
    if not locus.any():
        raise ValueError(f"estimate_fwhm: no star-like source among the {fwhms.size} measured (sizes "
                         f"{np.min(fwhms):.2f}..{np.max(fwhms):.2f} px, none >= min_fwhm {min_fwhm} px in a cluster)")
    return float(np.median(fwhms[locus][:max_stars]))
