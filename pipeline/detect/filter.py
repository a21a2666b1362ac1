"""PSF matched filter and peak finding.

:func:`gaussian_psf` (the unit-sum Gaussian detection kernel); :func:`psf_filter`, the optimal
point-source statistic at every pixel -- with ``P`` the PSF and masked pixels given zero weight,

    F = corr(D / V, P),   W = corr(1 / V, P**2),
    flux = F / W,   flux_err = 1 / sqrt(W),   snr = F / sqrt(W);

:func:`matched_filter` computes ``F``, ``W`` and the S/N map once (in row blocks that stay in the
CPU cache: a separable kernel is applied as shifted multiply-adds down the columns and a 1-D
correlation along the rows) and gives flux and error at chosen pixels (:class:`FilterMaps`) or as
full maps.  :func:`find_peaks` returns the sub-pixel peaks of the segments (or of the separated
local maxima) of a thresholded S/N map, with 8-connected segments found by :func:`label_segments`
(:func:`label_pixels` when the pixels above threshold are few) and the local maxima tested only at
the pixels above threshold; the helpers
:func:`_segment_peaks` (peak pixel of each connected region) and :func:`_refine_peaks` (3-point
parabola) serve star selection too.  ``method="reference"`` everywhere selects the previous
implementation (full-frame :func:`scipy.ndimage.correlate1d` passes, photutils segmentation, a
full-frame maximum filter), kept for comparison.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from scipy import ndimage

from dia.masks import BAD_FOR_FIT

__all__ = [
    "METHODS",
    "gaussian_psf",
    "PsfFilterResult",
    "FilterMaps",
    "matched_filter",
    "psf_filter",
    "label_pixels",
    "label_segments",
    "find_peaks",
    "shoulder_peaks",
    "map_peaks",
    "filter_at",
]

#: Implementations selectable by the ``method`` of the detection configs and functions:
#: ``"fast"`` (default) and ``"reference"`` (the previous code path, same statistic).
METHODS = ("fast", "reference")

#: Rows per block of the cache-blocked matched filter.
_BLOCK_ROWS = 64


def check_method(method: str, where: str = "method") -> str:
    """Return ``method`` if it is one of :data:`METHODS`, else raise a ValueError naming ``where``."""
    if method not in METHODS:
        raise ValueError(f"{where} must be one of {METHODS}, got {method!r}")
    return method


def gaussian_psf(fwhm: float, radius_fwhm: float = 1.5) -> np.ndarray:
    """Unit-sum circular Gaussian PSF image of the given FWHM (pixels)."""
    if not np.isfinite(fwhm) or fwhm <= 0:
        raise ValueError(f"PSF FWHM must be a positive number of pixels, got {fwhm}")
    sigma = fwhm / 2.3548
    r = max(2, int(np.ceil(radius_fwhm * fwhm)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    psf = np.exp(-0.5 * (xx**2 + yy**2) / sigma**2)
    return psf / psf.sum()


def _separable(kernel: np.ndarray):
    """``(ky, kx)`` float32 with ``kernel == outer(ky, kx)`` when the kernel is separable (rank 1), else None."""
    u, sv, vt = np.linalg.svd(kernel)
    if sv.size > 1 and sv[1] <= 1e-7 * sv[0]:
        ky = (u[:, 0] * np.sqrt(sv[0])).astype(np.float32)
        kx = (vt[0] * np.sqrt(sv[0])).astype(np.float32)
        if ky.sum() < 0:
            ky, kx = -ky, -kx
        return ky, kx
    return None


def _correlate(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate with a small kernel: two 1-D passes when it is separable (a Gaussian), else FFT."""
    sep = _separable(kernel)
    if sep is not None:
        ky, kx = sep
        out = ndimage.correlate1d(image, ky, axis=0, mode="constant", output=np.float32)
        return ndimage.correlate1d(out, kx, axis=1, mode="constant", output=np.float32)
    from scipy import signal  # imported here: scipy.signal alone takes ~0.5 s to import, Gaussians never need it

    return signal.fftconvolve(image, kernel[::-1, ::-1].astype(np.float32), mode="same").astype(np.float32)


def _weights(image, variance, mask, bad_bits: int, data: bool = True):
    """``(data * ivar, ivar)`` in float32: inverse variance, zero where masked or not finite
    (``data=False``: ``(None, ivar)``)."""
    good = np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    if mask is not None:
        good &= (mask & bad_bits) == 0
    ivar = np.zeros(image.shape, np.float32)
    np.divide(1.0, variance, out=ivar, where=good)
    if not data:
        return None, ivar
    return np.where(good, image, np.float32(0)).astype(np.float32, copy=False) * ivar, ivar


def _blocked_filter(image, variance, mask, kernels, bad_bits: int, block: int = _BLOCK_ROWS):
    """``corr(data * ivar, P)`` and ``corr(ivar, P**2)`` of separable kernels, one block of rows at a time.

    Each block (with a halo of the kernel's half-height, zeros beyond the image: ``mode="constant"``)
    is weighted, run down the columns by shifted multiply-adds and along the rows by a 1-D
    correlation, while it is in the cache.
    """
    (ky, kx), (ky2, kx2) = kernels
    ny, nx = image.shape
    r = ky.size // 2
    num = np.empty((ny, nx), np.float32)
    den = np.empty((ny, nx), np.float32)
    rows = min(block, ny)
    pad = np.zeros((2, rows + 2 * r, nx), np.float32)
    acc = np.empty((rows, nx), np.float32)
    tmp = np.empty((rows, nx), np.float32)
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        n = y1 - y0
        lo, hi = max(0, y0 - r), min(ny, y1 + r)
        data, ivar = _weights(image[lo:hi], variance[lo:hi], None if mask is None else mask[lo:hi], bad_bits)
        if lo != y0 - r or hi != y1 + r:  # the image border: zero rows beyond it
            top = lo - (y0 - r)
            buf = pad[:, : n + 2 * r]
            buf[:] = 0
            buf[0, top : top + hi - lo] = data
            buf[1, top : top + hi - lo] = ivar
            data, ivar = buf[0], buf[1]
        for plane, kv, kh, out in ((data, ky, kx, num), (ivar, ky2, kx2, den)):
            a, t = acc[:n], tmp[:n]
            np.multiply(plane[0:n], kv[0], out=a)
            for j in range(1, kv.size):
                np.multiply(plane[j : j + n], kv[j], out=t)
                a += t
            ndimage.correlate1d(a, kh, axis=1, mode="constant", output=out[y0:y1])
    return num, den


def _ok_threshold(den: np.ndarray, subsampled: bool = False):
    """Least ``W`` of a usable pixel: 1e-3 of the median positive ``W`` on a 7-pixel grid (0 if none);
    ``subsampled``: ``den`` is that grid already."""
    positive = den if subsampled else den[::7, ::7]
    positive = positive[positive > 0]
    return 1e-3 * np.median(positive) if positive.size else 0.0


def _flux_err(num: np.ndarray, den: np.ndarray, threshold) -> tuple[np.ndarray, np.ndarray]:
    """Flux ``F / W`` and error ``1 / sqrt(W)`` (float32); 0 and inf where ``W <= threshold``."""
    ok = den > threshold
    with np.errstate(divide="ignore", invalid="ignore"):
        safe = np.where(ok, den, np.float32(1))
        flux = np.where(ok, num / safe, np.float32(0))
        err = np.where(ok, 1 / np.sqrt(safe), np.float32(np.inf))
    return flux.astype(np.float32), err.astype(np.float32)


@dataclasses.dataclass
class PsfFilterResult:
    """PSF-weighted flux, its error and S/N at every pixel."""

    flux: np.ndarray
    flux_err: np.ndarray
    snr: np.ndarray


@dataclasses.dataclass
class FilterMaps:
    """The matched filter of one image: ``num = F``, ``den = W`` and the S/N map.

    Pixels with ``den <= threshold`` (almost no unmasked pixel under the PSF) have S/N 0, flux 0
    and an infinite error.  :meth:`at` gives flux and error at chosen pixels without full maps;
    :meth:`result` the full :class:`PsfFilterResult`.
    """

    num: np.ndarray
    den: np.ndarray
    snr: np.ndarray
    threshold: float

    def at(self, iy, ix) -> tuple[np.ndarray, np.ndarray]:
        """``(flux, flux_err)`` at integer pixels ``(iy, ix)``, as in :meth:`result`."""
        return _flux_err(self.num[iy, ix], self.den[iy, ix], self.threshold)

    def result(self) -> PsfFilterResult:
        """Full flux, error and S/N maps."""
        flux, err = _flux_err(self.num, self.den, self.threshold)
        return PsfFilterResult(flux=flux, flux_err=err, snr=self.snr)


def matched_filter(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, psf: np.ndarray,
                   bad_bits: int = int(BAD_FOR_FIT), method: str = "fast") -> FilterMaps:
    """The PSF matched filter ``F``, ``W`` and its S/N map (see :func:`psf_filter`).

    Parameters
    ----------
    image, variance, mask, psf, bad_bits
        As for :func:`psf_filter`.
    method : {"fast", "reference"}
        ``"fast"``: cache-blocked separable correlation with the weighting fused in (a
        non-separable PSF falls back to FFT); ``"reference"``: full-frame passes of the previous
        implementation.  Both compute the same statistic (to float32 rounding).

    Returns
    -------
    FilterMaps
    """
    check_method(method, "matched_filter method")
    psf = np.asarray(psf, np.float64)
    kernels = (_separable(psf), _separable(psf**2))
    if method == "fast" and kernels[0] is not None and kernels[1] is not None:
        num, den = _blocked_filter(image, variance, mask, kernels, bad_bits)
    else:
        data, ivar = _weights(image, variance, mask, bad_bits)
        num = _correlate(data, psf)
        den = _correlate(ivar, psf**2)
    threshold = _ok_threshold(den)
    if method == "fast":
        snr = np.empty(num.shape, np.float32)
        step = _BLOCK_ROWS
        for y0 in range(0, num.shape[0], step):  # S/N block by block (in cache)
            d, f = den[y0 : y0 + step], num[y0 : y0 + step]
            ok = d > threshold
            with np.errstate(divide="ignore", invalid="ignore"):
                np.divide(f, np.sqrt(np.where(ok, d, np.float32(1))), out=snr[y0 : y0 + step])
            snr[y0 : y0 + step][~ok] = 0
    else:
        ok = den > threshold
        with np.errstate(divide="ignore", invalid="ignore"):
            root = np.sqrt(np.where(ok, den, np.float32(1)))
            snr = np.where(ok, num / root, np.float32(0)).astype(np.float32)
    return FilterMaps(num=num, den=den, snr=snr, threshold=threshold)


def psf_filter(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, psf: np.ndarray,
               bad_bits: int = int(BAD_FOR_FIT), method: str = "fast") -> PsfFilterResult:
    """Optimal PSF-fit flux of a point source centred at every pixel.

    Pixels with ``mask & bad_bits`` or non-finite values get zero weight.

    Parameters
    ----------
    image, variance : ndarray
        Image (ADU) and variance (ADU^2).
    mask : ndarray or None
        Bit mask.
    psf : ndarray
        Unit-sum PSF image (odd size).
    bad_bits : int
        Mask bits that zero a pixel's weight.
    method : {"fast", "reference"}
        Implementation (:func:`matched_filter`).

    Returns
    -------
    PsfFilterResult
        Flux (ADU), its error and S/N at every pixel.
    """
    return matched_filter(image, variance, mask, psf, bad_bits, method).result()


def label_pixels(flat: np.ndarray, shape: tuple[int, int], connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected regions of the pixels at ascending flat indices ``flat`` of an image of ``shape``.

    Union-find over the pixels' neighbour pairs, vectorised: each pair hooks the larger of its two roots onto the
    smaller, then every pointer is followed to its root, until each pair shares one.  A root is then its region's
    smallest flat index, so the regions are numbered as :func:`scipy.ndimage.label` numbers them.  The cost
    grows with the pixels, not the frame: for a sparse set (a difference image's pixels above threshold,
    cosmic-ray flags) it is a fraction of a full-frame labelling.

    Parameters
    ----------
    flat : ndarray of int
        Ascending, unique flat indices.
    shape : tuple
        ``(ny, nx)`` of the image.
    connectivity : {4, 8}
        Neighbours along the axes only, or diagonal ones too.

    Returns
    -------
    label : ndarray of int
        Region number of each pixel of ``flat`` (from 1, in raster order of the regions' first pixels).
    n : int
        Number of regions.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"label_pixels: connectivity must be 4 or 8, got {connectivity}")
    flat = np.asarray(flat, np.intp)
    if flat.size == 0:
        return np.zeros(0, np.intp), 0
    nx = int(shape[1])
    x = flat % nx
    steps = ((0, 1), (1, 0)) if connectivity == 4 else ((0, 1), (1, -1), (1, 0), (1, 1))
    first, second = [], []
    for dy, dx in steps:  # each neighbour pair once
        inside = (x + dx >= 0) & (x + dx < nx)
        target = flat[inside] + (dy * nx + dx)
        at = np.minimum(np.searchsorted(flat, target), flat.size - 1)
        hit = flat[at] == target
        first.append(np.flatnonzero(inside)[hit])
        second.append(at[hit])
    i, j = np.concatenate(first), np.concatenate(second)
    index = np.arange(flat.size)
    root = index.copy()
    while True:
        lo, hi = np.minimum(root[i], root[j]), np.maximum(root[i], root[j])
        apart = lo != hi
        if not apart.any():
            break
        np.minimum.at(root, hi[apart], lo[apart])  # roots only point to smaller indices: no cycle
        while True:
            up = root[root]
            if np.array_equal(up, root):
                break
            root = up
    number = np.cumsum(root == index)
    return number[root], int(number[-1])


#: Pixels above threshold, as a fraction of the frame, up to which a segmentation labels them
#: (:func:`label_pixels`) rather than the frame (:func:`scipy.ndimage.label`, ~30 ms per DECam CCD).
_SPARSE_FRACTION = 0.01


def _label_flat(above: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``flat`` (the pixels of ``above``), their region numbers and the number of regions; the same numbers by
    either labelling (:data:`_SPARSE_FRACTION`)."""
    flat = np.flatnonzero(above)
    if flat.size <= _SPARSE_FRACTION * above.size:
        lab, n = label_pixels(flat, above.shape, connectivity)
        return flat, lab, n
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    labels, n = ndimage.label(above, structure=structure)
    return flat, labels.ravel()[flat], n


def label_segments(above: np.ndarray, n_pixels: int = 1):
    """8-connected regions of ``above`` with at least ``n_pixels`` pixels.

    Returns
    -------
    flat : ndarray
        Flat indices of the pixels of the kept regions, ascending.
    label : ndarray
        Region number (from 1, in raster order of the regions' first pixels) of each of them.
    """
    flat, lab, n = _label_flat(above, 8)
    if n == 0:
        e = np.zeros(0, np.intp)
        return e, e
    if n_pixels > 1:
        keep = np.bincount(lab)[lab] >= n_pixels
        flat, lab = flat[keep], lab[keep]
    return flat, lab


def _peak_per_label(values_flat: np.ndarray, flat: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """Flat index of the highest pixel of each label (the first in raster order among equals), by label."""
    if flat.size == 0:
        return flat
    top = np.full(int(lab.max()) + 1, -np.inf, values_flat.dtype if values_flat.dtype.kind == "f" else float)
    np.maximum.at(top, lab, values_flat)
    at_top = np.flatnonzero(values_flat == top[lab])
    _, first = np.unique(lab[at_top], return_index=True)
    return flat[at_top[first]]


def _sparse_local_maxima(snr: np.ndarray, flat: np.ndarray, sign: float, radius: int,
                         values: np.ndarray | None = None) -> np.ndarray:
    """The pixels of ``flat`` that are the highest of ``sign * snr`` over the pixels of ``flat`` within
    ``radius`` (a square window clipped to the image), in the order of ``flat``.  ``values``: the map at ``flat``
    when the caller has them and no full map (``snr`` then gives only the shape).

    The same answer as a full-frame maximum filter of the map with -inf outside ``flat``, computed at
    those pixels only: first against the 8 neighbours, then the whole window of what survives.  The
    map is copied once into a frame padded by ``radius`` with -inf outside ``flat`` (and outside the
    image), so each neighbour is a 1-D gather at a fixed offset from the pixel's padded index.
    """
    ny, nx = snr.shape
    r = max(1, int(radius))
    wide = nx + 2 * r
    padded = np.full((ny + 2 * r) * wide, -np.inf, np.float32 if snr.dtype == np.float32 else float)
    iy, ix = np.divmod(flat, nx)
    at = (iy + r) * wide + (ix + r)
    value = (sign * (snr.ravel()[flat] if values is None else values)).astype(padded.dtype, copy=False)
    padded[at] = value
    cand = np.ones(flat.size, bool)
    for reach in ((1, r) if r > 1 else (1,)):
        idx = np.flatnonzero(cand)
        here, v = at[idx], value[idx]
        best = np.full(idx.size, -np.inf, padded.dtype)
        for dy in range(-reach, reach + 1):
            for dx in range(-reach, reach + 1):
                if dy or dx:
                    np.maximum(best, padded.take(here + (dy * wide + dx)), out=best)
        cand[idx[v < best]] = False
    return flat[cand]


def find_peaks(snr: np.ndarray, threshold: float, n_pixels: int, max_peaks: int | None = None,
               min_separation: int = 0, *, method: str = "fast", negative: bool = False):
    """Segment ``snr > threshold`` (8-connected) and return each segment's sub-pixel peak.

    With ``min_separation > 0`` every local maximum of the S/N map inside the
    segments that is the highest within ``min_separation`` pixels is returned
    instead (peaks on galaxies are resolved into separate candidates).

    Parameters
    ----------
    snr : ndarray
        S/N map.
    threshold : float
        Segments are the pixels above it.
    n_pixels : int
        Least pixels of a segment.
    max_peaks : int, optional
        Keep at most this many, the highest.
    min_separation : int
        Radius (pixels) of the local-maximum test (0: one peak per segment).
    method : {"fast", "reference"}
        ``"reference"``: photutils segmentation and a full-frame maximum filter (the previous
        code); ``"fast"``: :func:`label_segments` and the maxima tested at the segment pixels only.
    negative : bool
        Find the peaks of ``-snr`` (negative footprints) without negating the map.

    Returns
    -------
    x, y : ndarray
        Peak positions refined by a 3-point parabola in each axis.
    peak : ndarray
        S/N at the peak pixel (of ``-snr`` when ``negative``).
    """
    check_method(method, "find_peaks method")
    if method == "reference":
        return _find_peaks_reference(-snr if negative else snr, threshold, n_pixels, max_peaks, min_separation)
    sign = -1.0 if negative else 1.0
    with np.errstate(invalid="ignore"):
        above = snr < -threshold if negative else snr > threshold
    flat, lab = label_segments(above, n_pixels)
    if flat.size == 0:
        e = np.zeros(0)
        return e, e, e
    if min_separation > 0:
        peaks = _sparse_local_maxima(snr, flat, sign, min_separation)
    else:
        peaks = _peak_per_label(sign * snr.ravel()[flat], flat, lab)
    iy, ix = np.unravel_index(peaks, snr.shape)
    peak = sign * snr[iy, ix]
    if max_peaks is not None and peak.size > max_peaks:
        keep = np.argsort(-peak)[:max_peaks]
        iy, ix, peak = iy[keep], ix[keep], peak[keep]
    x, y = _refine_peaks(snr, ix, iy, sign)
    return x, y, peak


def shoulder_peaks(snr: np.ndarray, fwhm: float, sigma: float, threshold: float, peak_x: np.ndarray,
                   peak_y: np.ndarray, min_separation: int, sample_step: int = 4):
    """Compact sources on the flank of a brighter one: the local maxima of the S/N map's curvature that are
    not near a peak of the map itself.

    A point source on the flank of a galaxy or a star one or two FWHM away adds a bump to the matched
    filter's S/N map but often no local maximum of its own: the brighter neighbour's slope carries it.  The
    curvature ``c = snr - mean(snr at the four pixels h = FWHM / 2 away)`` removes a slope (linear terms
    cancel) and keeps a bump of the PSF's size.  Its noise is the robust standard deviation of ``c`` over
    the frame (sampled every ``sample_step`` pixels: blank sky dominates), so the test holds whatever
    the noise correlation of the map.  A pixel is a shoulder peak when ``c`` exceeds ``sigma`` times that
    noise, the S/N there exceeds ``threshold``, it is the highest ``c`` of those pixels within
    ``min_separation`` px, and no peak ``(peak_x, peak_y)`` of the map lies within ``min_separation`` px.
    Pixels within ``h`` of the border are not tested.

    Parameters
    ----------
    snr : ndarray (ny, nx)
        S/N map of the matched filter (:class:`FilterMaps`).
    fwhm : float
        PSF FWHM of the image (pixels).
    sigma : float
        Least curvature, in units of its noise (> 0).
    threshold : float
        Least S/N at the pixel.
    peak_x, peak_y : ndarray
        The map's peaks (:func:`find_peaks`).
    min_separation : int
        Radius (pixels) of the local-maximum test and of the distance to the peaks.
    sample_step : int
        Stride of the pixels the noise of ``c`` is measured on.

    Returns
    -------
    x, y : ndarray
        Sub-pixel positions (3-point parabola through ``c``).
    peak : ndarray
        S/N at the pixel.
    """
    from dia.stats import robust_std

    empty = (np.zeros(0), np.zeros(0), np.zeros(0))
    if not (np.isfinite(fwhm) and fwhm > 0 and sigma > 0):
        raise ValueError(f"shoulder_peaks: fwhm and sigma must be positive, got {fwhm} and {sigma}")
    ny, nx = snr.shape
    h = max(1, int(round(fwhm / 2)))
    if ny <= 2 * h or nx <= 2 * h:
        return empty

    def combine(at) -> np.ndarray:  # c from ``at(dy, dx)``, the map shifted by (dy, dx): one order of float32 sums
        around = at(-h, 0) + at(h, 0)
        around += at(0, -h)
        around += at(0, h)
        around *= np.float32(-0.25)
        around += at(0, 0)
        return around

    def curvature(rows: slice, cols: slice, step: int = 1) -> np.ndarray:
        """``c`` over ``snr[h:-h, h:-h][rows, cols]`` (with ``step``)."""
        return combine(lambda dy, dx: snr[h + dy : ny - h + dy, h + dx : nx - h + dx][rows, cols][::step, ::step])

    def curvature_at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """``c`` at pixels, 0 within ``h`` of the border (where the block pass does not reach)."""
        inside = (yy >= h) & (yy < ny - h) & (xx >= h) & (xx < nx - h)
        yy, xx = np.clip(yy, h, ny - h - 1), np.clip(xx, h, nx - h - 1)
        return np.where(inside, combine(lambda dy, dx: snr[yy + dy, xx + dx]), np.float32(0))

    sample = curvature(slice(None), slice(None), sample_step)
    noise = robust_std(sample[np.isfinite(sample)].ravel()) if sample.size else 0.0
    if not (np.isfinite(noise) and noise > 0):
        return empty
    level = np.float32(sigma * noise)
    found, values = [], []
    for r0 in range(0, ny - 2 * h, _BLOCK_ROWS):  # in row blocks that stay in the cache; no frame-sized map
        rows = slice(r0, min(r0 + _BLOCK_ROWS, ny - 2 * h))
        c = curvature(rows, slice(None))
        with np.errstate(invalid="ignore"):
            hit = np.flatnonzero((c > level) & (snr[h + rows.start : h + rows.stop, h : nx - h] > threshold))
        by, bx = np.divmod(hit, nx - 2 * h)
        found.append((by + rows.start + h) * nx + (bx + h))
        values.append(c.ravel()[hit])
    flat = np.concatenate(found)
    if flat.size == 0:
        return empty
    flat = _sparse_local_maxima(snr, flat, 1.0, min_separation, values=np.concatenate(values))
    iy, ix = np.divmod(flat, nx)
    if np.size(peak_x):
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(np.column_stack([peak_x, peak_y])).query(np.column_stack([ix, iy]))
        iy, ix = iy[dist > min_separation], ix[dist > min_separation]
    if ix.size == 0:
        return empty
    # sub-pixel: the parabola through c at the peak and its neighbours, as _refine_peaks does on a map
    centre = curvature_at(iy, ix)
    x = ix + _parabola_offset(curvature_at(iy, ix - 1), centre, curvature_at(iy, ix + 1))
    y = iy + _parabola_offset(curvature_at(iy - 1, ix), centre, curvature_at(iy + 1, ix))
    return x, y, snr[iy, ix].astype(float)


def _plateau_firsts(peaks: np.ndarray, nx: int) -> np.ndarray:
    """Of local maxima with ties kept (sorted flat indices into rows of ``nx``), those with no other maximum
    among their earlier 8 neighbours in raster order: two neighbouring maxima are equal, so a plateau of equal
    cells -- one window seen again at the next cells, e.g. a network whose units are all off over blank sky -- is
    one peak, not one per cell."""
    if peaks.size < 2:
        return peaks
    py, px = np.divmod(peaks, nx)
    first = np.ones(peaks.size, bool)
    for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
        qy, qx = py + dy, px + dx
        inside = (qy >= 0) & (qx >= 0) & (qx < nx)
        q = qy[inside] * nx + qx[inside]
        at = np.minimum(np.searchsorted(peaks, q), peaks.size - 1)
        hit = np.zeros(peaks.size, bool)
        hit[inside] = peaks[at] == q
        first &= ~hit
    return peaks[first]


def map_peaks(logits: np.ndarray, threshold: float, spacing: float = 1.0,
              refine: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local maxima of a logit map (a classifier's score map) whose probability is >= ``threshold``.

    The same local-maximum test and sub-pixel refinement as :func:`find_peaks` (every pixel the highest of
    its 8 neighbours; a 3-point parabola per axis), on the cells at or above the threshold.  Of neighbouring
    cells of equal value (a plateau) only the first in raster order is a peak.

    Parameters
    ----------
    logits : ndarray
        ``log(p / (1 - p))`` per map cell (e.g. :func:`classifier.dense.dense_logit_map`); non-finite
        cells are never peaks.
    threshold : float
        Least probability of a peak, in (0, 1).
    spacing : float
        Pixels per map cell (the positions returned are ``spacing`` times the cell coordinates).
    refine : bool
        Refine each peak to the parabola's vertex (at most half a cell per axis); else the cell position.
        On the benchmark field with :data:`classifier.dense.GRID` this put transients' peaks 0.4-0.5 px
        from them (median) against ~1.6 px on the grid.

    Returns
    -------
    x, y, score : ndarray
        Positions in pixels (raster order of the peaks) and each peak's probability.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"map_peaks: threshold must lie in (0, 1), got {threshold}")
    cut = np.log(threshold / (1 - threshold))
    with np.errstate(invalid="ignore"):
        flat = np.flatnonzero(logits >= cut)
    peaks = _plateau_firsts(_sparse_local_maxima(logits, flat, 1.0, 1), logits.shape[1])
    iy, ix = np.unravel_index(peaks, logits.shape)
    score = 1.0 / (1.0 + np.exp(-logits[iy, ix].astype(float)))
    x, y = _refine_peaks(logits, ix, iy) if refine else (ix, iy)
    return np.asarray(x, float) * spacing, np.asarray(y, float) * spacing, score


def _find_peaks_reference(snr: np.ndarray, threshold: float, n_pixels: int, max_peaks: int | None = None,
                          min_separation: int = 0):
    """:func:`find_peaks` as it was: photutils segmentation, a full-frame maximum filter."""
    from photutils.segmentation import detect_sources
    from photutils.utils.exceptions import NoDetectionsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDetectionsWarning)  # an empty result is a valid answer
        segm = detect_sources(snr, threshold, n_pixels=n_pixels)
    if segm is None or segm.n_labels == 0:
        e = np.zeros(0)
        return e, e, e
    if min_separation > 0:
        # local maxima inside the segments (one separable maximum filter over the frame)
        inside = segm.data > 0
        masked = np.where(inside, snr, -np.inf).astype(np.float32)
        local_max = ndimage.maximum_filter(masked, size=2 * min_separation + 1, mode="nearest")
        iy, ix = np.nonzero(inside & (masked == local_max))
    else:
        # peak of each segment: sort only the (few) pixels above threshold by (label, -snr)
        flat = np.flatnonzero(segm.data)
        lab = segm.data.ravel()[flat]
        order = np.lexsort((-snr.ravel()[flat], lab))
        first = order[np.r_[True, lab[order][1:] != lab[order][:-1]]]
        iy, ix = np.unravel_index(flat[first], snr.shape)
    peak = snr[iy, ix]
    if max_peaks is not None and peak.size > max_peaks:
        keep = np.argsort(-peak)[:max_peaks]
        iy, ix, peak = iy[keep], ix[keep], peak[keep]
    x, y = _refine_peaks(snr, ix, iy)
    return x, y, peak


def _refine_peaks(values: np.ndarray, ix: np.ndarray, iy: np.ndarray, sign: float = 1.0):
    """Sub-pixel peak positions from a 3-point parabola through the peak pixel in each axis
    (of ``sign * values``)."""
    ny, nx = values.shape
    xm = np.clip(ix - 1, 0, nx - 1)
    xp = np.clip(ix + 1, 0, nx - 1)
    ym = np.clip(iy - 1, 0, ny - 1)
    yp = np.clip(iy + 1, 0, ny - 1)
    peak = sign * values[iy, ix]
    left, right, down, up = (sign * values[iy, xm], sign * values[iy, xp], sign * values[ym, ix],
                             sign * values[yp, ix])
    return ix + _parabola_offset(left, peak, right), iy + _parabola_offset(down, peak, up)


def _parabola_offset(lo: np.ndarray, mid: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Vertex of the parabola through ``(-1, lo)``, ``(0, mid)``, ``(1, hi)``, clipped to [-0.5, 0.5]; 0 where it
    is not a maximum."""
    with np.errstate(divide="ignore", invalid="ignore"):
        den = lo - 2 * mid + hi
        d = np.where(den < 0, 0.5 * (lo - hi) / den, 0.0)
    return np.clip(np.nan_to_num(d), -0.5, 0.5)


def _segment_peaks(values: np.ndarray, above: np.ndarray, method: str = "fast"):
    """Peak pixel (iy, ix) of every 4-connected region of ``above``, by region number."""
    if method == "fast":
        flat, lab, n = _label_flat(above, 4)
        if n == 0:
            e = np.zeros(0, int)
            return e, e
        peaks = _peak_per_label(values.ravel()[flat], flat, lab)
        return np.unravel_index(peaks, values.shape)
    labels, n = ndimage.label(above)
    if n == 0:
        e = np.zeros(0, int)
        return e, e
    flat = np.flatnonzero(labels)
    lab = labels.ravel()[flat]
    order = np.lexsort((-values.ravel()[flat], lab))
    first = order[np.r_[True, lab[order][1:] != lab[order][:-1]]]
    return np.unravel_index(flat[first], values.shape)


def _window_weights(image, variance, mask, psf, iy, ix, bad_bits: int, chunk: int = 2048):
    """``F`` and ``W`` of the matched filter at the four pixels ``(iy + {0, 1}, ix + {0, 1})`` of each
    position (zero weight off the image, as the full-frame correlation's ``mode="constant"``).

    One patch of ``2 r + 2`` pixels a side is read around each position and weighted once; the four
    sums are slices of it.  Returns ``num, den`` of shape ``(4, n)`` in the corner order
    ``(0, 0), (0, 1), (1, 0), (1, 1)``.
    """
    ny, nx = image.shape
    r = psf.shape[0] // 2
    side = 2 * r + 1
    offs = np.arange(-r, r + 2)
    p1 = np.asarray(psf, np.float64)
    p2 = p1**2
    num = np.empty((4, iy.size))
    den = np.empty((4, iy.size))
    for s in range(0, iy.size, chunk):
        rows = iy[s : s + chunk, None] + offs
        cols = ix[s : s + chunk, None] + offs
        on = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
        rr = np.clip(rows, 0, ny - 1)[:, :, None]
        cc = np.clip(cols, 0, nx - 1)[:, None, :]
        data, ivar = _weights(image[rr, cc], variance[rr, cc], None if mask is None else mask[rr, cc], bad_bits)
        data = np.where(on, data, np.float32(0)).astype(np.float64)
        ivar = np.where(on, ivar, np.float32(0)).astype(np.float64)
        for k, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            num[k, s : s + chunk] = np.einsum("nij,ij->n", data[:, dy : dy + side, dx : dx + side], p1)
            den[k, s : s + chunk] = np.einsum("nij,ij->n", ivar[:, dy : dy + side, dx : dx + side], p2)
    return num, den


def _grid_threshold(image, variance, mask, psf, bad_bits: int, step: int = 7):
    """:func:`_ok_threshold` of the image's ``W`` map, with ``W`` computed on the ``step`` grid only."""
    ny, nx = image.shape
    sep = _separable(np.asarray(psf, np.float64) ** 2)
    if sep is None:
        yy, xx = np.meshgrid(np.arange(0, ny, step), np.arange(0, nx, step), indexing="ij")
        _, den = _window_weights(image, variance, mask, psf, yy.ravel(), xx.ravel(), bad_bits)
        return _ok_threshold(den[0].astype(np.float32), subsampled=True)
    ky, kx = sep
    r = ky.size // 2
    ivar = np.empty((ny, nx), np.float32)
    for y0 in range(0, ny, 4 * _BLOCK_ROWS):  # block by block (in cache)
        sl = slice(y0, y0 + 4 * _BLOCK_ROWS)
        ivar[sl] = _weights(image[sl], variance[sl], None if mask is None else mask[sl], bad_bits, data=False)[1]
    n_rows = len(range(0, ny, step))
    acc = np.zeros((n_rows, nx), np.float32)
    for j in range(ky.size):  # down the columns, at the grid rows only (strided views, no copies)
        first = j - r  # source row of grid row 0; grid rows k0 <= k < k1 have 0 <= k * step + first < ny
        k0 = max(0, -(first // step))
        k1 = min(n_rows, (ny - 1 - first) // step + 1)
        if k1 > k0:
            acc[k0:k1] += ky[j] * ivar[k0 * step + first : (k1 - 1) * step + first + 1 : step]
    den = ndimage.correlate1d(acc, kx, axis=1, mode="constant", output=np.float32)[:, ::step]
    return _ok_threshold(den, subsampled=True)


def filter_at(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, psf: np.ndarray, y, x,
              bad_bits: int = int(BAD_FOR_FIT)) -> tuple[np.ndarray, np.ndarray]:
    """Matched-filter flux and error bilinearly interpolated at sub-pixel positions, without full maps.

    What :func:`psf_filter`'s ``flux`` and ``flux_err`` maps give through
    :func:`scipy.ndimage.map_coordinates` (``order=1``) at ``(y, x)``, computed at the four
    pixels around each position only; the usable-pixel threshold of ``W`` is measured on the same
    7-pixel grid as for the full maps.  Positions must lie on the image (``0 <= x <= nx - 1``).

    Returns
    -------
    flux, flux_err : ndarray
        float32, as the maps; the error is infinite or NaN where a pixel used has no weight.
    """
    y = np.asarray(y, float)
    x = np.asarray(x, float)
    ny, nx = image.shape
    if x.size == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    y0 = np.clip(np.floor(y).astype(np.intp), 0, max(ny - 2, 0))
    x0 = np.clip(np.floor(x).astype(np.intp), 0, max(nx - 2, 0))
    wy, wx = y - y0, x - x0
    num, den = _window_weights(image, variance, mask, psf, y0, x0, bad_bits)
    threshold = _grid_threshold(image, variance, mask, psf, bad_bits)
    flux_c, err_c = _flux_err(num.astype(np.float32), den.astype(np.float32), threshold)
    flux_c, err_c = flux_c.astype(np.float64), err_c.astype(np.float64)
    w = np.array([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx])
    with np.errstate(invalid="ignore"):
        return (w * flux_c).sum(axis=0).astype(np.float32), (w * err_c).sum(axis=0).astype(np.float32)
