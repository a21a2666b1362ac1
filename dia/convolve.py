"""Full-frame application of a spatially varying kernel, its variance and mask growth.

These are the ``PsfMatchConfig(path="reference")`` implementation (and shared helpers such as
:func:`kernel_spectra`); the default ``"fused"`` path, same mathematics, is :mod:`dia.fused`.

A kernel ``K(x, y) = sum_s P_s(x, y) K_s`` is applied as ``sum_s P_s * (X conv K_s)``:
one forward FFT of the image and one inverse FFT per spatial term ``s``
(never one per basis function).  ``P_s = xn^i yn^j`` is rank one on the pixel
grid, so its weighting is a pair of broadcast multiplies.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from .backend import Backend
from .basis import eval_poly_image, normalised_coords
from .fit import KernelSolution

__all__ = ["fft_shape", "kernel_spectra", "convolve_terms", "convolve_spatial", "convolve_variance", "grow_mask",
           "kernel_sum_image", "background_image"]


def fft_shape(shape: tuple[int, int], half_width: int) -> tuple[int, int]:
    """FFT grid for a linear (non-wrapping) convolution with a kernel of the given half-width."""
    ny, nx = shape
    return (scipy.fft.next_fast_len(ny + 2 * half_width), scipy.fft.next_fast_len(nx + 2 * half_width, real=True))


def kernel_spectra(be: Backend, kernels: np.ndarray, fshape: tuple[int, int], dtype):
    """rfft2 of small kernels ``(n, size, size)`` zero-padded (top-left) to ``fshape``.

    Done as a short real FFT along x of the ``size`` non-zero rows, then a
    complex FFT along y.
    """
    xp = be.xp
    k = xp.asarray(kernels.astype(dtype))
    kw = {"workers": be.workers} if be.name == "cpu" else {}
    kx = be.fft.rfft(k, n=fshape[1], axis=-1, **kw)  # (n, size, nxh)
    pad = xp.zeros((k.shape[0], fshape[0], kx.shape[-1]), dtype=kx.dtype)
    pad[:, : k.shape[1], :] = kx
    return be.fft.fft(pad, axis=1, overwrite_x=True, **kw)


def convolve_terms(be: Backend, image, kernels: np.ndarray, terms, dtype, band_rows: int | None, tag: str = "image"):
    """``sum_s xn^i_s yn^j_s (image conv kernels[s])`` on the image grid.

    The image is processed in bands of ``band_rows`` output rows (overlap-save:
    each band reads ``2 * hw`` extra rows), which keeps the FFTs cache-sized
    and makes the kernel spectra small; ``band_rows=None`` is one full-frame
    band.  Per band: one forward FFT and one inverse FFT per kernel (spatial
    term).  Outside the image the input counts as zero.
    """
    xp = be.xp
    ny, nx = image.shape
    hw = kernels.shape[-1] // 2
    band = ny if not band_rows or band_rows >= ny else int(band_rows)
    fshape = (scipy.fft.next_fast_len(band + 2 * hw), scipy.fft.next_fast_len(nx + 2 * hw, real=True))
    fker = kernel_spectra(be, kernels, fshape, dtype)
    padded = xp.zeros((ny + 2 * hw, nx + 2 * hw), dtype=dtype)
    padded[hw : hw + ny, hw : hw + nx] = image
    xn = normalised_coords(nx, xp).astype(dtype)
    yn = normalised_coords(ny, xp).astype(dtype)
    xpows = {i: (xn**i)[None, :] for i in {i for i, _ in terms} if i}
    out = xp.empty((ny, nx), dtype=dtype)
    for r0 in range(0, ny, band):
        r1 = min(r0 + band, ny)
        fimg = be.rfft2(padded[r0 : r1 + 2 * hw], s=fshape, tag=f"{tag}-forward")
        acc = None
        for s, (i, j) in enumerate(terms):
            conv = be.irfft2(fimg * fker[s], s=fshape, tag=f"{tag}-term")
            conv = conv[2 * hw : 2 * hw + r1 - r0, 2 * hw : 2 * hw + nx]
            if i:
                conv = conv * xpows[i]
            if j:
                conv = conv * (yn[r0:r1] ** j)[:, None]
            if acc is None:
                acc = conv  # a view of a fresh irfft2 output: safe to accumulate into
            else:
                acc += conv
        out[r0:r1] = acc
    return out


def convolve_spatial(be: Backend, image, solution: KernelSolution, dtype, band_rows: int | None = None):
    """Convolve ``image`` (bad pixels already replaced) with the spatially varying kernel.

    Returns ``sum_s P_s(x, y) (image conv K_s)(x, y)``: one inverse FFT per
    spatial term (per band), never one per basis function.
    """
    return convolve_terms(be, image, solution.spatial_kernels(), solution.spatial_terms, dtype, band_rows, "image")


def kernel_sum_image(be: Backend, solution: KernelSolution, dtype, step: int = 1):
    """Kernel sum (photometric scale) at every pixel (every ``step``-th on both axes: ``[::step, ::step]``)."""
    scale = float(solution.basis.images[0].sum())
    coeffs = {t: float(c) * scale for t, c in zip(solution.spatial_terms, solution.coefficients[0])}
    return eval_poly_image(coeffs, solution.shape, be.xp, dtype, step=step)


def background_image(be: Backend, solution: KernelSolution, dtype):
    """Differential background at every pixel."""
    coeffs = {t: float(c) for t, c in zip(solution.background_terms, solution.background_coefficients)}
    return eval_poly_image(coeffs, solution.shape, be.xp, dtype)


def kernel_power_coeffs(solution: KernelSolution, noise_cov: np.ndarray | None = None) -> dict[tuple[int, int], float]:
    """Polynomial ``sum_uv K(x, y; u, v)^2 = sum_st P_s P_t <K_s, K_t>`` as {(i, j): coefficient}.

    With ``noise_cov`` (the convolved image's noise covariance ``C[dy + L, dx + L]`` in units of its
    variance plane, :func:`dia.noise.noise_covariance`), the variance gain of correlated noise
    ``sum_d C(d) sum_u K(u) K(u + d) = sum_st P_s P_t sum_d C(d) <K_s, K_t shifted by d>`` instead.
    """
    ks = solution.spatial_kernels()
    if noise_cov is None:
        gram = np.einsum("suv,tuv->st", ks, ks)
    else:
        from .noise import kernel_correlation

        lag = noise_cov.shape[0] // 2
        gram = np.empty((len(ks), len(ks)))
        for a in range(len(ks)):
            for b in range(len(ks)):
                gram[a, b] = float((noise_cov * kernel_correlation(ks[a], ks[b], lag)).sum())
    terms = solution.spatial_terms
    out: dict[tuple[int, int], float] = {}
    for s, (i1, j1) in enumerate(terms):
        for t, (i2, j2) in enumerate(terms):
            key = (i1 + i2, j1 + j2)
            out[key] = out.get(key, 0.0) + float(gram[s, t])
    return out


def convolve_variance(be: Backend, variance, solution: KernelSolution, dtype, band_rows: int | None = None,
                      noise_cov: np.ndarray | None = None):
    """Propagate a variance plane through the spatially varying kernel (``noise_cov``: see :func:`kernel_power_coeffs`).

    Exact would be ``sum_uv K(x, y; u, v)^2 V(x - u, y - v)``, which needs one
    convolution per *pair* of spatial terms.  We convolve ``V`` once with the
    squared kernel at the image centre and rescale by the exact, analytic
    ``sum K(x, y)^2 / sum K_centre^2`` (a polynomial, evaluated as a small
    matrix product).  This is exact wherever ``V`` is locally flat over the
    kernel footprint (sky-limited pixels) or the kernel shape does not change,
    and errs only by the change of kernel *shape* across the CCD times the
    variance structure within one kernel footprint (bright-star cores).
    """
    ny, nx = variance.shape
    kc = solution.kernel_at((nx - 1) / 2, (ny - 1) / 2)
    k2 = kc * kc
    conv = convolve_terms(be, variance, k2[None], [(0, 0)], dtype, band_rows, "variance")
    ratio = eval_poly_image({k: v / float(k2.sum()) for k, v in kernel_power_coeffs(solution, noise_cov).items()},
                            (ny, nx), be.xp, dtype)
    conv *= ratio
    return conv


def grow_mask(be: Backend, flagged, half_width: int):
    """Boolean image: pixels within the kernel footprint (a box) of a flagged pixel, or of the border."""
    xp = be.xp
    grown = be.ndimage.maximum_filter(flagged.astype(xp.uint8), size=2 * half_width + 1, mode="constant", cval=1)
    return grown.astype(bool)
