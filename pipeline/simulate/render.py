"""Vectorised rendering: PSF fields, point-source stamps, Sersic galaxies, varying convolution.

Conventions: pixel ``(x, y)`` are 0-based coordinates of pixel centres;
arrays are indexed ``[y, x]``.  Every stamp is normalised to unit sum over
its full square (including parts that fall off the image), so the flux put
into the image by a source is exactly its truth flux (minus what falls off
the CCD).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.fft

__all__ = ["PsfField", "moffat_alpha", "render_points", "point_stamps", "render_sersic", "convolve_varying"]

#: maximum number of profile evaluations per vectorised chunk
_CHUNK = 3_000_000


def moffat_alpha(fwhm: np.ndarray | float, beta: float) -> np.ndarray:
    """Moffat core width alpha for a FWHM: ``fwhm = 2 alpha sqrt(2**(1/beta) - 1)``."""
    return np.asarray(fwhm) / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _quadratic_form(a: np.ndarray, b: np.ndarray, theta: np.ndarray):
    """Coefficients of ``A dx^2 + B dx dy + C dy^2 = (x'/a)^2 + (y'/b)^2`` for axes rotated by theta."""
    c, s = np.cos(theta), np.sin(theta)
    ia, ib = 1.0 / a**2, 1.0 / b**2
    return c * c * ia + s * s * ib, 2.0 * s * c * (ia - ib), s * s * ia + c * c * ib


@dataclasses.dataclass(frozen=True)
class PsfField:
    """Elliptical Moffat PSF whose FWHM and ellipticity vary smoothly over the CCD.

    ``fwhm(x, y) = fwhm0 * (1 + c . [u, v, u^2, u v, v^2])`` and
    ``e_k(x, y) = e_k0 + g_k . [u, v]`` with ``u, v`` in [-1, 1] across the CCD.
    The ellipticity ``e = (a - b) / (a + b)`` is area preserving: the FWHM is
    the geometric mean of the major and minor axis FWHMs.
    """

    shape: tuple[int, int]
    fwhm0: float
    beta: float
    fwhm_coeffs: tuple[float, float, float, float, float]
    e1_0: float
    e2_0: float
    e1_grad: tuple[float, float]
    e2_grad: tuple[float, float]

    def _uv(self, x, y):
        ny, nx = self.shape
        return (np.asarray(x, float) - (nx - 1) / 2) / (nx / 2), (np.asarray(y, float) - (ny - 1) / 2) / (ny / 2)

    def fwhm(self, x, y) -> np.ndarray:
        """FWHM (px) at pixel positions."""
        u, v = self._uv(x, y)
        c = self.fwhm_coeffs
        return self.fwhm0 * (1 + c[0] * u + c[1] * v + c[2] * u * u + c[3] * u * v + c[4] * v * v)

    def ellipticity(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """``(e1, e2)`` at pixel positions."""
        u, v = self._uv(x, y)
        return (self.e1_0 + self.e1_grad[0] * u + self.e1_grad[1] * v,
                self.e2_0 + self.e2_grad[0] * u + self.e2_grad[1] * v)

    def form(self, x, y):
        """Moffat quadratic-form coefficients ``(A, B, C)`` in units where r^2/alpha^2 = A dx^2 + B dx dy + C dy^2."""
        alpha = moffat_alpha(self.fwhm(x, y), self.beta)
        e1, e2 = self.ellipticity(x, y)
        e = np.clip(np.hypot(e1, e2), 0, 0.9)
        q = (1 - e) / (1 + e)
        theta = 0.5 * np.arctan2(e2, e1)
        return _quadratic_form(alpha / np.sqrt(q), alpha * np.sqrt(q), theta)

    def stamp_radius(self, x, y, flux, f5: float) -> np.ndarray:
        """Stamp half-width (px): 2.5 FWHM for faint sources, growing with log flux (bright wings)."""
        fw = self.fwhm(x, y)
        boost = 2.5 + 2.0 * np.clip(np.log10(np.maximum(flux, 1e-30) / f5), 0, None)
        return np.clip(np.ceil(fw * boost), 3, 200).astype(int)

    def kernel(self, x: float, y: float, half: int, sub: int = 3) -> np.ndarray:
        """Pixel-integrated PSF image of size ``2 half + 1`` centred at a pixel centre, unit sum."""
        A, B, C = (np.atleast_1d(v) for v in self.form(x, y))
        stamps, _, _ = _stamps(np.zeros(1), np.zeros(1), np.array([half]), _moffat, (A, B, C, self.beta), sub)
        return stamps[0]


def _moffat(dx, dy, params, idx):
    A, B, C, beta = params
    A, B, C = A[idx, None, None], B[idx, None, None], C[idx, None, None]
    return (1.0 + A * dx * dx + B * dx * dy + C * dy * dy) ** (-beta)


def _sersic(dx, dy, params, idx):
    A, B, C, n, bn = params
    A, B, C = A[idx, None, None], B[idx, None, None], C[idx, None, None]
    n, bn = n[idx, None, None], bn[idx, None, None]
    r = np.sqrt(A * dx * dx + B * dx * dy + C * dy * dy + 1e-4)
    return np.exp(-bn * (r ** (1.0 / n) - 1.0))


def _stamps(x, y, radius, profile, params, sub, idx=None):
    """Unit-sum stamps of one common radius; returns (stamps, iy0, ix0) of the lower-left pixel."""
    if idx is None:
        idx = np.arange(len(x))
    R = int(radius[0])
    ix = np.rint(x).astype(int)
    iy = np.rint(y).astype(int)
    off = np.arange(-R, R + 1, dtype=float)
    sub_off = (np.arange(sub) + 0.5) / sub - 0.5
    fx = (ix - x)[:, None, None]
    fy = (iy - y)[:, None, None]
    total = 0.0
    for sy in sub_off:
        for sx in sub_off:
            dx = off[None, None, :] + fx + sx
            dy = off[None, :, None] + fy + sy
            total = total + profile(dx, dy, params, idx)
    total = total / total.sum(axis=(1, 2), keepdims=True)
    return total, iy - R, ix - R


def _add_stamps(image_flat, shape, stamps, iy0, ix0, flux):
    ny, nx = shape
    S = stamps.shape[1]
    yy = iy0[:, None, None] + np.arange(S)[None, :, None]
    xx = ix0[:, None, None] + np.arange(S)[None, None, :]
    ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    ok = np.broadcast_to(ok, stamps.shape)
    flat = (np.broadcast_to(yy, stamps.shape) * nx + np.broadcast_to(xx, stamps.shape))[ok]
    vals = (stamps * flux[:, None, None])[ok]
    image_flat += np.bincount(flat, weights=vals, minlength=ny * nx)


def _render_grouped(shape, x, y, flux, radius, profile, params, sub, out=None):
    """Render sources grouped by stamp radius; returns a float64 image."""
    ny, nx = shape
    flat = np.zeros(ny * nx) if out is None else out.reshape(-1)
    if len(x) == 0:
        return flat.reshape(shape)
    x, y, flux, radius = map(np.asarray, (x, y, flux, radius))
    # only sources whose stamp touches the image
    touch = (x + radius >= -0.5) & (x - radius <= nx - 0.5) & (y + radius >= -0.5) & (y - radius <= ny - 0.5)
    for R in np.unique(radius[touch]):
        members = np.flatnonzero(touch & (radius == R))
        per = max(1, _CHUNK // ((2 * R + 1) ** 2 * sub * sub))
        for start in range(0, len(members), per):
            sel = members[start:start + per]
            stamps, iy0, ix0 = _stamps(x[sel], y[sel], np.full(len(sel), R), profile, params, sub, idx=sel)
            _add_stamps(flat, shape, stamps, iy0, ix0, flux[sel])
    return flat.reshape(shape)


def _sub_for(fwhm: float) -> int:
    """Sub-pixel sampling per axis: pixel-integrate undersampled PSFs more finely."""
    return 4 if fwhm < 2.5 else (3 if fwhm < 4.0 else 2)


def render_points(shape, psf: PsfField, x, y, flux, f5: float, out=None) -> np.ndarray:
    """Add point sources (pixel-integrated local Moffat PSF) to an image (float64, ADU).

    Parameters
    ----------
    shape : (ny, nx)
    psf : PsfField
    x, y, flux : array
        Positions (px) and total fluxes (ADU).
    f5 : float
        5-sigma flux, sets the stamp size of bright sources.
    out : ndarray, optional
        Float64 image to add into.
    """
    x, y, flux = (np.asarray(v, float) for v in (x, y, flux))
    A, B, C = psf.form(x, y)
    radius = psf.stamp_radius(x, y, flux, f5)
    return _render_grouped(shape, x, y, flux, radius, _moffat, (A, B, C, psf.beta), _sub_for(psf.fwhm0), out)


def point_stamps(psf: PsfField, x, y, flux, f5: float):
    """Per-source unit-sum PSF stamps as rendered by :func:`render_points`.

    Returns a list of ``(stamp, iy0, ix0)``, one per source.
    """
    x, y, flux = (np.asarray(v, float) for v in (x, y, flux))
    A, B, C = psf.form(x, y)
    radius = psf.stamp_radius(x, y, flux, f5)
    out = []
    for i in range(len(x)):
        s, iy0, ix0 = _stamps(x[i:i + 1], y[i:i + 1], radius[i:i + 1], _moffat, (A, B, C, psf.beta),
                              _sub_for(psf.fwhm0), idx=np.array([i]))
        out.append((s[0], int(iy0[0]), int(ix0[0])))
    return out


def sersic_bn(n: np.ndarray) -> np.ndarray:
    """Sersic b_n (Ciotti & Bertin 1999 expansion) so that r_e encloses half the light."""
    n = np.asarray(n, float)
    return 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n * n)


def render_sersic(shape, x, y, flux, re, n, q, theta, sub: int = 2) -> np.ndarray:
    """Intrinsic (unconvolved) Sersic galaxies on a pixel grid (float64, ADU).

    ``re`` is the semi-major half-light radius (px), ``q`` the axis ratio,
    ``theta`` the major-axis angle from +x (radians).  Stamps extend to
    ``~4 re`` (at least 3 px) and are normalised to the galaxy flux.
    """
    x, y, flux, re, n, q, theta = (np.asarray(v, float) for v in (x, y, flux, re, n, q, theta))
    A, B, C = _quadratic_form(re, re * q, theta)
    radius = np.clip(np.ceil(re * (2.5 + 0.6 * n)), 3, 60).astype(int)
    # coarse radius bins limit the number of groups
    radius = np.where(radius <= 8, radius, np.minimum(60, 4 * np.ceil(radius / 4))).astype(int)
    return _render_grouped(shape, x, y, flux, radius, _sersic, (A, B, C, n, sersic_bn(n)), sub)


def convolve_varying(image: np.ndarray, psf: PsfField, shape, pad: int, spacing: int) -> np.ndarray:
    """Convolve a padded intrinsic image with the spatially varying PSF; return the ``shape`` interior.

    ``image`` has shape ``(ny + 2 pad, nx + 2 pad)`` (pixel (0, 0) of the CCD at
    ``[pad, pad]``).  The PSF is evaluated at a grid of nodes (spacing
    ``spacing`` px, corners included) and the convolved images are blended with
    bilinear weights, i.e. ``out = sum_n w_n(x, y) (image * K_n)``.
    """
    ny, nx = shape
    nxn = max(2, int(np.ceil((nx - 1) / spacing)) + 1)
    nyn = max(2, int(np.ceil((ny - 1) / spacing)) + 1)
    xn = np.linspace(0, nx - 1, nxn)
    yn = np.linspace(0, ny - 1, nyn)
    L = (scipy.fft.next_fast_len(ny + 2 * pad, real=True), scipy.fft.next_fast_len(nx + 2 * pad, real=True))
    F = scipy.fft.rfft2(image.astype(np.float32), s=L, workers=-1)

    def hat(nodes, coord):
        w = np.zeros((len(nodes), len(coord)), dtype=np.float32)
        step = nodes[1] - nodes[0]
        for i, c in enumerate(nodes):
            w[i] = np.clip(1 - np.abs(coord - c) / step, 0, None)
        return w

    wx = hat(xn, np.arange(nx))
    wy = hat(yn, np.arange(ny))
    out = np.zeros(shape, dtype=np.float32)
    for j, yc in enumerate(yn):
        for i, xc in enumerate(xn):
            k = psf.kernel(xc, yc, pad).astype(np.float32)
            conv = scipy.fft.irfft2(F * scipy.fft.rfft2(k, s=L, workers=-1), s=L, workers=-1)
            # full-convolution index of CCD pixel (y, x) is y + 2 pad
            out += wy[j][:, None] * wx[i][None, :] * conv[2 * pad:2 * pad + ny, 2 * pad:2 * pad + nx]
    return out
