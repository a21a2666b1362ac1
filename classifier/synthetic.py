"""Small synthetic labelled stamp sets, for tests, demos and speed checks (NumPy only).

Not the science data sets (those are cut from simulated CCDs through the pipeline); these are
idealised stamps with the same layout: template (deeper, its own PSF), search, difference, with
Gaussian noise.  Real = a point source present in search and difference only (optionally on a
galaxy); bogus = a static star (difference: small flux-mismatch residual), a cosmic ray (sharp
spike in search and difference), or a dipole (star shifted by a fraction of a pixel).
"""

from __future__ import annotations

import numpy as np

from .data import CHANNELS, StampSet

__all__ = ["make_synthetic_set"]

_SIZE = 51


def _gauss(x0: np.ndarray, y0: np.ndarray, fwhm: np.ndarray) -> np.ndarray:
    """(N, 51, 51) unit-flux circular Gaussians."""
    s = (fwhm / 2.3548)[:, None, None]
    g = np.arange(_SIZE, dtype=np.float64) - _SIZE // 2
    yy = g[None, :, None] - y0[:, None, None]
    xx = g[None, None, :] - x0[:, None, None]
    return np.exp(-0.5 * (xx ** 2 + yy ** 2) / s ** 2) / (2 * np.pi * s ** 2)


def make_synthetic_set(n: int, seed: int = 0, n_ccds: int = 10, snr_range: tuple[float, float] = (4.0, 40.0),
                       nan_fraction: float = 0.0) -> StampSet:
    """A balanced synthetic stamp set with metadata (ccd, snr, kind, ...).

    Parameters
    ----------
    n : int
        Number of stamps (half real, half bogus).
    seed : int
        Random seed (the set is a deterministic function of the arguments).
    n_ccds : int
        Stamps are spread over this many fake CCD names (``ccd00`` ...), for split tests.
    snr_range : (float, float)
        Range (log-uniform) of the transient's peak-aperture S/N in the search stamp.
    nan_fraction : float
        Fraction of stamps with a missing (NaN) edge strip, as at an image border.
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, dtype=np.int8)
    labels[: n // 2] = 1
    labels = rng.permutation(labels)
    sig_s = rng.uniform(8.0, 15.0, n)           # search sky noise (ADU)
    sig_t = sig_s * rng.uniform(0.3, 0.6, n)    # deeper template
    fw_s = rng.uniform(2.5, 5.0, n)
    fw_t = fw_s * rng.uniform(0.7, 1.1, n)
    sky_s = rng.uniform(100, 1000, n)
    sky_t = rng.uniform(100, 1000, n)
    snr = np.exp(rng.uniform(*np.log(snr_range), n))
    # flux giving that S/N in an optimal (PSF) aperture: S/N = F / (sigma * sqrt(4 pi s^2))
    s_psf = fw_s / 2.3548
    flux = snr * np.sqrt(sig_s ** 2 + sig_t ** 2) * np.sqrt(4 * np.pi) * s_psf
    jitter = lambda: rng.uniform(-0.5, 0.5, n)  # noqa: E731
    xo, yo = jitter(), jitter()

    kind = np.where(labels == 1, "transient", rng.choice(["star", "cosmic_ray", "dipole"], n))
    # a static scene: a star (bogus star/dipole, some transients on galaxies/stars)
    static_flux = np.where(kind != "cosmic_ray", flux * rng.uniform(1.0, 20.0, n), 0.0)
    static_flux = np.where((labels == 1) & (rng.random(n) < 0.6), 0.0, static_flux)
    sx, sy = xo + np.where(labels == 1, rng.uniform(-3, 3, n), 0.0), yo
    template = static_flux[:, None, None] * _gauss(sx, sy, fw_t)
    search = static_flux[:, None, None] * _gauss(sx, sy, fw_s)
    matched = static_flux[:, None, None] * _gauss(sx, sy, fw_s)
    # imperfect subtraction: a few percent flux mismatch, plus sub-pixel shifts for dipoles
    mismatch = rng.normal(1.0, 0.03, n)
    shift = np.where(kind == "dipole", rng.uniform(0.3, 0.8, n), 0.0)
    shifted = static_flux[:, None, None] * _gauss(sx + shift, sy, fw_s)
    search = np.where((kind == "dipole")[:, None, None], shifted, search)
    difference = search - mismatch[:, None, None] * matched
    # the transient itself
    tr = (labels == 1)[:, None, None] * flux[:, None, None] * _gauss(xo, yo, fw_s)
    search = search + tr
    difference = difference + tr
    # cosmic rays: a sharp 1-3 pixel spike in search (and difference)
    cr = np.zeros((n, _SIZE, _SIZE))
    is_cr = np.flatnonzero(kind == "cosmic_ray")
    c = _SIZE // 2
    for i in is_cr:
        amp = flux[i] * rng.uniform(0.2, 0.6)
        cr[i, c, c] = amp
        if rng.random() < 0.5:
            cr[i, c, c + 1] = amp * rng.uniform(0.3, 1.0)
    search = search + cr
    difference = difference + cr

    stamps = np.empty((n, 3, _SIZE, _SIZE), dtype=np.float32)
    stamps[:, 0] = template + sky_t[:, None, None] + sig_t[:, None, None] * rng.standard_normal((n, _SIZE, _SIZE))
    stamps[:, 1] = search + sky_s[:, None, None] + sig_s[:, None, None] * rng.standard_normal((n, _SIZE, _SIZE))
    dnoise = np.sqrt(sig_s ** 2 + sig_t ** 2)[:, None, None]
    stamps[:, 2] = difference + dnoise * rng.standard_normal((n, _SIZE, _SIZE))
    if nan_fraction > 0:
        cut = np.flatnonzero(rng.random(n) < nan_fraction)
        for i in cut:
            stamps[i, :, :, : rng.integers(3, 15)] = np.nan
    mag = 30.0 - 2.5 * np.log10(np.where(labels == 1, flux, np.nan))
    meta = {
        "ccd": np.array([f"ccd{k:02d}" for k in rng.integers(0, n_ccds, n)]),
        "x": rng.uniform(0, 2048, n), "y": rng.uniform(0, 4096, n),
        "mag": mag, "snr": snr, "kind": kind,
        "truth_id": np.where(labels == 1, np.arange(n), -1), "split": np.full(n, ""),
    }
    return StampSet(stamps, labels, meta, CHANNELS, {"stream": "synthetic", "seed": int(seed)})
