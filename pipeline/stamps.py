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
import warnings

import numpy as np

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
    """

    data: np.ndarray
    mask: np.ndarray
    channels: tuple[str, ...]
    x: np.ndarray
    y: np.ndarray

    @property
    def complete(self) -> np.ndarray:
        """True for stamps with no missing pixel in any channel."""
        return ~np.isnan(self.data).any(axis=(1, 2, 3))

    def __len__(self) -> int:
        return self.data.shape[0]


def _cut(plane: np.ndarray, ix: np.ndarray, iy: np.ndarray, size: int, fill) -> np.ndarray:
    """(N, size, size) cut-outs of one plane, ``fill`` off the image (vectorised)."""
    half = size // 2
    ny, nx = plane.shape
    offs = np.arange(-half, half + 1)
    yy = iy[:, None] + offs[None, :]
    xx = ix[:, None] + offs[None, :]
    vy = (yy >= 0) & (yy < ny)
    vx = (xx >= 0) & (xx < nx)
    out = plane[np.clip(yy, 0, ny - 1)[:, :, None], np.clip(xx, 0, nx - 1)[:, None, :]]
    inside = vy[:, :, None] & vx[:, None, :]
    return np.where(inside, out, fill)


def cut_stamps(
    planes: dict[str, np.ndarray],
    masks: dict[str, np.ndarray] | None,
    x: np.ndarray,
    y: np.ndarray,
    size: int = STAMP_SIZE,
) -> Stamps:
    """Cut stamps of several aligned planes around positions.

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
    mask = np.empty((n, c, size, size), np.int32)
    nodata = int(MaskBits.NO_DATA)
    for k, (name, plane) in enumerate(planes.items()):
        m = masks.get(name)
        mk = _cut(m if m is not None else np.zeros(plane.shape, np.int32), ix, iy, size, nodata)
        dk = _cut(plane.astype(np.float32, copy=False), ix, iy, size, np.nan)
        dk = np.where((mk & nodata) != 0, np.nan, dk)
        data[:, k] = dk
        mask[:, k] = mk
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
    which is also what a classifier should not see as signal).
    """
    ring = np.ones(data.shape[-2:], bool)
    ring[width:-width, width:-width] = False
    with np.errstate(all="ignore"), warnings.catch_warnings():
        # a ring with no data at all (a stamp off the image) has no median: 0 below, said by NO_DATA
        warnings.filterwarnings("ignore", message="All-NaN slice encountered", category=RuntimeWarning)
        bkg = np.nanmedian(data[..., ring], axis=-1)
    return np.nan_to_num(bkg)
