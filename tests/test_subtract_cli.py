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
    entry_pair, _ = steps.mask_cosmics(entry_pair, RunConfig())  # the run's load stage masks cosmic rays
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


# ----------------------------------------------------------------------------- separate mask/weight/variance files
# (issue #11 item 1): HOTPANTS's -imi/-tmi and -ini/-tni.  A small pair is written as
# foreign multi-extension files (SCI, WHT, DQ: any non-zero DQ value is a bad pixel), then
# split into one file per plane; both layouts must give the same difference.

SMALL = (384, 384)
#: A crowded small field and a spatially constant kernel: enough stars on 384 x 384 pixels
#: with part of them masked, whatever the full-CCD defaults of the kernel fit.
SMALL_FIELD = {"shape": SMALL, "star_density_range": (40.0, 40.0)}
SMALL_FIT = "[psf_match]\nspatial_order = 0\nbackground_order = 0\nmin_stars = 4\n"


def _write_foreign(exposure, folder, stem, rng):
    """Write ``stem.fits`` (SCI, WHT, DQ) and its planes as ``stem_{sci,wht,dq,var}.fits``; return the DQ plane."""
    write_exposure(exposure, folder / f"{stem}_tmp.fits")
    header = fits.getheader(folder / f"{stem}_tmp.fits", "IMAGE")  # metadata and WCS
    (folder / f"{stem}_tmp.fits").unlink()
    dq = (exposure.mask != 0).astype(np.int16)
    ny, nx = exposure.shape
    dq[rng.integers(0, ny, 20), rng.integers(0, nx, 20)] = 4  # scattered bad pixels
    dq[:, nx // 3] = 1  # a bad column
    weight = (1.0 / exposure.variance).astype(np.float32)
    image = np.asarray(exposure.image, np.float32)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, header=header, name="SCI"),
                  fits.ImageHDU(weight, name="WHT"), fits.ImageHDU(dq, name="DQ")]).writeto(folder / f"{stem}.fits")
    fits.PrimaryHDU(image, header=header).writeto(folder / f"{stem}_sci.fits")
    fits.PrimaryHDU(weight).writeto(folder / f"{stem}_wht.fits")
    fits.PrimaryHDU(dq).writeto(folder / f"{stem}_dq.fits")
    # float64 1/weight rounds to the float32 that read_exposure makes of the weight: the same variance
    fits.PrimaryHDU(1.0 / weight.astype(np.float64)).writeto(folder / f"{stem}_var.fits")
    return dq


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Search and template (the template sharper: it is convolved) as MEFs and as separate planes."""
    cfg = dataclasses.replace(SimulationConfig(), **SMALL_FIELD)
    sim = simulate_pair(cfg, seed=7, ccd_index=0)
    folder = tmp_path_factory.mktemp("foreign")
    (folder / "fit.toml").write_text(SMALL_FIT)
    rng = np.random.default_rng(11)
    dq = {name: _write_foreign(getattr(sim, name), folder, name, rng) for name in ("search", "template")}
    return folder, dq


def _run(folder, out, *extra, config=None):
    code = cli(["subtract", *extra, "--out", str(folder / out), "--config", str(config or folder / "fit.toml")])
    assert code == 0
    with fits.open(folder / out) as hdul:
        return {n: np.asarray(hdul[n].data) for n in ("IMAGE", "VARIANCE", "MASK")}, hdul["IMAGE"].header.copy()


def _planes(folder, image, noise="wht"):
    option = "weight" if noise == "wht" else "variance"
    return [str(folder / f"{image}_sci.fits"), f"--{image}-mask", str(folder / f"{image}_dq.fits"),
            f"--{image}-{option}", str(folder / f"{image}_{noise}.fits")]


@pytest.fixture(scope="module")
def from_mef(foreign):
    folder, _ = foreign
    return _run(folder, "mef.fits", str(folder / "search.fits"), str(folder / "template.fits"))


@pytest.fixture(scope="module")
def from_planes(foreign):
    folder, _ = foreign
    search, *s_opts = _planes(folder, "search")
    template, *t_opts = _planes(folder, "template")
    return _run(folder, "planes.fits", search, template, *s_opts, *t_opts)


def test_separate_planes_give_the_multi_extension_difference(from_mef, from_planes):
    (mef, mef_hdr), (planes, planes_hdr) = from_mef, from_planes
    assert mef_hdr["CONVOLV"] == planes_hdr["CONVOLV"] == "template"
    for name in ("IMAGE", "VARIANCE", "MASK"):
        np.testing.assert_array_equal(planes[name], mef[name], err_msg=name)
    assert planes_hdr["HIERARCH DIA FIT USED"] == mef_hdr["HIERARCH DIA FIT USED"] > 0


def test_mask_file_bad_pixels_are_masked_in_the_difference(foreign, from_planes):
    from dia.masks import MaskBits

    folder, dq = foreign
    (planes, _) = from_planes
    mask = planes["MASK"]
    bad = dq["search"] != 0
    assert bad.sum() > SMALL[0]
    assert np.all(mask[bad] & int(MaskBits.BAD)), "every bad search pixel is BAD in the difference"
    assert np.mean(mask == 0) > 0.5  # and not everything
    # the template's mask file: without it, its bad column (resampled, grown by the kernel) is not masked
    search, *s_opts = _planes(folder, "search")
    no_template_mask, _ = _run(folder, "no_tmask.fits", search, str(folder / "template_sci.fits"), *s_opts,
                               "--template-weight", str(folder / "template_wht.fits"))
    extra = (mask != 0) & (no_template_mask["MASK"] == 0)
    assert extra.sum() > 0.8 * SMALL[0], extra.sum()
    assert np.all(no_template_mask["MASK"][mask == 0] == 0)  # the template mask only adds


def test_variance_files_give_the_weight_file_difference(foreign, from_planes):
    folder, _ = foreign
    search, *s_opts = _planes(folder, "search", "var")
    template, *t_opts = _planes(folder, "template", "var")
    via_variance, _ = _run(folder, "var.fits", search, template, *s_opts, *t_opts)
    for name in ("IMAGE", "VARIANCE", "MASK"):
        np.testing.assert_array_equal(via_variance[name], from_planes[0][name], err_msg=name)


def test_variance_of_a_weight_file_is_its_inverse(foreign, tmp_path):
    """The weight really is read as an inverse variance: doubling it halves the difference's variance
    where the (unconvolved) search dominates."""
    folder, _ = foreign
    weight = fits.getdata(folder / "search_wht.fits")
    fits.PrimaryHDU(4.0 * weight).writeto(tmp_path / "w4.fits")
    config = folder / "fit.toml"
    base, _ = _run(tmp_path, "a.fits", str(folder / "search_sci.fits"), str(folder / "template_sci.fits"),
                   "--search-weight", str(folder / "search_wht.fits"), config=config)
    quarter, _ = _run(tmp_path, "b.fits", str(folder / "search_sci.fits"), str(folder / "template_sci.fits"),
                      "--search-weight", str(tmp_path / "w4.fits"), config=config)
    good = (base["MASK"] == 0) & (quarter["MASK"] == 0)
    ratio = np.median(quarter["VARIANCE"][good] / base["VARIANCE"][good])
    assert 0.25 < ratio < 0.6, ratio  # search 1/4, the convolved template's share unchanged


# ----------------------------------------------------------------------------- FWHM overrides


@pytest.fixture(scope="module")
def equal_seeing(tmp_path_factory):
    """A pair of equal seeing (either image can be convolved), with FWHM keywords in the headers."""
    cfg = dataclasses.replace(SimulationConfig(), **SMALL_FIELD, template_seeing_factor=1.0)
    sim = simulate_pair(cfg, seed=7, ccd_index=0)
    folder = tmp_path_factory.mktemp("equal")
    (folder / "fit.toml").write_text(SMALL_FIT)
    write_exposure(sim.search, folder / "search.fits")
    write_exposure(sim.template, folder / "template.fits")
    return sim, folder


@pytest.mark.parametrize(("s_fwhm", "t_fwhm", "convolved"), [(2.5, 3.5, "search"), (3.5, 2.5, "template")])
def test_fwhm_overrides_choose_the_convolved_image_and_reach_the_header(equal_seeing, capsys, s_fwhm, t_fwhm,
                                                                        convolved):
    sim, folder = equal_seeing
    assert abs(sim.search.fwhm - sim.template.fwhm) < 0.2 * sim.search.fwhm
    _, hdr = _run(folder, f"d{convolved}.fits", str(folder / "search.fits"), str(folder / "template.fits"),
                  "--search-fwhm", str(s_fwhm), "--template-fwhm", str(t_fwhm))
    out = capsys.readouterr().out
    assert hdr["CONVOLV"] == convolved  # the narrower PSF is convolved
    assert hdr["SFWHM"] == s_fwhm and hdr["FWHM"] == s_fwhm
    assert hdr["TFWHM"] == pytest.approx(t_fwhm, rel=1e-3)  # same pixel scale
    assert hdr["CONVFWHM"] == pytest.approx(min(s_fwhm, t_fwhm), rel=1e-3)
    assert hdr["SFWHMSRC"] == f"--search-fwhm {s_fwhm:g} (FWHM {sim.search.fwhm:g} px not used)"
    assert hdr["TFWHMSRC"] == f"--template-fwhm {t_fwhm:g} (FWHM {sim.template.fwhm:g} px not used)"
    assert f"convolved the {convolved}" in out and f"FWHM search {s_fwhm:.2f} px [--search-fwhm" in out


def test_without_overrides_the_header_fwhm_is_used_and_recorded(equal_seeing):
    sim, folder = equal_seeing
    _, hdr = _run(folder, "plain.fits", str(folder / "search.fits"), str(folder / "template.fits"))
    assert hdr["SFWHM"] == pytest.approx(sim.search.fwhm, rel=1e-6)
    assert hdr["SFWHMSRC"] == hdr["TFWHMSRC"] == "FWHM"  # the keyword it was read from


@pytest.mark.parametrize("value", ["0", "-2", "nan", "inf", "wide"])
def test_fwhm_override_must_be_a_positive_number(equal_seeing, tmp_path, capsys, value):
    _, folder = equal_seeing
    with pytest.raises(SystemExit) as exc:
        cli(["subtract", str(folder / "search.fits"), str(folder / "template.fits"), "--out", str(tmp_path / "d.fits"),
             "--template-fwhm", value])
    assert exc.value.code == 2
    assert f"argument --template-fwhm: must be a positive number of pixels, got '{value}'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors: one line, option and file


def _error(args, capsys):
    assert cli(["subtract", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_files_are_named_with_their_option(foreign, tmp_path, capsys):
    folder, _ = foreign
    base = [str(folder / "search_sci.fits"), str(folder / "template_sci.fits"), "--out", str(tmp_path / "d.fits")]
    for option in ("--search-mask", "--search-weight", "--search-variance", "--template-mask", "--template-weight",
                   "--template-variance"):
        err = _error(base + [option, str(tmp_path / "nope.fits")], capsys)
        assert err == f"pipeline subtract: {option}: {tmp_path / 'nope.fits'}: no such file"
    err = _error([str(tmp_path / "nope.fits")] + base[1:], capsys)
    assert err == f"pipeline subtract: SEARCH: {tmp_path / 'nope.fits'}: no such file"
    assert not (tmp_path / "d.fits").exists()


def test_plane_of_another_shape_is_named_with_its_option(foreign, tmp_path, capsys):
    folder, _ = foreign
    fits.PrimaryHDU(np.zeros((100, 120), np.int16)).writeto(tmp_path / "small.fits")
    base = [str(folder / "search_sci.fits"), str(folder / "template_sci.fits"), "--out", str(tmp_path / "d.fits")]
    for option, role in (("--search-mask", "mask"), ("--template-weight", "weight"),
                         ("--template-variance", "variance")):
        err = _error(base + [option, str(tmp_path / "small.fits")], capsys)
        assert err.startswith(f"pipeline subtract: {option}: {tmp_path / 'small.fits'}[")
        assert f"{role} plane has shape (100, 120), image has {SMALL}" in err


def test_unreadable_hdu_and_file_are_named_with_their_option(foreign, tmp_path, capsys):
    folder, _ = foreign
    base = [str(folder / "search.fits"), str(folder / "template.fits"), "--out", str(tmp_path / "d.fits")]
    # --search-hdu SCI is also looked for in the mask file, which has only a primary HDU
    err = _error(base + ["--search-hdu", "SCI", "--search-mask", str(folder / "search_dq.fits")], capsys)
    assert err.startswith(f"pipeline subtract: --search-mask: {folder / 'search_dq.fits'}: HDU 'SCI' not found (mask)")
    err = _error(base + ["--template-hdu", "NOPE"], capsys)
    assert err.startswith(f"pipeline subtract: TEMPLATE: {folder / 'template.fits'}: HDU 'NOPE' not found (image)")
    err = _error(base + ["--search-hdu", "WHT"], capsys)  # the weight is an image, but has no WCS
    assert err.startswith(f"pipeline subtract: SEARCH: {folder / 'search.fits'}[WHT]: no celestial WCS")
    (tmp_path / "junk.fits").write_text("not a FITS file")
    err = _error(base + ["--template-mask", str(tmp_path / "junk.fits")], capsys)
    assert err.startswith(f"pipeline subtract: --template-mask: {tmp_path / 'junk.fits'}: cannot read mask file")


def test_weight_and_variance_of_one_image_are_refused(foreign, tmp_path, capsys):
    folder, _ = foreign
    with pytest.raises(SystemExit) as exc:
        cli(["subtract", str(folder / "search_sci.fits"), str(folder / "template_sci.fits"), "--out",
             str(tmp_path / "d.fits"), "--search-weight", str(folder / "search_wht.fits"),
             "--search-variance", str(folder / "search_var.fits")])
    assert exc.value.code == 2
    assert "argument --search-variance: not allowed with argument --search-weight" in capsys.readouterr().err
    assert not (tmp_path / "d.fits").exists()


def test_subtract_corrects_and_reports_a_template_off_its_wcs(swapped, through_cli, tmp_path, capsys):
    """A template whose WCS reference pixel is 0.4 px off (its stars 0.4 px from where the WCS puts them): the
    command measures the shift, corrects the WCS (align.registration_refine), says so and writes it in the header;
    the exact simulated WCS is measured and left alone."""
    sim, folder = swapped
    template = read_exposure(folder / "template.fits")
    wrong = template.wcs.deepcopy()
    wrong.wcs.crpix = wrong.wcs.crpix - np.array([0.4, -0.3])
    wrong.wcs.set()
    write_exposure(dataclasses.replace(template, wcs=wrong), tmp_path / "template_off.fits")
    capsys.readouterr()
    out = tmp_path / "diff_off.fits"
    assert cli(["subtract", str(folder / "search.fits"), str(tmp_path / "template_off.fits"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the template's WCS was shifted by (+0.4" in printed and "align.registration_refine" in printed
    with fits.open(out) as hdul:
        header = next(h.header for h in hdul if "REGSHFTX" in h.header)
    assert header["REGAPPLD"] is True and header["REGNSTAR"] >= 3
    assert header["REGSHFTX"] == pytest.approx(0.4, abs=0.08) and header["REGSHFTY"] == pytest.approx(-0.3, abs=0.08)
    with fits.open(through_cli) as hdul:
        exact = next(h.header for h in hdul if "REGSHFTX" in h.header)
    assert exact["REGAPPLD"] is False and abs(exact["REGSHFTX"]) < 0.05 and abs(exact["REGSHFTY"]) < 0.05
