"""The cosmic-ray stage (pipeline/cosmics.py): L.A.Cosmic on images made here with known tracks and stars."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage

from dia.masks import BAD_FOR_FIT, MaskBits
from pipeline.config import RunConfig, config_from_dict
from pipeline.cosmics import CosmicRayConfig, clean_exposure, mask_cosmic_rays, mask_pair_cosmics, single_exposure
from pipeline.io import Exposure

pytest.importorskip("astroscrappy")

GAIN, READ_NOISE, SKY, SATURATION = 4.0, 7.0, 400.0, 60000.0


def _gaussian(shape, x, y, flux, fwhm):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    sigma = fwhm / 2.3548
    return flux * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / sigma**2) / (2 * np.pi * sigma**2)


def _scene(seed=3, shape=(200, 200), fwhm=2.5, n_tracks=12, stars=()):
    """Sky + point sources (Gaussian, ``fwhm``) + CCD noise, then cosmic-ray tracks 1-3 px wide.

    Returns image, variance (the noise model without the tracks, as the simulator's), the track pixels
    and the width of each track pixel.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    model = np.full(shape, SKY)
    for x, y, flux in stars:
        model += _gaussian(shape, x, y, flux, fwhm)
    var = model / GAIN + (READ_NOISE / GAIN) ** 2
    image = model + rng.normal(size=shape) * np.sqrt(var)
    tracks = np.zeros(shape, bool)
    width = np.zeros(shape, int)
    for k in range(n_tracks):
        w = 1 + k % 3
        x0, y0 = rng.uniform(10, nx - 10), rng.uniform(10, ny - 10)
        angle = rng.uniform(0, np.pi)
        t = np.arange(rng.integers(3, 20))
        px = np.rint(x0 + t * np.cos(angle)).astype(int)
        py = np.rint(y0 + t * np.sin(angle)).astype(int)
        ok = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        hit = np.zeros(shape, bool)
        hit[py[ok], px[ok]] = True
        if w == 2:  # a second pixel across the track
            hit |= np.roll(hit, 1, axis=1 if abs(np.sin(angle)) > 0.7 else 0)
        elif w == 3:
            hit = ndimage.binary_dilation(hit)
        image[hit] += rng.uniform(200, 2500, int(hit.sum())) / GAIN  # 200-2500 e- per pixel, as the simulator
        tracks |= hit
        width[hit] = w
    return image.astype(np.float32), var.astype(np.float32), tracks, width


def _find(image, var, mask=None, config=CosmicRayConfig()):
    return mask_cosmic_rays(image, mask, var, config, gain=GAIN, read_noise=READ_NOISE, saturation=SATURATION)


def test_tracks_flagged_and_bright_stars_not():
    stars = [(40.3, 40.7, 2e5), (150.2, 60.6, 2e4), (60.5, 150.1, 3e3), (160.4, 160.2, 5e5)]  # peaks ~ 1e3-6e4 ADU
    image, var, tracks, width = _scene(stars=stars)
    result = _find(image, var, config=CosmicRayConfig(replace=True))
    labels, n_tracks = ndimage.label(tracks, np.ones((3, 3), bool))
    found = np.unique(labels[result.mask & tracks])
    assert set(found[found > 0]) == set(range(1, n_tracks + 1))  # every track
    assert (result.mask & tracks).sum() >= 0.9 * tracks.sum()  # nearly all of their pixels
    assert (result.mask[width == 1]).all() and (result.mask[width == 2]).mean() >= 0.95
    for x, y, _ in stars:  # no pixel within 2 FWHM of a star's centre
        assert not result.mask[int(y) - 5 : int(y) + 6, int(x) - 5 : int(x) + 6].any(), (x, y)
    # what is flagged beyond the tracks lies within 3 px of them (L.A.Cosmic's neighbour test, grow = 1)
    ring = ndimage.binary_dilation(tracks, np.ones((3, 3), bool), iterations=3)
    assert not (result.mask & ~ring).any()
    assert result.n_pixels == int(result.mask.sum())
    assert result.n_cosmic_rays == ndimage.label(result.mask, np.ones((3, 3), bool))[1] >= n_tracks
    # the replaced values are the sky's, not the tracks'
    assert np.abs(np.median(result.cleaned[result.mask & tracks]) - SKY) < 5 * np.sqrt(SKY / GAIN)


def test_transient_on_a_galaxy_core_and_wider_psf_not_flagged():
    shape = (120, 120)
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    galaxy = 3e4 * np.exp(-np.hypot(xx - 60, yy - 60) / 3.0) / (2 * np.pi * 9)  # compact exponential disc
    model = SKY + galaxy + _gaussian(shape, 60.4, 59.8, 4e4, 2.5) + _gaussian(shape, 30.2, 90.7, 1e5, 4.0)
    var = model / GAIN + (READ_NOISE / GAIN) ** 2
    image = (model + rng.normal(size=shape) * np.sqrt(var)).astype(np.float32)
    assert not _find(image, var.astype(np.float32)).mask.any()


def test_a_variance_plane_too_small_is_scaled_up_not_trusted():
    stars = [(40.3, 40.7, 2e5), (150.2, 60.6, 2e4)]
    image, var, tracks, _ = _scene(seed=9, stars=stars)
    right = _find(image, var)
    assert right.noise_scale == 1.0
    small = _find(image, var / 4)  # a weight map 4x too large
    assert small.noise_scale == pytest.approx(2.0, rel=0.1)
    assert (small.mask ^ right.mask).sum() <= 0.05 * right.n_pixels
    trusted = _find(image, var / 4, config=CosmicRayConfig(noise_check=False))
    assert trusted.n_cosmic_rays > 3 * right.n_cosmic_rays  # noise would be flagged all over
    assert _find(image, var * 4).noise_scale == 1.0  # never scaled down (correlated noise of stacks)


@pytest.mark.parametrize("sepmed", [True, False])
def test_masked_pixels_kept_out_and_tiles_equal_the_full_frame(sepmed):
    stars = [(40.3, 40.7, 2e5), (150.2, 60.6, 2e4), (60.5, 150.1, 3e3)]  # seeds of the first test, not cosmic rays
    image, var, tracks, _ = _scene(seed=8, n_tracks=9, stars=stars)
    ys, xs = np.nonzero(tracks)
    image[0, 50] += 800.0  # a hit on the border row
    image[120, 199] += 800.0  # and on the border column
    mask = np.zeros(image.shape, np.int32)
    mask[ys[:5], xs[:5]] = MaskBits.BAD  # already flagged: neither re-flagged nor read
    mask[:4, :] |= MaskBits.EDGE  # EDGE says where a pixel is: a hit there is still found
    tiled = _find(image, var, mask, CosmicRayConfig(replace=True, sepmed=sepmed))
    full = _find(image, var, mask, CosmicRayConfig(replace=True, method="full", sepmed=sepmed))
    assert np.array_equal(tiled.mask, full.mask) and np.array_equal(tiled.cleaned, full.cleaned)
    assert tiled.n_tiles > 1 and full.n_tiles == 1
    assert not tiled.mask[ys[:5], xs[:5]].any()
    assert tiled.mask[0, 50] and tiled.mask[120, 199]


def _exposure(image, var, mask=None, ncombine=None, fwhm=2.5):
    header = fits.Header()
    if ncombine is not None:
        header["NCOMBINE"] = ncombine
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cdelt = [-0.263 / 3600, 0.263 / 3600]
    wcs.wcs.crpix = [image.shape[1] / 2, image.shape[0] / 2]
    return Exposure(image=image, variance=var, mask=np.zeros(image.shape, np.int32) if mask is None else mask,
                    wcs=wcs, fwhm=fwhm, gain=GAIN, read_noise=READ_NOISE, saturation=SATURATION, header=header,
                    name="test")


def test_clean_exposure_sets_cr_bit_and_template_policy():
    image, var, tracks, _ = _scene(seed=4, n_tracks=6)
    exp = _exposure(image.copy(), var)
    cleaned, result = clean_exposure(exp, CosmicRayConfig(replace=True))
    assert np.array_equal((cleaned.mask & MaskBits.CR) != 0, result.mask) and result.n_pixels > 0
    assert (cleaned.mask[result.mask] & BAD_FOR_FIT).all()  # out of the kernel fit, the photometry, detection
    assert np.array_equal(exp.image, image) and not exp.mask.any()  # the input exposure is untouched
    assert np.array_equal(cleaned.image[~result.mask], image[~result.mask])
    assert not np.array_equal(cleaned.image[result.mask], image[result.mask])
    # provenance names the implementation that ran: the NumPy tiles by default, astroscrappy when asked for
    assert cleaned.provenance["cosmic_rays"].startswith("L.A.Cosmic (NumPy tiles, pipeline.lacosmic): "
                                                        f"{result.n_pixels} pixels in {result.n_cosmic_rays} groups")
    by_astroscrappy, _ = clean_exposure(exp, CosmicRayConfig(engine="astroscrappy"))
    assert by_astroscrappy.provenance["cosmic_rays"].startswith("L.A.Cosmic (astroscrappy tiles): ")
    full, _ = clean_exposure(exp, CosmicRayConfig(method="full"))
    assert full.provenance["cosmic_rays"].startswith("L.A.Cosmic (astroscrappy, full frame): ")
    kept, kept_result = clean_exposure(exp)  # the default keeps the values, as stamps keep masked pixels'
    assert kept_result.cleaned is None and kept.image is exp.image and np.array_equal(kept.mask, cleaned.mask)

    assert single_exposure(_exposure(image, var, ncombine=14)) == (False, "NCOMBINE = 14: a stack")
    assert single_exposure(_exposure(image, var, ncombine=1))[0] and single_exposure(_exposure(image, var))[0]
    stack = _exposure(image, var, ncombine=14)
    s, t, record = mask_pair_cosmics(exp, stack)
    assert t is stack and record["template"] == {"skipped": "NCOMBINE = 14: a stack"}
    assert record["search"]["n_pixels"] == result.n_pixels and record["search"]["n_cosmic_rays"] == result.n_cosmic_rays
    _, t, record = mask_pair_cosmics(exp, _exposure(image, var, ncombine=1))
    assert record["template"]["n_pixels"] == result.n_pixels and (t.mask & MaskBits.CR).any()
    _, t, record = mask_pair_cosmics(exp, stack, CosmicRayConfig(template="always"))
    assert (t.mask & MaskBits.CR).any()
    _, t, record = mask_pair_cosmics(exp, _exposure(image, var), CosmicRayConfig(template="never"))
    assert "skipped" in record["template"] and not t.mask.any()


def test_disabled_changes_nothing_and_config_round_trip():
    image, var, _, _ = _scene(seed=6, n_tracks=4)
    s, t = _exposure(image, var), _exposure(image.copy(), var, ncombine=1)
    out_s, out_t, record = mask_pair_cosmics(s, t, CosmicRayConfig(enabled=False))
    assert out_s is s and out_t is t and record == {"enabled": False}
    from pipeline import steps

    pair = steps.LoadedPair("c", s, t)
    same, record = steps.mask_cosmics(pair, RunConfig(cosmics=CosmicRayConfig(enabled=False)))
    assert same.search is s and same.template is t
    config = config_from_dict(RunConfig, {"cosmics": {"enabled": False, "sigclip": 6}})
    assert config.cosmics == CosmicRayConfig(enabled=False, sigclip=6.0)
    assert RunConfig().cosmics == CosmicRayConfig()
    with pytest.raises(ValueError, match="template"):
        CosmicRayConfig(template="sometimes")


def _star_pair(seed=2, shape=(256, 256), n=40):
    """A search (FWHM 3.2) and template (FWHM 2.4) of the same stars; the template is the one convolved."""
    rng = np.random.default_rng(seed)
    xs, ys = rng.uniform(20, shape[1] - 20, n), rng.uniform(20, shape[0] - 20, n)
    flux = np.exp(rng.uniform(np.log(2e4), np.log(2e5), n))
    planes = []
    for fwhm, sky, gain in ((3.2, SKY, GAIN), (2.4, 200.0, 4 * GAIN)):
        model = np.full(shape, sky)
        for x, y, f in zip(xs, ys, flux):
            model += _gaussian(shape, x, y, f, fwhm)
        var = model / gain + (READ_NOISE / gain) ** 2
        planes.append(((model + rng.normal(size=shape) * np.sqrt(var)).astype(np.float32), var.astype(np.float32)))
    return planes, np.column_stack([xs, ys])


def test_kernel_fit_ignores_flagged_pixels():
    from dia import PsfMatchConfig, subtract

    [(s_img, s_var), (t_img, t_var)], stars = _star_pair()
    for x, y in stars[:8]:  # hits 7 px from the centres of kernel-fit stars, in their fit stamps
        s_img[int(y) + 7, int(x) - 1 : int(x) + 2] += 2000.0
    exp = _exposure(s_img, s_var, fwhm=3.2)
    cleaned, result = clean_exposure(exp)
    assert all(result.mask[int(y) + 7, int(x)] for x, y in stars[:8])
    config = PsfMatchConfig(convolve="template")

    def diff(image):
        return subtract(image, s_var, cleaned.mask, t_img, t_var, np.zeros_like(cleaned.mask), search_fwhm=3.2,
                        template_fwhm=2.4, config=config)

    a = diff(cleaned.image)
    b = diff(np.where(result.mask, np.float32(1e5), cleaned.image))  # flagged pixels: any value
    assert a.stats.rejected["masked"] >= 8  # the stars they hit are not fitted
    assert dataclasses.asdict(a.stats) == dataclasses.asdict(b.stats)
    assert np.array_equal(a.image[~result.mask], b.image[~result.mask])  # the same kernel and background
    assert ((a.mask[result.mask] & MaskBits.CR) != 0).all()


def test_run_records_counts_and_masks_simulated_cosmic_rays(sim_field, tmp_path):
    from pipeline import graph
    from pipeline.io import read_manifest
    from pipeline.truth import read_truth

    entry = read_manifest(sim_field)[0]
    config = RunConfig(mode="direct")
    chash = graph.config_hash(config)
    state = graph.run_stage("load", graph.CcdState.start(entry, chash), config, str(tmp_path), chash)
    assert state.status != "failed", state.traceback
    record = state.decisions["cosmics"]
    cr = (state.pair.search.mask & MaskBits.CR) != 0
    assert record["search"]["n_pixels"] == int(cr.sum()) > 0
    assert record["search"]["n_cosmic_rays"] == ndimage.label(cr, np.ones((3, 3), bool))[1]
    assert record["search"]["wall_s"] >= 0 and "skipped" in record["template"]  # the simulated template is a stack
    truth = read_truth(entry.truth)
    rays = truth[truth["kind"] == "cosmic_ray"]
    ny, nx = cr.shape
    inside = [(int(round(y)), int(round(x))) for x, y in zip(rays["x"], rays["y"])
              if 1 <= x < nx - 1 and 1 <= y < ny - 1]
    assert len(inside) >= 5 and np.mean([cr[p] for p in inside]) >= 0.95
    transients = truth[truth["kind"] == "transient"]
    near = ndimage.maximum_filter(cr, size=5)
    assert not any(near[int(round(y)), int(round(x))] for x, y in zip(transients["x"], transients["y"])
                   if 0 <= x < nx and 0 <= y < ny)
    # disabled: nothing recorded but the fact, no CR bit
    off = RunConfig(mode="direct", cosmics=CosmicRayConfig(enabled=False))
    state = graph.run_stage("load", graph.CcdState.start(entry, chash), off, str(tmp_path), chash)
    assert state.decisions["cosmics"] == {"enabled": False} and not (state.pair.search.mask & MaskBits.CR).any()


def test_fine_structure_pass_drops_star_cores_and_keeps_every_track():
    """The second test on the seeds (pipeline.cosmics._fine_structure_pass) is a necessary condition: it keeps
    a seed on every track the full-frame L.A.Cosmic flags and drops the seeds on bright stars."""
    from pipeline.cosmics import _candidate_pixels, _fine_structure_pass

    stars = [(40.3, 40.7, 2e5), (150.2, 60.6, 2e4), (160.4, 160.2, 5e5)]
    image, var, tracks, _ = _scene(seed=4, stars=stars, fwhm=4.0)  # a DECam-like PSF (~1" at 0.263"/px)
    for sepmed in (True, False):
        config = CosmicRayConfig(sepmed=sepmed)
        ys, xs = _candidate_pixels(image, var, np.zeros(image.shape, bool), config.sigclip)
        seeds = np.zeros(image.shape, bool)
        seeds[ys, xs] = True
        kept = np.zeros(image.shape, bool)
        kept[_fine_structure_pass(image, ys, xs, config)] = True
        assert not (kept & ~seeds).any()
        full = _find(image, var, config=dataclasses.replace(config, method="full"))
        labels, n = ndimage.label(full.mask, np.ones((3, 3), bool))
        for k in range(1, n + 1):  # each flagged group holds a kept seed
            assert kept[labels == k].any(), k
        for x, y, flux in stars:  # the stars' cores are seeds of the first test, and few survive the second
            core = (slice(int(y) - 3, int(y) + 4), slice(int(x) - 3, int(x) + 4))
            assert seeds[core].sum() >= 20, (x, y)
            # the square medians follow a star's peak: none; the separable ones (default) leave the peaks of the
            # brightest (~1e4 ADU) stars
            assert kept[core].sum() <= (0 if not sepmed or flux < 1e5 else 0.25 * seeds[core].sum()), (x, y, sepmed)


@pytest.mark.parametrize("shape", [(40, 33), (5, 9), (2, 4), (1, 7)])
def test_tiles_are_reflected_like_numpy_pad_even_past_their_size(shape):
    """pipeline.cosmics._reflect extends a tile by mirror reflection about its edge pixels for any width, also
    wider than the tile on one side only (a tile of a tiny image): np.pad's "reflect" axis by axis ("edge" on a
    1-pixel axis)."""
    from pipeline.cosmics import _reflect

    plane = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    for pads in (((0, 0), (0, 0)), ((3, 0), (0, 5)), ((12, 12), (12, 12)), ((30, 1), (2, 40))):
        expect = plane
        for axis in (0, 1):
            width = [(0, 0), (0, 0)]
            width[axis] = pads[axis]
            expect = np.pad(expect, width, mode="reflect" if shape[axis] > 1 else "edge")
        assert np.array_equal(_reflect(plane, pads), expect), pads


def test_median_of_five_network_equals_numpy_median_with_ties():
    """pipeline.cosmics._median5 (the min/max network of the fine-structure pass) is np.median of five arrays,
    on continuous values and on small integers full of ties, whatever the order of the arguments."""
    from pipeline.cosmics import _median5

    rng = np.random.default_rng(7)
    continuous = rng.normal(size=(5, 4000)).astype(np.float32)
    for values in (continuous, rng.integers(0, 3, size=(5, 4000)).astype(np.float32)):
        expect = np.median(values, axis=0)
        for order in ((0, 1, 2, 3, 4), (4, 3, 2, 1, 0), (2, 0, 4, 1, 3)):
            assert np.array_equal(_median5(*values[list(order)]), expect), order


def _first_test_by_definition(image, var, skip, sigclip):
    """L.A.Cosmic's first test on every pixel, written out on the reflected frame: the clipped Laplacian of the
    2x sub-sampled image binned back, over twice the noise (the smallest variance of the pixel's cross)."""
    mode = "reflect" if min(image.shape) > 1 else "edge"
    img = np.pad(image.astype(np.float32), 1, mode=mode)
    v = np.pad(var.astype(np.float32), 1, mode=mode)
    centre = 2.0 * img[1:-1, 1:-1]
    lap = np.zeros(image.shape, np.float32)
    for h in (img[1:-1, :-2], img[1:-1, 2:]):
        for u in (img[:-2, 1:-1], img[2:, 1:-1]):
            lap += np.maximum(centre - h - u, 0)
    noise = np.minimum.reduce([v[1:-1, 1:-1], v[1:-1, :-2], v[1:-1, 2:], v[:-2, 1:-1], v[2:, 1:-1]])
    return (lap > np.sqrt(np.maximum(noise, 0)) * np.float32(8.0 * sigclip)) & ~skip


@pytest.mark.parametrize("case", ["scene", "uneven variance", "near-zero variance", "nan variance", "one row",
                                  "small bands"])
def test_first_test_screen_finds_exactly_the_pixels_of_the_definition(case):
    """pipeline.cosmics._candidate_pixels screens each band with a necessary condition and tests only the pixels that
    pass it: the same pixels as the test on every pixel, in row-major order, also where the screen cannot help
    (variance near zero somewhere, NaN) and on degenerate shapes."""
    from pipeline.cosmics import _candidate_pixels

    stars = [(40.3, 40.7, 2e5), (150.2, 60.6, 2e4), (60.5, 150.1, 3e3)]
    image, var, _, _ = _scene(seed=3, n_tracks=9, stars=stars)
    var = var.astype(np.float32)
    skip = np.zeros(image.shape, bool)
    skip[100:110, 20:40] = True
    block = 256
    if case == "uneven variance":  # each pixel's noise from a different one of its cross: each of the five counts
        var *= np.random.default_rng(4).uniform(0.5, 2.0, var.shape).astype(np.float32)
    elif case == "near-zero variance":
        var[70, :] = var[:, 130] = 1e-6  # the band's floor is useless: the band is tested pixel by pixel (and
        # every pixel next to these lines takes its noise from one neighbour: each of the four counts)
    elif case == "nan variance":
        var[130, 5] = np.nan
    elif case == "one row":
        image, var, skip = image[60:61], var[60:61], skip[60:61]
    elif case == "small bands":
        block = 7  # band edges through the stars and tracks
    ys, xs = _candidate_pixels(image, var, skip, 5.0, block=block)
    expect = np.nonzero(_first_test_by_definition(image, var, skip, 5.0))
    assert np.array_equal(ys, expect[0]) and np.array_equal(xs, expect[1])
    if case == "scene":
        assert ys.size > 100  # the stars' cores and the tracks

