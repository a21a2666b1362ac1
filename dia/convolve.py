"""Full-frame application of a spatially varying kernel, its variance and mask growth.

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

__all__ = ["fft_shape", "kernel_spectra", "convolve_spatial", "convolve_variance", "grow_mask", "kernel_sum_image", "background_image"]


def fft_shape(shape: tuple[int, int], half_width: int) -> tuple[int, int]:
    """FFT grid for a linear (non-wrapping) convolution with a kernel of the given half-width."""
    ny, nx = shape
    return (scipy.fft.next_fast_len(ny + 2 * half_width), scipy.fft.next_fast_len(nx + 2 * half_width, real=True))


def kernel_spectra(be: Backend, kernels: np.ndarray, fshape: tuple[int, int], dtype):
    """rfft2 of small kernels ``(n, size, size)`` zero-padded (top-left) to ``fshape``.

    Done as a short real FFT along x of the ``size`` non-zero rows, then a
    complex FFT along y; the kernels are small so this costs less than a
    padded rfft2.
    """
    xp = be.xp
    k = xp.asarray(kernels.astype(dtype))
    kw = {"workers": be.workers} if be.name == "cpu" else {}
    kx = be.fft.rfft(k, n=fshape[1], axis=-1, **kw)  # (n, size, nxh)
    pad = xp.zeros((k.shape[0], fshape[0], kx.shape[-1]), dtype=kx.dtype)
    pad[:, : k.shape[1], :] = kx
    return be.fft.fft(pad, axis=1, overwrite_x=True, **kw)


def convolve_spatial(be: Backend, image, solution: KernelSolution, dtype):
    """Convolve ``image`` (bad pixels already replaced) with the spatially varying kernel.

    Returns ``sum_s P_s(x, y) (image conv K_s)(x, y)`` on the image grid
    (pixels within the kernel half-width of the border see zeros outside).
    """
    xp = be.xp
    ny, nx = image.shape
    hw = solution.basis.half_width
    fshape = fft_shape((ny, nx), hw)
    fimg = be.rfft2(image.astype(dtype, copy=False), s=fshape, tag="image-forward")
    fker = kernel_spectra(be, solution.spatial_kernels(), fshape, dtype)
    xn = normalised_coords(nx, xp).astype(dtype)
    yn = normalised_coords(ny, xp).astype(dtype)
    out = xp.zeros((ny, nx), dtype=dtype)
    for s, (i, j) in enumerate(solution.spatial_terms):
        conv = be.irfft2(fimg * fker[s], s=fshape, tag="spatial-term")[hw : hw + ny, hw : hw + nx]
        if i:
            conv = conv * (xn**i)[None, :]
        if j:
            conv = conv * (yn**j)[:, None]
        out += conv
    return out


def kernel_sum_image(be: Backend, solution: KernelSolution, dtype):
    """Kernel sum (photometric scale) at every pixel."""
    scale = float(solution.basis.images[0].sum())
    coeffs = {t: float(c) * scale for t, c in zip(solution.spatial_terms, solution.coefficients[0])}
    return eval_poly_image(coeffs, solution.shape, be.xp, dtype)


def background_image(be: Backend, solution: KernelSolution, dtype):
    """Differential background at every pixel."""
    coeffs = {t: float(c) for t, c in zip(solution.background_terms, solution.background_coefficients)}
    return eval_poly_image(coeffs, solution.shape, be.xp, dtype)


def kernel_power_coeffs(solution: KernelSolution) -> dict[tuple[int, int], float]:
    """Polynomial ``sum_uv K(x, y; u, v)^2 = sum_st P_s P_t <K_s, K_t>`` as {(i, j): coefficient}."""
    ks = solution.spatial_kernels()
    gram = np.einsum("suv,tuv->st", ks, ks)
    terms = solution.spatial_terms
    out: dict[tuple[int, int], float] = {}
    for s, (i1, j1) in enumerate(terms):
        for t, (i2, j2) in enumerate(terms):
            key = (i1 + i2, j1 + j2)
            out[key] = out.get(key, 0.0) + float(gram[s, t])
    return out


def convolve_variance(be: Backend, variance, solution: KernelSolution, dtype):
    """Propagate a variance plane through the spatially varying kernel.

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
    hw = solution.basis.half_width
    fshape = fft_shape((ny, nx), hw)
    kc = solution.kernel_at((nx - 1) / 2, (ny - 1) / 2)
    k2 = kc * kc
    fv = be.rfft2(variance.astype(dtype, copy=False), s=fshape, tag="variance-forward")
    fk = kernel_spectra(be, k2[None], fshape, dtype)[0]
    conv = be.irfft2(fv * fk, s=fshape, tag="variance-inverse")[hw : hw + ny, hw : hw + nx]
    ratio = eval_poly_image({k: v / float(k2.sum()) for k, v in kernel_power_coeffs(solution).items()}, (ny, nx), be.xp, dtype)
    return conv * ratio


def grow_mask(be: Backend, flagged, half_width: int):
    """Boolean image: pixels within the kernel footprint (a box) of a flagged pixel, or of the border."""
    xp = be.xp
    grown = be.ndimage.maximum_filter(flagged.astype(xp.uint8), size=2 * half_width + 1, mode="constant", cval=1)
    return grown.astype(bool)
