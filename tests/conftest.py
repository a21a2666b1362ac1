"""Shared fixtures: small simulated CCD pairs (in memory and on disk), made once per session."""

from __future__ import annotations

import warnings

import numpy as np
import pytest


@pytest.fixture(scope="session")
def sim_config():
    """A small DECam-like CCD (1024 x 1024) with 4x the default transient density (~20 per CCD)."""
    from pipeline.simulate import SimulationConfig

    return SimulationConfig(shape=(1024, 1024), transient_density=4 * SimulationConfig().transient_density)


@pytest.fixture(scope="session")
def sim_pair(sim_config):
    """One simulated pair (seed 11, CCD 0) in memory."""
    from pipeline.simulate import simulate_pair

    return simulate_pair(sim_config, seed=11, ccd_index=0)


@pytest.fixture(scope="session")
def sim_field(tmp_path_factory, sim_config):
    """Two simulated CCD pairs written to disk with a manifest; returns the manifest path."""
    from pipeline.simulate import write_simulation

    out = tmp_path_factory.mktemp("field")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_simulation(out, n_ccds=2, seed=11, config=sim_config)


def render_gaussians(shape, xs, ys, fluxes, fwhm, sky_sigma, seed=0):
    """Noisy image of circular Gaussian point sources (test helper): image, variance."""
    rng = np.random.default_rng(seed)
    sigma = fwhm / 2.3548
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    model = np.zeros(shape)
    r = int(5 * sigma) + 2
    for x, y, f in zip(xs, ys, fluxes):
        ix, iy = int(round(x)), int(round(y))
        sl = (slice(max(iy - r, 0), iy + r + 1), slice(max(ix - r, 0), ix + r + 1))
        model[sl] += f * np.exp(-0.5 * ((xx[sl] - x) ** 2 + (yy[sl] - y) ** 2) / sigma**2) / (2 * np.pi * sigma**2)
    image = model + rng.normal(0, sky_sigma, shape)
    return image.astype(np.float32), np.full(shape, sky_sigma**2, np.float32)
