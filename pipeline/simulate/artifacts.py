"""Bogus signals: cosmic rays, hot pixels, bad columns, satellite trails, saturation and bleed trails.

Each function adds its signal to an image in place and returns a list of
truth records ``dict(kind, x, y, flux, length, flagged)`` in the image's
own pixel coordinates (the caller maps them onto the search grid).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dia.masks import MaskBits

__all__ = ["add_cosmic_rays", "add_hot_pixels", "add_bad_columns", "satellite_trail", "saturate_and_bleed"]


def add_cosmic_rays(image: np.ndarray, n: int, track_fraction: float, gain: float, rng) -> list[dict]:
    """Add ``n`` cosmic rays (electrons deposited, converted to ADU): 1-2 pixel hits and worm-like tracks.

    Tracks are random walks with angular persistence, 3-25 px long, with
    200-2500 e- per pixel; the truth position is the brightest pixel.
    """
    ny, nx = image.shape
    records = []
    for _ in range(n):
        x0, y0 = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        if rng.random() < track_fraction:
            length = int(rng.integers(3, 26))
            angle = rng.uniform(0, 2 * np.pi)
            turns = np.cumsum(rng.normal(0, 0.25, length))
            xs = x0 + np.cumsum(np.cos(angle + turns) * 0.9)
            ys = y0 + np.cumsum(np.sin(angle + turns) * 0.9)
            charge = rng.uniform(200, 2500, length) * rng.uniform(0.6, 1.4)
        else:
            k = int(rng.integers(1, 3))
            xs = x0 + np.array([0.0, rng.choice([-1.0, 1.0])])[:k]
            ys = y0 + np.zeros(k)
            charge = rng.uniform(300, 8000, k)
        ix = np.rint(xs).astype(int)
        iy = np.rint(ys).astype(int)
        ok = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        if not ok.any():
            continue
        ix, iy, adu = ix[ok], iy[ok], charge[ok] / gain
        np.add.at(image, (iy, ix), adu)
        b = int(np.argmax(adu))
        records.append(dict(kind="cosmic_ray", x=float(ix[b]), y=float(iy[b]), flux=float(adu.sum()),
                            length=float(np.hypot(np.ptp(ix), np.ptp(iy)) + 1), flagged=False))
    return records


def add_hot_pixels(image: np.ndarray, mask: np.ndarray, n: int, flagged_fraction: float,
                   saturation: float, rng) -> list[dict]:
    """Add ``n`` hot pixels (excess 300-30000 ADU); a fraction is flagged BAD."""
    ny, nx = image.shape
    records = []
    for _ in range(n):
        ix, iy = int(rng.integers(0, nx)), int(rng.integers(0, ny))
        excess = float(10 ** rng.uniform(2.5, 4.5))
        image[iy, ix] = min(image[iy, ix] + excess, saturation)
        flagged = bool(rng.random() < flagged_fraction)
        if flagged:
            mask[iy, ix] |= MaskBits.BAD
        records.append(dict(kind="hot_pixel", x=float(ix), y=float(iy), flux=excess, length=1.0, flagged=flagged))
    return records


def add_bad_columns(image: np.ndarray, mask: np.ndarray, n: int, flagged_fraction: float, rng) -> list[dict]:
    """Add ``n`` bad column segments: hot (+50-600 ADU) or dead (charge lost); a fraction is flagged BAD."""
    ny, nx = image.shape
    records = []
    for _ in range(n):
        ix = int(rng.integers(0, nx))
        length = int(rng.integers(min(50, ny), ny + 1))
        y0 = int(rng.integers(0, ny - length + 1))
        seg = slice(y0, y0 + length)
        if rng.random() < 0.6:
            level = float(rng.uniform(50, 600))
            image[seg, ix] += level
        else:
            level = -float(np.median(image[seg, ix])) * rng.uniform(0.7, 1.0)
            image[seg, ix] *= 1 - rng.uniform(0.7, 1.0)
        flagged = bool(rng.random() < flagged_fraction)
        if flagged:
            mask[seg, ix] |= MaskBits.BAD
        records.append(dict(kind="bad_column", x=float(ix), y=y0 + (length - 1) / 2, flux=level,
                            length=float(length), flagged=flagged))
    return records


def satellite_trail(shape, sigma_px: float, peak: float, rng, out: np.ndarray) -> dict:
    """Add a straight satellite trail with a Gaussian cross-section (ADU, before noise) to ``out``.

    Returns a record whose position is the trail point nearest the CCD centre.
    """
    ny, nx = shape
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    angle = rng.uniform(0, np.pi)
    # signed distance of the line from the centre: anywhere through the CCD
    d0 = rng.uniform(-0.45, 0.45) * min(nx, ny)
    nxv, nyv = -np.sin(angle), np.cos(angle)  # unit normal
    px, py = cx + d0 * nxv, cy + d0 * nyv
    width = max(sigma_px, 0.7)
    half = int(np.ceil(5 * width))
    # rows (or columns) loop keeps memory small: evaluate only the band around the line
    if abs(np.cos(angle)) >= abs(np.sin(angle)):  # mostly horizontal: loop over columns
        xs = np.arange(nx)
        yc = py + (xs - px) * np.tan(angle)
        for off in range(-half - 1, half + 2):
            yy = np.rint(yc).astype(int) + off
            ok = (yy >= 0) & (yy < ny)
            dist = (xs[ok] - px) * nxv + (yy[ok] - py) * nyv
            out[yy[ok], xs[ok]] += peak * np.exp(-0.5 * (dist / width) ** 2)
    else:
        ys = np.arange(ny)
        xc = px + (ys - py) / np.tan(angle)
        for off in range(-half - 1, half + 2):
            xx = np.rint(xc).astype(int) + off
            ok = (xx >= 0) & (xx < nx)
            dist = (xx[ok] - px) * nxv + (ys[ok] - py) * nyv
            out[ys[ok], xx[ok]] += peak * np.exp(-0.5 * (dist / width) ** 2)
    # chord length through the CCD
    t = np.linspace(-2 * max(nx, ny), 2 * max(nx, ny), 4001)
    lx, ly = px + t * np.cos(angle), py + t * np.sin(angle)
    inside = (lx >= 0) & (lx <= nx - 1) & (ly >= 0) & (ly <= ny - 1)
    length = float(inside.sum() * (t[1] - t[0]))
    return dict(kind="satellite", x=float(px), y=float(py), flux=float(peak * np.sqrt(2 * np.pi) * width),
                length=length, flagged=False, angle=float(np.degrees(angle)))


def saturate_and_bleed(model: np.ndarray, saturation: float) -> tuple[np.ndarray, list[dict]]:
    """Find saturated regions of a noiseless model and spill their excess charge along columns.

    The charge above ``saturation`` in each column of a saturated region
    fills that column up and down from the region at the saturation level
    (half each way).  Returns the boolean map of saturated + bleed pixels and
    one ``bleed`` record per region whose trail extends beyond its core.
    """
    ny, nx = model.shape
    sat = model >= saturation
    flagged = sat.copy()
    records = []
    if not sat.any():
        return flagged, records
    labels, nlab = ndimage.label(sat)
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        region = labels[sl] == k
        excess_cols = np.where(region, model[sl] - saturation, 0).sum(axis=0)
        y0, x0 = sl[0].start, sl[1].start
        extra = 0
        for j, excess in enumerate(excess_cols):
            rows = np.flatnonzero(region[:, j])
            if rows.size == 0:
                continue
            spill = int(np.ceil(excess / saturation / 2))
            top, bottom = y0 + rows.max(), y0 + rows.min()
            flagged[max(0, bottom - spill):bottom, x0 + j] = True
            flagged[top + 1:min(ny, top + 1 + spill), x0 + j] = True
            extra = max(extra, spill)
        if extra > 0:
            ys, xs = np.nonzero(region)
            records.append(dict(kind="bleed", x=float(x0 + xs.mean()), y=float(y0 + ys.mean()),
                                flux=float(excess_cols.sum()), length=float(sl[0].stop - sl[0].start + 2 * extra),
                                flagged=True))
    return flagged, records
