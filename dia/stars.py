"""Automatic choice of kernel-fit stars: bright, isolated, unsaturated, unmasked, spread out."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .backend import Backend, StepClock
from .config import PsfMatchConfig
from .masks import BAD_FOR_FIT, MaskBits

__all__ = ["StarSelectionError", "StarSelection", "select_stars", "REJECT_REASONS", "stars_needed", "choose_orders"]

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
    """Pixel positions (host int arrays) of the chosen stars and the bookkeeping of the choice.

    ``peak_snr_cut`` is the peak S/N cut applied (``min_peak_snr``, or lower down to
    ``min_peak_snr_floor`` when too few stars passed it).
    """

    y: np.ndarray
    x: np.ndarray
    found: int
    rejected: dict[str, int]
    not_selected: int
    peak_snr_cut: float = math.nan


def _n_terms(order: int) -> int:
    return (order + 1) * (order + 2) // 2


def stars_needed(config: PsfMatchConfig) -> int:
    """Usable stars needed for a fit with the configured orders (no fallback).

    ``max(min_stars, terms(spatial_order) + 1, terms(background_order) + 1)``.
    """
    return max(config.min_stars, _n_terms(config.spatial_order) + 1, _n_terms(config.background_order) + 1)


def _absolute_min(config: PsfMatchConfig) -> int:
    return max(2, min(config.fallback_min_stars, config.min_stars)) if config.order_fallback else stars_needed(config)


def choose_orders(n_stars: int, config: PsfMatchConfig) -> tuple[int, int, str] | None:
    """Spatial and background orders a fit with ``n_stars`` usable stars can afford.

    Parameters
    ----------
    n_stars : int
        Usable kernel-fit stars.
    config : PsfMatchConfig
        ``spatial_order``, ``background_order``, ``min_stars``, ``order_fallback``,
        ``fallback_stars_per_term``, ``fallback_min_stars``.

    Returns
    -------
    tuple or None
        ``(spatial_order, background_order, why)``: the configured orders and ``""`` with at least
        :func:`stars_needed` stars; otherwise (``order_fallback``) each order lowered to the highest
        ``o`` with ``n_stars >= max(fallback_min_stars, ceil(fallback_stars_per_term * terms(o)))``
        and ``why`` saying so; ``None`` when no fit can be made (fewer than ``fallback_min_stars``,
        or fewer than ``min_stars`` without ``order_fallback``).
    """
    if n_stars >= stars_needed(config):
        return config.spatial_order, config.background_order, ""
    if not config.order_fallback or n_stars < _absolute_min(config):
        return None

    def highest(order: int) -> int:
        while order > 0 and n_stars < max(_absolute_min(config), math.ceil(config.fallback_stars_per_term
                                                                           * _n_terms(order))):
            order -= 1
        return order

    so, bo = highest(config.spatial_order), highest(config.background_order)
    why = (f"{n_stars} usable kernel-fit stars < {stars_needed(config)} needed for spatial_order "
           f"{config.spatial_order} / background_order {config.background_order} (psf_match.min_stars): "
           f"fitted spatial_order {so}, background_order {bo} (psf_match.order_fallback, "
           f"fallback_stars_per_term {config.fallback_stars_per_term:g})")
    return so, bo, why


#: The PsfMatchConfig setting that controls each rejection reason (named in error messages).
REASON_SETTINGS = {
    "edge": "kernel_size / stamp_half_width: margin kernel half-width + stamp half-width",
    "too_faint": "min_peak_snr / min_peak_snr_floor, detect_snr",
    "saturated": "saturation and the SAT mask bit",
    "masked": "the input masks",
    "not_isolated": "isolation_ratio",
    "no_counterpart": "min_peak_snr / min_peak_snr_floor",
    "clipped": "clip_sigma",
}


def describe_rejections(found: int, usable: int, rejected: dict[str, int], needed: int,
                        peak_snr_cut: float = math.nan) -> str:
    """Human-readable summary used in StarSelectionError messages, naming the settings involved."""
    reasons = ", ".join(f"{k}: {v} [{REASON_SETTINGS.get(k, '?')}]" for k, v in rejected.items() if v) or "none"
    cut = f" at peak S/N cut {peak_snr_cut:.3g}" if math.isfinite(peak_snr_cut) else ""
    return (
        f"too few usable kernel-fit stars: {usable} usable, {needed} needed (psf_match.min_stars for the "
        f"configured spatial_order / background_order, or one more than their terms; with "
        f"psf_match.order_fallback the orders are lowered down to psf_match.fallback_min_stars stars); "
        f"{found} candidate peaks found{cut}, rejected by reason ({reasons}); the psf_match settings in brackets "
        f"control each reason"
    )


def cell_stack(xp, values, good, cell: int):
    """``values`` cut into ``cell`` x ``cell`` cells, one row of samples per cell (NaN where not ``good``
    and past the edge): ``(stack (by * bx, cell * cell), (by, bx))``, in ``values``' dtype."""
    sy, sx = values.shape
    by, bx = -(-sy // cell), -(-sx // cell)
    padded = xp.full((by * cell, bx * cell), xp.nan, dtype=values.dtype)
    padded[:sy, :sx] = xp.where(good, values, values.dtype.type(xp.nan))
    return padded.reshape(by, cell, bx, cell).transpose(0, 2, 1, 3).reshape(by * bx, cell * cell), (by, bx)


def _block_median(xp, cells):
    """Median along the last axis ignoring NaN (sort with NaN last, pick the middle finite values).

    Returns ``(median, n_finite)``; the median is NaN where a row has no finite value.
    """
    n = xp.isfinite(cells).sum(axis=-1)
    srt = xp.sort(xp.where(xp.isfinite(cells), cells, xp.inf), axis=-1)
    lo = xp.take_along_axis(srt, xp.maximum((n - 1) // 2, 0)[..., None], axis=-1)[..., 0]
    hi = xp.take_along_axis(srt, xp.maximum(n // 2, 0)[..., None], axis=-1)[..., 0]
    return xp.where(n > 0, 0.5 * (lo + hi), xp.nan), n


def _levels(be: Backend, images, block: int = 128):
    """Coarse background maps and typical noise of several ``(img, var, mask)`` triples at once.

    Each background map holds the median of every 8th good pixel (per axis) in each
    ``block`` x ``block`` cell (cells without good pixels take the median of
    the others); the noise is the square root of the median of the cells'
    median variances.  All planes go through one batched sort (few kernel
    launches on a GPU); the only host round trip is the noise scalars.
    """
    xp = be.xp
    step = 8  # 256 samples per 128 x 128 cell: plenty for a median, and a small sort
    b = block // step
    stacks = []
    for img, var, mask in images:
        sub = img[::step, ::step].astype(xp.float32)
        vsub = var[::step, ::step].astype(xp.float32)
        good = ((mask[::step, ::step] & _BAD) == 0) & xp.isfinite(sub) & xp.isfinite(vsub) & (vsub > 0)
        for a in (sub, vsub):
            cells, (by, bx) = cell_stack(xp, a, good, b)
            stacks.append(cells)
    med, _ = _block_median(xp, xp.stack(stacks))  # (2 * n_images, cells)
    fill, _ = _block_median(xp, med)  # per plane: the median over cells
    noise = be.asnumpy(xp.sqrt(fill[1::2]))
    out = []
    for k in range(len(images)):
        bg = xp.where(xp.isfinite(med[2 * k]), med[2 * k], xp.nan_to_num(fill[2 * k]))
        nz = float(noise[k]) if np.isfinite(noise[k]) and noise[k] > 0 else 1.0
        out.append((bg.reshape(by, bx).astype(xp.float32), nz))
    return out


def _gather(xp, img, ys, xs, hw: int):
    """Cut ``(n, 2hw+1, 2hw+1)`` stamps centred on integer positions (all inside the image).

    On NumPy the stamps are taken from a strided view of all windows (one block copy per stamp
    row, ~20x faster than indexing every pixel); other array modules index every pixel.
    """
    if xp is np:
        ny, nx = img.shape
        s0, s1 = img.strides
        size = 2 * hw + 1
        windows = np.lib.stride_tricks.as_strided(img, shape=(ny - 2 * hw, nx - 2 * hw, size, size),
                                                  strides=(s0, s1, s0, s1), writeable=False)
        return windows[np.asarray(ys) - hw, np.asarray(xs) - hw]
    off = xp.arange(-hw, hw + 1)
    yy = xp.asarray(ys)[:, None] + off[None, :]
    xx = xp.asarray(xs)[:, None] + off[None, :]
    return img[yy[:, :, None], xx[:, None, :]]


def _above_threshold(xp, img, bg_blocks, block: int, thr: float):
    """Pixels with ``img - background > thr`` (finite values only), one row of background blocks at a time.

    Returns ``(y, x, value)`` with ``value`` in float32; the background is the block map
    ``bg_blocks`` repeated over ``block x block`` cells (no full-frame temporary).
    """
    ny, nx = img.shape
    ys, xs, vals = [], [], []
    for b in range(bg_blocks.shape[0]):
        r0, r1 = b * block, min((b + 1) * block, ny)
        if r0 >= ny:
            break
        rows = img[r0:r1].astype(xp.float32, copy=False)
        bg_row = xp.repeat(bg_blocks[b], block)[:nx]
        above = (rows - bg_row[None, :]) > thr  # NaN compares False
        flat = xp.flatnonzero(above)  # (much faster than a 2-D nonzero)
        cy, cx = flat // nx, flat % nx
        v = rows.reshape(-1)[flat]
        ok = xp.isfinite(v)  # +inf is not a peak
        ys.append(cy[ok] + r0)
        xs.append(cx[ok])
        vals.append(v[ok])
    return xp.concatenate(ys), xp.concatenate(xs), xp.concatenate(vals)


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
    (``edge``: the margin is the kernel half-width + the stamp half-width, the pixels
    the convolved stamp needs), peak S/N >= the cut in the convolved image against its
    own noise (``too_faint``), no SAT pixel or
    value >= ``config.saturation`` in either stamp (``saturated``), no other
    BAD_FOR_FIT or non-finite pixel (``masked``), no neighbour peak brighter than
    ``isolation_ratio`` x its peak within the core (``not_isolated``), a peak
    with S/N >= the cut in the other image against that image's noise
    (``no_counterpart``, e.g. a transient or a bad pixel).  The cut is
    ``min_peak_snr``; when fewer than :func:`stars_needed` stars pass it, it is
    lowered to the S/N (the lower of the two images) of the star that makes that
    number, but not below ``min_peak_snr_floor`` (small or sparse frames).
    Survivors are spread over a grid of about ``grid_cells`` cells, brightest
    first per cell, up to ``max_stars``.

    ``peak_method`` (``"sparse"``: default on CPU, ``"filter"``: default on GPU)
    only changes how the same 5x5 local maxima are found.
    """
    xp = be.xp
    clock = StepClock(be, timings, "select")
    ny, nx = conv_img.shape
    block = 128
    (bgb_c, noise_c), (bgb_r, noise_r) = _levels(be, [(conv_img, conv_var, conv_mask), (ref_img, ref_var, ref_mask)],
                                                 block)
    clock("level")

    # local maxima (5x5) above detect_snr; non-finite pixels can't be peaks
    thr = config.detect_snr * noise_c
    method = peak_method or ("sparse" if be.name == "cpu" else "filter")
    if method == "filter":  # two separable passes over the frame: cheapest on a GPU
        bg_c = xp.repeat(xp.repeat(bgb_c, block, axis=0), block, axis=1)[:ny, :nx]
        work = xp.where(xp.isfinite(conv_img), conv_img, -xp.inf).astype(xp.float32, copy=False)
        peak_map = (work == be.ndimage.maximum_filter(work, size=5, mode="nearest")) & (work - bg_c > thr)
        cy, cx = xp.nonzero(peak_map)
        val = work[cy, cx]
        amp_dev = val - bg_c[cy, cx]
    elif method == "sparse":  # threshold first, then test the neighbourhood of the few pixels above it
        cy, cx, val = _above_threshold(xp, conv_img, bgb_c, block, thr)
        # the 8 nearest neighbours first: most candidates (the other pixels of a star) fail there, and
        # the survivors are compacted before the outer ring of the 5x5 box is tested
        rings = ([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx],
                 [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if max(abs(dy), abs(dx)) == 2])
        for ring in rings:
            is_peak = xp.ones(val.shape, dtype=bool)
            for dy, dx in ring:
                nb = conv_img[xp.clip(cy + dy, 0, ny - 1), xp.clip(cx + dx, 0, nx - 1)].astype(xp.float32)
                is_peak &= (val >= nb) | ~xp.isfinite(nb)  # a non-finite neighbour counts as -inf
            cy, cx, val = cy[is_peak], cx[is_peak], val[is_peak]
        amp_dev = val - bgb_c[cy // block, cx // block]
    else:
        raise ValueError(f"peak_method must be 'sparse' or 'filter', got {peak_method!r}")
    py, px = be.asnumpy(cy), be.asnumpy(cx)
    amp = be.asnumpy(amp_dev).astype(np.float64)
    found = int(py.size)
    clock("peaks")
    rejected = {k: 0 for k in REJECT_REASONS}
    if found == 0:
        return StarSelection(np.zeros(0, int), np.zeros(0, int), 0, rejected, 0, float(config.min_peak_snr))

    full = core_hw + kernel_hw
    edge = (py < full) | (px < full) | (py >= ny - full) | (px >= nx - full)
    cache: dict = {}

    def judge(cut: float):
        """Apply the tests in order with peak S/N cut ``cut``; returns ``(alive, rejected, snr)``."""
        alive = np.ones(found, bool)
        rej = {k: 0 for k in REJECT_REASONS}

        def reject(bad: np.ndarray, reason: str) -> None:
            bad = bad & alive
            rej[reason] += int(bad.sum())
            alive[bad] = False

        reject(edge, "edge")
        reject(amp < cut * noise_c, "too_faint")
        snr = np.full(found, -np.inf)  # the lower peak S/N of the two images (each against its own noise)
        idx = np.nonzero(alive)[0]
        if idx.size:
            todo = np.array([i for i in idx if i not in cache], dtype=int)
            if todo.size:
                ys, xs = xp.asarray(py[todo]), xp.asarray(px[todo])  # one small host->device copy
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
                res = be.asnumpy(xp.stack([sat.astype(xp.float64), bad.astype(xp.float64),
                                           ref_peak.astype(xp.float64)]))
                for j, i in enumerate(todo):
                    cache[int(i)] = (res[0, j] > 0, res[1, j] > 0, res[2, j])
            res = np.array([cache[int(i)] for i in idx], dtype=np.float64).T
            flags = np.zeros(found, bool)
            flags[idx] = res[0] > 0
            reject(flags, "saturated")
            flags[:] = False
            flags[idx] = res[1] > 0
            reject(flags, "masked")
            reject(notiso, "not_isolated")
            rp = np.full(found, np.inf)
            rp[idx] = res[2]
            reject(~(rp >= cut * noise_r), "no_counterpart")
            snr[idx] = np.minimum(amp[idx] / noise_c, rp[idx] / noise_r)
        return alive, rej, snr

    # isolation against every detected peak (a small host-side search, vectorised over pairs)
    from scipy.spatial import cKDTree

    pairs = cKDTree(np.column_stack([py, px])).query_pairs(r=core_hw, output_type="ndarray")
    notiso = np.zeros(found, bool)
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        np.logical_or.at(notiso, i, amp[j] > config.isolation_ratio * amp[i])
        np.logical_or.at(notiso, j, amp[i] > config.isolation_ratio * amp[j])

    cut = float(config.min_peak_snr)
    alive, rejected, _ = judge(cut)
    wanted = stars_needed(config)
    floor = min(float(config.min_peak_snr_floor), cut)
    if alive.sum() < wanted and floor < cut:
        # small or sparse frame: lower the cut just enough to keep ``wanted`` stars (not below the floor)
        ok, _, snr = judge(floor)
        ranked = np.sort(snr[ok])[::-1]
        cut = float(max(floor, ranked[wanted - 1])) if ranked.size >= wanted else floor
        alive, rejected, _ = judge(cut)

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
    return StarSelection(py[chosen].astype(int), px[chosen].astype(int), found, rejected, int(good.size - chosen.size),
                         cut)
