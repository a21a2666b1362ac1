"""Candidate detection: matched-filter S/N, photometry against injected fluxes, flags, direct mode."""

import dataclasses

import numpy as np
import pytest
from conftest import render_gaussians
from scipy.spatial import cKDTree

from dia import subtract
from dia.masks import MaskBits
from pipeline.detect import (
    CandidateFlags,
    CandidateTable,
    DetectConfig,
    DirectDetectConfig,
    detect_difference,
    detect_direct,
    estimate_background,
    fit_psf_model,
)
from pipeline.truth import match_truth


def _field(seed=3, n=60, shape=(400, 400), fwhm=4.0, sigma=10.0):
    rng = np.random.default_rng(seed)
    xs = rng.uniform(30, shape[1] - 30, n)
    ys = rng.uniform(30, shape[0] - 30, n)
    # S/N 8..80 for a Gaussian PSF: S/N = F / (sigma sqrt(4 pi s^2))
    s = fwhm / 2.3548
    snr = rng.uniform(8, 80, n)
    flux = snr * sigma * np.sqrt(4 * np.pi * s**2)
    image, var = render_gaussians(shape, xs, ys, flux, fwhm, sigma, seed=seed)
    return image, var, xs, ys, flux


def test_point_sources_recovered_with_unbiased_fluxes():
    image, var, xs, ys, flux = _field(n=40, shape=(600, 600))
    cands = detect_difference(image, var, np.zeros(image.shape, np.int32), 4.0)
    tree = cKDTree(np.column_stack([xs, ys]))
    d, j = tree.query(np.column_stack([cands["x"], cands["y"]]))
    real = d < 1.0
    assert real.sum() >= 0.95 * len(xs)
    assert (~real).sum() <= 2  # pure noise gives (almost) no 5-sigma detections
    # photometry is checked on sources without a neighbour within 4 FWHM (no blending)
    nn, _ = tree.query(np.column_stack([xs, ys]), k=2)
    real &= nn[j, 1] > 16
    assert np.median(d[real]) < 0.15  # sub-pixel positions
    pull = (np.asarray(cands["flux"])[real] - flux[j[real]]) / np.asarray(cands["flux_err"])[real]
    assert abs(pull.mean()) < 0.3
    assert 0.7 < pull.std() < 1.3
    # S/N is the injected one
    s = 4.0 / 2.3548
    expected = flux[j[real]] / (10.0 * np.sqrt(4 * np.pi * s**2))
    assert np.median(np.asarray(cands["snr"])[real] / expected) == pytest.approx(1.0, abs=0.1)


def test_pure_noise_gives_few_detections():
    rng = np.random.default_rng(5)
    image = rng.normal(0, 1, (500, 500)).astype(np.float32)
    cands = detect_difference(image, np.ones_like(image), np.zeros(image.shape, np.int32), 3.0)
    assert len(cands) <= 2


def test_dipole_edge_and_saturation_flags():
    image, var, _, _, _ = _field(n=0)
    shape = image.shape
    s = 4.0 / 2.3548
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]

    def blob(x, y, f):
        return f * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / s**2) / (2 * np.pi * s**2)

    image = image + blob(200, 200, 6000) - blob(203, 200, 6000) + blob(100, 300, 4000) + blob(10, 10, 4000)
    mask = np.zeros(shape, np.int32)
    mask[298:303, 104:106] |= MaskBits.SAT
    cands = detect_difference(image, var, mask, 4.0, config=DetectConfig(edge=25))
    by_pos = {(int(round(r["x"])), int(round(r["y"]))): int(r["flags"]) for r in cands}
    dip = [f for (x, y), f in by_pos.items() if abs(x - 199) <= 2 and abs(y - 200) <= 2]
    assert dip and dip[0] & CandidateFlags.DIPOLE
    sat = [f for (x, y), f in by_pos.items() if abs(x - 100) <= 2 and abs(y - 300) <= 2]
    assert sat and sat[0] & CandidateFlags.SATURATED and not sat[0] & CandidateFlags.DIPOLE
    edge = [f for (x, y), f in by_pos.items() if x < 15 and y < 15]
    assert edge and edge[0] & CandidateFlags.EDGE
    # negative footprints are not reported as candidates
    assert not any(abs(x - 203) <= 1 and abs(y - 200) <= 1 for x, y in by_pos)


def test_background_at_pixels_is_the_frame_there():
    """``estimate_background(..., at=(ix, iy))`` gives the full surface's values at those pixels (a sky sloped
    differently along each axis, plus sources and noise, on a frame whose boxes do not divide it), without making
    the frame."""
    rng = np.random.default_rng(8)
    ny, nx = 700, 530
    yy, xx = np.mgrid[0:ny, 0:nx]
    image = (50 + 0.05 * xx - 0.02 * yy + rng.normal(0, 3, (ny, nx))).astype(np.float32)
    image[rng.integers(0, ny, 300), rng.integers(0, nx, 300)] += 500  # sources the clipping rejects
    mask = np.zeros((ny, nx), np.int32)
    full = estimate_background(image, mask)
    ix, iy = rng.integers(0, nx, 400), rng.integers(0, ny, 400)
    at = estimate_background(image, mask, at=(ix, iy))
    assert at.shape == (400,) and at.dtype == np.float32
    np.testing.assert_allclose(at, full[iy, ix], rtol=1e-6, atol=1e-4)
    assert np.ptp(at) > 20  # the slopes show: swapped or shifted indices would not match


def test_psf_model_photometry_on_moffat_stars(sim_pair):
    """Gaussian fits at the local FWHM, aperture-corrected, give total fluxes of Moffat stars."""
    s, truth = sim_pair.search, sim_pair.truth
    img = s.image - estimate_background(s.image, s.mask)
    model = fit_psf_model(img, s.variance, s.mask, s.fwhm)
    assert model.n_stars >= 5 and model.correction > 1.02  # Moffat wings
    ny, nx = s.shape
    stars = truth[(truth["kind"] == "star") & (truth["snr"] > 50) & (truth["snr"] < 1000)
                  & (truth["x"] > 30) & (truth["x"] < nx - 30) & (truth["y"] > 30) & (truth["y"] < ny - 30)]
    flux, err = model.photometry(img, s.variance, s.mask, stars["x"], stars["y"])
    ratio = flux / stars["flux"]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.03)


def test_direct_detection_finds_transients_and_rejects_static_stars(sim_pair):
    """The brightening cut (``selection="flux"``, the default); every-peak selection: test_detect_direct_selection."""
    s, t, truth = sim_pair.search, sim_pair.template, sim_pair.truth
    cands = detect_direct(s, t, DirectDetectConfig(selection="flux"), ccd="ccd00")
    matched = match_truth(cands, truth)
    tr = truth[(truth["kind"] == "transient") & (truth["snr"] > 20)]
    found = set(np.asarray(matched["truth_id"])[np.asarray(matched["truth_kind"]) == "transient"])
    assert len(tr) >= 3
    assert np.mean([i in found for i in tr["id"]]) >= 0.8
    # static stars rarely pass the brightening test (variable stars are allowed to)
    n_star = (np.asarray(matched["truth_kind"]) == "star").sum()
    n_star_truth = (truth["kind"] == "star").sum()
    assert n_star <= 0.1 * n_star_truth
    assert {"search_flux", "template_flux", "delta_snr"} <= set(cands.colnames)
    assert isinstance(cands, CandidateTable)


def test_detect_config_validation():
    with pytest.raises(ValueError, match="threshold"):
        DetectConfig(threshold=0)


def _flags_at(cands, x, y, radius=1.0):
    """Flags of the one candidate within ``radius`` px of (x, y) (fails if there is none)."""
    d = np.hypot(np.asarray(cands["x"]) - x, np.asarray(cands["y"]) - y)
    assert d.size and d.min() <= radius, f"no candidate within {radius} px of ({x}, {y})"
    return CandidateFlags(int(cands["flags"][int(np.argmin(d))]))


def test_masked_flag_marks_flagged_pixels_in_the_core():
    """MASKED: a flagged pixel (any bit but SAT and EDGE) on the candidate pixel or in its 3x3 core."""
    pos = {"bad_centre": (80, 80), "cr_diagonal": (200, 80), "suspect_3px": (320, 80),
           "sat_centre": (80, 200), "clean": (200, 200)}
    xs, ys = (np.array([p[k] for p in pos.values()], float) for k in (0, 1))
    image, var = render_gaussians((300, 400), xs, ys, np.full(xs.size, 6000.0), 4.0, 10.0, seed=8)  # S/N ~100
    mask = np.zeros(image.shape, np.int32)
    mask[80, 80] = MaskBits.BAD
    mask[81, 201] = MaskBits.CR
    mask[80, 323] = MaskBits.SUSPECT
    mask[200, 80] = MaskBits.SAT
    cands = detect_difference(image, var, mask, 4.0, config=DetectConfig(edge=25))
    flags = {name: _flags_at(cands, *p) for name, p in pos.items()}
    assert flags["bad_centre"] & CandidateFlags.MASKED
    assert flags["cr_diagonal"] & CandidateFlags.MASKED
    assert not flags["suspect_3px"] & CandidateFlags.MASKED
    # saturation has its own flag
    assert flags["sat_centre"] & CandidateFlags.SATURATED and not flags["sat_centre"] & CandidateFlags.MASKED
    assert flags["clean"] == 0


def _psf_matching_field(seed=4, shape=(400, 400), n_stars=160):
    """Search (FWHM 4) and template (FWHM 2.8, so the one convolved) of one star field, with four
    transients of S/N ~100 in the search only at (100|300, 100|300)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    xs, ys = rng.uniform(8, nx - 8, n_stars), rng.uniform(8, ny - 8, n_stars)
    flux = np.exp(rng.uniform(np.log(2e3), np.log(2e5), n_stars))
    trans = np.array([[100.0, 100.0], [300.0, 100.0], [100.0, 300.0], [300.0, 300.0]])
    far = np.min(np.hypot(xs[:, None] - trans[:, 0], ys[:, None] - trans[:, 1]), axis=1) > 20
    xs, ys, flux = xs[far], ys[far], flux[far]
    template, t_var = render_gaussians(shape, xs, ys, flux, 2.8, 8.0, seed=seed + 1)
    search, s_var = render_gaussians(shape, np.r_[xs, trans[:, 0]], np.r_[ys, trans[:, 1]],
                                     np.r_[flux, np.full(len(trans), 6000.0)], 4.0, 8.0, seed=seed + 2)
    return search, s_var, template, t_var, trans


def test_convolved_flag_from_masked_pixels_of_the_convolved_image():
    """dia mode: a bad pixel of the convolved image (the template) reaches the difference through
    the kernel, so a transient a few pixels from it is CONVOLVED (not MASKED); a bad pixel of the
    unconvolved search at the same distance spreads nowhere and flags nothing."""
    search, s_var, template, t_var, trans = _psf_matching_field()
    s_mask = np.zeros(search.shape, np.int32)
    t_mask = np.zeros(search.shape, np.int32)
    t_mask[100, 106] = MaskBits.BAD  # 6 px right of transient (100, 100), in the convolved template
    s_mask[100, 306] = MaskBits.BAD  # 6 px right of transient (300, 100), in the search
    t_mask[300, 100] = MaskBits.BAD  # on transient (100, 300), in the template
    diff = subtract(search, s_var, s_mask, template, t_var, t_mask, search_fwhm=4.0, template_fwhm=2.8)
    assert diff.convolved == "template"
    cands = detect_difference(diff.image, diff.variance, diff.mask, 4.0)
    assert len(cands) == 4  # the stars subtract cleanly, every transient is found
    near_t, near_s, on_t, clean = (_flags_at(cands, x, y) for x, y in trans)
    assert near_t & CandidateFlags.CONVOLVED and not near_t & CandidateFlags.MASKED
    assert near_s == 0
    assert on_t & CandidateFlags.MASKED and on_t & CandidateFlags.CONVOLVED
    assert clean == 0


def test_direct_masked_flag_from_search_and_template_masks(sim_pair):
    """direct mode: MASKED when the search pixel of the candidate is flagged, or the template pixel
    at the same sky position (through the two WCSs: the template is rotated and shifted)."""
    s, t, truth = sim_pair.search, sim_pair.template, sim_pair.truth
    base = match_truth(detect_direct(s, t, DirectDetectConfig()), truth)
    good = base[(np.asarray(base["truth_kind"]) == "transient") & (np.asarray(base["flags"]) == 0)]
    assert len(good) >= 3
    (xa, ya), (xb, yb), (xc, yc) = ((float(r["x"]), float(r["y"])) for r in good[:3])
    s_mask, t_mask = s.mask.copy(), t.mask.copy()
    s_mask[int(round(ya)), int(round(xa))] |= MaskBits.BAD
    tx, ty = t.wcs.world_to_pixel_values(*s.wcs.pixel_to_world_values(xb, yb))
    t_mask[int(round(float(ty))), int(round(float(tx)))] |= MaskBits.BAD
    s_mask[int(round(yc)), int(round(xc)) + 3] |= MaskBits.BAD  # 3 px away: not the candidate's pixel
    cands = detect_direct(dataclasses.replace(s, mask=s_mask), dataclasses.replace(t, mask=t_mask),
                          DirectDetectConfig())
    assert _flags_at(cands, xa, ya) & CandidateFlags.MASKED
    assert _flags_at(cands, xb, yb) & CandidateFlags.MASKED
    assert _flags_at(cands, xc, yc) == 0
