"""Mask tests behind the candidate flags: near a flagged pixel, too close to the border or to no data.

:func:`near_mask_at` (a mask bit within a square radius of each candidate pixel) and
:func:`edge_distance_ok_at` (at least ``edge`` pixels from the border and from ``NO_DATA``),
evaluated at the candidates' pixels only, shared by both detection modes; :func:`_near_mask` and
:func:`_edge_distance_ok` are the previous full-frame maps (maximum filters), the ``"reference"``
method, giving the same answers.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dia.masks import MaskBits

__all__ = ["near_mask_at", "edge_distance_ok_at"]

#: Candidates per chunk of the window gathers (bounds the temporary memory to ~40 MB).
_CHUNK_PIXELS = 8_000_000


def _near_mask(mask: np.ndarray, bits: int, radius: int) -> np.ndarray:
    hit = (mask & bits) != 0
    if radius > 0 and hit.any():
        hit = ndimage.maximum_filter(hit, size=2 * radius + 1)
    return hit


def _edge_distance_ok(mask: np.ndarray, edge: int) -> np.ndarray:
    """True where the pixel is at least ``edge`` px from the border and from NO_DATA."""
    ny, nx = mask.shape
    ok = np.zeros(mask.shape, bool)
    if ny > 2 * edge and nx > 2 * edge:
        ok[edge : ny - edge, edge : nx - edge] = True
    nodata = (mask & int(MaskBits.NO_DATA)) != 0
    if nodata.any() and edge > 0:
        # distance transform on a coarse grid would do; the maximum filter is exact and fast enough
        ok &= ~ndimage.maximum_filter(nodata, size=2 * edge + 1)
    return ok


def near_mask_at(mask: np.ndarray, bits: int, radius: int, iy: np.ndarray, ix: np.ndarray,
                 method: str = "fast") -> np.ndarray:
    """Whether a pixel with ``mask & bits`` lies within ``radius`` pixels (a square) of each ``(iy, ix)``.

    ``"fast"`` reads the windows around the given pixels only (clipped to the image, which is
    what the full-frame maximum filter of ``"reference"`` amounts to there).
    """
    iy = np.asarray(iy, np.intp)
    ix = np.asarray(ix, np.intp)
    if method == "reference":
        return _near_mask(mask, bits, radius)[iy, ix]
    if radius <= 0 or iy.size == 0:
        return (mask[iy, ix] & bits) != 0
    ny, nx = mask.shape
    offs = np.arange(-radius, radius + 1)
    out = np.zeros(iy.size, bool)
    chunk = max(1, _CHUNK_PIXELS // offs.size**2)
    for s in range(0, iy.size, chunk):
        rows = np.clip(iy[s : s + chunk, None] + offs, 0, ny - 1)
        cols = np.clip(ix[s : s + chunk, None] + offs, 0, nx - 1)
        out[s : s + chunk] = ((mask[rows[:, :, None], cols[:, None, :]] & bits) != 0).any(axis=(1, 2))
    return out


def edge_distance_ok_at(mask: np.ndarray, edge: int, iy: np.ndarray, ix: np.ndarray,
                        method: str = "fast") -> np.ndarray:
    """Whether each ``(iy, ix)`` is at least ``edge`` pixels from the border and from ``NO_DATA``."""
    iy = np.asarray(iy, np.intp)
    ix = np.asarray(ix, np.intp)
    if method == "reference":
        return _edge_distance_ok(mask, edge)[iy, ix]
    ny, nx = mask.shape
    if not (ny > 2 * edge and nx > 2 * edge):
        return np.zeros(iy.size, bool)
    ok = (iy >= edge) & (iy < ny - edge) & (ix >= edge) & (ix < nx - edge)
    if edge > 0 and ok.any():
        ok[ok] = ~near_mask_at(mask, int(MaskBits.NO_DATA), edge, iy[ok], ix[ok])
    return ok
