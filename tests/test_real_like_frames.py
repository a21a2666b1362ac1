"""``pipeline subtract`` with default settings on real-like frames made here with known truth (issue #11).

Small (256 x 256) and tiny (128 x 128), sparse (8 stars), sky-subtracted with residual pedestals and a
differential gradient, correlated noise (white noise smoothed by a known Gaussian), MJy/sr without GAIN
among galaxies: each subtracts with the defaults and its blank-sky D / sigma has median ~0 and std in
[0.95, 1.10].  The frames come from :func:`benchmarks.real_frames.make_frames` (the benchmark's own).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from astropy.io import fits
from scipy import ndimage
from scipy.signal import correlate2d

from benchmarks.hotpants import _near_objects
from benchmarks.real_frames import SYNTHETIC_CASES, difference_figures, make_frames, run_subtract, write_frames
from dia import PsfMatchConfig, estimate_fwhm, subtract
from dia.backend import get_backend
from dia.noise import noise_covariance
from pipeline.io import read_exposure


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every synthetic case through ``pipeline subtract`` (defaults; the correlated one also with --decorrelate)."""
    work = tmp_path_factory.mktemp("real_like")
    out = {}
    runs = [(name, name, ()) for name in SYNTHETIC_CASES] + [("correlated+decorrelate", "correlated",
                                                              ("--decorrelate",))]
    for key, name, extra in runs:
        frames = make_frames(name)
        search, template = write_frames(frames, work / key)
        diff_path = work / f"{key}_diff.fits"
        res = run_subtract(search, template, diff_path, extra)
        out[key] = (frames, search, template, diff_path, res)
    return out


def _figures(entry):
    frames, _, _, diff_path, res = entry
    assert res["rc"] == 0, res["stderr"]
    with fits.open(diff_path) as h:
        d = h["IMAGE"].data.astype(float)
        sigma = np.sqrt(h["VARIANCE"].data.astype(float))
        bad = h["MASK"].data != 0
        header = h["IMAGE"].header
    fwhm = max(frames.case.search_fwhm, frames.case.template_fwhm)
    blank = ~_near_objects(d.shape, frames.objects_xy, max(15.0, 4.0 * fwhm))
    return difference_figures(d, sigma, bad, blank, frames.stars_xy, frames.stars_flux, 2 * fwhm), header


@pytest.mark.parametrize("key", list(SYNTHETIC_CASES) + ["correlated+decorrelate"])
def test_defaults_subtract_with_the_right_noise(results, key):
    figures, header = _figures(results[key])
    blank = figures["blank"]
    assert blank["n_pixels"] > 3000
    assert abs(blank["median"]) < 0.1
    assert 0.95 <= blank["std"] <= 1.10
    assert 0.95 <= blank["robust_std"] <= 1.10
    assert str(header["DIA FIT BACKGROUND"]).startswith("sky:")
    case = results[key][0].case
    if case.n_galaxies == 0 and (case.n_stars < 10 or case.shape[0] < 256):
        assert header["DIA FIT SPATIAL_ORDER"] < PsfMatchConfig().spatial_order  # the order fallback


def test_star_residuals_are_small_on_the_sparse_frame(results):
    figures, _ = _figures(results["sparse"])
    assert figures["stars"]["n"] >= 4
    assert figures["stars"]["median_abs_frac"] < 0.02


def test_sky_subtracted_pedestals_go_to_the_background_term(results):
    """Pedestals +3 / -2.5 ADU and a 0.02 ADU/px template gradient: the sky re-fit takes them out."""
    frames, search, template, _, _ = results["sky_subtracted"]
    s, t = read_exposure(search), read_exposure(template)
    z = np.zeros(s.shape, np.int32)
    blank = ~_near_objects(s.shape, frames.objects_xy, 21.0)
    medians = {}
    for fit in ("sky", "stamps"):
        d = subtract(s.image, s.variance, z, t.image, t.variance, z, search_fwhm=s.fwhm, template_fwhm=t.fwhm,
                     config=PsfMatchConfig(background_fit=fit))
        ok = blank & (d.mask == 0)
        medians[fit] = float(np.median(d.image[ok] / np.sqrt(d.variance[ok])))
        assert d.stats.background.startswith("sky:") == (fit == "sky")
    assert abs(medians["sky"]) < 0.05
    assert abs(medians["sky"]) <= abs(medians["stamps"]) + 0.01


def test_psf_size_among_galaxies():
    """30 galaxies (intrinsic sigma 2-4x the PSF's) and 8 stars: the stellar locus gives the PSF FWHM."""
    frames = make_frames("mjysr")
    for image, truth in ((frames.search, frames.case.search_fwhm), (frames.template, frames.case.template_fwhm)):
        assert estimate_fwhm(image) == pytest.approx(truth, rel=0.04)
    # 6 stars among 40 galaxies (the locus needs 10% of the measured sources, stellar_locus' min_fraction)
    big = dataclasses.replace(frames.case, n_stars=6, n_galaxies=40)
    assert estimate_fwhm(make_frames(big, seed=3).search) == pytest.approx(frames.case.search_fwhm, rel=0.06)


def test_noise_model_without_gain_is_measured_from_the_sky(results):
    frames, search, _, _, res = results["mjysr"]
    exp = read_exposure(search)
    assert exp.provenance["variance"].startswith("sky only")
    assert "MJy/sr" in exp.provenance["variance"]
    truth = frames.case.noise[0] * frames.case.unit_scale
    assert math.sqrt(float(np.median(exp.variance))) == pytest.approx(truth, rel=0.05)
    assert "search variance: sky only" in res["stdout"]


def test_noise_covariance_of_smoothed_white_noise():
    """White noise smoothed by a Gaussian of 0.9 px: the measured covariance is the kernel's autocorrelation."""
    rng = np.random.default_rng(4)
    shape, sigma = (256, 256), 0.9
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma, mode="wrap")
    delta = np.zeros((21, 21))
    delta[10, 10] = 1.0
    k = ndimage.gaussian_filter(delta, sigma)
    auto = correlate2d(k, k)[20 - 3 : 20 + 4, 20 - 3 : 20 + 4] / (k**2).sum()
    var = np.full(shape, field.var())
    be = get_backend("cpu", 1)
    cov = noise_covariance(be, field, var, np.zeros(shape, np.int32))
    assert np.abs(cov[2:5, 2:5] - auto[2:5, 2:5]).max() < 0.05
    white = noise_covariance(be, rng.normal(size=shape), np.ones(shape), np.zeros(shape, np.int32))
    assert np.count_nonzero(white) == 1 and white[3, 3] == 1.0


def test_decorrelated_variance_is_measured(results):
    _, header = _figures(results["correlated+decorrelate"])
    assert header["DECORREL"]
    assert header["DIA FIT VARIANCE_SCALE"] != 1.0


@pytest.mark.parametrize("size, lag", [(21, 3), (7, 3), (5, 2)])
def test_kernel_correlation_is_the_centre_of_scipy_correlate2d(size, lag):
    from dia.noise import kernel_correlation

    rng = np.random.default_rng(size)
    a, b = rng.normal(size=(size, size)), rng.normal(size=(size, size))
    c = size - 1
    expect = correlate2d(a, b, "full")[c - lag : c + lag + 1, c - lag : c + lag + 1]
    np.testing.assert_allclose(kernel_correlation(a, b, lag), expect, rtol=0, atol=1e-12)
