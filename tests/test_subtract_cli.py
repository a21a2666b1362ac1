"""``pipeline subtract`` and ``write_difference``: one code path with ``pipeline run``, a complete header.

Regression for issue #10 item 8: the command built its own difference and skipped the variance
factor that ``pipeline run`` applies when the search image is convolved (std(D/sigma) 0.909 on
the command's path against 1.033 through ``run`` on a swapped-seeing pair).
"""

from __future__ import annotations

import dataclasses

import astropy.wcs
import numpy as np
import pytest
from astropy.io import fits
from scipy import ndimage

from pipeline import steps
from pipeline.cli import main as cli
from pipeline.config import RunConfig
from pipeline.io import read_exposure, write_difference, write_exposure
from pipeline.simulate import SimulationConfig, simulate_pair


@pytest.fixture(scope="module")
def swapped(tmp_path_factory):
    """A pair whose template has the worse seeing (the search is convolved), written to disk."""
    base = SimulationConfig()
    cfg = dataclasses.replace(base, shape=(1024, 1024), transient_density=4 * base.transient_density,
                              template_seeing_factor=1.6)
    sim = simulate_pair(cfg, seed=22, ccd_index=0)
    folder = tmp_path_factory.mktemp("swapped")
    write_exposure(sim.search, folder / "search.fits")
    write_exposure(sim.template, folder / "template.fits")
    return sim, folder


@pytest.fixture(scope="module")
def through_run(swapped):
    """The difference exactly as ``pipeline run`` makes it, from the same files."""
    sim, folder = swapped
    entry_pair = steps.LoadedPair("t", read_exposure(folder / "search.fits"), read_exposure(folder / "template.fits"))
    aligned = steps.align(entry_pair, RunConfig())
    return aligned, steps.psf_match_subtract(aligned, RunConfig())


@pytest.fixture(scope="module")
def through_cli(swapped, tmp_path_factory):
    sim, folder = swapped
    out = tmp_path_factory.mktemp("cli") / "diff.fits"
    assert cli(["subtract", str(folder / "search.fits"), str(folder / "template.fits"), "--out", str(out)]) == 0
    return out


def _blank_z(sim, image, variance, mask):
    sigma = np.sqrt(sim.search.variance)
    signal = sim.search_model - np.median(sim.search_model)
    quiet = ndimage.binary_erosion(signal < 0.05 * np.median(sigma), iterations=8)
    artifact = ndimage.binary_dilation(np.abs(sim.search.image - sim.search_model) > 6 * sigma, iterations=3)
    blank = quiet & ~artifact & (mask == 0)
    z = image[blank] / np.sqrt(variance[blank])
    return z[np.abs(z) < 6]


def test_subtract_command_gives_the_run_difference(swapped, through_run, through_cli):
    sim, _ = swapped
    aligned, diff = through_run
    assert diff.convolved == "search"
    with fits.open(through_cli) as hdul:
        image, variance, mask = (np.asarray(hdul[n].data) for n in ("IMAGE", "VARIANCE", "MASK"))
    np.testing.assert_array_equal(mask, diff.mask)
    np.testing.assert_allclose(image, diff.image, rtol=0, atol=1e-5 * float(np.abs(diff.image).max()))
    np.testing.assert_allclose(variance, diff.variance, rtol=1e-6)
    z = _blank_z(sim, image, variance, mask)
    assert z.size > 10_000
    assert 0.95 <= np.std(z) <= 1.10, np.std(z)


def test_difference_header_records_the_convolution_and_every_fit_value(swapped, through_run, through_cli):
    aligned, diff = through_run
    hdr = fits.getheader(through_cli, "IMAGE")
    assert hdr["CONVOLV"] == "search"
    assert hdr["CONVFWHM"] == pytest.approx(aligned.search.fwhm)
    assert hdr["SFWHM"] == pytest.approx(aligned.search.fwhm)
    assert hdr["TFWHM"] == pytest.approx(aligned.template.fwhm)
    assert hdr["TFWHM"] > hdr["SFWHM"]
    stats = diff.stats
    for name in ("found", "selected", "used", "iterations"):
        assert hdr[f"HIERARCH DIA FIT {name.upper()}"] == getattr(stats, name)
    for name in ("chi2_median", "chi2_max", "residual_rms"):
        assert hdr[f"HIERARCH DIA FIT {name.upper()}"] == getattr(stats, name)  # full precision
    for reason, count in stats.rejected.items():
        assert hdr[f"HIERARCH DIA FIT REJECTED {reason.upper()}"] == count
    sol = diff.solution
    for i, sigma in enumerate(sol.basis.sigmas):
        assert hdr[f"HIERARCH DIA KERNEL BASIS SIGMAS {i + 1}"] == sigma
    assert hdr["HIERARCH DIA KERNEL KERNEL_SUM_CENTRE"] == sol.kernel_sum_centre


def test_write_difference_round_trip(swapped, through_run, tmp_path):
    aligned, diff = through_run
    path = write_difference(diff, aligned.search, tmp_path / "d.fits", template_fwhm=aligned.template.fwhm)
    back = read_exposure(path)
    np.testing.assert_array_equal(back.image, diff.image)
    np.testing.assert_array_equal(back.variance, diff.variance)
    np.testing.assert_array_equal(back.mask & 0xFFFF, diff.mask & 0xFFFF)
    # the celestial mapping is the same; ancillary cards (the epoch: MJD-OBS/DATE-OBS) are checked below
    assert back.wcs.wcs.compare(aligned.search.wcs.wcs, cmp=astropy.wcs.WCSCOMPARE_ANCILLARY)
    assert back.zero_point == aligned.search.zero_point
    assert np.isfinite(back.mjd) and abs(back.mjd - aligned.search.mjd) < 1e-8  # days: better than 1 ms


def test_subtract_command_refuses_bad_configuration(swapped, tmp_path, capsys):
    _, folder = swapped
    args = ["subtract", str(folder / "search.fits"), str(folder / "template.fits"), "--out", str(tmp_path / "d.fits")]
    (tmp_path / "c.toml").write_text("min_stars = 3\n[psf_match]\nspatial_order = 1\n")
    assert cli(args + ["--config", str(tmp_path / "c.toml")]) == 2
    assert "key(s) min_stars outside the [psf_match] table" in capsys.readouterr().err
    (tmp_path / "c.toml").write_text("[psf_match]\nmin_stars = 'few'\n")
    assert cli(args + ["--config", str(tmp_path / "c.toml")]) == 2
    assert "[psf_match].min_stars: expected an integer, got 'few'" in capsys.readouterr().err
    assert not (tmp_path / "d.fits").exists()
