"""PSF FWHM measurement from bright isolated stars (adaptive Gaussian moments)."""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage
from scipy.spatial import cKDTree

from .masks import BAD_FOR_FIT

__all__ = ["estimate_fwhm"]


def estimate_fwhm(image, mask=None, *, saturation: float = math.inf, max_stars: int = 200,
                  half_width: int = 12) -> float:
    """Median PSF FWHM [px] of bright, isolated, unsaturated, unmasked stars.

    Each star's width comes from adaptive Gaussian-weighted second moments
    (the weight width is iterated until it matches the star, at which point
    a Gaussian PSF's sigma is recovered exactly); 1/12 px^2 of pixelisation is
    removed before converting sigma to FWHM.

    Parameters
    ----------
    image : 2-D array
        Image [ADU] (NumPy or CuPy; measured on the host).
    mask : 2-D int array, optional
        Bit mask; stars touching ``BAD_FOR_FIT`` pixels are skipped.
    saturation : float
        Stars with any pixel at or above this value are skipped.
    max_stars, half_width : int
        Number of brightest usable stars measured and their stamp half-width [px].

    Raises
    ------
    ValueError
        If the image is not 2-D or no usable star is found.
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
    inside = (py >= h) & (px >= h) & (py < ny - h) & (px < nx - h) & (amp > 30 * noise)
    tree = cKDTree(np.column_stack([py, px])) if py.size else None
    sigmas = []
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1].astype(np.float64)
    for i in np.argsort(-amp):
        if len(sigmas) >= max_stars:
            break
        if not inside[i]:
            continue
        neigh = [j for j in tree.query_ball_point([py[i], px[i]], r=h) if j != i]
        if neigh and np.any(amp[neigh] > 0.05 * amp[i]):
            continue
        sl = (slice(py[i] - h, py[i] + h + 1), slice(px[i] - h, px[i] + h + 1))
        if bad[sl].any() or np.any(img[sl] >= saturation):
            continue
        st = img[sl] - bg
        sw = 2.0
        cy = cx = 0.0
        ok = False
        for _ in range(30):
            w = np.exp(-0.5 * ((xx - cx) ** 2 + (yy - cy) ** 2) / sw**2)
            f = (w * st).sum()
            if f <= 0:
                break
            cx, cy = (w * st * xx).sum() / f, (w * st * yy).sum() / f
            m2 = (w * st * ((xx - cx) ** 2 + (yy - cy) ** 2)).sum() / (2 * f)
            if not 0 < m2 < sw**2:
                break
            new = math.sqrt(1.0 / (1.0 / m2 - 1.0 / sw**2))
            if abs(new - sw) < 1e-4:
                ok = True
                sw = new
                break
            sw = min(new, h / 2)
        if ok and sw**2 > 1 / 12:
            sigmas.append(math.sqrt(sw**2 - 1.0 / 12.0))
    if not sigmas:
        raise ValueError("estimate_fwhm: no bright, isolated, unsaturated, unmasked star found")
    return float(np.median(sigmas) * 2.0 * math.sqrt(2.0 * math.log(2.0)))
