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
