"""The fast detection paths against the previous ("reference") ones and against injected truth.

Every replaced algorithm of ``pipeline.detect`` keeps its previous implementation behind
``method="reference"``; these tests check that both give the same answer (exactly where the
algorithm is the same, to float32 rounding where the summation order changed) on small images
made here, with masks, missing data and sources at the border.
"""

import dataclasses

import numpy as np
import pytest
from conftest import render_gaussians
from scipy import ndimage
from scipy.spatial import cKDTree

from dia.masks import MaskBits
from pipeline.detect import (
    DetectConfig,
    DirectDetectConfig,
    annulus_median,
    aperture_fluxes,
    bright_isolated_stars,
    detect_difference,
    detect_direct,
    edge_distance_ok_at,
    filter_at,
    find_peaks,
    fit_psf_model,
    gaussian_psf,
    matched_filter,
    near_mask_at,
    psf_filter,
)
from pipeline.detect.filter import _segment_peaks


def _field(seed=7, n=80, shape=(300, 260), fwhm=3.5, sigma=10.0):
    """Point sources (S/N 6..200, some off the border) on noise, with bad pixels, NaN and missing data."""
    rng = np.random.default_rng(seed)
    xs = rng.uniform(-3, shape[1] + 3, n)
    ys = rng.uniform(-3, shape[0] + 3, n)
    s = fwhm / 2.3548
    flux = rng.uniform(6, 200, n) * sigma * np.sqrt(4 * np.pi * s**2)
    # and blended pairs 2-5 px apart: several local maxima in one segment
    px, py = rng.uniform(20, shape[1] - 20, 15), rng.uniform(20, shape[0] - 20, 15)
    sep, ang = rng.uniform(2, 5, 15), rng.uniform(0, np.pi, 15)
    xs = np.r_[xs, px, px + sep * np.cos(ang)]
    ys = np.r_[ys, py, py + sep * np.sin(ang)]
    flux = np.r_[flux, np.repeat(rng.uniform(20, 60, 15) * sigma * np.sqrt(4 * np.pi * s**2), 2)]
    image, var = render_gaussians(shape, xs, ys, flux, fwhm, sigma, seed=seed)
    mask = np.zeros(shape, np.int32)
    mask[rng.integers(0, shape[0], 40), rng.integers(0, shape[1], 40)] |= int(MaskBits.BAD)
    mask[rng.integers(0, shape[0], 10), rng.integers(0, shape[1], 10)] |= int(MaskBits.SAT)
    mask[:, 200:203] |= int(MaskBits.CONVOLVED)
    mask[250:, 230:] |= int(MaskBits.NO_DATA)
    image[5, 7] = np.nan
    var[9, 11] = 0.0
    return image, var, mask, xs, ys, flux


def test_matched_filter_fast_equals_reference_and_psf_filter():
    image, var, mask, *_ = _field()
    psf = gaussian_psf(3.5)
    fast = matched_filter(image, var, mask, psf, method="fast")
    ref = matched_filter(image, var, mask, psf, method="reference")
    np.testing.assert_allclose(fast.snr, ref.snr, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast.num, ref.num, rtol=1e-5, atol=1e-6 * np.abs(ref.num).max())
    assert (fast.snr == 0).sum() == (ref.snr == 0).sum()  # the same pixels without weight
    full = psf_filter(image, var, mask, psf)
    np.testing.assert_array_equal(full.snr, fast.snr)
    flux, err = fast.at(np.array([50, 120]), np.array([60, 30]))
    np.testing.assert_array_equal(flux, full.flux[[50, 120], [60, 30]])
    np.testing.assert_array_equal(err, full.flux_err[[50, 120], [60, 30]])


def test_matched_filter_non_separable_kernel_falls_back():
    image, var, mask, *_ = _field(seed=2)
    yy, xx = np.mgrid[-6:7, -6:7]
    psf = np.exp(-0.5 * ((xx + 0.6 * yy) ** 2 / 4.0 + yy**2 / 1.5))  # sheared: not separable
    psf /= psf.sum()
    fast = matched_filter(image, var, mask, psf, method="fast")
    ref = matched_filter(image, var, mask, psf, method="reference")
    np.testing.assert_array_equal(fast.snr, ref.snr)


@pytest.mark.parametrize("min_separation", [0, 3])
@pytest.mark.parametrize("negative", [False, True])
def test_find_peaks_fast_is_identical_to_reference(min_separation, negative):
    image, var, mask, *_ = _field(seed=3)
    snr = matched_filter(image, var, mask, gaussian_psf(3.5)).snr
    if negative:  # the sources as negative footprints
        snr = -snr
    for max_peaks in (None, 30):
        ref = find_peaks(-snr if negative else snr, 4.0, 3, max_peaks, min_separation=min_separation,
                         method="reference")
        fast = find_peaks(snr, 4.0, 3, max_peaks, min_separation=min_separation, method="fast", negative=negative)
        assert ref[0].size >= 30
        for a, b in zip(ref, fast):
            np.testing.assert_array_equal(a, b)
    if min_separation > 1:  # the window test mattered: 3x3 maxima alone are more
        assert find_peaks(snr, 4.0, 3, min_separation=1, negative=negative)[0].size > fast[0].size


def test_find_peaks_finds_the_injected_sources():
    image, var, mask, xs, ys, flux = _field(seed=4)
    x, y, _ = find_peaks(matched_filter(image, var, None, gaussian_psf(3.5)).snr, 5.0, 3, min_separation=3)
    inside = (xs > 5) & (xs < image.shape[1] - 5) & (ys > 5) & (ys < image.shape[0] - 5)
    s = 3.5 / 2.3548
    bright = inside & (flux / (10.0 * np.sqrt(4 * np.pi * s**2)) > 10)
    bright &= cKDTree(np.column_stack([xs, ys])).query(np.column_stack([xs, ys]), k=2)[0][:, 1] > 6  # unblended
    d, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([xs[bright], ys[bright]]))
    assert np.mean(d < 1.0) >= 0.95


def test_segment_peaks_ties_go_to_the_first_pixel():
    values = np.zeros((20, 20), np.float32)
    values[5:8, 5:9] = 3.0  # a plateau: the first pixel in raster order is the peak
    values[14, 14] = 2.0
    values[15, 15] = 2.0  # diagonal: a separate 4-connected region
    for method in ("fast", "reference"):
        iy, ix = _segment_peaks(values, values > 1, method)
        assert list(zip(iy.tolist(), ix.tolist())) == [(5, 5), (14, 14), (15, 15)]


@pytest.mark.parametrize("radius", [0, 1, 4, 25])
def test_mask_tests_at_pixels_equal_the_full_frame_filters(radius):
    rng = np.random.default_rng(radius)
    mask = np.zeros((90, 70), np.int32)
    mask[rng.integers(0, 90, 12), rng.integers(0, 70, 12)] = int(MaskBits.SAT)
    mask[80:, :5] |= int(MaskBits.NO_DATA)
    iy, ix = np.divmod(np.arange(mask.size), mask.shape[1])  # every pixel, border included
    for bits in (int(MaskBits.SAT), int(MaskBits.NO_DATA)):
        np.testing.assert_array_equal(near_mask_at(mask, bits, radius, iy, ix),
                                      near_mask_at(mask, bits, radius, iy, ix, "reference"))
    np.testing.assert_array_equal(edge_distance_ok_at(mask, radius, iy, ix),
                                  edge_distance_ok_at(mask, radius, iy, ix, "reference"))


def test_aperture_fluxes_fast_equal_reference_and_truth():
    image, var, mask, xs, ys, flux = _field(seed=5)
    x = np.r_[xs, 1.3, 258.6]  # two apertures hanging over the border
    y = np.r_[ys, 150.2, 3.9]
    for annulus in (None, (9.0, 14.0)):
        fast = aperture_fluxes(image, var, mask, x, y, 6.0, annulus=annulus)
        ref = aperture_fluxes(image, var, mask, x, y, 6.0, annulus=annulus, method="reference")
        np.testing.assert_allclose(fast[0], ref[0], rtol=1e-9, atol=1e-6)
        np.testing.assert_allclose(fast[1], ref[1], rtol=1e-9)
        np.testing.assert_array_equal(fast[2], ref[2])
    # against the injected fluxes: a 6 px aperture holds 1 - exp(-r^2 / 2 s^2) of a Gaussian
    s = 3.5 / 2.3548
    clean = ~fast[2][: xs.size] & (xs > 10) & (xs < 250) & (ys > 10) & (ys < 240)
    tree = cKDTree(np.column_stack([xs, ys]))
    clean &= tree.query(np.column_stack([xs, ys]), k=2)[0][:, 1] > 16
    expected = flux * (1 - np.exp(-(6.0**2) / (2 * s**2)))
    pull = (fast[0][: xs.size] - expected)[clean] / fast[1][: xs.size][clean]
    assert clean.sum() > 10
    assert abs(np.median(pull)) < 1.0


def test_annulus_median_fast_is_identical_to_reference():
    image, var, mask, xs, ys, _ = _field(seed=6)
    image = image + 37.0
    image[::13, ::7] = np.nan
    x = np.r_[xs, 0.4, 259.5]
    y = np.r_[ys, 0.2, 299.4]
    for annulus in ((8.0, 12.5), (3.3, 4.1)):
        fast = annulus_median(image, x, y, annulus)
        np.testing.assert_array_equal(fast, annulus_median(image, x, y, annulus, method="reference"))
        if annulus[0] > 5:  # beyond the PSF (a 3.3 px annulus holds source light): the sky of 37
            assert np.median(fast) == pytest.approx(37.0, abs=2.0)


def test_filter_at_equals_interpolated_maps():
    image, var, mask, *_ = _field(seed=8)
    mask[100:140, 100:140] |= int(MaskBits.BAD)  # no weight at all in the middle of it
    psf = gaussian_psf(3.5)
    full = psf_filter(image, var, mask, psf, method="reference")
    rng = np.random.default_rng(0)
    y = np.r_[rng.uniform(1, image.shape[0] - 2, 200), 1.0, 120.0, 120.5]
    x = np.r_[rng.uniform(1, image.shape[1] - 2, 200), image.shape[1] - 2.0, 120.0, 101.0]
    flux, err = filter_at(image, var, mask, psf, y, x)
    np.testing.assert_allclose(flux, ndimage.map_coordinates(full.flux, [y, x], order=1), rtol=1e-4, atol=1e-3)
    ref_err = ndimage.map_coordinates(full.flux_err, [y, x], order=1)
    np.testing.assert_array_equal(np.isfinite(err), np.isfinite(ref_err))
    ok = np.isfinite(ref_err)
    np.testing.assert_allclose(err[ok], ref_err[ok], rtol=1e-5)


def test_detect_difference_fast_and_reference_agree():
    image, var, mask, *_ = _field(seed=9, shape=(400, 380))
    fast = detect_difference(image, var, mask, 3.5, config=DetectConfig())
    ref = detect_difference(image, var, mask, 3.5, config=DetectConfig(method="reference"))
    assert len(fast) == len(ref) > 20
    np.testing.assert_allclose(fast["x"], ref["x"], atol=1e-3)
    np.testing.assert_allclose(fast["y"], ref["y"], atol=1e-3)
    np.testing.assert_array_equal(fast["flags"], ref["flags"])
    np.testing.assert_allclose(fast["snr"], ref["snr"], rtol=1e-4)
    np.testing.assert_allclose(fast["flux"], ref["flux"], rtol=1e-4)
    assert set(np.unique(fast["flags"])) > {0}  # flags were exercised


def test_detect_direct_fast_and_reference_agree(sim_pair):
    s, t = sim_pair.search, sim_pair.template
    t_mask = t.mask.copy()
    t_mask[200:260, 300:360] |= int(MaskBits.BAD)
    t = dataclasses.replace(t, mask=t_mask)
    fast = detect_direct(s, t, DirectDetectConfig())
    ref = detect_direct(s, t, DirectDetectConfig(method="reference"))
    assert len(fast) == len(ref) > 5
    np.testing.assert_allclose(fast["x"], ref["x"], atol=1e-3)
    np.testing.assert_array_equal(fast["flags"], ref["flags"])
    for col in ("flux", "search_flux", "template_flux", "delta_snr"):
        np.testing.assert_allclose(fast[col], ref[col], rtol=1e-4, atol=1e-3)


def test_bright_isolated_stars_and_psf_model_unchanged(sim_pair):
    t = sim_pair.template
    from pipeline.detect import estimate_background

    img = t.image - estimate_background(t.image, t.mask)
    for kwargs in ({}, {"isolation": 6.0, "min_snr": 50.0}, {"isolation": 4.0, "min_snr": 30.0}):
        fast = bright_isolated_stars(img, t.variance, t.mask, t.fwhm, **kwargs)
        ref = bright_isolated_stars(img, t.variance, t.mask, t.fwhm, method="reference", **kwargs)
        assert fast[0].size >= 5
        np.testing.assert_array_equal(fast[0], ref[0])
        np.testing.assert_array_equal(fast[1], ref[1])
    m_fast = fit_psf_model(img, t.variance, t.mask, t.fwhm)
    m_ref = fit_psf_model(img, t.variance, t.mask, t.fwhm, method="reference")
    assert m_fast.n_stars == m_ref.n_stars >= 5
    np.testing.assert_allclose(m_fast.fwhm_coeffs, m_ref.fwhm_coeffs, rtol=1e-9)
    assert m_fast.correction == pytest.approx(m_ref.correction, rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_snr_fast_equals_reference_bit_for_bit(dtype):
    from pipeline.detect.psf import _pixel_snr

    rng = np.random.default_rng(4)
    image = (100 * rng.standard_normal((150, 77))).astype(dtype)
    variance = rng.uniform(-1.0, 50.0, image.shape).astype(dtype)  # some not positive
    image[3, 3], image[4, 4], variance[5, 5], variance[6, 6], variance[7, 7] = np.nan, np.inf, np.nan, 0.0, np.inf
    fast, ref = _pixel_snr(image, variance), _pixel_snr(image, variance, method="reference")
    assert fast.dtype == ref.dtype == np.float32
    np.testing.assert_array_equal(fast.view(np.uint32), ref.view(np.uint32))


def test_method_is_validated():
    with pytest.raises(ValueError, match="DetectConfig.method"):
        DetectConfig(method="quick")
    with pytest.raises(ValueError, match="DirectDetectConfig.method"):
        DirectDetectConfig(method="quick")
    with pytest.raises(ValueError, match="find_peaks method"):
        find_peaks(np.zeros((5, 5)), 1.0, 1, method="quick")


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_sparse_local_maxima_equals_maximum_filter_at_the_borders(radius):
    """The padded-frame neighbour test gives the maxima of a full-frame maximum filter with -inf outside the
    segment pixels, also for pixels on the image's first and last rows and columns and on ties."""
    from scipy import ndimage

    from pipeline.detect.filter import _sparse_local_maxima

    rng = np.random.default_rng(radius)
    snr = ndimage.gaussian_filter(rng.normal(0, 1, (37, 53)), 1.2).astype(np.float32) * 6
    snr[0, 0], snr[-1, -1], snr[0, 30], snr[20, -1] = 9.0, 8.5, 7.5, 7.0  # maxima on the border
    snr[10, 10] = snr[10, 11] = 12.0  # a tie: both are maxima of the filter, and both kept
    for sign in (1.0, -1.0):
        flat = np.flatnonzero((sign * snr).ravel() > 0.5)
        inside = np.zeros(snr.size, bool)
        inside[flat] = True
        inside = inside.reshape(snr.shape)
        masked = np.where(inside, sign * snr, -np.inf).astype(np.float32)
        local = ndimage.maximum_filter(masked, size=2 * radius + 1, mode="nearest")
        expected = np.flatnonzero((inside & (masked == local)).ravel())
        got = _sparse_local_maxima(snr, flat, sign, radius)
        np.testing.assert_array_equal(got, expected)
        if sign > 0 and radius == 1:  # the planted border maxima and both tied pixels are found
            assert {0, snr.size - 1, 30, 20 * 53 + 52, 10 * 53 + 10, 10 * 53 + 11} <= set(got.tolist())


def test_label_pixels_numbers_regions_as_scipy_label():
    """pipeline.detect.filter.label_pixels (union-find on the flat indices of the pixels) gives every pixel the region
    number scipy.ndimage.label gives it, 4- and 8-connected, on random masks from empty to full (long winding
    regions), on 1-pixel-wide images and across the row ends (no wrap-around)."""
    from pipeline.detect.filter import label_pixels

    rng = np.random.default_rng(0)
    for shape in [(1, 40), (40, 1), (17, 23), (64, 64), (3, 200)]:
        for density in (0.0, 0.02, 0.3, 0.6, 0.9, 1.0):
            mask = rng.random(shape) < density
            flat = np.flatnonzero(mask)
            for connectivity, structure in ((8, np.ones((3, 3), bool)), (4, None)):
                labels, n = ndimage.label(mask, structure)
                lab, k = label_pixels(flat, shape, connectivity)
                assert k == n and np.array_equal(lab, labels.ravel()[flat]), (shape, density, connectivity)
    edge = np.zeros((4, 5), bool)
    edge[1, 4] = edge[2, 0] = True  # consecutive flat indices, opposite ends of two rows: two regions
    assert label_pixels(np.flatnonzero(edge), edge.shape, 8)[1] == 2
    with pytest.raises(ValueError, match="connectivity"):
        label_pixels(np.zeros(0, int), (3, 3), 6)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_segments_are_the_same_by_either_labelling(fraction, monkeypatch):
    """find_peaks and _segment_peaks label the pixels above threshold themselves when they are few
    (_SPARSE_FRACTION) and the whole frame otherwise: the same peaks either way."""
    import pipeline.detect.filter as filt

    image, var, mask, *_ = _field(seed=3)
    snr = matched_filter(image, var, mask, gaussian_psf(3.5)).snr
    expect = filt.find_peaks(snr, 5.0, 3, min_separation=0), filt._segment_peaks(snr, snr > 5.0)
    monkeypatch.setattr(filt, "_SPARSE_FRACTION", fraction)
    got = filt.find_peaks(snr, 5.0, 3, min_separation=0), filt._segment_peaks(snr, snr > 5.0)
    for a, b in zip(expect[0] + expect[1], got[0] + got[1]):
        assert np.array_equal(a, b)
    assert expect[0][0].size > 5
