"""Stamps: fixed-size cut-outs of several aligned planes centred on candidates.

A stamp is centred on the candidate's nearest pixel, so stamps of planes on
the same pixel grid line up exactly and no pixel is resampled.  Pixels that
fall off the image, or that carry ``NO_DATA``, are NaN in ``data`` and flagged
``NO_DATA`` in ``mask``; other masked pixels keep their values (a bad column is
information for the classifier) and their bits.  ``complete`` tells which
stamps have no missing pixel.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from dia.masks import MaskBits

__all__ = ["STAMP_SIZE", "Stamps", "cut_stamps", "stack_channels", "ring_background"]

#: Stamp side in pixels (the paper's 51 x 51).
STAMP_SIZE = 51


@dataclasses.dataclass
class Stamps:
    """Cut-outs of ``C`` planes around ``N`` positions.

    Attributes
    ----------
    data : ndarray (N, C, size, size) float32
        Pixel values; NaN where there are no data.
    mask : ndarray (N, C, size, size) int32
        Mask bits of each pixel (``NO_DATA`` off the image).
    channels : tuple of str
        Plane names, e.g. ``("template", "search", "difference")``.
    x, y : ndarray (N,)
        Integer pixel centres of the stamps on the search grid.
    sky : ndarray (N, C) or None
        Each channel's smooth sky at the stamp's centre, from the whole frame (0 for a difference), when
        the stamps were cut for a model of the ``sky`` normalisation (:func:`pipeline.steps.sky_levels`).
    noise : ndarray (N,) or None
        The search image's sky noise at the stamp's centre, with ``sky``.
    """

    data: np.ndarray
    mask: np.ndarray
    channels: tuple[str, ...]
    x: np.ndarray
    y: np.ndarray
    sky: np.ndarray | None = None
    noise: np.ndarray | None = None

    @property
    def complete(self) -> np.ndarray:
        """True for stamps with no missing pixel in any channel."""
        return ~np.isnan(self.data).any(axis=(1, 2, 3))

    def __len__(self) -> int:
        return self.data.shape[0]


def _interior(ix: np.ndarray, iy: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
    """True for stamps that lie wholly on the image."""
    half = size // 2
    ny, nx = shape
    return (ix >= half) & (ix < nx - half) & (iy >= half) & (iy < ny - half)


def _edge_index(ix: np.ndarray, iy: np.ndarray, shape: tuple[int, int], size: int):
    """Clipped pixel indices ``(rows (N, size, 1), cols (N, 1, size))`` of stamps that reach
    off the image, and ``inside`` ``(N, size, size)``, True for stamp pixels on the image."""
    half = size // 2
    ny, nx = shape
    offs = np.arange(-half, half + 1, dtype=np.intp)
    yy = iy.astype(np.intp)[:, None] + offs[None, :]
    xx = ix.astype(np.intp)[:, None] + offs[None, :]
    inside = ((yy >= 0) & (yy < ny))[:, :, None] & ((xx >= 0) & (xx < nx))[:, None, :]
    return np.clip(yy, 0, ny - 1)[:, :, None], np.clip(xx, 0, nx - 1)[:, None, :], inside


def cut_stamps(
    planes: dict[str, np.ndarray],
    masks: dict[str, np.ndarray] | None,
    x: np.ndarray,
    y: np.ndarray,
    size: int = STAMP_SIZE,
) -> Stamps:
    """Cut stamps of several aligned planes around positions.

    Each plane (and mask) is read with one gather of all the stamps that lie wholly on the
    image (a fancy index into its sliding-window view, which copies whole stamp rows) and
    one clipped gather of those that reach off it: no full-frame copy or conversion of any
    plane, whatever its dtype or memory layout.

    Parameters
    ----------
    planes : dict name -> 2-D ndarray
        Planes on one pixel grid, in channel order (e.g. template, search, difference).
    masks : dict name -> 2-D int ndarray, optional
        Mask of each plane (missing names: no mask).
    x, y : array_like
        Positions (0-based pixels); stamps are centred on the nearest pixel.
    size : int
        Odd stamp side (default 51).

    Returns
    -------
    Stamps
    """
    if size % 2 != 1 or size < 3:
        raise ValueError(f"stamp size must be odd and >= 3, got {size}")
    shapes = {k: v.shape for k, v in planes.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"planes must share one pixel grid, got shapes {shapes}")
    ix = np.rint(np.atleast_1d(np.asarray(x, dtype=float))).astype(np.int64)
    iy = np.rint(np.atleast_1d(np.asarray(y, dtype=float))).astype(np.int64)
    masks = masks or {}
    n, c = ix.size, len(planes)
    data = np.empty((n, c, size, size), np.float32)
    mask = np.zeros((n, c, size, size), np.int32)
    if n == 0:
        return Stamps(data=data, mask=mask, channels=tuple(planes), x=ix, y=iy)
    shape = next(iter(shapes.values()))
    interior = _interior(ix, iy, shape, size)
    parts = []  # (stamp rows, gather of a plane's pixels there, pixels off the image or None)
    inner = slice(None) if interior.all() else np.flatnonzero(interior)
    half = size // 2
    if interior.any():  # whole windows, rows copied contiguously from the plane's sliding-window view
        wy, wx = iy[inner] - half, ix[inner] - half
        parts.append((inner, lambda src: sliding_window_view(src, (size, size))[wy, wx], None))
    if not interior.all():  # stamps reaching off the image: clipped indices, NO_DATA off it
        edge = np.flatnonzero(~interior)
        rows, cols, inside = _edge_index(ix[edge], iy[edge], shape, size)
        flat = rows * shape[1] + cols
        parts.append((edge, lambda src: src.reshape(-1).take(flat) if src.flags.c_contiguous else src[rows, cols],
                      ~inside))
    nodata = np.int32(MaskBits.NO_DATA)
    for k, (name, plane) in enumerate(planes.items()):
        m = masks.get(name)
        for where, gather, off in parts:
            dk = gather(plane).astype(np.float32, copy=False)
            if m is not None or off is not None:
                mk = gather(m).astype(np.int32, copy=False) if m is not None else np.zeros(dk.shape, np.int32)
                if off is not None:
                    mk[off] = nodata  # off the image: NO_DATA alone
                dk[(mk & nodata) != 0] = np.nan  # dk is a fresh gather: NaN where there are no data
                mask[where, k] = mk
            data[where, k] = dk
    return Stamps(data=data, mask=mask, channels=tuple(planes), x=ix, y=iy)


def stack_channels(*stamps: Stamps) -> Stamps:
    """Concatenate the channels of stamp sets cut at the same positions."""
    if not stamps:
        raise ValueError("nothing to stack")
    for s in stamps[1:]:
        if not (np.array_equal(s.x, stamps[0].x) and np.array_equal(s.y, stamps[0].y)):
            raise ValueError("stamp sets were cut at different positions")
    return Stamps(
        data=np.concatenate([s.data for s in stamps], axis=1),
        mask=np.concatenate([s.mask for s in stamps], axis=1),
        channels=tuple(c for s in stamps for c in s.channels),
        x=stamps[0].x,
        y=stamps[0].y,
    )


def ring_background(data: np.ndarray, width: int = 5) -> np.ndarray:
    """Median of the outer ``width``-pixel ring of each stamp, shape ``data.shape[:-2]``.

    The ring of a 51-pixel stamp lies >= 20 px from the centre: sky, unless a
    large galaxy fills the stamp (then the median is the local galaxy light,
    which is also what a classifier should not see as signal).  NaN pixels (no data) are
    left out; a ring with no data at all has background 0.

    The ring pixels of all stamps are gathered at once; rings without NaN take one batched
    median, rings with NaN one batched sort (:func:`_nan_median_rows`, the numbers of
    ``np.nanmedian`` row by row).
    """
    ring = np.ones(data.shape[-2:], bool)
    ring[width:-width, width:-width] = False
    values = data[..., ring]  # (..., R): one gather
    if values.size == 0:
        return np.zeros(values.shape[:-1], dtype=np.result_type(data.dtype, np.float16))
    has_nan = np.isnan(values).any(axis=-1)
    if not has_nan.any():
        return np.nan_to_num(np.median(values, axis=-1))
    bkg = np.empty(values.shape[:-1], dtype=np.result_type(data.dtype, np.float16))
    clean = ~has_nan
    if clean.any():
        bkg[clean] = np.median(values[clean], axis=-1)
    bkg[has_nan] = _nan_median_rows(values[has_nan])
    return np.nan_to_num(bkg)


def _nan_median_rows(rows: np.ndarray) -> np.ndarray:
    """Median of the non-NaN values of each row of ``rows`` (M, R); NaN for a row of NaN only.

    One sort of all rows (NaN sorts last), then the middle one or two values of each row's
    ``n`` valid ones -- the mean of two as ``np.median`` takes it, in the data's precision.
    """
    srt = np.sort(rows, axis=-1)
    n = np.count_nonzero(~np.isnan(rows), axis=-1)
    k = n // 2
    hi = np.take_along_axis(srt, k[:, None], axis=-1)[:, 0]
    lo = np.take_along_axis(srt, np.maximum(k - 1, 0)[:, None], axis=-1)[:, 0]
    with np.errstate(invalid="ignore"):
        med = np.where(n % 2 == 1, hi, (lo + hi) / 2)
    med[n == 0] = np.nan
    return med
