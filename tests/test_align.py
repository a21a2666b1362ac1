"""Template alignment: full-frame resampling with reproject and the cut-out variant."""

import dataclasses

import numpy as np
import pytest

from dia.masks import MaskBits
from pipeline.align import AlignConfig, align_pair, resample_cutouts
from pipeline.io import InputError


def _centroid(image, x, y, r=4):
    ix, iy = int(round(x)), int(round(y))
    sub = image[iy - r : iy + r + 1, ix - r : ix + r + 1].astype(float)
    sub = sub - np.median(image[iy - 3 * r : iy + 3 * r, ix - 3 * r : ix + 3 * r])
    sub = np.clip(sub, 0, None)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return ix + (sub * xx).sum() / sub.sum(), iy + (sub * yy).sum() / sub.sum()


def test_aligned_template_puts_stars_at_search_positions(sim_pair):
    truth = sim_pair.truth
    aligned = align_pair(sim_pair.search, sim_pair.template)
    assert aligned.template.shape == sim_pair.search.shape
    stars = truth[(truth["kind"] == "star") & (truth["snr"] > 200) & (truth["snr"] < 3000)]
    ny, nx = aligned.template.shape
    inner = (stars["x"] > 40) & (stars["x"] < nx - 40) & (stars["y"] > 40) & (stars["y"] < ny - 40)
    stars = stars[inner]
    assert len(stars) >= 5
    offsets = np.array([np.subtract(_centroid(aligned.template.image, s["x"], s["y"]), (s["x"], s["y"]))
                        for s in stars])
    # the template was offset by tens of pixels and rotated; after resampling stars sit on the truth
    assert np.median(np.hypot(*offsets.T)) < 0.15
    # the test is only meaningful if the raw template does not line up with the search grid
    assert np.hypot(truth.meta["template_offset_x"], truth.meta["template_offset_y"]) > 2.0


def test_footprint_and_mask_propagation(sim_pair):
    template = sim_pair.template
    mask = template.mask.copy()
    mask[500, 300] |= MaskBits.BAD
    template = dataclasses.replace(template, mask=mask)
    aligned = align_pair(sim_pair.search, template).template
    # where did template pixel (300, 500) land on the search grid?
    world = template.wcs.pixel_to_world_values(300, 500)
    sx, sy = sim_pair.search.wcs.world_to_pixel_values(*world)
    ix, iy = int(np.floor(sx)), int(np.floor(sy))
    window = aligned.mask[iy : iy + 2, ix : ix + 2]
    assert (window & MaskBits.BAD).any()
    # conservative but local: the flag covers a handful of pixels, not a region
    assert ((aligned.mask & MaskBits.BAD) != 0).sum() <= ((template.mask & MaskBits.BAD) != 0).sum() * 4 + 4
    # the template is offset: a strip of the search grid has no template data
    nodata = (aligned.mask & MaskBits.NO_DATA) != 0
    assert 0.005 < nodata.mean() < 0.3
    assert np.all(aligned.image[nodata] == 0)


def test_no_overlap_raises_clear_error(sim_pair):
    far = sim_pair.template.wcs.deepcopy()
    far.wcs.crval = [far.wcs.crval[0] + 5.0, far.wcs.crval[1]]
    template = dataclasses.replace(sim_pair.template, wcs=far, name="far.fits[IMAGE]")
    with pytest.raises(InputError, match="no overlap.*far.fits"):
        align_pair(sim_pair.search, template)


def test_cutouts_match_full_frame_resampling(sim_pair):
    aligned = align_pair(sim_pair.search, sim_pair.template, AlignConfig(order="bicubic"))
    x = np.array([200.3, 512.0, 800.7])
    y = np.array([300.6, 512.2, 700.1])
    stamps, mask = resample_cutouts(sim_pair.template, sim_pair.search.wcs, x, y, size=21)
    for k in range(3):
        ix, iy = int(round(x[k])), int(round(y[k]))
        full = aligned.template.image[iy - 10 : iy + 11, ix - 10 : ix + 11]
        np.testing.assert_allclose(stamps[k], full, rtol=1e-4, atol=1e-2 * np.std(full))
    # off the template: NaN and NO_DATA
    s, m = resample_cutouts(sim_pair.template, sim_pair.search.wcs, [-200.0], [-200.0], size=11)
    assert np.isnan(s).all() and ((m & MaskBits.NO_DATA) != 0).all()


def test_align_config_validation():
    with pytest.raises(ValueError, match="order"):
        AlignConfig(order="lanczos9")


def test_grid_mapping_agrees_with_reproject(sim_pair):
    """The fast grid method and reproject's per-pixel transform give the same resampled template."""
    fast = align_pair(sim_pair.search, sim_pair.template, AlignConfig(method="grid")).template
    ref = align_pair(sim_pair.search, sim_pair.template, AlignConfig(method="reproject")).template
    both = ((fast.mask | ref.mask) & MaskBits.NO_DATA) == 0
    assert both.mean() > 0.8
    scale = np.std(ref.image[both])
    assert np.max(np.abs(fast.image[both] - ref.image[both])) < 1e-3 * scale + 1e-3 * np.max(np.abs(ref.image[both]))
    np.testing.assert_array_equal(fast.mask[both], ref.mask[both])


# ---- the fast (affine, two-pass) path ------------------------------------------------------------


def _tan_wcs(shape, crpix_offset=(0.0, 0.0), rotation_deg=0.0, scale=1.0, sip_a20=0.0):
    """A TAN WCS of 0.263"/px centred on the grid (+ offset), rotated and rescaled; optional SIP term A_2_0."""
    from astropy.wcs import WCS, Sip

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip_a20 else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    crpix = [(shape[1] - 1) / 2 + 1 + crpix_offset[0], (shape[0] - 1) / 2 + 1 + crpix_offset[1]]
    w.wcs.crpix = crpix
    th = np.deg2rad(rotation_deg)
    w.wcs.cd = 0.263 / 3600 * scale * np.array([[-np.cos(th), np.sin(th)], [np.sin(th), np.cos(th)]])
    if sip_a20:
        a = np.zeros((3, 3))
        a[2, 0] = sip_a20
        w.sip = Sip(a, np.zeros((3, 3)), None, None, crpix)
    w.wcs.set()
    return w


def _star_pair(rotation_deg=0.8, offset=(12.3, -7.6), scale=1.0004, shape=(256, 320), template_wcs=None):
    """Search and template with the same Gaussian stars, each rendered through its own WCS (truth: search x, y)."""
    from conftest import render_gaussians

    from pipeline.io import Exposure

    rng = np.random.default_rng(5)
    n = 40
    xs, ys = rng.uniform(20, shape[1] - 20, n), rng.uniform(20, shape[0] - 20, n)
    fluxes = rng.uniform(2e4, 2e5, n)
    s_wcs = _tan_wcs(shape)
    t_wcs = template_wcs if template_wcs is not None else _tan_wcs(shape, offset, rotation_deg, scale)
    tx, ty = t_wcs.world_to_pixel_values(*s_wcs.pixel_to_world_values(xs, ys))
    s_img, s_var = render_gaussians(shape, xs, ys, fluxes, 3.5, 10.0, seed=1)
    t_img, t_var = render_gaussians(shape, tx, ty, fluxes, 3.0, 5.0, seed=2)
    t_mask = np.zeros(shape, np.int32)
    t_mask[100, 150] |= MaskBits.BAD
    t_mask[60:63, 200:202] |= MaskBits.SAT
    search = Exposure(s_img + 100, s_var, np.zeros(shape, np.int32), s_wcs, fwhm=3.5, name="s")
    template = Exposure(t_img + 100, t_var, t_mask, t_wcs, fwhm=3.0, name="t")
    return search, template, (xs, ys, fluxes)


def test_fast_path_agrees_with_exact_on_rotated_shifted_rescaled_pair():
    search, template, (xs, ys, fluxes) = _star_pair()
    cfg = dict(registration_stars=0)
    fast = align_pair(search, template, AlignConfig(method="fast", **cfg))
    exact = align_pair(search, template, AlignConfig(method="grid", **cfg))
    assert fast.method == "fast" and exact.method == "grid"
    f, g = fast.template, exact.template
    nf, ng = (f.mask & MaskBits.NO_DATA) != 0, (g.mask & MaskBits.NO_DATA) != 0
    # the template is shifted and rotated: a border without data, the same pixels on both paths
    assert 0.05 < ng.mean() < 0.4
    assert (nf != ng).sum() <= 4
    both = ~nf & ~ng
    sigma = np.sqrt(g.variance[both])
    diff = np.abs(f.image[both] - g.image[both]) / sigma
    # stars reach a peak S/N of ~4000 here: 0.002 px of position error is ~1 sigma at their flanks
    assert np.sqrt(np.mean(diff**2)) < 0.05 and diff.max() < 1.5
    assert np.max(np.abs(f.image - g.image)[both]) < 5e-4 * g.image.max()
    np.testing.assert_allclose(f.variance[both], g.variance[both], rtol=2e-3)
    assert ((f.mask ^ g.mask)[both] != 0).sum() <= 2
    assert (f.mask[both] & MaskBits.BAD).any() and (f.mask[both] & MaskBits.SAT).sum() >= 6
    assert f.image[nf].max() == 0 and np.all(f.variance[nf] == g.variance[ng][0])
    assert fast.overlap == pytest.approx(exact.overlap, abs=1e-4)
    # flux and position of the isolated resampled stars: the truth (interpolation keeps surface
    # brightness, so a sum over the smaller search pixels gains the pixel-area ratio 1.0004**2)
    inner = (xs > 30) & (xs < search.shape[1] - 30) & (ys > 30) & (ys < search.shape[0] - 30)
    sep = np.hypot(xs[:, None] - xs[None, :], ys[:, None] - ys[None, :]) + np.eye(xs.size) * 1e9
    inner &= sep.min(axis=1) > 25
    assert inner.sum() >= 5
    for x, y, flux in zip(xs[inner], ys[inner], fluxes[inner]):
        ix, iy = int(round(x)), int(round(y))
        box = f.image[iy - 10:iy + 11, ix - 10:ix + 11] - 100.0
        if (f.mask[iy - 10:iy + 11, ix - 10:ix + 11] & MaskBits.NO_DATA).any():
            continue
        assert box.sum() == pytest.approx(flux * 1.0004**2, rel=0.01)
        cx, cy = _centroid(f.image, x, y)
        assert np.hypot(cx - x, cy - y) < 0.05


def test_fast_path_bilinear_agrees_with_exact():
    search, template, _ = _star_pair(rotation_deg=-0.4, offset=(-5.5, 9.2), scale=0.9998)
    cfg = dict(registration_stars=0, order="bilinear")
    f = align_pair(search, template, AlignConfig(method="fast", **cfg)).template
    g = align_pair(search, template, AlignConfig(method="grid", **cfg)).template
    both = ((f.mask | g.mask) & MaskBits.NO_DATA) == 0
    assert both.mean() > 0.8
    assert np.max(np.abs(f.image[both] - g.image[both]) / np.sqrt(g.variance[both])) < 1.5
    assert (((f.mask ^ g.mask) & MaskBits.NO_DATA) != 0).sum() <= 4


def test_identity_wcs_is_not_resampled():
    search, _, _ = _star_pair()
    template = dataclasses.replace(search, image=search.image * 0.5 + 3, wcs=search.wcs.deepcopy(), name="same")
    for method in ("fast", "grid"):
        aligned = align_pair(search, template, AlignConfig(method=method, registration_stars=0))
        assert aligned.method == "identity"
        np.testing.assert_array_equal(aligned.template.image, template.image)  # bit-identical
        np.testing.assert_array_equal(aligned.template.variance, template.variance)
        assert not (aligned.template.mask & MaskBits.NO_DATA).any()
        assert aligned.overlap == 1.0 and aligned.scale_ratio == 1.0 and aligned.variance_factor == 1.0
    # a shift far below the tolerance is still an identity; one of 0.01 px is not
    w = search.wcs.deepcopy()
    w.wcs.crpix = w.wcs.crpix + [0.01, 0.0]
    shifted = align_pair(search, dataclasses.replace(template, wcs=w), AlignConfig(registration_stars=0))
    assert shifted.method == "fast" and (shifted.template.mask & MaskBits.NO_DATA).any()


def test_strongly_distorted_wcs_falls_back_to_exact_path(caplog):
    import logging

    shape = (256, 320)
    sip = _tan_wcs(shape, (3.3, -2.1), 0.3, 1.0, sip_a20=2e-5)  # ~0.3 px of curvature over the frame
    search, template, _ = _star_pair(template_wcs=sip)
    with caplog.at_level(logging.INFO, logger="pipeline.align"):
        aligned = align_pair(search, template, AlignConfig(registration_stars=0))
    assert aligned.method == "grid"
    assert any("fast path not taken" in r.getMessage() and "not affine" in r.getMessage() for r in caplog.records)
    exact = align_pair(search, template, AlignConfig(method="grid", registration_stars=0))
    np.testing.assert_array_equal(aligned.template.image, exact.template.image)
    # the mildly distorted case stays fast
    caplog.clear()
    mild = _tan_wcs(shape, (3.3, -2.1), 0.3, 1.0, sip_a20=1e-8)
    search, template, _ = _star_pair(template_wcs=mild)
    with caplog.at_level(logging.INFO, logger="pipeline.align"):
        assert align_pair(search, template, AlignConfig(registration_stars=0)).method == "fast"
    assert not caplog.records


def test_fast_path_helpers_match_scipy():
    from scipy import ndimage

    from pipeline.align import _dilate_intervals, _filter_axis0, _row_intervals, fit_affine_mapping

    a = np.random.default_rng(3).standard_normal((70, 9)).astype(np.float32)
    ref = ndimage.spline_filter1d(a, 3, axis=0, mode="mirror", output=np.float64)
    np.testing.assert_allclose(_filter_axis0(a), ref, atol=1e-5)
    # the data region of an affine map and its dilation, as row intervals == the 2-D mask operations
    shape, in_shape = (60, 80), (50, 70)
    s_wcs = _tan_wcs(shape)
    t_wcs = _tan_wcs(in_shape, (4.2, -3.7), 20.0, 1.01)
    coef, resid = fit_affine_mapping(s_wcs, t_wcs, shape)
    assert resid < 1e-3
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    tx, ty = coef[0, 0] * xx + coef[0, 1] * yy + coef[0, 2], coef[1, 0] * xx + coef[1, 1] * yy + coef[1, 2]
    nodata = ~((tx >= 0) & (tx <= in_shape[1] - 1) & (ty >= 0) & (ty <= in_shape[0] - 1))
    lo, hi = _row_intervals(coef, shape, in_shape)
    cols = np.arange(shape[1])
    np.testing.assert_array_equal((cols < lo[:, None]) | (cols > hi[:, None]), nodata)
    assert nodata.any() and not nodata.all()
    for k in (1, 2):
        lo_k, hi_k = _dilate_intervals(lo, hi, shape[1], k)
        np.testing.assert_array_equal((cols < lo_k[:, None]) | (cols > hi_k[:, None]),
                                      ndimage.binary_dilation(nodata, iterations=k))


def _same_bits(a, b):
    return a.dtype == b.dtype and np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                                                 np.ascontiguousarray(b).view(np.uint8))


def _resample_1d_pixel_by_pixel(src_img, src_var, src_mask, row_shift, drift, tol, cubic, n_out):
    """What ``_resample_1d`` computes, one output pixel at a time: the segment's weights, the interior formula
    (float32 products summed in tap order) where the taps lie inside the row, ``_edge_taps`` elsewhere."""
    from pipeline.align import _cubic_weights, _edge_taps, _segments

    n_rows, width = src_img.shape
    img = np.empty((n_rows, n_out), np.float32)
    var = np.empty((n_rows, n_out), np.float32)
    mask = np.empty((n_rows, n_out), src_mask.dtype)
    for s0, s1, centre in _segments(n_out, drift, tol):
        shift = row_shift + drift * centre
        base = np.floor(shift)
        f = shift - base
        base = base.astype(np.int64)
        w = _cubic_weights(f)
        lin = ((1.0 - f).astype(np.float32), f.astype(np.float32))
        for i in range(n_rows):
            k = int(base[i])
            for u in range(s0, s1):
                if not 1 - k <= u < width - 2 - k:
                    e = _edge_taps(src_img, src_var, src_mask, np.array([i]), np.array([u]), k, f,
                                   w if cubic else None, cubic)
                    img[i, u], var[i, u], mask[i, u] = (a[0, 0] for a in e)
                    continue
                x = u + k
                if cubic:
                    acc = src_img[i, x - 1] * w[0][i]
                    for t in (1, 2, 3):
                        acc = acc + src_img[i, x + t - 1] * w[t][i]
                else:
                    acc = src_img[i, x] * lin[0][i] + src_img[i, x + 1] * lin[1][i]
                img[i, u] = acc
                var[i, u] = src_var[i, x] * lin[0][i] + src_var[i, x + 1] * lin[1][i]
                mask[i, u] = ((src_mask[i, x] if lin[0][i] > 1e-3 else 0)
                              | (src_mask[i, x + 1] if lin[1][i] > 1e-3 else 0))
    return img, var, mask


@pytest.mark.parametrize("cubic", [True, False])
@pytest.mark.parametrize("shear, drift, offset", [(0.0, 0.0, 0.3), (0.013, 4e-4, -2.6), (-0.021, -7e-4, 3.4),
                                                  (0.4, 2e-3, 0.0)])
def test_resample_1d_blocks_equal_pixel_by_pixel_evaluation(cubic, shear, drift, offset):
    """The whole-array blocks (runs of rows with one shift, the rows where it steps between segments, the edges)
    give every pixel bit for bit what its own evaluation gives, row-major and through transposed views."""
    from pipeline.align import _resample_1d

    rng = np.random.default_rng(7)
    n_rows, width, n_out = 48, 70, 66
    src_img = rng.standard_normal((n_rows, width)).astype(np.float32)
    src_var = rng.uniform(0.5, 2.0, (n_rows, width)).astype(np.float32)
    src_mask = np.where(rng.random((n_rows, width)) < 0.2, rng.integers(1, 64, (n_rows, width)), 0).astype(np.int32)
    # rows whose fractional shift is ~0 or ~1 leave a linear tap out of the mask
    row_shift = shear * np.arange(n_rows) + offset
    row_shift[5], row_shift[6] = np.floor(row_shift[5]) + 1e-5, np.floor(row_shift[6]) + 1 - 1e-5
    ref = _resample_1d_pixel_by_pixel(src_img, src_var, src_mask, row_shift, drift, 5e-4, cubic, n_out)
    out = [np.empty((n_rows, n_out), a.dtype) for a in ref]
    _resample_1d(src_img, src_var, src_mask, *out, row_shift, drift, 5e-4, cubic)
    for got, want in zip(out, ref):
        assert _same_bits(got, want)
    # the second pass reads and writes transposed views
    src_t = [np.ascontiguousarray(a.T) for a in (src_img, src_var, src_mask)]
    out_t = [np.empty((n_out, n_rows), a.dtype) for a in ref]
    _resample_1d(*(a.T for a in src_t), *(a.T for a in out_t), row_shift, drift, 5e-4, cubic)
    for got, want in zip(out_t, ref):
        assert _same_bits(got.T, want)


def test_fast_path_masks_as_bytes_or_as_they_come():
    from pipeline.align import _align_fast

    rng = np.random.default_rng(11)
    image = rng.standard_normal((120, 90)).astype(np.float32)
    variance = rng.uniform(1.0, 2.0, image.shape).astype(np.float32)
    mask = np.where(rng.random(image.shape) < 0.05, 32, 0).astype(np.int32)
    coef = np.array([[0.9999, 0.012, 3.3], [-0.012, 1.0002, -2.7]])
    narrow = _align_fast(image, variance, mask, coef, (110, 85), True, 5e-4)
    wide = _align_fast(image, variance, mask | 256, coef, (110, 85), True, 5e-4)  # a bit past a byte
    assert narrow[2].dtype == np.int32 and narrow[2].any()
    np.testing.assert_array_equal(narrow[0], wide[0])
    np.testing.assert_array_equal(narrow[2], wide[2] & 255)


def test_interval_max_and_fill_equal_the_frame_masks():
    from pipeline.align import _fill_outside_intervals, _interval_max

    rng = np.random.default_rng(5)
    ny, nx = 150, 40
    lo = np.clip(rng.integers(-5, 25, ny) + np.arange(ny) // 10, 0, None)
    hi = np.minimum(lo + rng.integers(-3, 30, ny), nx - 1)
    empty = lo > hi
    lo[empty], hi[empty] = nx, -1
    lo[:20], hi[:20] = nx, -1  # whole bands without data
    cols = np.arange(nx)
    inside = (cols >= lo[:, None]) & (cols <= hi[:, None])
    values = rng.standard_normal((ny, nx)).astype(np.float32)
    assert _interval_max(values, lo, hi) == np.max(values, where=inside, initial=-np.inf)
    image, variance = values.copy(), values.copy()
    mask = rng.integers(0, 4, (ny, nx)).astype(np.int32)
    expected_mask = np.where(inside, mask, mask | int(MaskBits.NO_DATA))
    _fill_outside_intervals(image, variance, mask, lo, hi, 9.5)
    np.testing.assert_array_equal(image, np.where(inside, values, 0))
    np.testing.assert_array_equal(variance, np.where(inside, values, 9.5))
    np.testing.assert_array_equal(mask, expected_mask)


def test_align_config_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        AlignConfig(method="lanczos")
    with pytest.raises(ValueError, match="fast_tolerance"):
        AlignConfig(fast_tolerance=0.0)


# ---- the registration check ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_pair():
    """A 1024 x 1024 CCD with 80x the default transient density (~400 transients, most of the bright isolated
    search sources): looking for the search's bright isolated sources in the template found only 12 of 28 here
    (a false "does not line up"), as in the dense 2k x 2k data sets at 12x."""
    from pipeline.simulate import SimulationConfig, simulate_pair

    cfg = SimulationConfig(shape=(1024, 1024), transient_density=80 * SimulationConfig().transient_density)
    return simulate_pair(cfg, seed=3000, ccd_index=15)


def _moved_template(template, shift=(0.0, 0.0), rotation_deg=0.0):
    """The template's pixels shifted (x, y) and rotated about the centre, its WCS left as it was."""
    from scipy import ndimage

    def move(plane, order):
        out = plane.astype(float)
        if rotation_deg:
            out = ndimage.rotate(out, rotation_deg, reshape=False, order=order, mode="nearest")
        return ndimage.shift(out, (shift[1], shift[0]), order=order, mode="nearest")

    return dataclasses.replace(template, image=move(template.image, 3).astype(np.float32),
                               variance=move(template.variance, 1).astype(np.float32),
                               mask=move(template.mask, 0).astype(template.mask.dtype), name="moved.fits[IMAGE]")


def test_registration_check_has_no_false_alarm_in_a_transient_rich_field(dense_pair):
    from pipeline.align import check_registration

    truth = dense_pair.truth
    assert (truth["kind"] == "transient").sum() >= 300
    result = check_registration(dense_pair.search, dense_pair.template)
    assert result.checked and result.n_stars >= 15
    assert result.fraction > 0.9
    # the simulated WCSs are exact: the found stars sit where the WCSs put them
    assert result.median_offset_px < 0.25
    assert abs(result.median_dx_px) < 0.1 and abs(result.median_dy_px) < 0.1
    summary = result.as_dict()
    assert summary["checked"] and summary["n_found"] == result.n_found


@pytest.mark.parametrize("shift, rotation", [((3.0, 0.0), 0.0), ((-1.5, 1.5), 0.0), ((0.0, 0.0), 0.5)])
def test_registration_check_catches_small_shift_or_rotation(dense_pair, shift, rotation):
    from pipeline.align import check_registration

    moved = _moved_template(dense_pair.template, shift, rotation)
    with pytest.raises(InputError, match=r"moved\.fits\[IMAGE\]' does not line up .*WCS") as err:
        check_registration(dense_pair.search, moved)
    message = str(err.value)
    for setting in ("align.registration_min_fraction", "align.registration_max_offset_px",
                    "align.registration_radius_fwhm", "align.registration_stars = 0"):
        assert setting in message
    if not rotation:  # a shift well inside the match radius: the stars are found, their offset measured
        assert "systematic" in message
        expected = np.hypot(*shift)
        loose = check_registration(dense_pair.search, moved, AlignConfig(registration_max_offset_px=2 * expected))
        assert loose.checked and loose.fraction > 0.9
        assert loose.median_offset_px == pytest.approx(expected, abs=0.25)
        # search peak minus WCS position: the template's stars moved by +shift, the search's did not
        assert loose.median_dx_px == pytest.approx(-shift[0], abs=0.25)
        assert loose.median_dy_px == pytest.approx(-shift[1], abs=0.25)


def test_registration_check_is_skipped_without_stars_and_validated():
    from pipeline.align import check_registration

    search, template, _ = _star_pair()
    empty = dataclasses.replace(template, image=np.full(template.shape, 100.0, np.float32))
    result = check_registration(search, empty)
    assert not result.checked and result.n_stars == 0
    disabled = check_registration(search, template, AlignConfig(registration_stars=0))
    assert not disabled.checked
    for name in ("registration_star_snr", "registration_found_snr", "registration_max_offset_px"):
        with pytest.raises(ValueError, match=name):
            AlignConfig(**{name: 0.0})


@pytest.mark.parametrize("order", ["bicubic", "biquadratic", "bilinear"])
def test_cutouts_equal_whole_frame_spline_interpolation_at_the_exact_mapping(sim_pair, order):
    """Each cut-out is interpolated from its own box of template pixels (pipeline.align.SPLINE_MARGIN around it):
    the values are those of one spline interpolation of the whole template at the pixels' exact WCS positions,
    in the interior, at the frame's edges and on a stamp that runs off the template."""
    from scipy import ndimage

    from pipeline.align import template_pixels

    t = sim_pair.template
    tny, tnx = t.shape
    # search positions of the template's first and last pixels: stamps straddling the template's edges
    cx, cy = template_pixels(t.wcs, sim_pair.search.wcs, np.array([1.0, tnx - 2.0]), np.array([2.0, tny - 3.0]))
    x = np.array([200.3, 512.0, cx[0], cx[1], -300.0])
    y = np.array([300.6, 512.2, cy[0], cy[1], -300.0])
    size = 21
    stamps, _ = resample_cutouts(t, sim_pair.search.wcs, x, y, size=size, config=AlignConfig(order=order))
    offs = np.arange(size) - size // 2
    xs = np.rint(x)[:, None, None] + offs[None, None, :]
    ys = np.rint(y)[:, None, None] + offs[None, :, None]
    xs, ys = np.broadcast_arrays(xs, ys)
    tx, ty = template_pixels(sim_pair.search.wcs, t.wcs, xs, ys)
    frame = np.where((t.mask & MaskBits.NO_DATA) != 0, 0, t.image).astype(np.float32)
    spline_order = {"bicubic": 3, "biquadratic": 2, "bilinear": 1}[order]
    expect = ndimage.map_coordinates(frame, [ty, tx], order=spline_order, mode="constant", cval=np.nan)
    inside = (tx >= -0.5) & (tx <= tnx - 0.5) & (ty >= -0.5) & (ty <= tny - 0.5) & np.isfinite(expect)
    assert inside[:2].all() and not inside[4].any()  # two stamps inside, one off the template
    assert all(0 < inside[k].sum() < size * size for k in (2, 3))  # two on its corners
    assert np.isnan(stamps[~inside]).all()
    scale = np.abs(expect[inside]).max()
    np.testing.assert_allclose(stamps[inside], expect[inside], rtol=0, atol=1e-5 * scale)


def test_peaks_near_find_injected_stars_as_one_stack_and_window_by_window():
    """The registration check's stacked peak finder: each injected Gaussian star is found at its true sub-pixel
    position (one with a flagged pixel 2 px from its core to within 0.1 px), positions too close to the border
    get NaN and S/N 0, and each window's result is the same alone as in the stack."""
    from conftest import render_gaussians

    from pipeline.align import _find_peaks_near
    from pipeline.io import Exposure

    shape = (200, 240)
    xs = np.array([40.3, 120.71, 180.45, 60.0, 150.2])
    ys = np.array([50.6, 100.18, 60.92, 150.5, 160.33])
    fluxes = np.array([5e4, 2e4, 8e4, 3e4, 1e5])
    img, var = render_gaussians(shape, xs, ys, fluxes, 3.2, 10.0, seed=3)
    mask = np.zeros(shape, np.int32)
    mask[150, 58] |= MaskBits.BAD  # a flagged pixel beside the fourth star's core
    exposure = Exposure(img + 50.0, var, mask, None, fwhm=3.2, name="stars")
    # start 1-2 px off each star, plus two positions whose windows leave the image
    qx = np.r_[xs + np.array([1.2, -0.8, 0.5, -1.5, 0.9]), 3.0, 238.0]
    qy = np.r_[ys + np.array([-0.7, 1.1, -1.4, 0.6, 1.3]), 100.0, 5.0]
    px, py, peak = _find_peaks_near(exposure, qx, qy, radius=5.0, fwhm=3.2)
    err = np.hypot(px[:5] - xs, py[:5] - ys)
    assert np.all(err[[0, 1, 2, 4]] < 0.01)
    assert err[3] < 0.1  # one pixel 2 px from its core left out: a small bias, not a lost star
    assert np.all(peak[:5] > 50)
    assert np.isnan(px[5:]).all() and np.isnan(py[5:]).all() and np.all(peak[5:] == 0)
    for i in range(len(qx)):
        one = _find_peaks_near(exposure, qx[i:i + 1], qy[i:i + 1], radius=5.0, fwhm=3.2)
        np.testing.assert_allclose([one[0][0], one[1][0], one[2][0]], [px[i], py[i], peak[i]], rtol=0, atol=1e-9)


def _wcs_off_by(template, shift):
    """The template with its WCS's reference pixel moved by ``-shift``: its stars then sit ``shift`` template
    pixels from where the WCS puts them (the zero-point error of a real astrometric solution)."""
    wrong = template.wcs.deepcopy()
    wrong.wcs.crpix = wrong.wcs.crpix - np.asarray(shift, float)
    wrong.wcs.set()
    return dataclasses.replace(template, wcs=wrong, name="off.fits")


def test_registration_refinement_corrects_a_subpixel_wcs_zero_point():
    from pipeline.align import check_registration, refine_registration

    search, template, _ = _star_pair()
    shift = np.array([0.35, -0.25])
    off = _wcs_off_by(template, shift)
    check = check_registration(search, off)
    assert check.checked and check.n_shift >= 10
    assert check.shift_x_px == pytest.approx(shift[0], abs=0.05)
    assert check.shift_y_px == pytest.approx(shift[1], abs=0.05)
    assert check.shift_err_px < 0.03
    crpix = off.wcs.wcs.crpix.copy()
    fixed, applied = refine_registration(off, check)
    assert applied.applied and "registration" in fixed.provenance
    np.testing.assert_allclose(fixed.wcs.wcs.crpix, template.wcs.wcs.crpix, atol=0.05)
    np.testing.assert_array_equal(off.wcs.wcs.crpix, crpix)  # the input is left as it was
    assert abs(check_registration(search, fixed).shift_x_px) < 0.05
    # align_pair applies it: the template resampled through the corrected WCS is the one through the true WCS
    true = align_pair(search, template)
    refined = align_pair(search, off)
    kept = align_pair(search, off, AlignConfig(registration_refine=False))
    assert refined.registration.applied and not kept.registration.applied
    assert not true.registration.applied and np.hypot(true.registration.shift_x_px, true.registration.shift_y_px) < 0.05
    assert refined.registration.as_dict()["applied"] is True
    good = ((true.template.mask | refined.template.mask | kept.template.mask) & MaskBits.NO_DATA) == 0

    def rms(aligned):
        return float(np.sqrt(np.mean((aligned.template.image - true.template.image)[good] ** 2)))

    assert rms(refined) < 0.1 * rms(kept)


def test_direct_mode_gets_the_refined_template_too():
    from pipeline.config import RunConfig
    from pipeline.steps import LoadedPair, check_direct_pair

    search, template, _ = _star_pair()
    off = _wcs_off_by(template, (-0.3, 0.4))
    check = check_direct_pair(LoadedPair("ccd", search, off, None), RunConfig())
    assert check.registration.applied
    np.testing.assert_allclose(check.template.wcs.wcs.crpix, template.wcs.wcs.crpix, atol=0.05)
    exact = check_direct_pair(LoadedPair("ccd", search, template, None), RunConfig())
    assert not exact.registration.applied and exact.template is template
    with pytest.raises(ValueError, match="registration_refine_min_stars"):
        AlignConfig(registration_refine_min_stars=1)


def test_direct_candidates_need_template_data_over_their_core():
    """A candidate whose position has template data but whose measurement core reaches past the template's data
    (here: the template's last 20 columns are no-data) is dropped, as dia cannot detect there; one a FWHM farther
    in is kept, and so is one in the middle."""
    from astropy.table import Table

    from pipeline.steps import LoadedPair, drop_without_template

    search, template, _ = _star_pair(rotation_deg=0.0, offset=(0.0, 0.0), scale=1.0)
    mask = template.mask.copy()
    mask[:, -20:] |= MaskBits.NO_DATA
    template = dataclasses.replace(template, mask=mask)
    edge = template.shape[1] - 20  # first no-data column (the two grids coincide)
    fwhm = search.fwhm
    candidates = Table({"id": np.arange(3), "x": [edge - 1.5, edge - fwhm - 2.0, 100.0], "y": [120.0, 120.0, 120.0]})
    pair = LoadedPair("ccd", search, template, None)
    kept, dropped = drop_without_template(candidates, pair)
    assert dropped == 1 and list(kept["x"]) == [edge - fwhm - 2.0, 100.0] and list(kept["id"]) == [0, 1]
    centre_only, none = drop_without_template(candidates, pair, radius=0.0)
    assert none == 0 and len(centre_only) == 3  # its centre has data: the old rule kept it
