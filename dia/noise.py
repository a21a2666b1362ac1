"""Noise correlation of the convolved image and what it does to the variance of ``K * X``.

The variance plane of a difference propagates the per-pixel variance of the convolved image
``X`` as ``sum_u K(u)^2 V_X``, which holds for white noise.  Stacks and resampled images have
positively correlated noise, and then the convolution adds neighbouring noise coherently:

    Var(K * X) = V_X sum_d C(d) A_K(d),    A_K(d) = sum_u K(u) K(u + d)

with ``C(d)`` the noise covariance at lag ``d`` in units of the variance plane (``C(0)`` is the
ratio of the pixels' variance to the plane, below 1 for an interpolated image whose plane was
not reduced).  :func:`noise_covariance` measures ``C`` on the blank sky of ``X`` (sources,
flagged pixels and their neighbours left out; only lags whose correlation is significant, so that
white noise gives exactly ``C = delta``), and :func:`correlation_factor` gives the factor
``sum_d C(d) A_K(d) / A_K(0)`` applied to the convolved image's variance term.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import Backend
from .fused import grow_mask_box
from .masks import BAD_FOR_FIT
from .stars import _block_median, cell_stack
from .stats import robust_std

__all__ = ["noise_covariance", "correlation_factor", "kernel_correlation"]

_BAD = int(BAD_FOR_FIT)


def noise_covariance(be: Backend, image, variance, mask, *, max_lag: int = 3, cell: int = 32, clip: float = 5.0,
                     smooth: float = 1.5, grow: int = 6, significance: float = 5.0, max_side: int = 512) -> np.ndarray:
    """Noise covariance ``C[dy + L, dx + L]`` (lags up to ``L = max_lag``) of an image, in units of its variance plane.

    Measured on a central crop of at most ``max_side`` px: ``z = (image - cell median) / sqrt(variance)``,
    sources left out (pixels beyond ``clip`` robust sigma in ``z`` or in ``z`` smoothed by a Gaussian of
    ``smooth`` px, grown by ``grow`` px, and flagged pixels).  A covariance floor common to all lags
    (structure larger than them: halos, background residuals), measured at the lags just beyond
    ``max_lag``, is taken off.  The correlation at a lag counts only when it exceeds
    ``significance`` / sqrt(pairs); ``C(0)`` is the robust variance of ``z`` on the sky.  White noise
    (no significant lag) returns ``C = delta`` exactly (the plane trusted as it is).
    """
    xp = be.xp
    n_lag = 2 * max_lag + 1
    delta = np.zeros((n_lag, n_lag))
    delta[max_lag, max_lag] = 1.0
    ny, nx = image.shape
    cy, cx = min(ny, max_side), min(nx, max_side)
    y0, x0 = (ny - cy) // 2, (nx - cx) // 2
    img = image[y0 : y0 + cy, x0 : x0 + cx].astype(xp.float64)
    var = variance[y0 : y0 + cy, x0 : x0 + cx].astype(xp.float64)
    good = ((mask[y0 : y0 + cy, x0 : x0 + cx] & _BAD) == 0) & xp.isfinite(img) & xp.isfinite(var) & (var > 0)
    # local sky: the median of each cell (a smooth background would bias the products)
    cells, (by, bx) = cell_stack(xp, img, good, cell)
    med, _ = _block_median(xp, cells)
    fill = float(be.asnumpy(_block_median(xp, med[None])[0])[0]) if bool(xp.isfinite(med).any()) else 0.0
    med = xp.where(xp.isfinite(med), med, fill).reshape(by, bx)
    sky = xp.repeat(xp.repeat(med, cell, axis=0), cell, axis=1)[:cy, :cx]
    z = (img - sky) / xp.sqrt(xp.where(good, var, 1.0))
    zg = z[good]
    if int(zg.size) < 1000:
        return delta
    scale = robust_std(zg, xp)
    if not scale > 0:
        return delta
    # sources: above ``clip`` sigma in z smoothed by a Gaussian of ``smooth`` px (against its own robust noise, so
    # that faint wings go too), or single pixels beyond ``clip`` sigma; grown by ``grow`` px
    zs = be.ndimage.gaussian_filter(xp.where(good, z, 0.0), smooth)
    zsg = zs[good]
    s_scale = robust_std(zsg, xp)
    source = (zs > clip * s_scale) | (xp.abs(z) > clip * scale)
    good &= ~grow_mask_box(xp, source | ~good, grow, border=False)
    w = good.astype(xp.float64)
    n0 = float(w.sum())
    if n0 < 1000:
        return delta
    zg = z[good]
    z = xp.where(good, z - xp.mean(zg), 0.0)
    c0_robust = robust_std(zg, xp) ** 2
    outer = max_lag + 2
    products, pair_counts = {}, {}
    for dy in range(0, outer + 1):
        for dx in range(-outer, outer + 1):
            if dy == 0 and dx < 0:
                continue
            a = z[dy:, max(dx, 0) : cx + min(dx, 0)]
            b = z[: cy - dy, max(-dx, 0) : cx - max(dx, 0)]
            wa = w[dy:, max(dx, 0) : cx + min(dx, 0)]
            wb = w[: cy - dy, max(-dx, 0) : cx - max(dx, 0)]
            pairs = float((wa * wb).sum())
            if pairs >= 100:
                products[dy, dx] = float((a * b).sum()) / pairs
                pair_counts[dy, dx] = pairs
    # a floor common to every lag (structure larger than the lags: galaxy halos, background residuals) is
    # measured on the lags just beyond max_lag and taken off
    ring = [v for (dy, dx), v in products.items() if max(dy, abs(dx)) > max_lag]
    floor = float(np.median(ring)) if ring else 0.0
    c0 = products.get((0, 0), 0.0) - floor
    if not c0 > 0:
        return delta
    cov = np.zeros((n_lag, n_lag))
    significant = False
    for (dy, dx), v in products.items():
        if max(dy, abs(dx)) > max_lag or (dy, dx) == (0, 0):
            continue
        rho = (v - floor) / c0
        if abs(rho) > significance / math.sqrt(pair_counts[dy, dx]):
            significant = True
            cov[max_lag + dy, max_lag + dx] = cov[max_lag - dy, max_lag - dx] = rho
    if not significant:
        return delta
    # in units of the variance plane: C(0) is the robust variance of z on the sky
    cov[max_lag, max_lag] = 1.0
    return cov * c0_robust


def kernel_correlation(a: np.ndarray, b: np.ndarray, lag: int) -> np.ndarray:
    """``out[L + dy, L + dx] = sum_u b(u) a(u + d)`` for ``|dy|, |dx| <= lag``: the central ``2 lag + 1`` square of
    ``scipy.signal.correlate2d(a, b, "full")`` (two kernels of one shape), without importing scipy.signal (~0.5 s)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    ny, nx = b.shape
    padded = np.pad(a, lag)
    out = np.empty((2 * lag + 1, 2 * lag + 1))
    for i in range(2 * lag + 1):
        for j in range(2 * lag + 1):
            out[i, j] = float(np.sum(padded[i : i + ny, j : j + nx] * b))
    return out


def correlation_factor(cov: np.ndarray, kernel: np.ndarray) -> float:
    """``sum_d C(d) A_K(d) / A_K(0)``: the variance of ``K * X`` over the white-noise propagation ``sum K^2 V_X``."""
    lag = cov.shape[0] // 2
    auto = kernel_correlation(kernel, kernel, lag)  # A_K around lag 0
    return float((cov * auto).sum() / auto[lag, lag])
