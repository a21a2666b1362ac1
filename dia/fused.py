"""The difference, its variance and its mask computed band by band in one pass (the ``"fused"`` path).

Same mathematics as :mod:`dia.convolve` (the ``"reference"`` path), organised for speed:

* The image is processed in bands of output rows (overlap-save, ``2 * hw`` extra input rows), and
  every plane of the result -- difference, variance, mask -- is finished on a band while its
  inputs are in cache; no full-frame temporaries beyond the three output planes.
* The spatially varying kernel ``sum_s xn^i_s yn^j_s (X conv K_s)`` costs one forward FFT of the
  band, one inverse FFT *along y* per spatial term (the ``yn^j`` weight is a function of the row,
  so it is applied between the two 1-D inverse transforms) and one inverse real FFT *along x* per
  distinct power ``i`` of ``xn`` (3 instead of 6 for spatial order 2).
* The background, the kernel sum and the variance ratio ``sum K(x, y)^2 / sum K_centre^2`` are
  polynomials evaluated per band by Horner's rule in ``xn`` (no BLAS calls, no full-frame planes);
  the background's ``xn^i`` part is added to the group of the same power before its weight.
* Mask growth by the kernel footprint (a box of side ``2 hw + 1``) is a pair of running ORs built
  by doubling (``log2(2 hw + 1)`` shifted ORs per axis), exact, on any array module.
* The variance keeps the reference's model (the centre kernel squared, rescaled by the exact
  polynomial ratio): one forward and one inverse FFT per band.

Each function here takes the array module through a :class:`dia.backend.Backend`; nothing calls
NumPy-only functions on ``xp`` arrays.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.fft

from .backend import Backend
from .basis import normalised_coords
from .convolve import kernel_power_coeffs, kernel_spectra
from .fit import KernelSolution
from .masks import MaskBits

__all__ = ["window_or", "grow_mask_box", "band_layout", "subtract_fused"]

_CONVOLVED = int(MaskBits.CONVOLVED)
_NO_DATA = int(MaskBits.NO_DATA)


def window_or(a, length: int, axis: int):
    """Running OR along ``axis``: ``out[k] = a[k] | a[k + 1] | ... | a[k + length - 1]``.

    The output is ``length - 1`` shorter than ``a`` along ``axis``.  Built by doubling: a window
    of ``w`` is the OR of two windows of ``w / 2``, and a length that is not a power of two is the
    OR of two overlapping power-of-two windows, so the cost is ``ceil(log2(length))`` ORs.
    """
    if length < 1:
        raise ValueError(f"window length must be >= 1, got {length}")

    def take(arr, start, stop):
        idx = [slice(None)] * arr.ndim
        idx[axis] = slice(start, stop)
        return arr[tuple(idx)]

    r = a
    w = 1
    while 2 * w <= length:
        n = r.shape[axis]
        r = take(r, 0, n - w) | take(r, w, n)
        w *= 2
    d = length - w
    if d:
        n = r.shape[axis]
        r = take(r, 0, n - d) | take(r, d, n)
    return r


def grow_mask_box(xp, flagged, half_width: int, border: bool = True):
    """Pixels within a ``(2 hw + 1)`` box of a flagged pixel (and, with ``border``, of the image edge).

    Equal to ``maximum_filter(flagged, size=2 hw + 1, mode="constant", cval=border)`` over the last two
    axes; leading axes (a stack of tiles) are independent images.
    """
    *lead, ny, nx = flagged.shape
    h = int(half_width)
    length = 2 * h + 1
    padded = xp.full((*lead, ny + 2 * h, nx + 2 * h), bool(border), dtype=bool)
    padded[..., h : h + ny, h : h + nx] = flagged
    return window_or(window_or(padded, length, -2), length, -1)


def band_layout(ny: int, band_rows: int | None, half_width: int) -> tuple[int, int]:
    """``(rows per band, FFT length along y)``: bands of about ``band_rows`` rows, balanced.

    ``None`` (or ``band_rows >= ny``): a single band.
    """
    if not band_rows or band_rows >= ny:
        band = ny
    else:
        n_bands = -(-ny // int(band_rows))
        band = -(-ny // n_bands)
    # 5-smooth lengths: measured ~15% faster than the 7- and 11-smooth ones scipy allows for complex FFTs
    return band, scipy.fft.next_fast_len(band + 2 * half_width, real=True)


def _row_coefficients(xp, coeffs: dict[tuple[int, int], float], ypow_rows):
    """Row coefficients ``a[:, i] = sum_j c_ij yn^j`` (float64 ``(rows, deg_x)``): ``p = sum_i a_i(y) xn^i``."""
    deg_x = max(i for i, _ in coeffs) + 1
    deg_y = max(j for _, j in coeffs) + 1
    cmat = np.zeros((deg_y, deg_x))
    for (i, j), c in coeffs.items():
        cmat[j, i] += c
    # a handful of multiply-adds (no BLAS call: a tiny matrix product is slow under thread oversubscription)
    a = None
    for j in range(deg_y):
        term = ypow_rows[:, j : j + 1] * xp.asarray(cmat[j][None, :])
        a = term if a is None else a + term
    return a


def _horner(xp, a, xn_t, dtype, out=None):
    """``sum_i a[:, i] xn^i`` on a band by Horner's rule (``a``: row coefficients, ``xn_t``: x in ``dtype``)."""
    a = a.astype(dtype)
    deg = a.shape[1]
    ny, nx = a.shape[0], xn_t.shape[0]
    if out is None:
        out = xp.empty((ny, nx), dtype=dtype)
    if deg == 1:
        out[...] = a[:, :1]
        return out
    xp.multiply(a[:, deg - 1 : deg], xn_t[None, :], out=out)
    for i in range(deg - 2, -1, -1):
        out += a[:, i : i + 1]
        if i:
            out *= xn_t[None, :]
    return out


class _Laps:
    """Adds synchronised seconds since the previous call to ``timings[name]`` (no-op without a dict)."""

    def __init__(self, be: Backend, timings: dict | None):
        self.be, self.timings = be, timings
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.timings is None:
            return
        self.be.sync()
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.t
        self.t = now


def subtract_fused(be: Backend, x_img, x_var, x_mask, y_img, y_var, y_mask, solution: KernelSolution, convolved: str,
                   *, grow_bits: int, dtype, band_rows: int | None, timings: dict | None = None,
                   noise_cov: np.ndarray | None = None):
    """Difference, variance and mask of a PSF-matched pair, band by band.

    Parameters
    ----------
    be : Backend
        Array module and FFTs.
    x_img, x_var, x_mask : arrays
        The image that is convolved (pixels flagged by ``grow_bits`` or non-finite count as zero).
    y_img, y_var, y_mask : arrays
        The reference image, not convolved.
    solution : KernelSolution
        Fitted kernel and background.
    convolved : {"template", "search"}
        ``template``: ``D = Y - (K X + B)``; ``search``: ``D = (K X + B - Y) / sum K``.
    grow_bits : int
        Mask bits of ``x_mask`` grown by the kernel footprint (``MaskBits.CONVOLVED``).
    dtype : float32 or float64
        Precision of the full-frame arithmetic and FFTs.
    band_rows : int or None
        Rows per band (``None``: one band).
    timings : dict, optional
        Seconds spent on the image (``convolve``), the variance and the mask are added here.
    noise_cov : array, optional
        Noise covariance of ``x_img`` in units of ``x_var`` (:func:`dia.noise.noise_covariance`): the
        variance propagation accounts for correlated noise (:func:`dia.convolve.kernel_power_coeffs`).

    Returns
    -------
    image, variance, mask : arrays
        ``mask`` is ``x_mask | y_mask | CONVOLVED (grown) | NO_DATA (non-finite reference)``.
    """
    xp = be.xp
    ny, nx = y_img.shape
    kernels = solution.spatial_kernels()
    terms = solution.spatial_terms
    hw = kernels.shape[-1] // 2
    length = 2 * hw + 1
    band, fy = band_layout(ny, band_rows, hw)
    fx = scipy.fft.next_fast_len(nx + 2 * hw, real=True)
    kw = {"workers": be.workers} if be.name == "cpu" else {}
    hook = be.fft_hook or (lambda tag: None)

    # kernel spectra: the spatial kernels, and the centre kernel squared for the variance
    fker = kernel_spectra(be, kernels, (fy, fx), dtype)
    kc = solution.kernel_at((nx - 1) / 2, (ny - 1) / 2)
    k2 = kc * kc
    fk2 = kernel_spectra(be, k2[None], (fy, fx), dtype)[0]

    # polynomials in xn, yn (normalised coordinates): evaluated per band as row coefficients x powers of xn
    xn_t = normalised_coords(nx, xp).astype(dtype)
    yn = normalised_coords(ny, xp)
    deg_y = max(2 * solution.spatial_order, solution.background_order) + 1
    ypow = xp.stack([yn**j for j in range(deg_y)], axis=1)  # (ny, deg_y) float64
    groups: dict[int, list[tuple[int, int]]] = {}  # x power -> [(spatial term, y power)]
    for s, (i, j) in enumerate(terms):
        groups.setdefault(i, []).append((s, j))
    bg_coeffs = {t: float(c) for t, c in zip(solution.background_terms, solution.background_coefficients)}
    bg_left = sorted({i for i, _ in bg_coeffs} - set(groups))  # background x powers without a spatial group
    scale0 = float(solution.basis.images[0].sum())
    ksum_coeffs = {t: float(c) * scale0 for t, c in zip(terms, solution.coefficients[0])}
    ratio_coeffs = {k: v / float(k2.sum()) for k, v in kernel_power_coeffs(solution, noise_cov).items()}

    xpows = {i: xn_t**i for i in set(groups) | set(bg_left) if i > 1}
    xpows[1] = xn_t

    clock = _Laps(be, timings)
    # outputs, touched once up front: first-touch page faults taken band by band, interleaved with the FFT
    # temporaries, cost ~10x more on a busy host (measured); on a GPU this is one cheap kernel each
    image = xp.empty((ny, nx), dtype=dtype)
    variance = xp.empty((ny, nx), dtype=dtype)
    mask = xp.empty((ny, nx), dtype=xp.int32)
    for plane in (image, variance, mask):
        plane.fill(0)
    # band work buffers, reused from band to band
    buf = xp.zeros((fy, fx), dtype=dtype)
    vbuf = xp.zeros((fy, fx), dtype=dtype)
    ctype = xp.result_type(dtype, xp.complex64)
    prod = xp.empty((fy, fx // 2 + 1), dtype=ctype)
    acc_buf = xp.empty((band, fx // 2 + 1), dtype=ctype)
    conv_buf = xp.empty((band, nx), dtype=dtype)
    zero = dtype(0)

    for r0 in range(0, ny, band):
        r1 = min(r0 + band, ny)
        nr = r1 - r0
        a0, a1 = r0 - hw, r1 + hw  # input rows of this band (may overhang the image)
        i0, i1 = max(a0, 0), min(a1, ny)
        off, n_in = i0 - a0, i1 - i0
        xb, vb = x_img[i0:i1], x_var[i0:i1]
        # pixels that must not spread through the kernel: flagged bits and non-finite values
        bad = (x_mask[i0:i1] & grow_bits) != 0
        bad |= ~xp.isfinite(xb)
        bad |= ~xp.isfinite(vb)
        # the band's input, zero outside the image and on bad pixels (the buffers' x margins stay zero)
        for target, src in ((buf, xb), (vbuf, vb)):
            target[:off] = zero
            target[off + n_in :] = zero
            view = target[off : off + n_in, hw : hw + nx]
            xp.copyto(view, src, casting="same_kind")
            xp.copyto(view, zero, where=bad)
        ywin = ypow[r0:r1]
        yw_t = ywin.astype(dtype)
        bg_rows = _row_coefficients(xp, bg_coeffs, ywin).astype(dtype) if bg_coeffs else None

        # image: one forward FFT; per spatial term an inverse FFT along y, weighted by yn^j (a function of the
        # row); per power i of xn an inverse real FFT along x of the group's sum, then the weight xn^i
        fimg = be.rfft2(buf, tag="image-forward")
        conv = conv_buf[:nr]
        acc = acc_buf[:nr]
        for n_group, i in enumerate(sorted(groups)):
            for n_term, (s, j) in enumerate(groups[i]):
                hook("image-term-y")
                xp.multiply(fimg, fker[s], out=prod)
                part = be.fft.ifft(prod, axis=0, overwrite_x=True, **kw)[2 * hw : 2 * hw + nr]
                if j:
                    part *= yw_t[:, j : j + 1]
                if n_term == 0:
                    acc[...] = part
                else:
                    acc += part
            hook("image-term-x")
            real = be.fft.irfft(acc, n=fx, axis=1, **kw)[:, 2 * hw : 2 * hw + nx]
            if bg_rows is not None and i < bg_rows.shape[1]:
                real += bg_rows[:, i : i + 1]  # the background's xn^i part rides along
            if i:
                real *= xpows[i][None, :]
            if n_group == 0:
                conv[...] = real
            else:
                conv += real
        for i in bg_left:
            extra = xp.broadcast_to(bg_rows[:, i : i + 1], (nr, nx)).copy()
            if i:
                extra *= xpows[i][None, :]
            conv += extra
        yb = y_img[r0:r1].astype(dtype, copy=False)
        if convolved == "template":
            xp.subtract(yb, conv, out=image[r0:r1], casting="same_kind")
        else:
            ksum = _horner(xp, _row_coefficients(xp, ksum_coeffs, ywin), xn_t, dtype)
            conv -= yb
            xp.divide(conv, ksum, out=image[r0:r1])
        clock("convolve")

        # variance: the centre kernel squared, rescaled by the exact polynomial sum K(x, y)^2 / sum K_c^2
        fvar = be.rfft2(vbuf, tag="variance-forward")
        fvar *= fk2
        vconv = be.irfft2(fvar, s=(fy, fx), tag="variance-term")[2 * hw : 2 * hw + nr, 2 * hw : 2 * hw + nx]
        vout = variance[r0:r1]
        _horner(xp, _row_coefficients(xp, ratio_coeffs, ywin), xn_t, dtype, out=vout)
        vout *= vconv
        vout += y_var[r0:r1]
        if convolved == "search":
            ksum *= ksum
            vout /= ksum
        clock("variance")

        # mask: OR of the inputs, CONVOLVED where a flagged pixel (or the border) is within the footprint,
        # NO_DATA where the reference is not finite
        padded = xp.ones((a1 - a0, nx + 2 * hw), dtype=bool)
        padded[off : off + n_in, hw : hw + nx] = bad
        grown = window_or(window_or(padded, length, 0), length, 1)
        flags = grown.view(xp.uint8) * xp.uint8(_CONVOLVED)
        flags |= (~xp.isfinite(yb)).view(xp.uint8) * xp.uint8(_NO_DATA)
        mout = mask[r0:r1]
        xp.bitwise_or(x_mask[r0:r1], y_mask[r0:r1], out=mout)
        mout |= flags
        clock("mask")
    return image, variance, mask
