"""Smooth sky background of an image: clipped medians in boxes, bilinearly interpolated.

:func:`estimate_background` with its helpers :func:`_nanmedian_rows` (row medians ignoring NaN in
one sort) and :func:`_interp_matrix` (separable linear interpolation as a small matrix).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dia.masks import BAD_FOR_FIT

__all__ = ["estimate_background"]


def _nanmedian_rows(values: np.ndarray) -> np.ndarray:
    """Median of each row ignoring NaN (one sort; NaN where a row has no finite value)."""
    finite = np.isfinite(values)
    n = finite.sum(axis=1)
    srt = np.sort(np.where(finite, values, np.inf), axis=1)
    lo = np.take_along_axis(srt, np.maximum((n - 1) // 2, 0)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(srt, np.maximum(n // 2, 0)[:, None], axis=1)[:, 0]
    return np.where(n > 0, 0.5 * (lo + hi), np.nan)


def _interp_matrix(n_out: int, centres: np.ndarray) -> np.ndarray:
    """(n_out, len(centres)) matrix of linear-interpolation weights (extrapolated beyond the end
    centres, so a sky gradient continues to the image border); centres are evenly spaced."""
    if centres.size == 1:
        return np.ones((n_out, 1), np.float32)
    pos = (np.arange(n_out) - centres[0]) / (centres[1] - centres[0])
    lo = np.clip(np.floor(pos), 0, centres.size - 2).astype(int)
    hi = lo + 1
    w = pos - lo
    mat = np.zeros((n_out, centres.size), np.float32)
    mat[np.arange(n_out), lo] += 1 - w
    mat[np.arange(n_out), hi] += w
    return mat


def estimate_background(image: np.ndarray, mask: np.ndarray | None = None, cell: int = 128,
                        at: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Smooth sky background: 3-sigma-clipped medians in ``cell`` x ``cell`` boxes, bilinearly interpolated.

    Medians use a regular subsample of each box (every 4th pixel per axis for
    large boxes), the only pixels read; the interpolation is separable (two small matrix products).
    With ``at = (ix, iy)`` (integer pixel indices inside the image) the surface is evaluated at those
    pixels only and an ``(N,)`` array returned: the full frame's values there, without making the frame.
    """
    ny, nx = image.shape
    cy, cx = max(1, ny // cell), max(1, nx // cell)
    hy, hx = ny // cy, nx // cx
    step = 4 if min(hy, hx) >= 64 else (2 if min(hy, hx) >= 32 else 1)

    def sample(plane):  # the subsample of every box, one row per box (only these pixels are read)
        boxes = plane[: cy * hy, : cx * hx].reshape(cy, hy, cx, hx)[:, ::step, :, ::step]
        return boxes.transpose(0, 2, 1, 3).reshape(cy * cx, -1)

    boxes = sample(image)
    boxes = np.where(np.isfinite(boxes), boxes, np.nan).astype(np.float32)
    if mask is not None:
        boxes = np.where((sample(mask) & int(BAD_FOR_FIT)) != 0, np.nan, boxes)
    med = _nanmedian_rows(boxes)
    mad = 1.4826 * _nanmedian_rows(np.abs(boxes - med[:, None]))
    grid = _nanmedian_rows(np.where(np.abs(boxes - med[:, None]) <= 3 * mad[:, None], boxes, np.nan)).reshape(cy, cx)
    if not np.isfinite(grid).any():
        return np.zeros(np.shape(at[0]) if at is not None else image.shape, dtype=np.float32)
    grid = np.where(np.isfinite(grid), grid, np.nanmedian(grid)).astype(np.float32)
    if min(cy, cx) >= 3:  # replace cells that stand out from their neighbours (a bright star's halo)
        smooth = ndimage.median_filter(grid, size=3, mode="nearest")
        spread = 1.4826 * np.median(np.abs(grid - smooth)) + 1e-6
        grid = np.where(np.abs(grid - smooth) > 5 * spread, smooth, grid)
    wy = _interp_matrix(ny, (np.arange(cy) + 0.5) * hy - 0.5)
    wx = _interp_matrix(nx, (np.arange(cx) + 0.5) * hx - 0.5)
    if at is not None:  # the rows of the two interpolation matrices at those pixels
        ix, iy = (np.asarray(v, np.intp) for v in at)
        return ((wy[iy] @ grid) * wx[ix]).sum(axis=1).astype(np.float32)
    return (wy @ grid @ wx.T).astype(np.float32)

