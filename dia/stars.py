"""Automatic choice of kernel-fit stars: bright, isolated, unsaturated, unmasked, spread out."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .backend import Backend, StepClock
from .config import PsfMatchConfig
from .masks import BAD_FOR_FIT, MaskBits

__all__ = ["StarSelectionError", "StarSelection", "select_stars", "REJECT_REASONS"]

# plain ints: CuPy kernels do not take enum scalars
_BAD = int(BAD_FOR_FIT)
_SAT = int(MaskBits.SAT)

#: Rejection reasons, in the order they are tested (a star counts under its first failing test).
REJECT_REASONS = ("edge", "too_faint", "saturated", "masked", "not_isolated", "no_counterpart", "clipped")


class StarSelectionError(ValueError):
    """Too few usable kernel-fit stars; the message and attributes say how many were found and why rejected."""

    def __init__(self, message: str, found: int = 0, usable: int = 0, rejected: dict[str, int] | None = None):
        super().__init__(message)
        self.found = found
        self.usable = usable
        self.rejected = dict(rejected or {})


@dataclasses.dataclass
class StarSelection:
    """Pixel positions (host int arrays) of the chosen stars and the bookkeeping of the choice."""

    y: np.ndarray
    x: np.ndarray
    found: int
    rejected: dict[str, int]
    not_selected: int


def describe_rejections(found: int, usable: int, rejected: dict[str, int], needed: int) -> str:
    """Human-readable summary used in StarSelectionError messages."""
    reasons = ", ".join(f"{k}: {v}" for k, v in rejected.items() if v) or "none"
    return (
        f"too few usable kernel-fit stars: {usable} usable, {needed} needed; "
        f"{found} candidate peaks found, rejected by reason ({reasons})"
    )


def _block_level(xp, cells, clip: float = 2.5, iterations: int = 3):
    """Sigma-clipped mean along the last axis, ignoring NaN (reductions only: cheap on a GPU).

    Returns ``(level, n_good)``; ``level`` is NaN where a row has no finite value.
    """
    ok = xp.isfinite(cells)
    vals = xp.where(ok, cells, 0)
    keep = ok
    for it in range(iterations + 1):
        n = keep.sum(axis=-1)
        mean = xp.where(keep, vals, 0).sum(axis=-1) / xp.maximum(n, 1)
        if it == iterations:
            break
        dev = xp.where(keep, vals - mean[..., None], 0)
        std = xp.sqrt((dev * dev).sum(axis=-1) / xp.maximum(n - 1, 1))
        keep = ok & (xp.abs(vals - mean[..., None]) <= clip * std[..., None])
    return xp.where(n > 0, mean, xp.nan), ok.sum(axis=-1)


def _level(be: Backend, img, var, mask, block: int = 128):
    """Coarse background map (clipped mean per ``block`` x ``block`` cell, every 4th pixel) and typical noise.

    Returns ``(bg_blocks, noise)``: per-cell sigma-clipped means (device
    array; cells without good pixels take the level of the others) and the
    square root of the typical cell variance.  Reductions only, no host round
    trip except the one noise scalar.
    """
    xp = be.xp
    step = 4
    sub = img[::step, ::step].astype(xp.float32)
    vsub, msub = var[::step, ::step].astype(xp.float32), mask[::step, ::step]
    good = ((msub & _BAD) == 0) & xp.isfinite(sub) & xp.isfinite(vsub) & (vsub > 0)
    b = block // step
    sy, sx = sub.shape
    by, bx = -(-sy // b), -(-sx // b)

    def cells(a):
        padded = xp.full((by * b, bx * b), xp.nan, dtype=xp.float32)
        padded[:sy, :sx] = xp.where(good, a, xp.float32(xp.nan))
        return padded.reshape(by, b, bx, b).transpose(0, 2, 1, 3).reshape(by * bx, b * b)

    both, n = _block_level(xp, xp.concatenate([cells(sub), cells(vsub)], axis=0))
    bg, v = both[: by * bx], both[by * bx :]
    # cells with no good pixel: the level of the others (or 0 / 1 when nothing is good)
    meds, _ = _block_level(xp, xp.stack([bg, v]))
    meds = meds[:, None]
    noise = float(xp.sqrt(meds[1, 0])) if bool(xp.isfinite(meds[1, 0])) else 1.0
    bg = xp.where(xp.isfinite(bg), bg, xp.nan_to_num(meds[0, 0]))
    return bg.reshape(by, bx).astype(xp.float32), noise


def _gather(xp, img, ys, xs, hw: int):
    """Cut ``(n, 2hw+1, 2hw+1)`` stamps centred on integer positions (all inside the image)."""
    off = xp.arange(-hw, hw + 1)
    yy = xp.asarray(ys)[:, None] + off[None, :]
    xx = xp.asarray(xs)[:, None] + off[None, :]
    return img[yy[:, :, None], xx[:, None, :]]


def select_stars(
    be: Backend,
    conv_img,
    conv_var,
    conv_mask,
    ref_img,
    ref_var,
    ref_mask,
    *,
    core_hw: int,
    kernel_hw: int,
    config: PsfMatchConfig,
    peak_method: str | None = None,
    timings: dict | None = None,
) -> StarSelection:
    """Find kernel-fit stars.

    Peaks are found in the image to be convolved (the sharper one), then
    tested in order: the stamp and its kernel margin inside the image
    (``edge``), peak S/N >= ``min_peak_snr`` (``too_faint``), no SAT pixel or
    value >= ``config.saturation`` in either stamp (``saturated``), no other
    BAD_FOR_FIT or non-finite pixel (``masked``), no neighbour peak brighter than
    ``isolation_ratio`` x its peak within the core (``not_isolated``), a peak
    with S/N >= ``min_peak_snr`` in the other image (``no_counterpart``, e.g. a
    transient or a bad pixel).  Survivors are spread over a grid of about
    ``grid_cells`` cells, brightest first per cell, up to ``max_stars``.

    ``peak_method`` (``"sparse"``: default on CPU, ``"filter"``: default on GPU)
    only changes how the same 5x5 local maxima are found.
    """
    xp = be.xp
    clock = StepClock(be, timings, "select")
    ny, nx = conv_img.shape
    block = 128
    bgb_c, noise_c = _level(be, conv_img, conv_var, conv_mask, block)
    bgb_r, noise_r = _level(be, ref_img, ref_var, ref_mask, block)
    bg_c = xp.repeat(xp.repeat(bgb_c, block, axis=0), block, axis=1)[:ny, :nx]
    clock("level")

    # local maxima (5x5) above detect_snr; non-finite pixels can't be peaks
    work = xp.where(xp.isfinite(conv_img), conv_img, -xp.inf).astype(xp.float32, copy=False)
    method = peak_method or ("sparse" if be.name == "cpu" else "filter")
    if method == "filter":  # two separable passes over the frame: cheapest on a GPU
        peak_map = (work == be.ndimage.maximum_filter(work, size=5, mode="nearest")) & (work - bg_c > config.detect_snr * noise_c)
        cy, cx = xp.nonzero(peak_map)
        val = work[cy, cx]
        is_peak = xp.ones(val.shape, dtype=bool)
    elif method == "sparse":  # threshold first, then test the neighbourhood of the few pixels above it
        cy, cx = xp.nonzero(work - bg_c > config.detect_snr * noise_c)
        val = work[cy, cx]
        is_peak = xp.ones(val.shape, dtype=bool)
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                if dy or dx:
                    ny_, nx_ = xp.clip(cy + dy, 0, ny - 1), xp.clip(cx + dx, 0, nx - 1)
                    is_peak &= val >= work[ny_, nx_]
    else:
        raise ValueError(f"peak_method must be 'sparse' or 'filter', got {peak_method!r}")
    py, px = be.asnumpy(cy[is_peak]), be.asnumpy(cx[is_peak])
    amp = be.asnumpy(val[is_peak] - bg_c[cy[is_peak], cx[is_peak]]).astype(np.float64)
    found = int(py.size)
    clock("peaks")
    rejected = {k: 0 for k in REJECT_REASONS}
    if found == 0:
        return StarSelection(np.zeros(0, int), np.zeros(0, int), 0, rejected, 0)

    full = core_hw + kernel_hw
    alive = np.ones(found, bool)

    def reject(bad: np.ndarray, reason: str) -> None:
        bad = bad & alive
        rejected[reason] += int(bad.sum())
        alive[bad] = False

    reject((py < full) | (px < full) | (py >= ny - full) | (px >= nx - full), "edge")
    reject(amp < config.min_peak_snr * noise_c, "too_faint")

    idx = np.nonzero(alive)[0]
    if idx.size:
        ys, xs = xp.asarray(py[idx]), xp.asarray(px[idx])  # one small host->device copy
        mc = _gather(xp, conv_mask, ys, xs, full)
        mr = _gather(xp, ref_mask, ys, xs, core_hw)
        vc = _gather(xp, conv_img, ys, xs, full)
        vr = _gather(xp, ref_img, ys, xs, core_hw)
        varc = _gather(xp, conv_var, ys, xs, full)
        varr = _gather(xp, ref_var, ys, xs, core_hw)
        sat = (
            ((mc & _SAT) != 0).any(axis=(1, 2))
            | ((mr & _SAT) != 0).any(axis=(1, 2))
            | (vc >= config.saturation).any(axis=(1, 2))
            | (vr >= config.saturation).any(axis=(1, 2))
        )
        bad = (
            ((mc & _BAD) != 0).any(axis=(1, 2))
            | ((mr & _BAD) != 0).any(axis=(1, 2))
            | ~xp.isfinite(vc).all(axis=(1, 2))
            | ~xp.isfinite(vr).all(axis=(1, 2))
            | ~(xp.isfinite(varc) & (varc > 0)).all(axis=(1, 2))
            | ~(xp.isfinite(varr) & (varr > 0)).all(axis=(1, 2))
        )
        c = core_hw
        ref_peak = vr[:, c - 1 : c + 2, c - 1 : c + 2].max(axis=(1, 2)) - bgb_r[ys // block, xs // block]
        # one device->host copy for the three per-star results
        res = be.asnumpy(xp.stack([sat.astype(xp.float64), bad.astype(xp.float64), ref_peak.astype(xp.float64)]))
        flags = np.zeros(found, bool)
        flags[idx] = res[0] > 0
        reject(flags, "saturated")
        flags[:] = False
        flags[idx] = res[1] > 0
        reject(flags, "masked")

        # isolation against every detected peak (a small host-side search, vectorised over pairs)
        from scipy.spatial import cKDTree

        pairs = cKDTree(np.column_stack([py, px])).query_pairs(r=core_hw, output_type="ndarray")
        notiso = np.zeros(found, bool)
        if len(pairs):
            i, j = pairs[:, 0], pairs[:, 1]
            np.logical_or.at(notiso, i, amp[j] > config.isolation_ratio * amp[i])
            np.logical_or.at(notiso, j, amp[i] > config.isolation_ratio * amp[j])
        reject(notiso, "not_isolated")

        flags[:] = False
        rp = np.full(found, np.inf)
        rp[idx] = res[2]
        reject(~(rp >= config.min_peak_snr * noise_r), "no_counterpart")

    clock("tests")
    good = np.nonzero(alive)[0]
    # spread over a grid: brightest per cell first, then fill with the brightest left
    gx = max(1, int(round(math.sqrt(config.grid_cells * nx / ny))))
    gy = max(1, int(round(config.grid_cells / gx)))
    per_cell = max(1, math.ceil(config.max_stars / (gx * gy)))
    order = good[np.argsort(-amp[good], kind="stable")]
    cell = (py[order] * gy // ny) * gx + (px[order] * gx // nx)
    # rank of each star within its cell (0 = brightest): stable sort by cell keeps brightness order
    by_cell = np.argsort(cell, kind="stable")
    sorted_cells = cell[by_cell]
    starts = np.searchsorted(sorted_cells, sorted_cells, side="left")
    rank = np.empty(order.size, int)
    rank[by_cell] = np.arange(order.size) - starts
    first = order[rank < per_cell]
    rest = order[rank >= per_cell]
    chosen = np.concatenate([first, rest])[: config.max_stars]
    return StarSelection(py[chosen].astype(int), px[chosen].astype(int), found, rejected, int(good.size - chosen.size))
