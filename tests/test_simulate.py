"""Tests of the survey simulator against its own ground truth (small CCDs, fixed seeds)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from photutils.aperture import CircularAperture, aperture_photometry
from scipy.optimize import least_squares

from dia.masks import MaskBits
from pipeline.io import read_exposure, read_manifest
from pipeline.simulate import INSTRUMENTS, SimulationConfig, simulate_pair, write_simulation
from pipeline.simulate.artifacts import saturate_and_bleed
from pipeline.simulate.command import main as simulate_main
from pipeline.simulate.command import parse_shape

NO_ARTIFACTS = dict(cosmic_ray_density=0.0, hot_pixel_rate=0.0, bad_column_rate=0.0, satellite_probability=0.0)
BLANK = SimulationConfig(shape=(256, 256), star_density_range=(1e-9, 1e-9), galaxy_density=0.0,
                         transient_density=0.0, variable_fraction=0.0, **NO_ARTIFACTS)


@pytest.fixture(scope="module")
def realistic():
    """Default (DECam) physics on a 512 x 512 CCD with more transients than usual."""
    return simulate_pair(SimulationConfig(shape=(512, 512), transient_density=4.0, cosmic_ray_density=3.0,
                                          hot_pixel_rate=40.0), seed=11, ccd_index=0)


@pytest.fixture(scope="module")
def lonely_transients():
    """Blank sky with hostless transients only."""
    cfg = dataclasses.replace(BLANK, shape=(768, 1024), transient_density=4.0, hostless_fraction=1.0)
    return simulate_pair(cfg, seed=5)


@pytest.fixture(scope="module")
def starfield():
    """Stars only, dense enough for PSF and astrometry measurements."""
    cfg = SimulationConfig(shape=(768, 768), star_density_range=(60.0, 60.0), galaxy_density=0.0,
                           transient_density=0.0, variable_fraction=0.0, **NO_ARTIFACTS)
    return simulate_pair(cfg, seed=3)


# ----------------------------------------------------------------------------- noise


def test_blank_sky_noise_matches_variance_plane():
    pair = simulate_pair(BLANK, seed=2)
    for exp in (pair.search, pair.template):
        inner = exp.image[10:-10, 10:-10]
        var = exp.variance[10:-10, 10:-10]
        assert abs(np.mean(inner) - exp.sky_level) < 5 * np.sqrt(np.mean(var) / inner.size)
        assert np.std(inner) / np.sqrt(np.mean(var)) == pytest.approx(1.0, abs=0.05)
        # expected variance formula: sky / gain + (rn / gain)^2
        assert np.mean(var) == pytest.approx(exp.sky_level / exp.gain + (exp.read_noise / exp.gain) ** 2, rel=1e-3)
    # the template coadd is much less noisy than the search
    assert np.mean(pair.template.variance) < 0.3 * np.mean(pair.search.variance)


def test_depth_calibration_decam():
    """Median DECam search 5-sigma limit ~ r 23.5, template ~ 1-2 mag deeper."""
    m5 = []
    deeper = []
    for seed in range(12):
        meta = simulate_pair(dataclasses.replace(BLANK, shape=(64, 64)), seed=seed).truth.meta
        m5.append(meta["search_m5"])
        deeper.append(meta["template_m5"] - meta["search_m5"])
    assert 23.2 < np.median(m5) < 23.8
    assert 0.8 < np.median(deeper) < 2.2


# ----------------------------------------------------------------------------- photometry and S/N


def test_aperture_photometry_recovers_transient_fluxes(lonely_transients):
    pair = lonely_transients
    exp, truth = pair.search, pair.truth
    tr = truth[truth["kind"] == "transient"]
    assert len(tr) >= 20
    assert np.all(tr["host_id"] == -1)
    # holds the whole rendered stamp (half-width <= 4.9 FWHM, corners included) of transients fainter than 20.5
    r_ap = 7.2 * exp.fwhm
    xy = np.column_stack([tr["x"], tr["y"]])
    dist = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1)) + np.eye(len(tr)) * 1e9
    # no other transient's rendered stamp reaches into the aperture
    meta = pair.truth.meta
    f5 = 10 ** (-0.4 * (meta["search_m5"] - meta["search_zp"]))
    reach = np.sqrt(2) * pair.search_psf.stamp_radius(tr["x"], tr["y"], tr["flux"], f5) + 1
    isolated = np.all(dist > r_ap + reach[None, :], axis=1)
    ny, nx = exp.shape
    keep = ((tr["mag"] > 20.5) & isolated & (tr["x"] > r_ap) & (tr["x"] < nx - r_ap)
            & (tr["y"] > r_ap) & (tr["y"] < ny - r_ap))
    assert keep.sum() >= 6
    ap = CircularAperture(xy[keep], r=r_ap)
    phot = aperture_photometry(exp.image - exp.sky_level, ap, error=np.sqrt(exp.variance))
    pull = (np.asarray(phot["aperture_sum"]) - tr["flux"][keep]) / np.asarray(phot["aperture_sum_err"])
    assert np.all(np.abs(pull) < 4.0), pull
    assert 0.2 < np.mean(pull**2) < 2.5, pull


def test_truth_snr_follows_psf_formula(lonely_transients):
    """Faint blank-sky transients: snr = 5 at the 5-sigma limit, scaling with flux."""
    tr = lonely_transients.truth[lonely_transients.truth["kind"] == "transient"]
    m5 = lonely_transients.truth.meta["search_m5"]
    faint = tr["mag"] > m5 - 1.5
    expected = 5 * 10 ** (-0.4 * (tr["mag"][faint] - m5))
    # PSF varies over the CCD (a few %), source Poisson noise lowers bright-ish S/N slightly
    np.testing.assert_allclose(tr["snr"][faint], expected, rtol=0.12)
    assert tr["snr"].min() < 5 < tr["snr"].max()
    assert tr["mag"].max() > m5 + 0.3  # transients reach below the detection limit


def test_transients_in_search_not_in_template(lonely_transients):
    pair = lonely_transients
    tr = pair.truth[pair.truth["kind"] == "transient"]
    bright = tr[tr["snr"] > 15]
    assert len(bright) >= 3
    xt, yt = pair.template.wcs.world_to_pixel_values(bright["ra"], bright["dec"])
    for row, x_t, y_t in zip(bright, xt, yt):
        r = 2.0 * pair.search.fwhm
        s = aperture_photometry(pair.search.image - pair.search.sky_level, CircularAperture((row["x"], row["y"]), r),
                                error=np.sqrt(pair.search.variance))
        t = aperture_photometry(pair.template.image - pair.template.sky_level, CircularAperture((x_t, y_t), r),
                                error=np.sqrt(pair.template.variance))
        assert s["aperture_sum"][0] > 8 * s["aperture_sum_err"][0]
        assert abs(t["aperture_sum"][0]) < 4 * t["aperture_sum_err"][0]


def test_truth_consistent_with_images(realistic):
    pair, truth = realistic, realistic.truth
    ny, nx = pair.search.shape
    kinds = set(truth["kind"])
    assert {"transient", "star", "galaxy", "cosmic_ray", "hot_pixel"} <= kinds
    # ra/dec and x/y agree through the search WCS
    x, y = pair.search.wcs.world_to_pixel_values(truth["ra"], truth["dec"])
    np.testing.assert_allclose(x, truth["x"], atol=1e-6)
    np.testing.assert_allclose(y, truth["y"], atol=1e-6)
    tr = truth[truth["kind"] == "transient"]
    assert np.all((tr["x"] >= 0) & (tr["x"] <= nx - 1) & (tr["y"] >= 0) & (tr["y"] <= ny - 1))
    assert np.all(tr["image"] == "search") and np.all(tr["dflux"] == tr["flux"])
    # most transients have hosts; host ids point at galaxies near the transient
    hosted = tr[tr["host_id"] >= 0]
    assert 0.5 < len(hosted) / len(tr) < 1.0
    by_id = {int(r["id"]): r for r in truth}
    for row in hosted:
        host = by_id[int(row["host_id"])]
        assert host["kind"] == "galaxy"
        assert np.hypot(row["x"] - host["x"], row["y"] - host["y"]) < 60
    # each bright transient adds its flux to the noiseless search model only
    # cosmic rays: search only, sharp excess over the noiseless model
    cr = truth[truth["kind"] == "cosmic_ray"]
    assert np.all(cr["image"] == "search")
    resid = (pair.search.image - pair.search_model) / np.sqrt(pair.search.variance)
    assert np.all(resid[cr["y"].astype(int), cr["x"].astype(int)] > 3)
    # hot pixels: flagged ones carry BAD, the others do not
    hot = truth[truth["kind"] == "hot_pixel"]
    bad = (pair.search.mask[hot["y"].astype(int), hot["x"].astype(int)] & MaskBits.BAD) != 0
    np.testing.assert_array_equal(bad, hot["flagged"])
    assert hot["flagged"].any() and (~hot["flagged"]).any()
    # units and descriptions
    assert truth["ra"].unit == "deg" and truth["flux"].unit == "adu"
    # saturated pixels are at the saturation level and flagged, edges flagged
    for exp in (pair.search, pair.template):
        sat = (exp.mask & MaskBits.SAT) != 0
        assert np.all(exp.image[sat] == exp.saturation)
        assert np.all(exp.mask[0] & MaskBits.EDGE) and np.all(exp.mask[:, -1] & MaskBits.EDGE)


def test_saturation_spills_along_columns():
    model = np.full((200, 50), 100.0)
    yy, xx = np.mgrid[:200, :50]
    model += 4e7 * np.exp(-0.5 * ((xx - 25) ** 2 + (yy - 100) ** 2) / 2.0**2) / (2 * np.pi * 4)
    flagged, recs = saturate_and_bleed(model, 45000.0)
    assert len(recs) == 1 and recs[0]["kind"] == "bleed"
    col = flagged[:, 25]
    assert col.sum() > (model[:, 25] >= 45000).sum() + 10  # trail extends beyond the core
    rows = np.flatnonzero(col)
    assert rows.min() < 100 < rows.max() and np.all(np.diff(rows) == 1)
    assert not flagged[:, 0].any()


# ----------------------------------------------------------------------------- PSF and astrometry


def _fit_moffat(image, variance, x0, y0, half):
    iy, ix = int(round(y0)), int(round(x0))
    sl = (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
    data, sig = image[sl].astype(float), np.sqrt(variance[sl].astype(float))
    yy, xx = np.mgrid[sl]

    def model(p):
        x, y, f, a, b, c, beta, bkg = p
        dx, dy = xx - x, yy - y
        prof = (1 + a * dx * dx + b * dx * dy + c * dy * dy) ** (-beta)
        return f * prof * (beta - 1) * np.sqrt(max(a * c - b * b / 4, 1e-12)) / np.pi + bkg

    s = 1.0 / 4.0
    p0 = [x0, y0, data.sum() - np.median(data) * data.size, s, 0.0, s, 3.0, np.median(data)]
    res = least_squares(lambda p: ((model(p) - data) / sig).ravel(), p0,
                        bounds=([x0 - 3, y0 - 3, 0, 1e-3, -1, 1e-3, 1.2, -np.inf],
                                [x0 + 3, y0 + 3, np.inf, 5, 1, 5, 10, np.inf]))
    x, y, f, a, b, c, beta, bkg = res.x
    alpha = (a * c - b * b / 4) ** -0.25
    return x, y, 2 * alpha * np.sqrt(2 ** (1 / beta) - 1)


def _bright_isolated_stars(truth, exp, n=15):
    stars = truth[(truth["kind"] == "star")]
    ny, nx = exp.shape
    ok = []
    for row in stars[np.argsort(stars["mag"])]:
        if row["snr"] < 50 or row["flux"] * 0.05 > exp.saturation:
            continue
        others = stars[stars["mag"] < row["mag"] + 4]
        d = np.hypot(others["x"] - row["x"], others["y"] - row["y"])
        if np.sum(d < 6 * exp.fwhm) > 1:
            continue
        if not (60 < row["x"] < nx - 60 and 60 < row["y"] < ny - 60):
            continue
        ok.append(row)
    return ok[:n]


def test_psf_fwhm_matches_header(starfield):
    pair = starfield
    stars = _bright_isolated_stars(pair.truth, pair.search)
    assert len(stars) >= 5
    for exp, key in ((pair.search, "search_fwhm"), (pair.template, "template_fwhm")):
        assert exp.fwhm == pytest.approx(pair.truth.meta[key])
        assert exp.header["SEEING"] == pytest.approx(exp.fwhm * INSTRUMENTS["decam"].pixel_scale, rel=1e-3)
        fw = []
        for row in stars:
            x, y = (row["x"], row["y"]) if exp is pair.search else exp.wcs.world_to_pixel_values(row["ra"], row["dec"])
            half = int(np.ceil(3 * exp.fwhm))
            fw.append(_fit_moffat(exp.image, exp.variance, float(x), float(y), half)[2])
        # pixel integration and PSF variation over the CCD: a few per cent
        assert np.median(fw) == pytest.approx(exp.fwhm, rel=0.06)
    # the two images have different PSFs
    assert pair.search.fwhm != pytest.approx(pair.template.fwhm, rel=0.02)


def test_template_offset_and_rotation_match_truth(starfield):
    pair = starfield
    meta = pair.truth.meta
    stars = _bright_isolated_stars(pair.truth, pair.search, n=20)
    ny, nx = pair.search.shape
    c = np.array([(nx - 1) / 2, (ny - 1) / 2])
    rot = np.radians(meta["template_rotation_deg"])
    R = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    off = np.array([meta["template_offset_x"], meta["template_offset_y"]])
    ps, pt = [], []
    for row in stars:
        xs, ys, _ = _fit_moffat(pair.search.image, pair.search.variance, row["x"], row["y"], 10)
        guess = R @ (np.array([xs, ys]) - c) + c + off  # predicted from the truth meta alone
        xt, yt, _ = _fit_moffat(pair.template.image, pair.template.variance, guess[0], guess[1], 10)
        ps.append((xs, ys))
        pt.append((xt, yt))
        # the truth ra/dec agrees with the template WCS
        wx, wy = pair.template.wcs.world_to_pixel_values(row["ra"], row["dec"])
        assert np.hypot(wx - xt, wy - yt) < 0.1
    ps, pt = np.array(ps), np.array(pt)
    # fit p_t = A p_s + b
    design = np.column_stack([ps, np.ones(len(ps))])
    coef, *_ = np.linalg.lstsq(design, pt, rcond=None)
    A, b = coef[:2].T, coef[2]
    assert np.degrees(np.arctan2(A[1, 0], A[0, 0])) == pytest.approx(meta["template_rotation_deg"], abs=0.02)
    np.testing.assert_allclose(A @ c + b - c, off, atol=0.05)
    assert np.hypot(*off) > 1  # a real offset, resampling needed


# ----------------------------------------------------------------------------- determinism, files, CLI


def test_determinism_and_per_ccd_streams(tmp_path):
    cfg = dataclasses.replace(SimulationConfig(shape=(128, 128)), transient_density=8.0)
    a = simulate_pair(cfg, seed=4, ccd_index=1)
    b = simulate_pair(cfg, seed=4, ccd_index=1)
    c = simulate_pair(cfg, seed=5, ccd_index=1)
    np.testing.assert_array_equal(a.search.image, b.search.image)
    np.testing.assert_array_equal(a.template.mask, b.template.mask)
    assert not np.array_equal(a.search.image, c.search.image)
    # CCD 1 of a 2-CCD run is the same as CCD 1 made alone; files are byte-identical across runs
    m1 = write_simulation(tmp_path / "r1", 2, 4, cfg)
    m2 = write_simulation(tmp_path / "r2", 2, 4, cfg)
    for name in ("ccd01_search.fits", "ccd01_template.fits", "ccd01_truth.ecsv", "manifest.ecsv"):
        assert (m1.parent / name).read_bytes() == (m2.parent / name).read_bytes()
    on_disk = read_exposure(m1.parent / "ccd01_search.fits")
    np.testing.assert_array_equal(on_disk.image, a.search.image)
    truth = Table.read(m1.parent / "ccd01_truth.ecsv")
    np.testing.assert_array_equal(truth["x"], a.truth["x"])
    assert truth.meta["search_m5"] == pytest.approx(a.truth.meta["search_m5"])


def test_written_files_and_manifest(tmp_path):
    cfg = SimulationConfig(shape=(128, 160))
    manifest = write_simulation(tmp_path, 2, 9, cfg)
    table = Table.read(manifest)
    assert table.colnames == ["ccd", "search", "template", "truth"]
    entries = read_manifest(manifest)
    assert [e.ccd for e in entries] == ["ccd00", "ccd01"]
    search, template = entries[1].load()
    assert search.shape == (128, 160)
    for path in (entries[0].search, entries[0].template):
        with fits.open(path) as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "VARIANCE", "MASK"]
            for hdr in (hdul[0].header, hdul["IMAGE"].header):
                for key in ("GAIN", "RDNOISE", "SATURATE", "MAGZERO", "FWHM", "SKYLEVEL", "EXPTIME", "BAND",
                            "INSTRUME", "CCDNAME", "SEEING", "SIMSEED"):
                    assert key in hdr, key
            assert hdul[0].header["INSTRUME"] == "DECam"
    assert template.gain > search.gain  # coadd: GAIN = N x frame gain
    assert template.header["NCOMBINE"] >= 2


def test_instrument_presets():
    for name, preset in INSTRUMENTS.items():
        pair = simulate_pair(SimulationConfig(instrument=name, shape=(96, 96)), seed=1)
        assert pair.search.instrument == preset.name
        assert pair.search.fwhm == pytest.approx(pair.truth.meta["search_seeing"] / preset.pixel_scale)
        scale = np.sqrt(abs(np.linalg.det(pair.search.wcs.pixel_scale_matrix))) * 3600
        assert scale == pytest.approx(preset.pixel_scale, rel=1e-6)
    assert INSTRUMENTS["decam"].shape == (4096, 2048)
    with pytest.raises(ValueError, match="instrument"):
        simulate_pair(SimulationConfig(instrument="hubble"))


def test_cli(tmp_path, capsys):
    import argparse

    cfg_file = tmp_path / "sim.toml"
    cfg_file.write_text("[simulation]\ntransient_density = 10.0\n")
    args = argparse.Namespace(out=str(tmp_path / "out"), ccds=1, seed=2, instrument="ztf", shape=parse_shape("96x128"),
                              config=str(cfg_file))
    assert simulate_main(args) == 0
    line = capsys.readouterr().out.strip()
    assert "1 ztf CCD pair" in line and "transients" in line
    search = read_exposure(tmp_path / "out" / "ccd00_search.fits")
    assert search.shape == (96, 128) and search.instrument == "ZTF"
    with pytest.raises(Exception, match="NYxNX"):
        parse_shape("12by3")
