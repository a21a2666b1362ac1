"""Alard-Lupton kernel basis: Gaussians x polynomials, and spatial polynomials."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .config import PsfMatchConfig

__all__ = ["KernelBasis", "make_basis", "basis_sigmas", "spatial_terms", "FWHM_TO_SIGMA", "SeparableBasis",
           "separable_basis"]

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclasses.dataclass(frozen=True)
class KernelBasis:
    """A kernel basis on a square ``(size, size)`` pixel grid.

    Attributes
    ----------
    sigmas, degrees : tuple
        Gaussian widths [px] and the polynomial degree used with each.
    half_width : int
        Kernel half-width; the kernel side is ``2 * half_width + 1``.
    images : numpy.ndarray
        ``(n_basis, size, size)`` float64; ``images[0]`` sums to one, every
        other function sums to zero.
    """

    sigmas: tuple[float, ...]
    degrees: tuple[int, ...]
    half_width: int
    images: np.ndarray

    @property
    def size(self) -> int:
        return 2 * self.half_width + 1

    @property
    def n_basis(self) -> int:
        return int(self.images.shape[0])


def basis_sigmas(search_fwhm: float, template_fwhm: float, config: PsfMatchConfig) -> tuple[float, ...]:
    """Basis Gaussian widths [px], derived as in ip_diffim.

    sigma_K = sqrt(sigma_wide^2 - sigma_narrow^2) is the width of the Gaussian
    that takes the narrow PSF to the wide one.  The Gaussians are
    sigma_K * beta**(i - c) (c the central index), with the narrowest floored at
    ``min_sigma`` and the others kept ``beta`` apart.
    """
    if config.kernel_sigmas is not None:
        return tuple(float(s) for s in config.kernel_sigmas)
    n = len(config.kernel_degrees)
    s1, s2 = search_fwhm * FWHM_TO_SIGMA, template_fwhm * FWHM_TO_SIGMA
    sig_k = math.sqrt(abs(s1 * s1 - s2 * s2))
    centre = (n - 1) // 2
    first = max(sig_k * config.sigma_beta ** (-centre), config.min_sigma)
    return tuple(first * config.sigma_beta**i for i in range(n))


def make_basis(search_fwhm: float, template_fwhm: float, config: PsfMatchConfig) -> KernelBasis:
    """Build the normalised Gaussian x polynomial basis.

    Functions are ordered Gaussian by Gaussian, and within one by total
    degree of ``u^i v^j``.  The first (the narrowest Gaussian, degree 0) is
    normalised to unit sum; every later function ``b`` is replaced by
    ``b - sum(b) * b_0`` so it sums to zero (then scaled to unit L2 norm for
    conditioning).  The photometric scale of a kernel is thus the coefficient
    of ``b_0`` alone.
    """
    sigmas = basis_sigmas(search_fwhm, template_fwhm, config)
    if config.kernel_size is not None:
        size = config.kernel_size
    else:
        size = int(math.ceil(config.kernel_size_factor * max(sigmas)))
        size = min(max(size, config.kernel_size_min), config.kernel_size_max)
        size += 1 - size % 2
    hw = size // 2
    u = np.arange(-hw, hw + 1, dtype=np.float64)
    scale = float(hw)
    funcs = []
    for sigma, degree in zip(sigmas, config.kernel_degrees):
        g = np.exp(-0.5 * (u / sigma) ** 2)
        for total in range(degree + 1):
            for j in range(total + 1):
                i = total - j
                fx = g * (u / scale) ** i
                fy = g * (u / scale) ** j
                funcs.append(np.outer(fy, fx))
    images = np.array(funcs)
    images[0] /= images[0].sum()
    for k in range(1, len(images)):
        images[k] -= images[k].sum() * images[0]
        images[k] /= np.sqrt((images[k] ** 2).sum())
    return KernelBasis(sigmas, tuple(config.kernel_degrees), hw, images)


@dataclasses.dataclass(frozen=True)
class SeparableBasis:
    """A kernel basis written with 1-D factors: ``images[k] = scale[k] * outer(fy[k], fx[k]) - offset[k] * images[0]``.

    Attributes
    ----------
    fx, fy : numpy.ndarray
        ``(n_basis, size)`` 1-D factors along x (``u``) and y (``v``).
    scale, offset : numpy.ndarray
        ``(n_basis,)``; ``offset[0] = 0``.
    x_index, y_index : numpy.ndarray
        ``(n_basis,)``: ``fx[k] = factors[x_index[k]]``, ``fy[k] = factors[y_index[k]]``.
    factors : numpy.ndarray
        ``(n_factors, size)``: the distinct 1-D factors, Gaussian ``g`` by Gaussian, ``g (u / hw)^p`` for
        ``p = 0 .. degree``.
    """

    fx: np.ndarray
    fy: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    x_index: np.ndarray
    y_index: np.ndarray
    factors: np.ndarray


def separable_basis(basis: KernelBasis, rtol: float = 1e-9) -> SeparableBasis | None:
    """The 1-D factors of a basis built by :func:`make_basis` (``None`` if ``basis.images`` are not of that form).

    Every Alard-Lupton function is a Gaussian times ``u^i v^j``, i.e. an outer product of two
    1-D functions; normalisation subtracts a multiple of the first function.  The factors are
    recomputed from ``sigmas``/``degrees``/``half_width`` and checked against ``images`` to ``rtol``
    of the largest pixel, so a basis whose images were changed by hand falls back to 2-D methods.
    """
    hw = basis.half_width
    u = np.arange(-hw, hw + 1, dtype=np.float64)
    scale_u = float(hw)
    fx, fy, xi, yi, factors = [], [], [], [], []
    for sigma, degree in zip(basis.sigmas, basis.degrees):
        g = np.exp(-0.5 * (u / sigma) ** 2)
        base = len(factors)
        factors.extend(g * (u / scale_u) ** p for p in range(degree + 1))
        for total in range(degree + 1):
            for j in range(total + 1):
                i = total - j
                xi.append(base + i)
                yi.append(base + j)
                fx.append(factors[base + i])
                fy.append(factors[base + j])
    if len(fx) != basis.n_basis:
        return None
    fx_a, fy_a = np.array(fx), np.array(fy)
    raw = np.einsum("kv,ku->kvu", fy_a, fx_a)
    sums = raw.sum(axis=(1, 2))
    first = raw[0] / sums[0]
    scale = np.empty(len(fx))
    offset = np.empty(len(fx))
    scale[0], offset[0] = 1.0 / sums[0], 0.0
    for k in range(1, len(fx)):
        norm = np.sqrt(((raw[k] - sums[k] * first) ** 2).sum())
        scale[k], offset[k] = 1.0 / norm, sums[k] / norm
    recon = scale[:, None, None] * raw - offset[:, None, None] * first[None]
    if np.max(np.abs(recon - basis.images)) > rtol * np.max(np.abs(basis.images)):
        return None
    return SeparableBasis(fx_a, fy_a, scale, offset, np.array(xi), np.array(yi), np.array(factors))


def spatial_terms(order: int) -> list[tuple[int, int]]:
    """Exponents ``(i, j)`` of the terms ``x^i y^j`` of a 2-D polynomial, by total degree."""
    return [(total - j, j) for total in range(order + 1) for j in range(total + 1)]


def normalised_coords(n: int, xp=np):
    """Pixel index 0..n-1 mapped to [-1, 1]."""
    c = xp.arange(n, dtype=xp.float64)
    return (2.0 * c - (n - 1)) / max(n - 1, 1)


def spatial_vector(x, y, shape: tuple[int, int], order: int) -> np.ndarray:
    """Values of the spatial polynomial terms at pixel positions ``x``, ``y`` (arrays), shape (n, n_terms)."""
    ny, nx = shape
    xn = (2.0 * np.asarray(x, dtype=np.float64) - (nx - 1)) / max(nx - 1, 1)
    yn = (2.0 * np.asarray(y, dtype=np.float64) - (ny - 1)) / max(ny - 1, 1)
    return np.stack([xn**i * yn**j for i, j in spatial_terms(order)], axis=-1)


def eval_poly_image(coeffs: dict[tuple[int, int], float], shape: tuple[int, int], xp=np, dtype=None, step: int = 1):
    """Evaluate ``sum c_ij xn^i yn^j`` on the full pixel grid (or every ``step``-th pixel of it on both axes,
    ``image[::step, ::step]``) as one small matrix product.

    The polynomial is written as ``Y @ C @ X^T`` with ``Y`` the powers of yn and
    ``X`` the powers of xn, so the cost is one (ny x d) @ (d x nx) product.
    """
    ny, nx = shape
    if not coeffs:
        return xp.zeros((-(-ny // step), -(-nx // step)), dtype=dtype or xp.float64)
    deg = max(max(i, j) for i, j in coeffs) + 1
    cmat = np.zeros((deg, deg))
    for (i, j), c in coeffs.items():
        cmat[j, i] += c
    xn = normalised_coords(nx, xp)[::step]
    yn = normalised_coords(ny, xp)[::step]
    xpow = xp.stack([xn**i for i in range(deg)], axis=1)  # (nx, deg)
    ypow = xp.stack([yn**j for j in range(deg)], axis=1)  # (ny, deg)
    left = ypow @ xp.asarray(cmat)  # small products in float64, the full-frame one in the output dtype
    if dtype is not None:
        left, xpow = left.astype(dtype), xpow.astype(dtype)
    return left @ xpow.T
