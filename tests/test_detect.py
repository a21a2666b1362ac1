"""Candidate detection: matched-filter S/N, photometry against injected fluxes, flags, direct mode."""

import numpy as np
import pytest
from scipy.spatial import cKDTree

from conftest import render_gaussians
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
    blob = lambda x, y, f: f * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / s**2) / (2 * np.pi * s**2)
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
    s, t, truth = sim_pair.search, sim_pair.template, sim_pair.truth
    cands = detect_direct(s, t, DirectDetectConfig(), ccd="ccd00")
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
