"""Tests of pipeline.io: FITS round trip, the survey layouts, bad inputs, manifests."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from dia.masks import MaskBits
from pipeline.io import InputError, read_exposure, read_manifest, write_exposure
from pipeline.simulate import SimulationConfig, simulate_pair


@pytest.fixture(scope="module")
def pair():
    return simulate_pair(SimulationConfig(shape=(96, 128), hot_pixel_rate=200.0), seed=21)


def _wcs_header(shape=(96, 128)):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cd = [[-0.263 / 3600, 0], [0, 0.263 / 3600]]
    return w.to_header()


def test_round_trip(pair, tmp_path):
    exp = pair.search
    path = write_exposure(exp, tmp_path / "s.fits")
    back = read_exposure(path)
    np.testing.assert_array_equal(back.image, exp.image)
    np.testing.assert_array_equal(back.variance, exp.variance)
    np.testing.assert_array_equal(back.mask, exp.mask)
    for attr in ("fwhm", "gain", "read_noise", "saturation", "zero_point", "exptime", "sky_level"):
        assert getattr(back, attr) == pytest.approx(getattr(exp, attr)), attr
    assert (back.band, back.instrument, back.ccd) == (exp.band, exp.instrument, exp.ccd)
    assert back.header["SEEING"] == exp.header["SEEING"]
    x, y = 17.3, 60.9
    assert back.wcs.pixel_to_world(x, y).separation(exp.wcs.pixel_to_world(x, y)).arcsec < 1e-6
    assert (back.mask & MaskBits.BAD).any()  # flagged hot pixels survive
    # no temporary file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.fits"]


def test_bare_image_variance_from_gain_and_read_noise(pair, tmp_path):
    exp = pair.template  # coadd: GAIN and RDNOISE describe its noise exactly
    hdr = _wcs_header()
    hdr["GAIN"], hdr["RDNOISE"], hdr["SATURATE"] = exp.gain, exp.read_noise, exp.saturation
    image = exp.image.copy()
    image[5, 7] = exp.saturation + 10
    fits.PrimaryHDU(image, header=hdr).writeto(tmp_path / "bare.fits")
    back = read_exposure(tmp_path / "bare.fits")
    assert back.gain == pytest.approx(exp.gain) and back.read_noise == pytest.approx(exp.read_noise)
    sky = np.median(back.variance)
    assert sky == pytest.approx(np.median(exp.variance), rel=0.1)
    assert back.mask[5, 7] & MaskBits.SAT


def test_decam_separate_files_with_amplifier_keywords(pair, tmp_path):
    exp = pair.search
    hdr = _wcs_header()
    hdr["GAINA"], hdr["GAINB"] = 3.9, 4.1
    hdr["RDNOISEA"], hdr["RDNOISEB"] = 6.8, 7.2
    hdr["SATURATA"], hdr["SATURATB"] = 44000.0, 46000.0
    hdr["EXTNAME"] = "S7"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(exp.image, header=hdr)]).writeto(tmp_path / "c4d_ooi.fits")
    dq = np.zeros(exp.shape, np.int16)
    dq[10, 10] = 1
    dq[20, 30] = 8
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(dq, name="S7")]).writeto(tmp_path / "c4d_ood.fits")
    weight = (1.0 / exp.variance).astype(np.float32)
    weight[40, 40] = 0.0
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(weight, name="S7")]).writeto(tmp_path / "c4d_oow.fits")
    back = read_exposure(tmp_path / "c4d_ooi.fits", hdu="S7", mask_path=tmp_path / "c4d_ood.fits",
                         weight_path=tmp_path / "c4d_oow.fits")
    assert back.gain == pytest.approx(4.0) and back.read_noise == pytest.approx(7.0)
    assert 44000 <= back.saturation <= 46000
    assert back.mask[10, 10] & MaskBits.BAD and back.mask[20, 30] & MaskBits.BAD
    assert back.mask[40, 40] & MaskBits.NO_DATA
    good = back.mask == 0
    np.testing.assert_allclose(back.variance[good], exp.variance[good], rtol=1e-5)


# ----------------------------------------------------------------------------- bad inputs


def test_unreadable_file(tmp_path):
    path = tmp_path / "garbage.fits"
    path.write_bytes(b"this is not a FITS file" * 100)
    with pytest.raises(InputError, match="garbage.fits"):
        read_exposure(path)
    with pytest.raises(InputError, match="does not exist"):
        read_exposure(tmp_path / "absent.fits")


def test_missing_hdu(pair, tmp_path):
    path = write_exposure(pair.search, tmp_path / "s.fits")
    with pytest.raises(InputError, match=r"s\.fits.*'NOPE'"):
        read_exposure(path, hdu="NOPE")
    with pytest.raises(InputError, match=r"s\.fits: HDU 7 not found"):  # an index past the last HDU
        read_exposure(path, hdu=7)
    with pytest.raises(InputError, match=r"no_mask\.fits: mask file does not exist"):
        read_exposure(path, mask_path=tmp_path / "no_mask.fits")
    # a separate mask file that lacks the requested CCD extension
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(pair.search.image, header=_wcs_header(), name="S7")]).writeto(
        tmp_path / "img.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros(pair.search.shape, np.int16), name="N4")]).writeto(
        tmp_path / "dq.fits")
    with pytest.raises(InputError, match=r"dq\.fits: HDU 'S7' not found \(mask\)"):
        read_exposure(tmp_path / "img.fits", hdu="S7", mask_path=tmp_path / "dq.fits")


def test_no_celestial_wcs(tmp_path):
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((32, 32), np.float32), name="IMAGE")]).writeto(
        tmp_path / "nowcs.fits")
    with pytest.raises(InputError, match=r"nowcs\.fits\[IMAGE\].*celestial WCS"):
        read_exposure(tmp_path / "nowcs.fits")


def test_all_nan_image(tmp_path):
    data = np.full((32, 32), np.nan, np.float32)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header=_wcs_header((32, 32)), name="IMAGE")]).writeto(
        tmp_path / "nan.fits")
    with pytest.raises(InputError, match=r"nan\.fits\[IMAGE\].*NaN"):
        read_exposure(tmp_path / "nan.fits")


def test_shapes_that_disagree(tmp_path):
    hdr = _wcs_header((32, 32))
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((32, 32), np.float32), header=hdr, name="IMAGE"),
                         fits.ImageHDU(np.ones((32, 31), np.float32), name="VARIANCE")])
    hdul.writeto(tmp_path / "shape.fits")
    with pytest.raises(InputError, match=r"shape\.fits\[VARIANCE\].*shape"):
        read_exposure(tmp_path / "shape.fits")
    fits.PrimaryHDU(np.ones((32, 32), np.float32), header=hdr).writeto(tmp_path / "img.fits")
    fits.PrimaryHDU(np.zeros((16, 32), np.int16)).writeto(tmp_path / "msk.fits")
    with pytest.raises(InputError, match=r"msk\.fits\[PRIMARY\].*mask plane has shape"):
        read_exposure(tmp_path / "img.fits", mask_path=tmp_path / "msk.fits")


# ----------------------------------------------------------------------------- manifests


def test_read_manifest(pair, tmp_path):
    write_exposure(pair.search, tmp_path / "a_s.fits")
    write_exposure(pair.template, tmp_path / "a_t.fits")
    sub = tmp_path / "raw"
    sub.mkdir()
    fits.PrimaryHDU(pair.search.image, header=_wcs_header()).writeto(sub / "b_s.fits")
    fits.PrimaryHDU(pair.template.image, header=_wcs_header()).writeto(sub / "b_t.fits")
    fits.PrimaryHDU(np.zeros(pair.search.shape, np.int16)).writeto(sub / "b_s_mask.fits")
    table = Table({"ccd": ["a", "b"], "search": ["a_s.fits", "raw/b_s.fits"], "template": ["a_t.fits", "raw/b_t.fits"],
                   "truth": ["", ""], "search_mask": ["", "raw/b_s_mask.fits"]})
    table.write(tmp_path / "manifest.ecsv", format="ascii.ecsv")
    entries = read_manifest(tmp_path / "manifest.ecsv")
    assert [e.ccd for e in entries] == ["a", "b"]
    assert entries[0].search == tmp_path / "a_s.fits" and entries[0].truth is None
    assert entries[1].search_mask == sub / "b_s_mask.fits" and entries[0].search_mask is None
    s, t = entries[0].load()
    np.testing.assert_array_equal(s.image, pair.search.image)
    assert t.zero_point == pytest.approx(pair.template.zero_point)
    s2, _ = entries[1].load()
    assert s2.ccd == "b"
    # bad manifests
    Table({"ccd": ["a"], "search": ["x.fits"]}).write(tmp_path / "bad.ecsv", format="ascii.ecsv")
    with pytest.raises(InputError, match="template"):
        read_manifest(tmp_path / "bad.ecsv")
    Table({"ccd": ["a", "a"], "search": ["x", "y"], "template": ["x", "y"]}).write(tmp_path / "dup.ecsv",
                                                                                 format="ascii.ecsv")
    with pytest.raises(InputError, match="unique"):
        read_manifest(tmp_path / "dup.ecsv")
    with pytest.raises(InputError, match="does not exist"):
        read_manifest(tmp_path / "none.ecsv")
